"""`ioc-operator run` as a child process: for the demo, the tests and the benchmarks.
Started with a kubeconfig, logged to a file, stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


class OperatorProcess:
    def __init__(self, kubeconfig: Path | str, log_path: Path,
                 args: Sequence[str] = ("run",), env: Mapping[str, str] | None = None,
                 clean_env: bool = False, module: str = "ioc_operator.cli") -> None:
        """`env` adds to (or, with `clean_env`, replaces the operator's settings in) the
        environment; KUBECONFIG always points at `kubeconfig`. `module` is the entry
        point run with `python -m` (the benchmarks' memory profile wraps the CLI)."""
        self.kubeconfig = Path(kubeconfig)
        self.log_path = log_path
        self.args = list(args)
        self.env = dict(env or {})
        self.clean_env = clean_env
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        base = dict(os.environ)
        if self.clean_env:
            base = {k: v for k, v in base.items()
                    if not k.startswith(("IOC_OPERATOR_", "KUBECONFIG", "EPICS_"))}
        env = {**base, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        """Terminate (or kill) by PID; bounded."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
