"""The IOC custom resource: the one pydantic model the CRD schema is generated from.

Field descriptions become `kubectl explain` text: each says what the field does and
its default. The cross-field rules come from one table (rules.py): the CEL rules the
API server enforces and the validator that makes offline `ioc-operator render` refuse
the same manifests with the same words. Every string, list and map has a size limit,
so the API server refuses oversized input at apply, naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from ioc_operator.model import rules
from ioc_operator.model.enums import (
    CAGatewayImplementation,
    CAImplementation,
    NetworkMode,
    PVAImplementation,
)

# EPICS record names allow these characters; a prefix is a record-name prefix.
PREFIX_PATTERN = r"^[A-Za-z0-9_:\-\[\]<>;.{}$]+$"
PORT = Annotated[StrictInt, Field(ge=1024, le=65535)]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Size limits. Generous for real IOCs; together (free-form Kubernetes objects aside) an
# IOC at every limit stays under 1 MiB, so it always fits the API server and etcd
# (1.5 MiB per object), with room for metadata and status.
NAME_MAX = 52  # metadata.name: see NAME_RULE
PREFIX_MAX = 60  # EPICS Base's record name length
PV_NAME_MAX = 256
K8S_NAME_MAX = 253  # a Kubernetes object name (DNS subdomain)
IMAGE_MAX = 512  # registry/path (255) + :tag (128) + @sha256:digest (71)
PATH_MAX = 4096
ARG_MAX = 1024  # one command or args item (long text belongs in spec.config.files)
ARGS_MAX = 32
GATEWAY_COMMAND_MAX = 8
DESCRIPTION_MAX = 1024
CONFIG_TEXT_MAX = 32768  # a gateway's pvlist or access file
ENV_MAX = 100
ENV_NAME_MAX = 256
ENV_VALUE_MAX = 4096
QUALIFIED_NAME_MAX = 317  # a label or annotation key: prefix (253) / name (63)
LABEL_VALUE_MAX = 63
ANNOTATION_VALUE_MAX = 2048
MAP_MAX = 32
RESOURCES_MAX = 16
QUANTITY_MAX = 64
OBJECT_FIELDS_MAX = 16  # top-level fields of a free-form Kubernetes object
OBJECTS_MAX = 64  # volumes, mounts, tolerations
NAMESPACES_MAX = 64
CONTAINERS_MAX = 8  # init or extra containers
CONFIG_FILE_MAX = 262144  # one file of spec.config.files (characters); see CONFIG_TOTAL_MAX
CONFIG_FILES_MAX = 32
CONFIG_TOTAL_MAX = rules.CONFIG_TOTAL_MAX
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"  # a ConfigMap key, i.e. a file name
IPV4 = (r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
        r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$")

Image = Annotated[str, Field(max_length=IMAGE_MAX)]
K8sName = Annotated[str, Field(max_length=K8S_NAME_MAX)]
Arg = Annotated[str, Field(max_length=ARG_MAX)]
QualifiedName = Annotated[str, Field(max_length=QUALIFIED_NAME_MAX)]
LabelValue = Annotated[str, Field(max_length=LABEL_VALUE_MAX)]
AnnotationValue = Annotated[str, Field(max_length=ANNOTATION_VALUE_MAX)]
NamespaceName = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]

# Why 52: the operator names the IOC's StatefulSet, Service and ConfigMaps after the
# IOC, and Kubernetes labels the StatefulSet's pod with controller-revision-hash
# <name>-<hash of up to 10 characters>, a label value of at most 63 characters.
NAME_RULE = {
    "rule": f"size(self.metadata.name) <= {NAME_MAX}",
    "message": (
        f"may have at most {NAME_MAX} characters: the IOC's StatefulSet and Service take "
        "this name, and Kubernetes labels the StatefulSet's pod controller-revision-hash="
        "<name>-<hash of up to 10 characters>, which must fit in 63"),
    "fieldPath": ".metadata.name",
}


class Model(BaseModel):
    """Base: camelCase on the wire, unknown fields are an error (typos must not pass)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# A Kubernetes object passed through verbatim (affinity, a volume, ...): Kubernetes
# validates its content when the operator's dry run applies it (a refusal is the IOC's
# Rejected condition); the schema bounds its top-level fields.
FreeObject = Annotated[dict[str, Any], Field(
    max_length=OBJECT_FIELDS_MAX,
    json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})]


