"""Probes of the IOC container: when it has started, when it is ready, when it hangs.

Without spec.health.pv the kubelet connects to the IOC's TCP port (host and pod modes;
in sidecar mode the IOC serves loopback, which kubelet TCP probes do not reach, and the
gateways' probes stand in). A TCP probe cannot tell a hung IOC: the kernel completes the
handshake for a stopped process. With a heartbeat PV the probe reads it from inside the
container over loopback, in every mode, so a hung IOC fails it and is restarted.
"""

from __future__ import annotations

import math
from typing import Any

from ioc_operator.model.ioc import IOC

from .ports import ResolvedPorts

# The startup probe of a TCP port is cheap, so it runs every second: Ready within about
# a second of the server listening (measured on the real node: 2.1-2.6 s from apply to
# Ready, against 11 s with a 10 s readiness period alone). An exec probe starts a
# process, so it runs every 2 s.
TCP_STARTUP_PERIOD_S = 1
EXEC_STARTUP_PERIOD_S = 2
# Client settings that could send the probe's search elsewhere (the namespace's
# directory, when spec.injectClientEnv loads it into the container) are cleared.
CLEARED = ("EPICS_CA_NAME_SERVERS=", "EPICS_PVA_NAME_SERVERS=")


def heartbeat_command(ioc: IOC, ports: ResolvedPorts) -> list[str]:
    """The exec probe: `command pv`, searching only the IOC's own server on loopback."""
    spec = ioc.spec
    health = spec.health
    assert health.pv is not None
    wait = str(max(1, health.timeout_seconds - 1))
    if spec.servers.ca.enabled:
        port = spec.ca_gateway.internal_port if spec.runs_ca_gateway else ports.ca
        settings = [f"EPICS_CA_ADDR_LIST=127.0.0.1:{port}", "EPICS_CA_AUTO_ADDR_LIST=NO"]
        default = ["caget", "-w", wait]
    else:
        port = (spec.pva_gateway.internal_broadcast_port if spec.runs_pvagw
                else ports.pva_broadcast)
        settings = [f"EPICS_PVA_ADDR_LIST=127.0.0.1:{port}", "EPICS_PVA_AUTO_ADDR_LIST=NO"]
        default = ["pvget", "-w", wait]
    # env(1) is in every image with a shell userland, and an exec probe has no env field.
    return ["env", *settings, *CLEARED, *(health.command or default), health.pv]


def probes(ioc: IOC, ports: ResolvedPorts, tcp_port: int | None) -> dict[str, Any]:
    """startupProbe, readinessProbe and livenessProbe of the IOC container. `tcp_port`:
    where the IOC serves clients directly (None: on loopback only)."""
    health = ioc.spec.health
    if health.pv:
        action: dict[str, Any] = {"exec": {"command": heartbeat_command(ioc, ports)},
                                  "timeoutSeconds": health.timeout_seconds}
        startup_period = EXEC_STARTUP_PERIOD_S
    elif tcp_port is not None:
        action = {"tcpSocket": {"port": tcp_port}, "timeoutSeconds": health.timeout_seconds}
        startup_period = TCP_STARTUP_PERIOD_S
    else:
        return {}
    out = {
        "startupProbe": {**action, "periodSeconds": startup_period,
                         "failureThreshold": math.ceil(health.startup_seconds / startup_period)},
        # The readiness probe stays at 10 s by default: pvxs logs each probe's reset.
        "readinessProbe": {**action, "periodSeconds": health.period_seconds,
                           "failureThreshold": 2},
    }
    if health.restart_after_seconds:
        out["livenessProbe"] = {
            **action, "periodSeconds": health.period_seconds,
            "failureThreshold": max(1, math.ceil(
                health.restart_after_seconds / health.period_seconds))}
    return out
