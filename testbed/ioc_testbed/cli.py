"""The `ioc-testbed` command: the demo, and the test bed's parts one at a time."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.kubeconfig, Path(args.examples))


def cmd_cluster(args: argparse.Namespace) -> int:
    """Start a real cluster, print how to reach it, keep it until Ctrl-C or SIGTERM."""
    import signal
    import time

    from .cluster import Cluster

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    cluster = Cluster(args.nodes, context=Path(args.context))
    try:
        cluster.start()
        print(f"cluster up in {cluster.timings['start']:.0f} s: "
              f"{', '.join(n.name for n in cluster.nodes)}", flush=True)
        print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
        if args.kubeconfig_link:
            link = Path(args.kubeconfig_link)
            link.unlink(missing_ok=True)
            link.symlink_to(cluster.kubeconfig)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        problems = cluster.stop()
        left = cluster.residue()
        print(f"cluster stopped in {cluster.timings.get('stop', 0):.0f} s"
              + (f"; problems: {problems}" if problems else "")
              + (f"; left behind: {left}" if left else "; nothing left behind"), flush=True)
    return 0


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
    cluster = sub.add_parser(
        "cluster", help="start a real cluster (control plane, nodes, the project's images) "
        "and keep it until Ctrl-C; root only")
    cluster.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    cluster.add_argument("--context", default=".",
                         help="repository root: docker/*.Dockerfile are built from it")
    cluster.add_argument("--kubeconfig-link", help="also symlink the admin kubeconfig here")
    cluster.set_defaults(func=cmd_cluster)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
