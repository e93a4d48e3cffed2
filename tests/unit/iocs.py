from __future__ import annotations

from typing import Any

from ioc_operator.model.ioc import IOC
from ioc_operator.model.validation import parse_ioc


def make_ioc(name: str = "ioc1", namespace: str = "ns", uid: str | None = "uid-1",
             **spec: Any) -> IOC:
    body = {"image": "reg/ioc:1", "prefix": "T:", **spec}
    return parse_ioc({"metadata": {"name": name, "namespace": namespace, "uid": uid},
                      "spec": body})


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


