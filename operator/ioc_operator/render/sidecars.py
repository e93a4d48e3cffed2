"""Shared parts of the sidecar containers: the pod IP and a locked-down security context."""

from __future__ import annotations

from typing import Any

# Kubernetes expands $(POD_IP) in command and args from the container's env.
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
POD_IP = "$(POD_IP)"

SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


# Ready within about a second of the server listening: the kubelet runs the readiness
# probe at once when the startup probe succeeds (measured on the real node: 2.1-2.6 s
# from apply to Ready, against 11 s with a 10 s readiness period alone, whose first try
# comes before the server listens). The readiness probe stays at 10 s: pvxs logs every
# probe's connection reset. The startup probe gives up (restarting the container) only
# after an hour without a listening port, so a slow IOC is not killed.
STARTUP_PERIOD_S = 1
STARTUP_GIVE_UP_S = 3600


def probes(port: int) -> dict[str, dict[str, Any]]:
    """readinessProbe and startupProbe of a container serving TCP `port`."""
    tcp = {"tcpSocket": {"port": port}}
    return {
        "readinessProbe": {**tcp, "periodSeconds": 10, "failureThreshold": 3},
        "startupProbe": {**tcp, "periodSeconds": STARTUP_PERIOD_S,
                         "failureThreshold": STARTUP_GIVE_UP_S // STARTUP_PERIOD_S},
    }


def ports(prefix: str, tcp: int, udp: int) -> list[dict[str, Any]]:
    return [
        {"name": f"{prefix}-tcp", "containerPort": tcp, "protocol": "TCP"},
        {"name": f"{prefix}-udp", "containerPort": udp, "protocol": "UDP"},
    ]


def metrics_port(name: str, port: int | None) -> list[dict[str, Any]]:
    """A sidecar's Prometheus port, named for a PodMonitor; none when unset."""
    return [{"name": name, "containerPort": port, "protocol": "TCP"}] if port else []
