"""Generate the IOC CustomResourceDefinition from the pydantic model.

pydantic emits JSON Schema (refs, anyOf-null, titles); Kubernetes wants a structural
OpenAPI v3 schema (everything inlined, one type per node). This module translates.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from ioc_operator import GROUP, KIND, PLURAL, VERSION
from ioc_operator.model.ioc import NAME_RULE, IOCSpec, IOCStatus

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Mode", "type": "string", "jsonPath": ".spec.network.mode"},
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {
        "name": "Reachable",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Reachable")].status',
    },
    {"name": "Node", "type": "string", "jsonPath": ".status.node"},
    {"name": "CA", "type": "string", "jsonPath": ".status.endpoints.ca"},
    {"name": "PVA", "type": "string", "jsonPath": ".status.endpoints.pva"},
    {"name": "Prefix", "type": "string", "jsonPath": ".spec.prefix", "priority": 1},
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# JSON Schema keys that structural schemas do not accept or that only add noise.
_DROP = {"title", "$defs", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline $refs and turn pydantic's JSON Schema into structural OpenAPI."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        node = {**target, **node}  # the referring field's description wins
    any_of = node.get("anyOf")
    if any_of and not node.get("x-kubernetes-int-or-string"):
        rest = [alt for alt in any_of if alt != {"type": "null"}]
        if len(rest) == 1:  # Optional[X]: the field is simply not required
            del node["anyOf"]
            if "default" in node and node["default"] is None:
                del node["default"]
            node = {**_resolve(rest[0], defs), **node}  # the field's own keys win
    out: dict[str, Any] = {}
    optional: set[str] = set()  # Optional[...] fields stay absent unless given
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
            optional = {name for name, sub in value.items()
                        if {"type": "null"} in sub.get("anyOf", [])}
        elif key in ("items", "additionalProperties", "anyOf", "allOf"):
            out[key] = _resolve(value, defs)
        elif key == "patternProperties":
            # A map whose keys have a pattern: structural schemas have no
            # patternProperties; the values' schema stays, a CEL rule checks the keys.
            ((pattern, values),) = value.items()
            out["additionalProperties"] = _resolve(values, defs)
            out.setdefault("x-kubernetes-validations", []).append({
                "rule": f"self.all(k, k.matches('{pattern}'))",
                "message": f"keys must match {pattern}"})
        elif key == "propertyNames":
            # Structural schemas cannot bound map keys; a CEL rule does.
            limit = value["maxLength"]
            out.setdefault("x-kubernetes-validations", []).append({
                "rule": f"self.all(k, size(k) <= {limit})",
                "message": f"keys may have at most {limit} characters"})
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields") or "properties" in out:
        # additionalProperties may not sit beside properties or preserve-unknown-fields.
        out.pop("additionalProperties", None)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "properties" in out:
        out["type"] = "object"
        required = set(out.get("required", []))
        for name, sub in out["properties"].items():
            # Defaulting nested objects lets the API server fill their defaults too,
            # so CEL rules can read e.g. self.network.mode when `network` was omitted.
            if (name not in required and name not in optional and "properties" in sub
                    and "default" not in sub):
                sub["default"] = {}
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _resolve(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    spec_schema = openapi_schema(IOCSpec)
    status_schema = openapi_schema(IOCStatus)
    status_schema["x-kubernetes-preserve-unknown-fields"] = True  # room for kopf's own keys
    status_schema.pop("default", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ioc"],
                "categories": ["epics"],
                "listKind": f"{KIND}List",
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "An EPICS IOC run by the ioc-operator, reachable over CA and "
                                "PVA on cluster networks without broadcast."
                            ),
                            "required": ["spec"],
                            "x-kubernetes-validations": [NAME_RULE],
                            "properties": {
                                "apiVersion": {"type": "string", "description": (
                                    f"{GROUP}/{VERSION}.")},
                                "kind": {"type": "string", "description": f"{KIND}."},
                                # Declared so NAME_RULE's fieldPath may name it; the API
                                # server still documents metadata as ObjectMeta.
                                "metadata": {"type": "object",
                                             "properties": {"name": {"type": "string"}}},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated from ioc_operator.model.ioc by `ioc-operator crd`. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
