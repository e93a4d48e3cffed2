"""Write the client directories (I/O). Skips the API when the content is unchanged.

With a name service configured (IOC_OPERATOR_NAME_SERVICE_ADDRESS) every directory is
the constant one, and it stays when a namespace's last IOC goes: client pods loading it
with envFrom keep starting, and nothing in it depended on that IOC.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from ioc_operator.controller.kube import Kube
from ioc_operator.discovery.clientenv import name_service, name_service_env
from ioc_operator.discovery.directory import directory_config_map
from ioc_operator.model.config import OperatorConfig

# Our own writes' resourceVersions kept per ConfigMap: a burst of publishes has its
# echoes arrive after later writes, and each must still be known as ours.
KEPT_VERSIONS = 64


class DirectoryPublisher:
    """Applies a namespace's directory ConfigMap, or deletes it when no IOC is left."""

    def __init__(self, kube: Kube, name: str, config: OperatorConfig | None = None) -> None:
        self.kube = kube
        self.name = name
        service = name_service(config if config is not None else OperatorConfig.from_env())
        self.constant = name_service_env(service) if service is not None else None
        self._last: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._writing: dict[tuple[str, str], dict[str, Any]] = {}
        self._versions: dict[tuple[str, str], deque[str]] = {}
        self._lock = threading.Lock()  # one publish at a time, held through the API call
        self._seen = threading.Lock()  # the records above, never held through I/O

    def publish(self, namespace: str, envs: Iterable[Mapping[str, str]] | None,
                name: str | None = None) -> bool:
        """`envs` None: the namespace has no IOCs. Returns whether the API was called."""
        name = name or self.name
        key = (namespace, name)
        if envs is None and self.constant is not None:
            return False  # constant: kept as it is (or never written, if no IOC ever was)
        wanted = (directory_config_map(namespace, name, envs, self.constant)
                  if envs is not None else None)
        with self._lock:
            if key in self._last and self._last[key] == wanted:
                return False
            if wanted is None:
                self.kube.delete("v1", "ConfigMap", namespace, name)
            else:
                with self._seen:  # its echo can arrive before the call returns
                    self._writing[key] = wanted
                try:
                    written = self.kube.apply(wanted)
                finally:
                    with self._seen:
                        del self._writing[key]
                version = (written.get("metadata") or {}).get("resourceVersion")
                with self._seen:
                    if version:
                        self._versions.setdefault(
                            key, deque(maxlen=KEPT_VERSIONS)).append(version)
            with self._seen:
                self._last[key] = wanted
            return True

    def matches(self, body: dict[str, Any]) -> bool:
        """Whether an observed directory ConfigMap is the echo of one of our own writes
        (the last one, one in flight, or an earlier one a later write has overtaken),
        not a hand edit."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._seen:  # not the publish lock: that one waits for the API
            if meta.get("resourceVersion") in self._versions.get(key, ()):
                return True
            candidates = (self._last.get(key), self._writing.get(key))
        labels = meta.get("labels") or {}
        for wanted in candidates:
            if wanted and body.get("data") == wanted["data"] and all(
                    labels.get(k) == v for k, v in wanted["metadata"]["labels"].items()):
                return True
        return False

    def forget(self, namespace: str) -> None:
        """Make the next publish write again (the ConfigMap was changed by hand)."""
        with self._seen:
            for key in [k for k in self._last if k[0] == namespace]:
                del self._last[key]
                self._versions.pop(key, None)