class EnvVar(Model):
    """An environment variable of the IOC container, as in a Kubernetes container."""

    name: str = Field(min_length=1, max_length=ENV_NAME_MAX, description=(
        "Variable name. Those the operator sets itself (EPICS_CAS_*, EPICS_PVAS_* server "
        "ports and interfaces) are refused: use spec.network.ports. Required."))
    value: str | None = Field(default=None, max_length=ENV_VALUE_MAX, description=(
        "Literal value. Default: none (the empty string, unless valueFrom is set)."))
    value_from: FreeObject | None = Field(default=None, description=(
        "Where the value comes from instead: one of secretKeyRef, configMapKeyRef, "
        "fieldRef, resourceFieldRef (Kubernetes EnvVarSource). Default: none."))


Quantity = int | Annotated[str, Field(max_length=QUANTITY_MAX)]
# The same in the CRD: structural schemas spell int-or-string this way only.
QUANTITY: JsonDict = {"x-kubernetes-int-or-string": True, "maxLength": QUANTITY_MAX,
            "anyOf": [{"type": "integer"}, {"type": "string"}]}
ResourceName = QualifiedName


class Resources(Model):
    """Compute resources of one container, as in a Kubernetes container. Default:
    none (the namespace's LimitRange, if any, decides)."""

    requests: dict[QualifiedName, Quantity] = Field(
        default_factory=dict, max_length=RESOURCES_MAX,
        description=(
            "What the scheduler reserves for the container, e.g. {cpu: 100m, memory: "
            "128Mi}. Default: none."),
        json_schema_extra={"additionalProperties": QUANTITY},
    )
    limits: dict[QualifiedName, Quantity] = Field(
        default_factory=dict, max_length=RESOURCES_MAX,
        description="The most the container may use, e.g. {memory: 256Mi}. Default: none.",
        json_schema_extra={"additionalProperties": QUANTITY},
    )


class CAServer(Model):
    """The IOC's Channel Access server. Default: enabled, rsrv."""

    enabled: StrictBool = Field(default=True, description=(
        "The IOC serves Channel Access: the operator gives it a CA port and publishes it "
        "to clients. false: no CA (then servers.pva must be enabled). Default: true."))
    implementation: CAImplementation = Field(
        default=CAImplementation.RSRV,
        description=(
            "Which CA server the IOC runs. rsrv: an EPICS Base IOC (softIoc, "
            "epicscorelibs/pvxslibs IOCs, pythonSoftIOC), answers UDP and TCP name-server "
            "searches. caproto: a caproto server, answers UDP searches only (in sidecar mode "
            "the CA gateway answers name-server searches for it). pcas: the portable CA "
            "server (pcaspy), answers UDP and TCP searches; it aborts without a "
            "broadcast-capable interface, so it needs network.mode host or sidecar. "
            "Default: rsrv."
        ),
    )


class PVAServer(Model):
    """The IOC's PV Access server. Default: enabled, pvxs."""

    enabled: StrictBool = Field(default=True, description=(
        "The IOC serves PV Access: the operator gives it PVA server and broadcast ports "
        "and publishes them to clients. false: no PVA (a CA-only IOC; in sidecar mode "
        "gateways.bridge can serve its PVs over PVA). Default: true."))
    implementation: PVAImplementation = Field(
        default=PVAImplementation.PVXS,
        description=(
            "Which PVA server the IOC runs. pvxs: QSRV2, p4p, pythonSoftIOC, pvxslibs IOCs; "
            "answers UDP and TCP name-server searches. classic: QSRV1 (pvAccessCPP), pvaPy; "
            "answers UDP searches only, so EPICS_PVA_NAME_SERVERS reaches it only through "
            "sidecar mode's pvagw. Default: pvxs."
        ),
    )


class Servers(Model):
    """Which EPICS servers the IOC process runs, so the operator knows which ports to
    give it and what clients can reach. Default: CA (rsrv) and PVA (pvxs)."""

    ca: CAServer = Field(default_factory=CAServer, description=(
        "The IOC's Channel Access server. Default: enabled, rsrv."))
    pva: PVAServer = Field(default_factory=PVAServer, description=(
        "The IOC's PV Access server. Default: enabled, pvxs."))


