"""Port lists edited by hand. Pure: a live object and the rendered one in, a patch out.

Server-side apply merges a port list by key (port + protocol). A port renumbered by
hand is an entry of another field manager: apply adds the operator's entry back beside
it, and two ports of one name are invalid, so apply alone can never revert the edit.
The operator's objects have no legitimate foreign ports, so such entries are replaced
by the rendered list (a strategic merge patch with `$patch: replace`) before applying.
"""

from __future__ import annotations

from typing import Any

STRATEGIC = "application/strategic-merge-patch+json"


def _keys(ports: list[dict[str, Any]], number: str) -> set[tuple[Any, str]]:
    return {(p.get(number), p.get("protocol") or "TCP") for p in ports}


def _foreign(live: list[dict[str, Any]], wanted: list[dict[str, Any]], number: str) -> bool:
    return bool(_keys(live, number) - _keys(wanted, number))


def _replace(ports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*ports, {"$patch": "replace"}]


def reclaim_patch(live: dict[str, Any] | None, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The strategic merge patch that drops port entries the operator did not render,
    or None when there are none (or the object is of another kind, or gone)."""
    if not live:
        return None
    if wanted["kind"] == "Service":
        ports = wanted["spec"].get("ports") or []
        if _foreign(live.get("spec", {}).get("ports") or [], ports, "port"):
            return {"spec": {"ports": _replace(ports)}}
        return None
    if wanted["kind"] == "StatefulSet":
        live_containers = {c["name"]: c for c in
                           live.get("spec", {}).get("template", {}).get("spec", {}).get(
                               "containers") or []}
        fixes = []
        for c in wanted["spec"]["template"]["spec"]["containers"]:
            ports = c.get("ports") or []
            old = live_containers.get(c["name"])
            if old and _foreign(old.get("ports") or [], ports, "containerPort"):
                fixes.append({"name": c["name"], "ports": _replace(ports)})
        if fixes:
            return {"spec": {"template": {"spec": {"containers": fixes}}}}
    return None
