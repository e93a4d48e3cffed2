"""The IOC's singleton workload: a StatefulSet of one replica.

A StatefulSet never runs two pods of one identity at once (a rolling update deletes
the old pod before creating the new one), which is what an IOC needs: two copies
would serve the same PVs, and in host mode would fight for the same ports.
"""

from __future__ import annotations

from typing import Any

from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.ioc import IOC, CAImplementation, NetworkMode

from . import bridge, cagw, health, instance, names, pvagw
from .ports import ResolvedPorts

# The IOC container's default securityContext: a soft IOC needs no capability (its
# ports are above 1024). What real IOCs add: SYS_NICE for EPICS' real-time thread
# priorities (without it they run at normal priority), IPC_LOCK to lock memory, and
# device access (a device plugin or privileged) for hardware; spec.securityContext.
IOC_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
# Container names the operator gives; spec.initContainers/extraContainers may not.
OPERATOR_CONTAINERS = ("ioc", "pvagw", "cagw", "bridge")


def server_env(ioc: IOC, ports: ResolvedPorts) -> list[dict[str, Any]]:
    """EPICS server variables that put the IOC on the ports clients are told about."""
    spec = ioc.spec
    env: list[dict[str, Any]] = []
    if spec.servers.ca.enabled:
        ca_port = ports.ca
        if spec.runs_ca_gateway:  # the gateway serves the pod IP; the IOC moves to loopback
            ca_port = spec.ca_gateway.internal_port
            env.append({"name": "EPICS_CAS_INTF_ADDR_LIST", "value": "127.0.0.1"})
        env.append({"name": "EPICS_CAS_SERVER_PORT", "value": str(ca_port)})
        if spec.servers.ca.implementation == CAImplementation.CAPROTO:
            # caproto reads only EPICS_CA_SERVER_PORT. rsrv and pcas read the CAS name,
            # and EPICS_CA_SERVER_PORT would also move their own CA client's searches.
            env.append({"name": "EPICS_CA_SERVER_PORT", "value": str(ca_port)})
    if spec.servers.pva.enabled:
        if spec.runs_pvagw:
            gw = spec.pva_gateway
            env += [
                {"name": "EPICS_PVAS_INTF_ADDR_LIST", "value": "127.0.0.1"},
                {"name": "EPICS_PVAS_SERVER_PORT", "value": str(gw.internal_server_port)},
                {"name": "EPICS_PVAS_BROADCAST_PORT", "value": str(gw.internal_broadcast_port)},
            ]
        else:
            env += [
                {"name": "EPICS_PVAS_SERVER_PORT", "value": str(ports.pva_server)},
                {"name": "EPICS_PVAS_BROADCAST_PORT", "value": str(ports.pva_broadcast)},
            ]
    return env


def container_ports(ioc: IOC, ports: ResolvedPorts) -> list[dict[str, Any]]:
    """Declared ports. In host mode hostPort == containerPort, which also makes the
    scheduler refuse to put two IOCs that need the same port on one node."""
    spec = ioc.spec
    out: list[dict[str, Any]] = []
    if spec.servers.ca.enabled and not spec.runs_ca_gateway:
        out += [
            {"name": "ca-tcp", "containerPort": ports.ca, "protocol": "TCP"},
            {"name": "ca-udp", "containerPort": ports.ca, "protocol": "UDP"},
        ]
    if spec.servers.pva.enabled and spec.network.mode != NetworkMode.SIDECAR:
        out += [
            {"name": "pva-tcp", "containerPort": ports.pva_server, "protocol": "TCP"},
            {"name": "pva-udp", "containerPort": ports.pva_broadcast, "protocol": "UDP"},
        ]
    if spec.network.mode == NetworkMode.HOST:
        for port in out:
            port["hostPort"] = port["containerPort"]
    return out


def probed_port(ioc: IOC, ports: ResolvedPorts) -> int | None:
    """Ready once the server listens where clients are told to go. rsrv and pvxs move
    to a random TCP port when theirs is taken; this catches that."""
    spec = ioc.spec
    if spec.servers.ca.enabled and not spec.runs_ca_gateway:
        return ports.ca
    if spec.servers.pva.enabled and not spec.runs_pvagw:
        return ports.pva_server
    return None  # the IOC's servers are on loopback; the gateways' probes cover them


