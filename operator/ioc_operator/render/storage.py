"""The autosave PersistentVolumeClaim. Not owned by the IOC, so deleting the IOC
keeps the saved values; an IOC re-created with the same name mounts them again."""

from __future__ import annotations

from typing import Any

from ioc_operator.model.ioc import IOC

from . import names


def autosave_claim(ioc: IOC) -> dict[str, Any]:
    autosave = ioc.spec.autosave
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": autosave.size}},
    }
    if autosave.storage_class_name:
        spec["storageClassName"] = autosave.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": names.metadata(ioc, names.autosave_claim_name(ioc), "autosave", owned=False),
        "spec": spec,
    }