class Ports(Model):
    """Explicit ports (see Network.ports)."""

    ca: PORT | None = Field(default=None, description=(
        "CA server port, TCP and UDP (EPICS_CAS_SERVER_PORT). Default: 5064 in pod and "
        "sidecar modes, allocated in host mode."))
    pva_server: PORT | None = Field(default=None, description=(
        "PVA server TCP port (EPICS_PVAS_SERVER_PORT). Default: 5075 in pod and sidecar "
        "modes, allocated in host mode."))
    pva_broadcast: PORT | None = Field(default=None, description=(
        "PVA search UDP port (EPICS_PVAS_BROADCAST_PORT); must differ from pvaServer. "
        "Default: 5076 in pod and sidecar modes, allocated in host mode."))


class Network(Model):
    """How the IOC is reached on a cluster network without broadcast. Default: pod
    mode on the EPICS default ports, no NetworkPolicy."""

    model_config = ConfigDict(json_schema_extra=rules.schema(rules.NETWORK_RULES))

    mode: NetworkMode = Field(
        default=NetworkMode.POD,
        description=(
            "host: the IOC uses the node's network, with CA and PVA ports of its own so "
            "several IOCs share a node; clients reach <node IP>:<port>. pod: the IOC "
            "serves on its pod IP behind a Service with a stable ClusterIP, on the EPICS "
            "default ports. sidecar: like pod, but the IOC's servers move to loopback "
            "behind gateways in its pod that serve the pod IP: pvagw for PVA, the CA "
            "gateway for CA (on by default: the builtin caproto gateway, or EPICS' C++ "
            "ca-gateway; gateways.ca), and for CA-only IOCs optionally the CA-to-PVA "
            "bridge (gateways.bridge). The gateways answer name-server (TCP) searches "
            "whatever the IOC's own servers can. Default: pod."
        ),
    )
    ports: Ports = Field(default_factory=Ports, description=(
        "Explicit ports, for clients that need known port numbers. host mode: the node "
        "ports the IOC binds; unset ones are allocated per node from the operator's "
        "host port range (default 5064-5999, EPICS defaults first), recorded in "
        "status.ports and kept across restarts; when two IOCs that may share a node ask "
        "for one explicit port, the newer one is refused (PortConflict) until the older "
        "one lets it go. pod mode: the ports on the pod IP and the Service. sidecar "
        "mode: the pod-IP ports the gateways serve (the IOC's own servers move to "
        "loopback, see gateways). Default: the EPICS defaults (CA 5064, PVA 5075 and "
        "5076) in pod and sidecar modes, allocated ports in host mode."))
    allowed_namespaces: list[NamespaceName] | None = Field(
        default=None,
        min_length=1,
        max_length=NAMESPACES_MAX,
        description=(
            "Pod and sidecar modes: render a NetworkPolicy that admits the IOC's EPICS "
            "ports only from these namespaces (include the IOC's own, and the "
            "operator's for reachability probes). Default: unset, no NetworkPolicy."
        ),
    )
    cluster_ip: str | None = Field(
        default=None,
        alias="clusterIP",
        pattern=IPV4,
        max_length=15,
        description=(
            "Pod and sidecar modes: the Service's ClusterIP, inside the cluster's Service "
            "range. Default: an address derived from the IOC's namespace and name, so a "
            "deleted and re-created IOC gets the same one and running clients find it "
            "again (if another Service holds it, the next of a few derived addresses). "
            "Changing it re-creates the Service."),
    )
    require_name_servers: StrictBool = Field(
        default=False,
        description=(
            "Refuse to run unless every protocol the IOC serves is reachable through "
            "EPICS_CA_NAME_SERVERS / EPICS_PVA_NAME_SERVERS (TCP search), for sites whose "
            "clients use no address lists. Default: false."
        ),
    )


class PVAGateway(Model):
    """The pvagw sidecar (p4p's PVA gateway) of sidecar mode: it serves PVA on the pod
    IP, answers UDP and name-server (TCP) searches, and forwards to the IOC's PVA
    server on loopback. It runs whenever the IOC serves PVA in sidecar mode."""

    image: Image | None = Field(default=None, description=(
        "Image with p4p's pvagw. Default: the operator's gateway image "
        "(IOC_OPERATOR_GATEWAY_IMAGE)."))
    read_only: StrictBool = Field(default=False, description=(
        "Refuse PVA puts through the gateway. Default: false."))
    status_prefix: str | None = Field(
        default=None,
        pattern=PREFIX_PATTERN,
        max_length=PREFIX_MAX,
        description="Prefix of the gateway's own status PVs. Default: <prefix>PVAGW:.",
    )
    internal_server_port: PORT = Field(default=15075, description=(
        "Loopback TCP port the IOC's PVA server is moved to. Default: 15075."))
    internal_broadcast_port: PORT = Field(default=15076, description=(
        "Loopback UDP port the IOC's PVA search is moved to. Default: 15076."))
    resources: Resources = Field(default_factory=Resources, description=(
        "The gateway container's resources. Default: none."))