def ioc_container(ioc: IOC, ports: ResolvedPorts, config: OperatorConfig) -> dict[str, Any]:
    spec = ioc.spec
    env = server_env(ioc, ports) + [e.model_dump(by_alias=True, exclude_none=True)
                                    for e in spec.env]
    container: dict[str, Any] = {"name": "ioc", "image": spec.image}
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    if spec.command:
        container["command"] = list(spec.command)
    if spec.args:
        container["args"] = list(spec.args)
    if spec.working_dir:
        container["workingDir"] = spec.working_dir
    container["env"] = env
    if spec.inject_client_env:
        # optional: the directory appears once the first IOC of the namespace is seen.
        container["envFrom"] = [
            {"configMapRef": {"name": config.directory_name, "optional": True}}
        ]
    container["ports"] = container_ports(ioc, ports)
    resources = spec.resources.model_dump(exclude_defaults=True)
    if resources:
        container["resources"] = resources
    container.update(health.probes(ioc, ports, probed_port(ioc, ports)))
    container["securityContext"] = {**IOC_SECURITY_CONTEXT, **(spec.security_context or {})}
    mounts = [dict(m) for m in spec.volume_mounts] + instance.mounts(ioc)
    if spec.autosave.enabled:
        mounts.append({"name": "autosave", "mountPath": spec.autosave.mount_path})
    if mounts:
        container["volumeMounts"] = mounts
    if spec.console:
        container["stdin"] = True
        container["tty"] = True
    return container


def pod_spec(ioc: IOC, ports: ResolvedPorts, config: OperatorConfig) -> dict[str, Any]:
    spec = ioc.spec
    sched = spec.scheduling
    host = spec.network.mode == NetworkMode.HOST
    pod: dict[str, Any] = {
        "containers": [ioc_container(ioc, ports, config)],
        # Service links would put every Service of the namespace into every IOC's env.
        "enableServiceLinks": False,
        # The pause container is PID 1, not the IOC: a PID 1 without a SIGTERM handler
        # (a soft IOC, python, pvagw) ignores SIGTERM, so every stop took the whole grace
        # period (measured on the real node: 11 s per delete or rollout, now ~1 s).
        "shareProcessNamespace": True,
        "terminationGracePeriodSeconds": 10,
    }
    if host:
        pod["hostNetwork"] = True
        pod["dnsPolicy"] = "ClusterFirstWithHostNet"
    if spec.init_containers:
        pod["initContainers"] = [dict(c) for c in spec.init_containers]
    if spec.pod_security_context:
        pod["securityContext"] = dict(spec.pod_security_context)
    volumes = [dict(v) for v in spec.volumes] + instance.volumes(ioc)
    if spec.autosave.enabled:
        volumes.append(
            {
                "name": "autosave",
                "persistentVolumeClaim": {"claimName": names.autosave_claim_name(ioc)},
            }
        )
    if spec.runs_pvagw:
        pod["containers"].append(pvagw.container(ioc, ports, config))
        volumes += pvagw.volumes(ioc)
    if spec.runs_ca_gateway:
        pod["containers"].append(cagw.container(ioc, ports, config))
        volumes += cagw.volumes(ioc)
    if spec.runs_bridge:
        pod["containers"].append(bridge.container(ioc, ports, config))
    pod["containers"] += [dict(c) for c in spec.extra_containers]
    if volumes:
        pod["volumes"] = volumes
    if sched.node_name:
        pod["nodeName"] = sched.node_name
    if sched.node_selector:
        pod["nodeSelector"] = dict(sched.node_selector)
    if sched.affinity:
        pod["affinity"] = dict(sched.affinity)
    if sched.tolerations:
        pod["tolerations"] = [dict(t) for t in sched.tolerations]
    if sched.priority_class_name:
        pod["priorityClassName"] = sched.priority_class_name
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    return pod


def stateful_set(
    ioc: IOC, ports: ResolvedPorts, config: OperatorConfig, config_hash: str | None,
    files_hash: str | None = None,
) -> dict[str, Any]:
    spec = ioc.spec
    template_labels = {**spec.pod_labels, **names.labels(ioc, "ioc")}
    annotations = dict(spec.pod_annotations)
    if config_hash:
        # A changed gateway config must restart the pod: the hash rolls the template.
        annotations[names.CONFIG_HASH_ANNOTATION] = config_hash
    if files_hash:
        annotations[names.FILES_HASH_ANNOTATION] = files_hash
    template_meta: dict[str, Any] = {"labels": template_labels}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": names.metadata(ioc, names.workload_name(ioc), "ioc"),
        "spec": {
            "replicas": 0 if spec.suspend else 1,
            "serviceName": names.service_name(ioc),
            # Parallel: a fixed spec replaces a crash-looping pod at once. OrderedReady
            # waits for the broken pod to be Ready before it rolls it, so it never does
            # (the StatefulSet controller's known stuck rollout).
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": names.selector(ioc)},
            "template": {"metadata": template_meta, "spec": pod_spec(ioc, ports, config)},
        },
    }
