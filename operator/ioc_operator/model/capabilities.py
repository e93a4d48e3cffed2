"""What each EPICS server implementation can answer, as measured on a broadcast-less lab.

See docs/support-matrix.md. Everything the renderer decides about discovery
(which NAME_SERVERS entries to publish, when a gateway is needed) reads from here.
"""

from __future__ import annotations

from ioc_operator.model.ioc import CAImplementation, IOCSpec, NetworkMode, PVAImplementation

# CA servers that answer a search sent over a TCP circuit (EPICS_CA_NAME_SERVERS).
# caproto's circuit rejects libca's TCP search frame; rsrv and pcas answer it
# (docs/lab.md, re-measured; tests/lab pins it).
CA_TCP_SEARCH = {CAImplementation.RSRV: True, CAImplementation.CAPROTO: False,
                 CAImplementation.PCAS: True}

# PVA servers that answer a search on a TCP connection (EPICS_PVA_NAME_SERVERS):
# PVXS does; classic pvAccessCPP replies over UDP to port 0.
PVA_TCP_SEARCH = {PVAImplementation.PVXS: True, PVAImplementation.CLASSIC: False}


def ca_name_server(spec: IOCSpec) -> bool:
    """Whether clients may list this IOC in EPICS_CA_NAME_SERVERS. In sidecar mode the
    CA gateway answers in front of whatever the IOC runs (both gateways answer TCP
    searches: ioc-ca-gateway by design, the C++ ca-gateway as a pcas server)."""
    if spec.runs_ca_gateway:
        return True
    return spec.servers.ca.enabled and CA_TCP_SEARCH[spec.servers.ca.implementation]


def pva_name_server(spec: IOCSpec) -> bool:
    """Whether clients may list this IOC in EPICS_PVA_NAME_SERVERS.

    In sidecar mode pvagw or the CA-to-PVA bridge (both PVXS servers) answer in front
    of whatever the IOC runs.
    """
    if not spec.serves_pva:
        return False
    if spec.network.mode == NetworkMode.SIDECAR:
        return True
    return PVA_TCP_SEARCH[spec.servers.pva.implementation]
