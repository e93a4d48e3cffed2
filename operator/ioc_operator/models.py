"""The IOC custom resource: the one pydantic model the CRD schema is generated from.

Field descriptions become `kubectl explain` text; `x-kubernetes-validations` (CEL)
rules attached here are enforced by the API server; the model validators repeat
them so offline `ioc-operator render` rejects the same manifests with the same words.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic.alias_generators import to_camel

# EPICS record names allow these characters; a prefix is a record-name prefix.
PREFIX_PATTERN = r"^[A-Za-z0-9_:\-\[\]<>;.{}$]+$"
PORT = Annotated[StrictInt, Field(ge=1024, le=65535)]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class Model(BaseModel):
    """Base: camelCase on the wire, unknown fields are an error (typos must not pass)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class FreeForm(dict[str, Any]):
    """Marker for Kubernetes objects passed through verbatim (affinity, volumes, ...)."""


def free_object(description: str) -> Any:
    return Field(
        default=None,
        description=description,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
    )


def free_list(description: str) -> Any:
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra={
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        },
    )


class NetworkMode(StrEnum):
    HOST = "host"
    POD = "pod"
    SIDECAR = "sidecar"


class CAImplementation(StrEnum):
    RSRV = "rsrv"
    CAPROTO = "caproto"
    PCAS = "pcas"


class PVAImplementation(StrEnum):
    PVXS = "pvxs"
    CLASSIC = "classic"


class EnvVar(Model):
    """An environment variable, as in a Kubernetes container."""

    name: str = Field(min_length=1, description="Variable name.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: dict[str, Any] | None = free_object(
        "Source for the value (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef)."
    )


QUANTITY = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}


class Resources(Model):
    """Compute resources of the IOC container."""

    requests: dict[str, int | str] = Field(
        default_factory=dict,
        description="Minimum resources, e.g. {cpu: 100m, memory: 128Mi}.",
        json_schema_extra={"additionalProperties": QUANTITY},
    )
    limits: dict[str, int | str] = Field(
        default_factory=dict,
        description="Maximum resources, e.g. {memory: 256Mi}.",
        json_schema_extra={"additionalProperties": QUANTITY},
    )


class CAServer(Model):
    """The IOC's Channel Access server."""

    enabled: StrictBool = Field(default=True, description="The IOC serves Channel Access.")
    implementation: CAImplementation = Field(
        default=CAImplementation.RSRV,
        description=(
            "Which CA server the IOC runs. rsrv: an EPICS Base IOC (softIoc, "
            "epicscorelibs/pvxslibs IOCs, pythonSoftIOC), answers UDP and TCP name-server "
            "searches. caproto: a caproto server, answers UDP searches only (in sidecar mode "
            "the CA gateway answers name-server searches for it). pcas: the portable CA "
            "server (pcaspy), answers UDP and TCP searches; it aborts without a "
            "broadcast-capable interface, so it needs network.mode host or sidecar."
        ),
    )


class PVAServer(Model):
    """The IOC's PV Access server."""

    enabled: StrictBool = Field(default=True, description="The IOC serves PV Access.")
    implementation: PVAImplementation = Field(
        default=PVAImplementation.PVXS,
        description=(
            "Which PVA server the IOC runs. pvxs: QSRV2, p4p, pythonSoftIOC, pvxslibs IOCs; "
            "answers UDP and TCP name-server searches. classic: QSRV1 (pvAccessCPP), pvaPy; "
            "answers UDP searches only, so EPICS_PVA_NAME_SERVERS reaches it only through "
            "the sidecar gateway."
        ),
    )


class Servers(Model):
    """Which EPICS servers the IOC process runs."""

    ca: CAServer = Field(default_factory=CAServer, description="Channel Access server.")
    pva: PVAServer = Field(default_factory=PVAServer, description="PV Access server.")


class Ports(Model):
    """Explicit ports. In host mode they are the node ports the IOC binds; in pod mode
    the ports on the pod IP and the Service; in sidecar mode the pod-IP ports of CA and
    of the gateway. Unset ports take the EPICS defaults (host mode: allocated)."""

    ca: PORT | None = Field(default=None, description="CA server port, TCP and UDP (5064).")
    pva_server: PORT | None = Field(default=None, description="PVA server TCP port (5075).")
    pva_broadcast: PORT | None = Field(
        default=None, description="PVA search UDP port (5076)."
    )


