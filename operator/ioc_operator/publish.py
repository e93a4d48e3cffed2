"""Write the client directories (I/O). Skips the API when the content is unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from .directory import directory_config_map
from .kube import Kube


class DirectoryPublisher:
    """Applies a namespace's directory ConfigMap, or deletes it when no IOC is left."""

    def __init__(self, kube: Kube, name: str) -> None:
        self.kube = kube
        self.name = name
        self._last: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._lock = threading.Lock()

    def publish(self, namespace: str, envs: Iterable[Mapping[str, str]] | None,
                name: str | None = None) -> bool:
        """`envs` None: the namespace has no IOCs. Returns whether the API was called."""
        name = name or self.name
        wanted = directory_config_map(namespace, name, envs) if envs is not None else None
        key = (namespace, name)
        with self._lock:
            if key in self._last and self._last[key] == wanted:
                return False
            if wanted is None:
                self.kube.delete("v1", "ConfigMap", namespace, name)
            else:
                self.kube.apply(wanted)
            self._last[key] = wanted
            return True

    def matches(self, body: dict[str, Any]) -> bool:
        """Whether an observed directory ConfigMap is what was last written (the echo of
        our own write, not a hand edit)."""
        meta = body.get("metadata") or {}
        with self._lock:
            wanted = self._last.get((meta.get("namespace", ""), meta.get("name", "")))
        if not wanted:
            return False
        labels = meta.get("labels") or {}
        return (body.get("data") == wanted["data"] and all(
            labels.get(k) == v for k, v in wanted["metadata"]["labels"].items()))

    def forget(self, namespace: str) -> None:
        """Make the next publish write again (the ConfigMap was changed by hand)."""
        with self._lock:
            for key in [k for k in self._last if k[0] == namespace]:
                del self._last[key]
