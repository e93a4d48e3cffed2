"""The IOC's cross-field rules, one table per object they read. Each rule yields its
CEL rule (`x-kubernetes-validations` in the CRD: the API server refuses at `kubectl
apply`) and its Python check (the model's validator: offline `ioc-operator render`
refuses the same manifests with the same words), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic.config import JsonDict

from ioc_operator.model.enums import NetworkMode


@dataclass(frozen=True)
class Rule:
    cel: str  # over `self`: the object the table is attached to
    broken: Callable[[Any], bool]  # the same rule in Python, on the same object
    message: str
    field_path: str | None = None

    def schema(self) -> JsonDict:
        """The rule's `x-kubernetes-validations` entry."""
        entry: JsonDict = {"rule": self.cel, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry


# On spec.network (Network).
NETWORK_RULES = (
    Rule(f"!has(self.allowedNamespaces) || self.mode != '{NetworkMode.HOST}'",
         lambda n: n.allowed_namespaces is not None and n.mode == NetworkMode.HOST,
         "allowedNamespaces needs network.mode pod or sidecar: NetworkPolicies do not "
         "apply to host-network pods"),
    Rule("!has(self.ports) || !has(self.ports.pvaServer) || !has(self.ports.pvaBroadcast) "
         "|| self.ports.pvaServer != self.ports.pvaBroadcast",
         lambda n: n.ports.pva_server is not None
         and n.ports.pva_server == n.ports.pva_broadcast,
         "ports.pvaServer and ports.pvaBroadcast must differ"),
)

# On spec.config (Config). CEL's size() counts characters, near the ConfigMap's bytes.
CONFIG_TOTAL_MAX = 262144  # all of spec.config.files, so an IOC still fits in etcd
CONFIG_RULES = (
    Rule("has(self.files) != has(self.configMap)",
         lambda c: (c.files is None) == (c.config_map is None),
         "set exactly one of files and configMap"),
    Rule(f"!has(self.files) || self.files.map(k, size(self.files[k])).sum() "
         f"<= {CONFIG_TOTAL_MAX}",
         lambda c: c.files is not None and sum(map(len, c.files.values())) > CONFIG_TOTAL_MAX,
         f"files may hold at most {CONFIG_TOTAL_MAX // 1024} KiB in all (larger files "
         "belong in the image or a ConfigMap of their own: configMap)", ".files"),
)

# On spec (IOCSpec).
SPEC_RULES = (
    Rule(f"!has(self.gateways) || self.network.mode == '{NetworkMode.SIDECAR}'",
         lambda s: s.gateways is not None and s.network.mode != NetworkMode.SIDECAR,
         "gateways may only be set when network.mode is sidecar", ".gateways"),
    Rule("self.servers.ca.enabled || self.servers.pva.enabled",
         lambda s: not (s.servers.ca.enabled or s.servers.pva.enabled),
         "an IOC must serve CA or PVA: enable servers.ca or servers.pva", ".servers"),
    Rule("!has(self.gateways) || !has(self.gateways.bridge) || "
         "!self.gateways.bridge.enabled || !self.servers.pva.enabled",
         lambda s: s.gateways is not None and s.gateways.bridge.enabled
         and s.servers.pva.enabled,
         "the CA-to-PVA bridge is for IOCs without a PVA server: disable servers.pva or "
         "the bridge", ".gateways.bridge.enabled"),
)


def schema(rules: tuple[Rule, ...]) -> JsonDict:
    """The `json_schema_extra` that puts a table's CEL rules in the CRD."""
    return {"x-kubernetes-validations": [rule.schema() for rule in rules]}


def check(rules: tuple[Rule, ...], obj: Any) -> None:
    """Raise ValueError with the message of the first rule `obj` breaks."""
    for rule in rules:
        if rule.broken(obj):
            raise ValueError(rule.message)
