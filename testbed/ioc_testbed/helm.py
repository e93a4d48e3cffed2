"""Helm, built from the Go module proxy (kubernetes/build-helm.sh) and run with its own
home directories: nothing is read from or written to the user's."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import resource

BUILD_TIMEOUT = 1800.0


def build_helm() -> Path:
    """Build (or reuse) helm; returns the binary."""
    done = subprocess.run(["bash", str(resource("kubernetes/build-helm.sh"))],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                          check=False, stdin=subprocess.DEVNULL)
    if done.returncode:
        raise RuntimeError(f"build-helm.sh failed (needs Go and the module proxy):\n"
                           f"{done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Helm:
    binary: Path
    home: Path  # HELM_* directories
    chart: Path

    def env(self) -> dict[str, str]:
        return {**os.environ,
                "HELM_CACHE_HOME": str(self.home / "cache"),
                "HELM_CONFIG_HOME": str(self.home / "config"),
                "HELM_DATA_HOME": str(self.home / "data")}

    def __call__(self, *args: str, check: bool = True,
                 timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=self.env(),
                              check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def values_file(self, name: str, values: dict[str, Any]) -> Path:
        path = self.home / f"values-{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(values))
        return path

    def template(self, release: str, namespace: str, values: dict[str, Any] | None = None,
                 *, crds: bool = False) -> list[dict[str, Any]]:
        """The chart's objects for these values, as dicts (helm's own order)."""
        args = ["template", release, str(self.chart), "--namespace", namespace]
        if crds:
            args.append("--include-crds")
        if values:
            args += ["--values", str(self.values_file(f"{release}-{namespace}", values))]
        return [d for d in yaml.safe_load_all(self(*args).stdout) if d]

    def install_operator(self, kubeconfig: Path, namespace: str, *settings: str,
                         timeout: float = 180.0) -> None:
        """`helm upgrade --install ioc-operator` of the chart, as a user would, waiting
        for its pods (the operator, the name service). `settings`: `--set` values."""
        args = ["upgrade", "--install", "ioc-operator", str(self.chart), "--namespace",
                namespace, "--create-namespace", "--kubeconfig", str(kubeconfig), "--wait",
                "--timeout", f"{timeout:.0f}s"]
        for setting in settings:
            args += ["--set", setting]
        self(*args, timeout=timeout + 60)