class CAGateway(Model):
    """The CA gateway sidecar of sidecar mode: the IOC's CA server moves to loopback
    and the gateway serves the pod IP, answering UDP and name-server (TCP) searches.
    Default: enabled, builtin."""

    enabled: StrictBool = Field(
        default=True,
        description=(
            "Front the IOC's CA server with the gateway. false: the IOC's own CA server "
            "serves the pod IP (as in pod mode). Default: true."
        ),
    )
    implementation: CAGatewayImplementation = Field(
        default=CAGatewayImplementation.BUILTIN,
        description=(
            "builtin: this project's caproto-based ioc-ca-gateway (in the gateway image). "
            "ca-gateway: EPICS' C++ ca-gateway, run from `image` with the same ports, "
            "pvlist and access file. Default: builtin."
        ),
    )
    image: Image | None = Field(
        default=None,
        description=(
            "Gateway image. Default: the operator's gateway image for builtin "
            "(IOC_OPERATOR_GATEWAY_IMAGE); for ca-gateway IOC_OPERATOR_CA_GATEWAY_IMAGE, "
            "and without that this field is required."
        ),
    )
    command: list[Arg] = Field(
        default_factory=list,
        max_length=GATEWAY_COMMAND_MAX,
        description="ca-gateway only: the gateway executable, e.g. [/epics/ca-gateway/bin/"
        "linux-x86_64/gateway]. Default: [gateway].",
    )
    read_only: StrictBool = Field(default=False, description=(
        "Refuse CA puts through the gateway. Default: false."))
    metrics_port: PORT | None = Field(default=None, description=(
        "builtin only: serve Prometheus metrics (searches, channels, updates relayed) on "
        "this pod port, as a container port named cagw-metrics. Default: none."))
    internal_port: PORT = Field(default=15064, description=(
        "Loopback TCP and UDP port the IOC's CA server is moved to. Default: 15064."))
    pvlist: str | None = Field(
        default=None,
        max_length=CONFIG_TEXT_MAX,
        description=(
            "ca-gateway pvlist text: `EVALUATION ORDER ALLOW, DENY` and `<regex> ALLOW|DENY` "
            "lines (the builtin gateway understands this subset). Default: every PV."
        ),
    )
    access: str | None = Field(
        default=None,
        max_length=CONFIG_TEXT_MAX,
        description=(
            "ca-gateway only: an access security file (ASG rules). Default: none (every "
            "client may read and write, unless readOnly)."),
    )
    inactive_timeout_seconds: StrictInt = Field(
        default=60, ge=1, le=86400,
        description=(
            "Drop upstream channels no client has used for this long (also the bridge's). "
            "Default: 60."),
    )
    resources: Resources = Field(default_factory=Resources, description=(
        "The gateway container's resources. Default: none."))


class CAPVABridge(Model):
    """A PVA server in front of a CA-only IOC: each PV of the IOC, found over CA on
    loopback, served as a Normative Type (docs/ca-pva-bridge.md). Default: off."""

    enabled: StrictBool = Field(
        default=False,
        description=(
            "Run the bridge (for IOCs that serve CA only: servers.pva.enabled false). "
            "Default: false."),
    )
    image: Image | None = Field(default=None, description=(
        "Bridge image. Default: the operator's gateway image (IOC_OPERATOR_GATEWAY_IMAGE)."))
    read_only: StrictBool = Field(default=False, description=(
        "Refuse PVA puts through the bridge. Default: false."))
    metrics_port: PORT | None = Field(default=None, description=(
        "Serve Prometheus metrics (searches, channels, updates relayed) on this pod port, "
        "as a container port named bridge-metrics. Default: none."))
    resources: Resources = Field(default_factory=Resources, description=(
        "The bridge container's resources. Default: none."))


