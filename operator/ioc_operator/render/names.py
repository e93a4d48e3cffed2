"""Object names and labels shared by everything the renderer emits."""

from __future__ import annotations

from typing import Any

from ioc_operator.model.ioc import IOC

from .. import GROUP, KIND, VERSION

IOC_LABEL = f"{GROUP}/ioc"
MODE_LABEL = f"{GROUP}/mode"
MANAGED_BY = "ioc-operator"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
# The IOC's files (spec.config) roll the pod apart from the gateways' config.
FILES_HASH_ANNOTATION = f"{GROUP}/files-hash"
# On a user's ConfigMap: edits to it restart the IOCs that mount it (spec.config).
CONFIG_LABEL = f"{GROUP}/config"


def selector(ioc: IOC) -> dict[str, str]:
    """Pod selector: only the IOC name, so a mode change never needs a new selector."""
    return {IOC_LABEL: ioc.metadata.name}


def labels(ioc: IOC, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "ioc",
        "app.kubernetes.io/instance": ioc.metadata.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "epics",
        IOC_LABEL: ioc.metadata.name,
        MODE_LABEL: ioc.spec.network.mode.value,
    }


def metadata(ioc: IOC, name: str, component: str, owned: bool = True) -> dict[str, Any]:
    """Object metadata; owned objects carry a controller reference to the IOC."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ioc.metadata.namespace,
        "labels": labels(ioc, component),
    }
    if owned and ioc.metadata.uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": ioc.metadata.name,
                "uid": ioc.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def workload_name(ioc: IOC) -> str:
    return ioc.metadata.name


def service_name(ioc: IOC) -> str:
    return ioc.metadata.name


def pvagw_config_name(ioc: IOC) -> str:
    return f"{ioc.metadata.name}-pvagw"


def cagw_config_name(ioc: IOC) -> str:
    return f"{ioc.metadata.name}-cagw"


def ioc_config_name(ioc: IOC) -> str:
    return f"{ioc.metadata.name}-config"


def autosave_claim_name(ioc: IOC) -> str:
    return f"{ioc.metadata.name}-autosave"
