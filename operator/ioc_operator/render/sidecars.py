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


def readiness(port: int) -> dict[str, Any]:
    return {"tcpSocket": {"port": port}, "periodSeconds": 10, "failureThreshold": 3}


def ports(prefix: str, tcp: int, udp: int) -> list[dict[str, Any]]:
    return [
        {"name": f"{prefix}-tcp", "containerPort": tcp, "protocol": "TCP"},
        {"name": f"{prefix}-udp", "containerPort": udp, "protocol": "UDP"},
    ]
