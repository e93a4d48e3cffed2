"""The CRD schema bounds every piece of user input and documents every field
(`kubectl explain`), and offline render says what the API server says about names."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from ioc_operator.model.crd import crd
from ioc_operator.model.errors import IOCValidationError
from ioc_operator.model.validation import parse_ioc

ETCD_OBJECT_MAX = 1_572_864  # etcd's default request limit, 1.5 MiB
ROOM_FOR_METADATA_AND_STATUS = 512 * 1024


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def nodes(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if "items" in node:
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")


def key_limit(node: dict[str, Any]) -> int | None:
    for rule in node.get("x-kubernetes-validations") or []:
        if m := re.fullmatch(r"self\.all\(k, size\(k\) <= (\d+)\)", rule["rule"]):
            return int(m.group(1))
    return None


def test_every_string_list_and_map_of_the_spec_is_bounded() -> None:
    unbounded = []
    for path, node in nodes(schema()["properties"]["spec"], "spec"):
        if (node.get("type") == "string" and "enum" not in node) or node.get(
                "x-kubernetes-int-or-string"):
            if "maxLength" not in node:
                unbounded.append(f"{path}: no maxLength")
        elif node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(f"{path}: no maxItems")
        elif node.get("type") == "object" and "properties" not in node:
            if "maxProperties" not in node:
                unbounded.append(f"{path}: no maxProperties")
            if "additionalProperties" in node and key_limit(node) is None:
                unbounded.append(f"{path}: keys unbounded")
    assert not unbounded, "\n".join(unbounded)


def worst_size(node: dict[str, Any]) -> int:
    """An upper bound of the JSON size of any ASCII value the node admits (free-form
    Kubernetes objects count as empty: Kubernetes validates their content)."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return 2
    if "enum" in node:
        return max(len(str(e)) for e in node["enum"]) + 2
    if node.get("type") == "string" or node.get("x-kubernetes-int-or-string"):
        return node["maxLength"] + 2
    if node.get("type") in ("integer", "boolean"):
        return 20
    if node.get("type") == "array":
        return node["maxItems"] * (worst_size(node["items"]) + 1) + 2
    if "properties" in node:
        return sum(len(k) + 4 + min(worst_size(v), total_cap(node, k, v))
                   for k, v in node["properties"].items()) + 2
    limit = key_limit(node)
    assert limit is not None
    return node["maxProperties"] * (limit + 4 + worst_size(node["additionalProperties"])) + 2


def total_cap(parent: dict[str, Any], name: str, node: dict[str, Any]) -> int:
    """A map's size as capped by a CEL rule of its parent on the sum of its values'
    sizes (spec.config.files), with its keys and JSON punctuation."""
    for rule in parent.get("x-kubernetes-validations") or []:
        found = re.search(rf"self\.{name}\.map\(k, size\(self\.{name}\[k\]\)\)"
                          r"\.sum\(\) <= (\d+)", rule["rule"])
        if found:
            return int(found[1]) + node["maxProperties"] * (key_limit(node) or 0) + 8 * (
                node["maxProperties"]) + 2
    return 1 << 62


def test_an_ioc_at_every_limit_still_fits_in_etcd() -> None:
    """The limits are chosen together: the largest spec they admit leaves room for
    metadata (annotations alone may take 256 KiB) and status in one etcd object."""
    largest = worst_size(schema()["properties"]["spec"])
    assert largest < 1024 * 1024
    assert largest + ROOM_FOR_METADATA_AND_STATUS < ETCD_OBJECT_MAX


def test_every_field_has_a_description_and_optional_spec_fields_name_their_default():
    missing, no_default = [], []
    root = schema()
    for part in ("spec", "status"):
        for path, node in nodes(root["properties"][part], part):
            if path.endswith(("[]", "{}")):
                continue  # list items and map values: the list's or map's text covers them
            if not (node.get("description") or "").strip():
                missing.append(path)
    spec = root["properties"]["spec"]
    for path, node in nodes(spec, "spec"):
        required = set(node.get("required") or [])
        for name, sub in (node.get("properties") or {}).items():
            text = sub.get("description") or ""
            if name in required:
                assert "Required" in text, f"{path}.{name}"
            elif "default" not in text.lower():
                no_default.append(f"{path}.{name}")
    assert not missing, f"no description: {missing}"
    assert not no_default, f"description does not say the default: {no_default}"


def test_explain_texts_the_issue_named():
    spec = schema()["properties"]["spec"]["properties"]
    mode = spec["network"]["properties"]["mode"]["description"]
    for words in ("pvagw", "CA gateway", "on by default", "CA-to-PVA bridge"):
        assert words in mode
    ports = spec["network"]["properties"]["ports"]["description"]
    assert ports != "Explicit ports." and "5064" in ports and "allocated" in ports
    cond = schema()["properties"]["status"]["properties"]["conditions"]["items"]
    for field in ("type", "status", "reason", "message", "observedGeneration",
                  "lastTransitionTime"):
        assert cond["properties"][field].get("description"), field
    for meta in ("apiVersion", "kind"):
        assert schema()["properties"][meta]["description"]


def test_names_longer_than_52_are_refused_by_a_cel_rule_that_says_why():
    rules = schema()["x-kubernetes-validations"]
    rule = next(r for r in rules if "metadata.name" in r["rule"])
    assert rule["rule"] == "size(self.metadata.name) <= 52"
    assert rule["fieldPath"] == ".metadata.name"
    assert "controller-revision-hash" in rule["message"] and "63" in rule["message"]
    spec = {"image": "i", "prefix": "A:"}
    parse_ioc({"metadata": {"name": "a" * 52}, "spec": spec})
    with pytest.raises(IOCValidationError) as info:
        parse_ioc({"metadata": {"name": "a" * 53}, "spec": spec})
    assert info.value.field == "metadata.name"
    assert rule["message"] in str(info.value)


@pytest.mark.parametrize(("spec", "field"), [
    ({"description": "x" * 1025}, "spec.description"),
    ({"args": ["x" * 4097]}, "spec.args.0"),
    ({"env": [{"name": "A", "value": "x" * 4097}]}, "spec.env.0.value"),
    ({"podLabels": {"k" * 318: "v"}}, "spec.podLabels.kkk"),
    ({"scheduling": {"tolerations": [{}] * 65}}, "spec.scheduling.tolerations"),
])
def test_offline_render_refuses_oversized_input_naming_the_field(spec, field):
    with pytest.raises(IOCValidationError) as info:
        parse_ioc({"metadata": {"name": "a"}, "spec": {"image": "i", "prefix": "A:", **spec}})
    assert info.value.field.startswith(field)
    assert "at most" in str(info.value)