class Gateways(Model):
    """Sidecar gateways (network.mode sidecar only). Default: pvagw when the IOC serves
    PVA, the builtin CA gateway when it serves CA, no bridge."""

    pva: PVAGateway = Field(default_factory=PVAGateway, description=(
        "pvagw (p4p's PVA gateway): runs whenever the IOC serves PVA in sidecar mode, "
        "serves PVA on the pod IP, answers UDP and name-server (TCP) searches, and "
        "forwards to the IOC's PVA server on loopback. Default: the operator's gateway "
        "image, read-write, loopback ports 15075 and 15076."))
    ca: CAGateway = Field(default_factory=CAGateway, description=(
        "The CA gateway: runs whenever the IOC serves CA in sidecar mode, unless "
        "disabled; it serves CA on the pod IP, answers UDP and name-server (TCP) "
        "searches, and forwards to the IOC's CA server on loopback. Default: enabled, "
        "builtin."))
    bridge: CAPVABridge = Field(default_factory=CAPVABridge, description=(
        "The CA-to-PVA bridge, for CA-only IOCs: a PVA server on the pod IP serving each "
        "PV of the IOC, found over CA on loopback, as a Normative Type. Default: off."))


class Autosave(Model):
    """A persistent volume for autosave files (a PersistentVolumeClaim <name>-autosave,
    ReadWriteOnce). It outlives the IOC: deleting the IOC keeps it, and an IOC created
    again with the same name mounts it again. Default: off."""

    enabled: StrictBool = Field(default=False, description=(
        "Create and mount the autosave volume. Default: false."))
    size: str = Field(
        default="1Gi",
        pattern=r"^(0\.[0-9]*[1-9][0-9]*|[1-9][0-9]*(\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        max_length=QUANTITY_MAX,
        description="Requested size (more than zero), e.g. 100Mi. Default: 1Gi.",
    )
    storage_class_name: K8sName | None = Field(default=None, description=(
        "Storage class of the claim. Default: the cluster's default storage class."))
    mount_path: str = Field(
        default="/autosave", pattern=r"^/", max_length=PATH_MAX,
        description="Where the IOC container sees the volume. Default: /autosave.",
    )


ConfigKey = Annotated[str, Field(pattern=CONFIG_KEY, max_length=K8S_NAME_MAX)]
ConfigText = Annotated[str, Field(max_length=CONFIG_FILE_MAX)]


class Config(Model):
    """The IOC instance's own files (st.cmd, ioc.yaml, databases, substitution files),
    for one generic IOC image per support module: mounted read-only into the IOC
    container; a change of their content restarts the IOC. Default: none."""

    model_config = ConfigDict(json_schema_extra=rules.schema(rules.CONFIG_RULES))

    files: dict[ConfigKey, ConfigText] | None = Field(
        default=None, min_length=1, max_length=CONFIG_FILES_MAX,
        description=(
            "The files, by name: {st.cmd: ..., ioc.db: ...}. The operator keeps them in a "
            f"ConfigMap <name>-config. At most {CONFIG_FILES_MAX} files of "
            f"{CONFIG_FILE_MAX // 1024} KiB each, {CONFIG_TOTAL_MAX // 1024} KiB in all. "
            "Default: none."))
    config_map: K8sName | None = Field(default=None, description=(
        "Instead of files: an existing ConfigMap of the IOC's namespace, mounted whole. "
        "Its content hash is taken when the IOC is reconciled; label it "
        "epics-operator.io/config=true and each edit restarts the IOCs that mount it. "
        "Default: none."))
    mount_path: str = Field(
        default="/epics/ioc/config", pattern=r"^/", max_length=PATH_MAX,
        description=(
            "Where the IOC container sees the files (the epics-containers convention). "
            "Default: /epics/ioc/config."))

    @model_validator(mode="after")
    def _one_source(self) -> Config:
        rules.check(rules.CONFIG_RULES, self)
        return self