class Network(Model):
    """How the IOC is reached on a cluster network without broadcast."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.allowedNamespaces) || self.mode != 'host'",
                    "allowedNamespaces needs network.mode pod or sidecar: NetworkPolicies "
                    "do not apply to host-network pods",
                ),
                cel(
                    "!has(self.ports) || !has(self.ports.pvaServer) || "
                    "!has(self.ports.pvaBroadcast) || "
                    "self.ports.pvaServer != self.ports.pvaBroadcast",
                    "ports.pvaServer and ports.pvaBroadcast must differ",
                ),
            ]
        }
    )

    mode: NetworkMode = Field(
        default=NetworkMode.POD,
        description=(
            "host: the IOC uses the node's network with its own ports, so several IOCs "
            "share a node. pod: the IOC serves on its pod IP behind a Service with a stable "
            "ClusterIP. sidecar: like pod, but a pvagw sidecar serves PVA on the pod IP and "
            "the IOC's own PVA server is moved to loopback (for PVA servers that cannot "
            "answer name-server searches)."
        ),
    )
    ports: Ports = Field(default_factory=Ports, description="Explicit ports.")
    allowed_namespaces: list[Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]] | None = (
        Field(
            default=None,
            min_length=1,
            description=(
                "Pod and sidecar modes: render a NetworkPolicy that admits the IOC's EPICS "
                "ports only from these namespaces (include the IOC's own, and the "
                "operator's for reachability probes). Unset: no policy."
            ),
        )
    )
    require_name_servers: StrictBool = Field(
        default=False,
        description=(
            "Refuse to run unless every protocol the IOC serves is reachable through "
            "EPICS_CA_NAME_SERVERS / EPICS_PVA_NAME_SERVERS (TCP search), for sites whose "
            "clients use no address lists."
        ),
    )


class PVAGateway(Model):
    """The pvagw sidecar used in sidecar mode."""

    image: str | None = Field(
        default=None, description="Image with p4p's pvagw (default: the operator's setting)."
    )
    read_only: StrictBool = Field(default=False, description="Refuse PVA puts through the gateway.")
    status_prefix: str | None = Field(
        default=None,
        pattern=PREFIX_PATTERN,
        description="Prefix of the gateway's status PVs (default: <prefix>PVAGW:).",
    )
    internal_server_port: PORT = Field(
        default=15075, description="Loopback TCP port the IOC's PVA server is moved to."
    )
    internal_broadcast_port: PORT = Field(
        default=15076, description="Loopback UDP port the IOC's PVA search is moved to."
    )
    resources: Resources = Field(default_factory=Resources, description="Sidecar resources.")


class CAGatewayImplementation(StrEnum):
    BUILTIN = "builtin"
    CA_GATEWAY = "ca-gateway"


class CAGateway(Model):
    """The CA gateway sidecar used in sidecar mode: the IOC's CA server moves to loopback
    and the gateway serves the pod IP, answering UDP and name-server (TCP) searches."""

    enabled: StrictBool = Field(
        default=True,
        description=(
            "Front the IOC's CA server with the gateway. false: the IOC's own CA server "
            "serves the pod IP (as in pod mode)."
        ),
    )
    implementation: CAGatewayImplementation = Field(
        default=CAGatewayImplementation.BUILTIN,
        description=(
            "builtin: this project's caproto-based ioc-ca-gateway (in the gateway image). "
            "ca-gateway: EPICS' C++ ca-gateway, run from `image` with the same ports, "
            "pvlist and access file."
        ),
    )
    image: str | None = Field(
        default=None,
        description=(
            "Gateway image (default: the operator's gateway image for builtin; required "
            "for ca-gateway unless the operator sets a default)."
        ),
    )
    command: list[str] = Field(
        default_factory=list,
        description="ca-gateway only: the gateway executable, e.g. [/epics/ca-gateway/bin/"
        "linux-x86_64/gateway] (default: [gateway]).",
    )
    read_only: StrictBool = Field(default=False, description="Refuse CA puts through the gateway.")
    internal_port: PORT = Field(
        default=15064, description="Loopback TCP and UDP port the IOC's CA server is moved to."
    )
    pvlist: str | None = Field(
        default=None,
        description=(
            "ca-gateway pvlist text: `EVALUATION ORDER ALLOW, DENY` and `<regex> ALLOW|DENY` "
            "lines (the builtin gateway understands this subset). Default: every PV."
        ),
    )
    access: str | None = Field(
        default=None,
        description="ca-gateway only: an access security file (ASG rules).",
    )
    inactive_timeout_seconds: StrictInt = Field(
        default=60, ge=1, le=86400,
        description="Drop upstream channels no client has used for this long.",
    )
    resources: Resources = Field(default_factory=Resources, description="Sidecar resources.")


class CAPVABridge(Model):
    """A PVA server in front of a CA-only IOC: each PV of the IOC, found over CA on
    loopback, served as a Normative Type (docs/ca-pva-bridge.md)."""

    enabled: StrictBool = Field(
        default=False,
        description="Run the bridge (for IOCs that serve CA only: servers.pva.enabled false).",
    )
    image: str | None = Field(
        default=None, description="Bridge image (default: the operator's gateway image)."
    )
    read_only: StrictBool = Field(default=False, description="Refuse PVA puts through the bridge.")
    resources: Resources = Field(default_factory=Resources, description="Sidecar resources.")


class Gateways(Model):
    """Sidecar gateways (sidecar mode only)."""

    pva: PVAGateway = Field(default_factory=PVAGateway, description="The PVA gateway.")
    ca: CAGateway = Field(default_factory=CAGateway, description="The CA gateway.")
    bridge: CAPVABridge = Field(
        default_factory=CAPVABridge, description="The CA-to-PVA bridge."
    )


class Autosave(Model):
    """A persistent volume for autosave files; it outlives the IOC."""

    enabled: StrictBool = Field(default=False, description="Create and mount the autosave volume.")
    size: str = Field(
        default="1Gi",
        pattern=r"^(0\.[0-9]*[1-9][0-9]*|[1-9][0-9]*(\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        description="Requested size (more than zero), e.g. 100Mi.",
    )
    storage_class_name: str | None = Field(default=None, description="Storage class.")
    mount_path: str = Field(
        default="/autosave", pattern=r"^/", description="Where the IOC sees the volume."
    )


class Probe(Model):
    """A PV the operator reads to check the IOC is reachable as clients see it."""

    pv: str | None = Field(
        default=None,
        pattern=PREFIX_PATTERN,
        description="PV name to read (default: none, reachability is not checked).",
    )
    period_seconds: StrictInt = Field(default=30, ge=5, le=3600, description="Check period.")


class Scheduling(Model):
    """Where the IOC pod may run."""

    node_name: str | None = Field(default=None, description="Pin the IOC to this node.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels.")
    affinity: dict[str, Any] | None = free_object("Pod affinity rules (Kubernetes Affinity).")
    tolerations: list[dict[str, Any]] = free_list("Tolerations (Kubernetes Toleration).")
    priority_class_name: str | None = Field(default=None, description="Priority class.")


class IOCSpec(Model):
    """Desired state of one EPICS IOC."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.gateways) || self.network.mode == 'sidecar'",
                    "gateways may only be set when network.mode is sidecar",
                    ".gateways",
                ),
                cel(
                    "self.servers.ca.enabled || self.servers.pva.enabled",
                    "an IOC must serve CA or PVA: enable servers.ca or servers.pva",
                    ".servers",
                ),
                cel(
                    "!has(self.gateways) || !has(self.gateways.bridge) || "
                    "!self.gateways.bridge.enabled || !self.servers.pva.enabled",
                    "the CA-to-PVA bridge is for IOCs without a PVA server: disable "
                    "servers.pva or the bridge",
                    ".gateways.bridge.enabled",
                ),
            ]
        }
    )

    image: str = Field(min_length=1, description="Container image that runs the IOC.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Names of Secrets to pull the image with."
    )
    command: list[str] = Field(default_factory=list, description="Entrypoint override.")
    args: list[str] = Field(default_factory=list, description="Arguments, e.g. st.cmd.")
    working_dir: str | None = Field(default=None, description="Working directory.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment.")
    resources: Resources = Field(default_factory=Resources, description="IOC resources.")
    prefix: str = Field(
        pattern=PREFIX_PATTERN,
        max_length=60,
        description="PV name prefix of the IOC's records, e.g. 'BL01:MOT:'.",
    )
    description: str | None = Field(default=None, description="What this IOC controls.")
    servers: Servers = Field(default_factory=Servers, description="EPICS servers it runs.")
    network: Network = Field(default_factory=Network, description="Network mode and ports.")
    gateways: Gateways | None = Field(default=None, description="Sidecar gateway settings.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Placement.")
    autosave: Autosave = Field(default_factory=Autosave, description="Autosave volume.")
    volumes: list[dict[str, Any]] = free_list("Extra pod volumes (Kubernetes Volume).")
    volume_mounts: list[dict[str, Any]] = free_list(
        "Extra IOC container mounts (Kubernetes VolumeMount)."
    )
    probe: Probe = Field(default_factory=Probe, description="Reachability probe.")
    inject_client_env: StrictBool = Field(
        default=False,
        description=(
            "Load the namespace's EPICS client directory into the IOC with envFrom, so "
            "its CA/PVA links reach the other IOCs."
        ),
    )
    suspend: StrictBool = Field(
        default=False, description="Stop the IOC (0 replicas) without deleting anything."
    )
    console: StrictBool = Field(
        default=True,
        description="Keep stdin and a TTY open so `kubectl attach -it` reaches the IOC shell.",
    )
    service_account_name: str | None = Field(default=None, description="Pod service account.")
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra pod annotations."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> IOCSpec:
        # Same rules as the CEL above, so offline render says what the API server says.
        if self.gateways is not None and self.network.mode != NetworkMode.SIDECAR:
            raise ValueError("gateways may only be set when network.mode is sidecar")
        if not (self.servers.ca.enabled or self.servers.pva.enabled):
            raise ValueError("an IOC must serve CA or PVA: enable servers.ca or servers.pva")
        if self.gateways is not None and self.gateways.bridge.enabled and self.servers.pva.enabled:
            raise ValueError(
                "the CA-to-PVA bridge is for IOCs without a PVA server: disable servers.pva "
                "or the bridge"
            )
        if self.network.allowed_namespaces is not None and self.network.mode == NetworkMode.HOST:
            raise ValueError(
                "allowedNamespaces needs network.mode pod or sidecar: NetworkPolicies do not "
                "apply to host-network pods"
            )
        ports = self.network.ports
        if ports.pva_server is not None and ports.pva_server == ports.pva_broadcast:
            raise ValueError("ports.pvaServer and ports.pvaBroadcast must differ")
        if not re.fullmatch(PREFIX_PATTERN, self.prefix):
            raise ValueError("prefix has characters EPICS record names cannot hold")
        return self

    @property
    def pva_gateway(self) -> PVAGateway:
        return (self.gateways or Gateways()).pva

    @property
    def ca_gateway(self) -> CAGateway:
        return (self.gateways or Gateways()).ca

    @property
    def bridge(self) -> CAPVABridge:
        return (self.gateways or Gateways()).bridge

    @property
    def runs_pvagw(self) -> bool:
        return self.network.mode == NetworkMode.SIDECAR and self.servers.pva.enabled

    @property
    def runs_ca_gateway(self) -> bool:
        return (self.network.mode == NetworkMode.SIDECAR and self.servers.ca.enabled
                and self.ca_gateway.enabled)

    @property
    def runs_bridge(self) -> bool:
        return self.network.mode == NetworkMode.SIDECAR and self.bridge.enabled

    @property
    def serves_pva(self) -> bool:
        """PVA on the pod's address: the IOC's own server (through pvagw) or the bridge."""
        return self.servers.pva.enabled or self.runs_bridge


class Condition(Model):
    """A Kubernetes-style status condition."""

    type: str
    status: str = Field(json_schema_extra={"enum": ["True", "False", "Unknown"]})
    reason: str
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = None


class Endpoints(Model):
    """Where clients reach the IOC, as host:port."""

    ca: str | None = Field(default=None, description="CA endpoint (UDP search and TCP).")
    pva: str | None = Field(default=None, description="PVA endpoint (TCP server port).")


class IOCStatus(Model):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = Field(default=None, description="Last handled spec.")
    mode: str | None = Field(default=None, description="Network mode in effect.")
    node: str | None = Field(default=None, description="Node the IOC runs on.")
    endpoints: Endpoints | None = Field(default=None, description="Client endpoints.")
    ports: dict[str, int] | None = Field(default=None, description="Ports in effect.")
    client_env: dict[str, str] | None = Field(
        default=None, description="EPICS client settings that reach this IOC."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")


class IOCMeta(Model):
    """The metadata the renderer needs; kept apart so rendering stays pure."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(pattern=DNS_LABEL, max_length=52)
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class IOC(BaseModel):
    """A whole IOC object: metadata plus spec."""

    model_config = ConfigDict(frozen=True)

    metadata: IOCMeta
    spec: IOCSpec
