"""The IOC instance's files (spec.config): a ConfigMap of inline files, or the user's
ConfigMap, mounted read-only into the IOC container. Their hash is on the pod template,
so a change of content rolls the IOC (the kubelet would update the files in place, but
an IOC reads st.cmd and its databases only when it starts)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ioc_operator.model.ioc import IOC

from . import names

VOLUME = "ioc-config"


def config_map(ioc: IOC) -> dict[str, Any] | None:
    """The ConfigMap of inline files; None when there are none."""
    config = ioc.spec.config
    if config is None or config.files is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": names.metadata(ioc, names.ioc_config_name(ioc), "ioc-config"),
        "data": dict(sorted(config.files.items())),
    }


def files_hash(files: dict[str, str]) -> str:
    """The content hash of a set of files (inline, or a ConfigMap's data)."""
    text = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_hash(ioc: IOC, mounted: str | None) -> str | None:
    """What rolls the pod when the files change: the inline files' hash, or `mounted`,
    the hash of the user's ConfigMap as the operator last read it (None: not read)."""
    config = ioc.spec.config
    if config is None:
        return None
    if config.files is not None:
        return files_hash(config.files)
    return mounted


def volumes(ioc: IOC) -> list[dict[str, Any]]:
    config = ioc.spec.config
    if config is None:
        return []
    name = config.config_map or names.ioc_config_name(ioc)
    return [{"name": VOLUME, "configMap": {"name": name}}]


def mounts(ioc: IOC) -> list[dict[str, Any]]:
    config = ioc.spec.config
    if config is None:
        return []
    return [{"name": VOLUME, "mountPath": config.mount_path, "readOnly": True}]