class Health(Model):
    """How the kubelet tells a starting, a ready and a hung IOC apart. Default: TCP
    probes on the IOC's CA (else PVA) port in host and pod modes, none on the IOC
    container in sidecar mode (its servers are on loopback: set pv)."""

    pv: str | None = Field(
        default=None, pattern=PREFIX_PATTERN, max_length=PV_NAME_MAX,
        description=(
            "A heartbeat PV (e.g. iocStats' <prefix>UPTIME) read inside the IOC container "
            "by `command` through loopback, in every network mode: the startup, readiness "
            "and liveness probe. A hung IOC (it still accepts TCP connections, so a TCP "
            "probe passes) stops answering it. Default: none, TCP probes."))
    command: list[Arg] = Field(
        default_factory=list, max_length=GATEWAY_COMMAND_MAX,
        description=(
            "The command that reads pv, with the PV name appended; it must exist in the "
            "IOC image and exit non-zero when the read fails. It runs with "
            "EPICS_CA_ADDR_LIST (or EPICS_PVA_ADDR_LIST) naming the IOC on loopback. "
            "Default: [caget, -w, <timeoutSeconds>] when the IOC serves CA, else [pvget, "
            "-w, <timeoutSeconds>] (EPICS Base's)."))
    timeout_seconds: StrictInt = Field(default=5, ge=1, le=60, description=(
        "How long one probe may take. Default: 5."))
    period_seconds: StrictInt = Field(default=10, ge=1, le=300, description=(
        "Seconds between readiness and liveness probes. Default: 10."))
    startup_seconds: StrictInt = Field(default=3600, ge=1, le=86400, description=(
        "How long the IOC may take to start (waiting for hardware, loading databases) "
        "before the kubelet restarts it; liveness is checked only after it started. "
        "Default: 3600."))
    restart_after_seconds: StrictInt = Field(default=60, ge=0, le=86400, description=(
        "Restart the IOC container after its probe has failed this long (at least one "
        "period); 0: never restart, only report it not ready. Default: 60."))


class Probe(Model):
    """A PV the operator reads to check the IOC is reachable as clients see it: over
    CA and PVA (whichever the IOC serves) with exactly the published client settings,
    reported as the Reachable condition. Default: no probe."""

    pv: str | None = Field(
        default=None,
        pattern=PREFIX_PATTERN,
        max_length=PV_NAME_MAX,
        description="PV name to read. Default: none, reachability is not checked.",
    )
    period_seconds: StrictInt = Field(default=30, ge=5, le=3600, description=(
        "Seconds between reads (doubling while they fail, up to 300). Default: 30."))


class Scheduling(Model):
    """Where the IOC pod may run. Default: anywhere the scheduler puts it."""

    node_name: K8sName | None = Field(default=None, description=(
        "Pin the IOC to this node (the pod skips the scheduler). Host-mode IOCs pinned "
        "to different nodes may share ports. Default: none."))
    node_selector: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict, max_length=MAP_MAX, description=(
            "Run only on nodes with these labels. Default: none."))
    affinity: FreeObject | None = Field(default=None, description=(
        "Affinity rules (Kubernetes Affinity: nodeAffinity, podAffinity, "
        "podAntiAffinity). Default: none."))
    tolerations: list[FreeObject] = Field(
        default_factory=list, max_length=OBJECTS_MAX,
        description="Taints the pod tolerates (Kubernetes Toleration). Default: none.")
    priority_class_name: K8sName | None = Field(default=None, description=(
        "The pod's PriorityClass. Default: none (the cluster's default priority)."))


