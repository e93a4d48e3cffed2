"""The table from a YAML file (``--table FILE``), for sites and tests without Kubernetes.

    # every IOC the name server answers for
    iocs:
    - name: bl01-vacuum            # unique; Kubernetes entries are namespace/name
      prefix: "BL01:VAC:"          # PV names it holds start with this
      ca: 198.18.0.12:5070         # CA server (TCP), what clients are told
      pva: 198.18.0.12:5081        # PVA server (TCP), what clients are told
      caSearch: 198.18.0.12:5070   # optional: UDP port to confirm names (default: ca)
      pvaSearch: 198.18.0.12:5082  # optional: PVA UDP search port (default: pva host:5076)
      servers: {ca: rsrv, pva: pvxs}   # optional, for logs
      external: true               # optional: reachable from outside the cluster network
      created: "2026-01-01T00:00:00Z"  # optional: the older IOC wins a name two claim

Addresses are IPv4 literals; a missing port is the EPICS default (CA 5064, PVA 5075).
An IOC needs at least one of ``ca`` and ``pva``. The file is re-read when it changes
(checked every second) and on SIGHUP; a file that does not parse leaves the table as
it was and is reported.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from .table import DEFAULT_PORTS, IOC, Endpoint, Table, TableError

__all__ = ["TableFile", "load_table", "parse_table"]

log = logging.getLogger("ioc_name_server.table")

MAX_FILE_BYTES = 64 * 1024 * 1024
KEYS = {"name", "prefix", "ca", "pva", "caSearch", "pvaSearch", "servers", "external",
        "created", "ready"}


def _endpoint(entry: dict[str, Any], key: str, default_port: int) -> Endpoint | None:
    value = entry.get(key)
    if value is None or value == "":
        return None
    return Endpoint.parse(str(value), default_port)


def parse_entry(entry: Any, index: int) -> IOC:
    if not isinstance(entry, dict):
        raise TableError(f"iocs[{index}]: not a mapping")
    unknown = set(entry) - KEYS
    if unknown:
        raise TableError(f"iocs[{index}]: unknown key(s) {', '.join(sorted(unknown))}")
    name, prefix = entry.get("name"), entry.get("prefix")
    if not isinstance(name, str) or not name:
        raise TableError(f"iocs[{index}]: name is required")
    if not isinstance(prefix, str):
        raise TableError(f"iocs[{index}] ({name}): prefix is required")
    servers = entry.get("servers") or {}
    if not isinstance(servers, dict):
        raise TableError(f"iocs[{index}] ({name}): servers must be a mapping")
    try:
        ca = _endpoint(entry, "ca", DEFAULT_PORTS["ca"])
        pva = _endpoint(entry, "pva", DEFAULT_PORTS["pva"])
        return IOC(
            key=name, prefix=prefix, ca=ca, pva=pva,
            ca_search=_endpoint(entry, "caSearch", ca.port if ca else DEFAULT_PORTS["ca"]),
            pva_search=_endpoint(entry, "pvaSearch", DEFAULT_PORTS["pva_search"]),
            created=str(entry.get("created") or ""),
            ca_server=str(servers.get("ca", "")), pva_server=str(servers.get("pva", "")),
            external=bool(entry.get("external", False)),
            ready=bool(entry.get("ready", True)))
    except TableError as exc:
        raise TableError(f"iocs[{index}] ({name}): {exc}") from None


def parse_table(text: str) -> list[IOC]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TableError(f"not valid YAML: {exc}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("iocs", []), list):
        raise TableError("the file must be a mapping with a list `iocs`")
    iocs = [parse_entry(e, i) for i, e in enumerate(doc.get("iocs") or [])]
    seen: set[str] = set()
    for ioc in iocs:
        if ioc.key in seen:
            raise TableError(f"two IOCs named {ioc.key}")
        seen.add(ioc.key)
    return iocs


def load_table(path: Path) -> list[IOC]:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TableError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return parse_table(path.read_text())


class TableFile:
    """Keeps a Table equal to a file: loaded at start, reloaded when it changes."""

    def __init__(self, path: Path, table: Table, poll: float = 1.0) -> None:
        self.path = path
        self.table = table
        self.poll = poll
        self._stamp: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> bool:
        """(Re)load now; returns whether the table was replaced."""
        self._stamp = self._current_stamp()
        try:
            iocs = load_table(self.path)
        except (OSError, TableError) as exc:
            log.error("table %s not (re)loaded, keeping %d IOC(s): %s", self.path,
                      len(self.table), exc)
            return False
        changed, removed = self.table.replace_all(iocs)
        log.info("table %s: %d IOC(s) (%d new or changed, %d removed)", self.path, len(iocs),
                 changed, removed)
        for prefix, holders in self.table.claims().items():
            log.warning("prefix %r is claimed by %s; the older one answers", prefix,
                        ", ".join(h.key for h in holders))
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            stamp = self._current_stamp()
            if stamp is not None and stamp != self._stamp:
                self.load()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
