"""The `ioc-testbed` command: the demo, and the test bed's parts one at a time."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.kubeconfig, Path(args.examples))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ioc-testbed",
        description="Test bed of ioc-operator: control plane, nodes, images, lab, demo.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run the examples on a throwaway cluster and read and write their PVs "
        "with only the published settings")
    demo.add_argument("--kubeconfig",
                      help="use this cluster instead of a throwaway one (no network lab)")
    demo.add_argument("--examples", default="examples",
                      help="directory of IOC manifests (default: ./examples)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