class IOCSpec(Model):
    """Desired state of one EPICS IOC."""

    model_config = ConfigDict(json_schema_extra=rules.schema(rules.SPEC_RULES))

    image: str = Field(min_length=1, max_length=IMAGE_MAX, description=(
        "Container image that runs the IOC, e.g. registry.example/bl01-motors:1.2. "
        "Required."))
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description=(
            "When the kubelet pulls the image. Default: Kubernetes' (Always for :latest "
            "or no tag, else IfNotPresent)."))
    image_pull_secrets: list[K8sName] = Field(
        default_factory=list, max_length=MAP_MAX, description=(
            "Names of Secrets in the IOC's namespace to pull the image with. Default: "
            "none (the service account's)."))
    command: list[Arg] = Field(default_factory=list, max_length=ARGS_MAX, description=(
        "Entrypoint override, e.g. [softIoc]. Default: the image's entrypoint."))
    args: list[Arg] = Field(default_factory=list, max_length=ARGS_MAX, description=(
        "Arguments, e.g. [st.cmd]. Default: the image's."))
    working_dir: str | None = Field(default=None, max_length=PATH_MAX, description=(
        "Working directory of the IOC process, e.g. where st.cmd is. Default: the "
        "image's."))
    env: list[EnvVar] = Field(default_factory=list, max_length=ENV_MAX, description=(
        "Extra environment of the IOC container (the operator adds the EPICS server "
        "port variables itself). Default: none."))
    resources: Resources = Field(default_factory=Resources, description=(
        "The IOC container's resources. Default: none."))
    prefix: str = Field(
        pattern=PREFIX_PATTERN,
        max_length=PREFIX_MAX,
        description=(
            "PV name prefix of the IOC's records, e.g. 'BL01:MOT:'. Two IOCs of one "
            "namespace may not share it (the newer one is refused: DuplicatePrefix). "
            "Required."),
    )
    description: str | None = Field(default=None, max_length=DESCRIPTION_MAX, description=(
        "What this IOC controls, for people; the operator does not use it. Default: "
        "none."))
    servers: Servers = Field(default_factory=Servers, description=(
        "Which EPICS servers the IOC runs. Default: CA (rsrv) and PVA (pvxs)."))
    network: Network = Field(default_factory=Network, description=(
        "Network mode, ports and access. Default: pod mode on the EPICS default ports."))
    gateways: Gateways | None = Field(default=None, description=(
        "Settings of the sidecar gateways; only with network.mode sidecar. Default: "
        "pvagw for PVA, the builtin CA gateway for CA, no bridge."))
    scheduling: Scheduling = Field(default_factory=Scheduling, description=(
        "Where the IOC pod may run. Default: anywhere."))
    autosave: Autosave = Field(default_factory=Autosave, description=(
        "A persistent volume for autosave files (a PersistentVolumeClaim "
        "<name>-autosave). It outlives the IOC: an IOC created again with the same name "
        "mounts it again. Default: none."))
    volumes: list[FreeObject] = Field(
        default_factory=list, max_length=OBJECTS_MAX,
        description="Extra pod volumes (Kubernetes Volume). Default: none.")
    volume_mounts: list[FreeObject] = Field(
        default_factory=list, max_length=OBJECTS_MAX,
        description="Extra IOC container mounts (Kubernetes VolumeMount). Default: none.")
    config: Config | None = Field(default=None, description=(
        "The IOC instance's files (st.cmd, databases, ...), inline or from a ConfigMap, "
        "mounted read-only at /epics/ioc/config; a change restarts the IOC. Default: "
        "none."))
    health: Health = Field(default_factory=Health, description=(
        "Startup, readiness and liveness probes of the IOC container; a hung IOC is "
        "restarted. Default: TCP probes on the IOC's port in host and pod modes."))
    security_context: FreeObject | None = Field(default=None, description=(
        "The IOC container's securityContext (Kubernetes SecurityContext), e.g. "
        "{capabilities: {add: [SYS_NICE]}} for real-time thread priorities, "
        "{runAsUser: 37000} for a facility uid. Its top-level fields replace the "
        "default's. Default: {allowPrivilegeEscalation: false, capabilities: {drop: "
        "[ALL]}} (a soft IOC needs no capability)."))
    pod_security_context: FreeObject | None = Field(default=None, description=(
        "The pod's securityContext (Kubernetes PodSecurityContext), e.g. {fsGroup: "
        "37000, supplementalGroups: [...]} for detector data. Default: none."))
    init_containers: list[FreeObject] = Field(
        default_factory=list, max_length=CONTAINERS_MAX,
        description=(
            "Containers run to completion before the IOC starts (Kubernetes Container), "
            "e.g. to wait for a device or fetch files. Names ioc, pvagw, cagw and bridge "
            "are the operator's. Default: none."))
    extra_containers: list[FreeObject] = Field(
        default_factory=list, max_length=CONTAINERS_MAX,
        description=(
            "More containers beside the IOC (Kubernetes Container), e.g. a log shipper. "
            "They may not declare the EPICS ports the operator gives the IOC (nor, in host "
            "mode, any port of its host port range). Default: none."))
    probe: Probe = Field(default_factory=Probe, description=(
        "A PV the operator reads, over CA and PVA with exactly the published client "
        "settings, to check the IOC is reachable as clients see it (the Reachable "
        "condition). Default: none."))
    inject_client_env: StrictBool = Field(
        default=False,
        description=(
            "Load the namespace's EPICS client directory (the epics-client-env "
            "ConfigMap) into the IOC with envFrom, so its CA/PVA links reach the other "
            "IOCs. Default: false."
        ),
    )
    suspend: StrictBool = Field(default=False, description=(
        "Stop the IOC (0 replicas) without deleting anything; false starts it again. "
        "Default: false."))
    console: StrictBool = Field(
        default=True,
        description=(
            "Keep stdin and a TTY open so `kubectl attach -it` reaches the IOC shell. "
            "Default: true."),
    )
    service_account_name: K8sName | None = Field(default=None, description=(
        "The pod's service account. Default: the namespace's default."))
    pod_labels: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict, max_length=MAP_MAX, description=(
            "Extra labels of the IOC pod (the operator's own labels win). Default: none."))
    pod_annotations: dict[QualifiedName, AnnotationValue] = Field(
        default_factory=dict, max_length=MAP_MAX, description=(
            "Extra annotations of the IOC pod. Default: none."))

    @model_validator(mode="after")
    def _cross_field(self) -> IOCSpec:
        # The CEL rules' Python side (rules.py): offline render says what the API server says.
        rules.check(rules.SPEC_RULES, self)
        rules.check(rules.NETWORK_RULES, self.network)
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
    """A Kubernetes-style status condition; each change is also a Kubernetes event."""

    type: str = Field(description=(
        "Reconciled: the current spec was applied (False: refused, and reason says why). "
        "Ready: the IOC runs and its pod is ready. PortConflict (host mode): another IOC "
        "asks for one of its explicit ports. Reachable (with spec.probe): the probe PV "
        "was read with the published client settings."))
    status: str = Field(description="True, False or Unknown.",
                        json_schema_extra={"enum": ["True", "False", "Unknown"]})
    reason: str = Field(description=(
        "Why, in one word. Applied, Running, PodNotReady, WaitingForAddress, Suspended, "
        "NoConflict, Reachable, NoAddress; refusals (Warning events): InvalidSpec, "
        "Rejected (the API server refused an object), PortConflict, ExplicitPortClash, "
        "DuplicatePrefix, PortRangeExhausted, Unreachable."))
    message: str = Field(default="", description=(
        "What happened, for people: for a refusal the field at fault and whether the "
        "last applied configuration keeps running."))
    observed_generation: int | None = Field(default=None, description=(
        "The IOC generation (spec version) this condition was computed from."))
    last_transition_time: str | None = Field(default=None, description=(
        "When status last changed (RFC 3339, UTC)."))


