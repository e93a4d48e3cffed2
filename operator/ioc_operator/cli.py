"""The `ioc-operator` command: run the operator, render IOCs offline, print the CRD."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from ioc_operator.metrics import port_arg
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.crd import crd_yaml
from ioc_operator.model.errors import IOCValidationError

from . import GROUP, KIND, VERSION


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the gateway config) as literal blocks, like kubectl. No
    anchors and aliases (`&id001` / `*id001` where the renderer shares an object, e.g.
    the sidecars' POD_IP env entry): GitOps tools and people read plain YAML."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump_all(objects: Sequence[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=100)


def read_iocs(paths: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """IOC documents from files ('-' is stdin); other kinds are ignored."""
    for name in paths:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise IOCValidationError(name, f"not valid YAML: {exc}") from None
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == KIND and str(doc.get("apiVersion", "")).startswith(GROUP):
                yield name, doc


def cmd_render(args: argparse.Namespace) -> int:
    from ioc_operator.allocation.plan import render_all
    from ioc_operator.model.validation import parse_ioc

    docs = list(read_iocs(args.filename))
    if not docs:
        print(f"error: no {KIND} ({GROUP}) documents in {', '.join(args.filename)}",
              file=sys.stderr)
        return 2
    iocs = []
    for source, doc in docs:
        meta = doc.setdefault("metadata", {})
        meta.setdefault("namespace", args.namespace)
        try:
            iocs.append(parse_ioc(doc))
        except IOCValidationError as exc:
            raise IOCValidationError(
                exc.field, f"{exc.message} (IOC {meta.get('name', '?')} in {source})") from None
    objects = [obj for r in render_all(iocs, OperatorConfig.from_env()) for obj in r.objects]
    sys.stdout.write(dump_all(objects))
    return 0


def _print_env(data: dict[str, str], fmt: str) -> None:
    from ioc_operator.discovery.directory import PHOEBUS_KEY, phoebus_settings

    if fmt == "phoebus":
        sys.stdout.write(data.get(PHOEBUS_KEY) or phoebus_settings(data))
        return
    for key in sorted(k for k in data if k.startswith("EPICS_")):
        value = data[key].replace("'", "'\\''")
        print(f"export {key}='{value}'" if fmt == "shell" else f"{key}={data[key]}")


def _name_service_arg(text: str) -> Any:
    """ADDR, or ADDR:CA_PORT[:PVA_PORT[:PVA_UDP_PORT]]."""
    from ioc_operator.discovery.clientenv import NameService

    address, *ports = text.split(":")
    try:
        numbers = [int(p) for p in ports]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: ports must be numbers") from None
    if not address or len(numbers) > 3 or not all(0 < p < 65536 for p in numbers):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ADDR[:CA_PORT[:PVA_PORT[:PVA_UDP_PORT]]]")
    return NameService(address, *numbers)


def cmd_client_env(args: argparse.Namespace) -> int:
    if args.name_service is not None:
        # The constant directory for a name service: nothing to read from the cluster.
        from ioc_operator.discovery.clientenv import name_service_env

        _print_env(name_service_env(args.name_service), args.format)
        return 0

    from kubernetes import config as k8s_config

    from ioc_operator.controller.kube import Kube, client

    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    namespace = args.namespace
    if not namespace:
        try:
            _, current = k8s_config.list_kube_config_contexts()
            namespace = current.get("context", {}).get("namespace") or "default"
        except (k8s_config.ConfigException, OSError):
            namespace = "default"
    kube = Kube(client())
    if args.per_ioc:
        # Every IOC's own settings merged, as the directory holds them without a name
        # service: for sites that want the per-IOC lists while the directory is constant.
        from ioc_operator.discovery.directory import directory_env

        iocs = kube.list(f"{GROUP}/{VERSION}", KIND, namespace)
        envs = [(i.get("status") or {}).get("clientEnv") or {} for i in iocs]
        envs = [e for e in envs if e]
        if not envs:
            print(f"error: no IOC with client settings in namespace {namespace}",
                  file=sys.stderr)
            return 1
        _print_env(directory_env(envs), args.format)
        return 0
    config = OperatorConfig.from_env()
    name = config.directory_name + ("-cluster" if args.cluster else "")
    cm = kube.get("v1", "ConfigMap", namespace, name)
    if cm is None:
        print(f"error: no client directory {name} in namespace {namespace} "
              "(no IOCs there yet, or the operator is not running)", file=sys.stderr)
        return 1
    _print_env(cm.get("data") or {}, args.format)
    return 0


def cmd_crd(_: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    import kopf

    from ioc_operator.controller import handlers  # noqa: F401  (registers the handlers)
    from ioc_operator.metrics import CollectorRegistry, MetricsServer

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The metrics endpoint opens before kopf starts (a port taken fails at once); the
    # Operator (handlers.startup) puts its metrics in this registry.
    registry = CollectorRegistry() if args.metrics_port else None
    server = (MetricsServer(registry, args.metrics_port, args.metrics_address)
              if registry is not None else None)
    if server is not None:
        logging.getLogger("ioc_operator").info("serving metrics on %s:%d/metrics",
                                               args.metrics_address, server.port)
    try:
        kopf.run(
            standalone=True,  # one replica with a Recreate strategy: no peering needed
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(metrics_registry=registry),
        )
    finally:
        if server is not None:
            server.stop()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ioc-operator",
        description="Kubernetes operator for EPICS IOCs (CA and PVA without broadcast).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator against the current cluster")
    run.add_argument("-n", "--namespace", action="append",
                     help="watch this namespace (repeatable; default: all namespaces)")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster or $KUBECONFIG)")
    run.add_argument("--liveness", metavar="URL",
                     help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--metrics-port", type=port_arg, default=0, metavar="PORT",
                     help="serve Prometheus metrics on this port (docs/metrics.md); "
                          "0, the default: none")
    run.add_argument("--metrics-address", default="0.0.0.0", metavar="ADDR",
                     help="address of the metrics endpoint (default 0.0.0.0)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_run)

    render = sub.add_parser("render", help="print the objects the operator would create")
    render.add_argument("-f", "--filename", action="append", required=True,
                        help="IOC manifest file, '-' for stdin (repeatable)")
    render.add_argument("-n", "--namespace", default="default",
                        help="namespace for IOCs that name none (default: default)")
    render.set_defaults(func=cmd_render)

    env = sub.add_parser("client-env",
                         help="print the EPICS client settings that reach every IOC: the "
                              "namespace's directory (the name service's address when the "
                              "operator has one), or --per-ioc, or --name-service")
    env.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    env.add_argument("--cluster", action="store_true",
                     help="the cluster-wide directory (IOC_OPERATOR_CLUSTER_DIRECTORY_NAMESPACE)")
    env.add_argument("--format", choices=["shell", "env", "phoebus"], default="shell",
                     help="shell: export lines (default); env: KEY=VALUE; phoebus: settings.ini")
    env.add_argument("--kubeconfig", help="kubeconfig file")
    source = env.add_mutually_exclusive_group()
    source.add_argument("--per-ioc", action="store_true",
                        help="every IOC's own addresses merged (the directory without a "
                             "name service), from the IOCs' status")
    source.add_argument("--name-service", type=_name_service_arg,
                        metavar="ADDR[:CA[:PVA[:PVAUDP]]]",
                        help="the constant settings for a name service at ADDR (offline)")
    env.set_defaults(func=cmd_client_env)

    crd = sub.add_parser("crd", help="print the IOC CustomResourceDefinition")
    crd.set_defaults(func=cmd_crd)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except IOCValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
