"""The client directory: one ConfigMap per namespace (and optionally one for the whole
cluster) whose keys are the EPICS client settings that reach every IOC in it.

Pure: per-IOC client settings in, ConfigMap out. Sorted and de-duplicated, so the
same set of IOCs always yields the same bytes and an unchanged set never rewrites it
(the PVA address list puts the IOCs without a PVA name server first: `pva_addr_order`).
With a name service the directory is constant: only the name service's address, the
same bytes whatever the IOCs (`constant`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ioc_operator.discovery.clientenv import ClientSettings, merge
from ioc_operator.render.names import MANAGED_BY

COMPONENT = "client-directory"
PHOEBUS_KEY = "PHOEBUS_SETTINGS_INI"  # a valid variable name: envFrom takes it silently

_VARS = {
    "ca_addr": "EPICS_CA_ADDR_LIST",
    "ca_name_servers": "EPICS_CA_NAME_SERVERS",
    "pva_addr": "EPICS_PVA_ADDR_LIST",
    "pva_name_servers": "EPICS_PVA_NAME_SERVERS",
}


def settings_from_env(env: Mapping[str, str]) -> ClientSettings:
    """Parse one IOC's published variables (status.clientEnv) back into entries."""
    lists = {attr: tuple(env.get(var, "").split()) for attr, var in _VARS.items()}
    return ClientSettings(**lists, serves_ca="EPICS_CA_ADDR_LIST" in env,
                          serves_pva="EPICS_PVA_ADDR_LIST" in env)


def pva_addr_order(envs: Iterable[Mapping[str, str]], entries: Iterable[str]
                   ) -> tuple[str, ...]:
    """The PVA address list, sorted, except that of the entries for one IP address those
    of IOCs without a PVA name server come first. pvAccessCPP clients (pvaPy, pvget
    before pvxs) keep only the first entry per IP address ("avoid duplicates in address
    list" in its initializeUDPTransports), so of two host-mode IOCs on one node they
    search the first only; an IOC with a name server is still found through
    EPICS_PVA_NAME_SERVERS. See docs/pvaccesscpp.md."""
    udp_only = {entry for env in envs if not env.get("EPICS_PVA_NAME_SERVERS")
                for entry in env.get("EPICS_PVA_ADDR_LIST", "").split()}
    ordered = sorted(entries)
    slots: dict[str, list[int]] = {}
    for i, entry in enumerate(ordered):
        slots.setdefault(entry.partition(":")[0], []).append(i)
    out = list(ordered)
    for positions in slots.values():  # an address's own slots, refilled udp-only first
        mine = [ordered[i] for i in positions]
        mine.sort(key=lambda entry: entry not in udp_only)  # stable: sorted within each
        for i, entry in zip(positions, mine, strict=True):
            out[i] = entry
    return tuple(out)


def directory_env(envs: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Variables reaching every IOC. Both AUTO_ADDR_LISTs are NO even when a protocol
    has no IOC yet: the directory is the whole list, broadcast finds nothing more."""
    envs = list(envs)
    merged = merge(settings_from_env(env) for env in envs)
    env = {
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": " ".join(merged.ca_addr),
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": " ".join(pva_addr_order(envs, merged.pva_addr)),
    }
    if merged.ca_name_servers:
        env["EPICS_CA_NAME_SERVERS"] = " ".join(merged.ca_name_servers)
    if merged.pva_name_servers:
        env["EPICS_PVA_NAME_SERVERS"] = " ".join(merged.pva_name_servers)
    return dict(sorted(env.items()))


def phoebus_settings(env: Mapping[str, str]) -> str:
    """The same settings as phoebus settings.ini preferences."""
    lines = [
        "# EPICS client settings from the ioc-operator directory",
        f"org.phoebus.pv.ca/addr_list={env.get('EPICS_CA_ADDR_LIST', '')}",
        "org.phoebus.pv.ca/auto_addr_list=false",
        f"org.phoebus.pv.ca/name_servers={env.get('EPICS_CA_NAME_SERVERS', '')}",
        f"org.phoebus.pv.pva/epics_pva_addr_list={env.get('EPICS_PVA_ADDR_LIST', '')}",
        "org.phoebus.pv.pva/epics_pva_auto_addr_list=false",
        f"org.phoebus.pv.pva/epics_pva_name_servers={env.get('EPICS_PVA_NAME_SERVERS', '')}",
    ]
    return "\n".join(lines) + "\n"


def directory_config_map(namespace: str, name: str, envs: Iterable[Mapping[str, str]],
                         constant: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The directory ConfigMap: `constant` settings (the name service's) when given,
    else the merged settings of every IOC."""
    env = dict(sorted(constant.items())) if constant is not None else directory_env(envs)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                "app.kubernetes.io/component": COMPONENT,
                "app.kubernetes.io/part-of": "epics",
            },
        },
        "data": {**env, PHOEBUS_KEY: phoebus_settings(env)},
    }