class Endpoints(Model):
    """Where clients reach the IOC, as host:port: <node IP>:<port> in host mode, the
    Service's <ClusterIP>:<port> in pod and sidecar modes."""

    ca: str | None = Field(default=None, description=(
        "CA endpoint (UDP search and TCP). Unset when the IOC serves no CA."))
    pva: str | None = Field(default=None, description=(
        "PVA endpoint (TCP server port). Unset when the IOC serves no PVA."))


class IOCStatus(Model):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = Field(default=None, description=(
        "The generation (spec version) last applied. A refused newer spec leaves it."))
    mode: str | None = Field(default=None, description="Network mode in effect.")
    node: str | None = Field(default=None, description=(
        "Node the IOC runs on (host mode: also where it is pinned before it runs)."))
    endpoints: Endpoints | None = Field(default=None, description=(
        "Where clients reach the IOC, as host:port: <node IP>:<port> in host mode, the "
        "Service's <ClusterIP>:<port> otherwise. Unset until it has an address."))
    ports: dict[str, int] | None = Field(default=None, description=(
        "Ports in effect: ca, pvaServer, pvaBroadcast. In host mode this records the "
        "allocation, which survives operator restarts."))
    client_env: dict[str, str] | None = Field(
        default=None, description=(
            "EPICS client settings (EPICS_CA_ADDR_LIST, EPICS_PVA_NAME_SERVERS, ...) that "
            "reach this IOC; the namespace's epics-client-env ConfigMap merges them for "
            "every IOC."),
    )
    port_clashes: list[str] | None = Field(default=None, description=(
        "Host mode: the IOCs (namespace/name) asking for one of this IOC's explicit "
        "ports on a node they may share."))
    last_handled: str | None = Field(default=None, description=(
        "The operator's bookkeeping: the generation and a digest of the labels (and "
        "port recheck requests) it last reconciled, <generation>-<digest>. Compared "
        "with the object, it tells a change from the echo of a write."))
    conditions: list[Condition] = Field(default_factory=list, description=(
        "Reconciled, Ready, PortConflict (host mode) and Reachable (with spec.probe)."))


class IOCMeta(Model):
    """The metadata the renderer needs; kept apart so rendering stays pure."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(pattern=DNS_LABEL)
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_fits(cls, name: str) -> str:
        # NAME_RULE's words, as the API server says them.
        if len(name) > NAME_MAX:
            raise ValueError(NAME_RULE["message"])
        return name


class IOC(BaseModel):
    """A whole IOC object: metadata plus spec."""

    model_config = ConfigDict(frozen=True)

    metadata: IOCMeta
    spec: IOCSpec
