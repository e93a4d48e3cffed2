"""Helpers for the integration tests: bounded waits and the operator subprocess."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ioc_testbed.operator_process import OperatorProcess

IOC_API = "epics-operator.io/v1alpha1"
WAIT = 30.0


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll until probe() is truthy; bounded in time (and so in count)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


class Operator(OperatorProcess):
    """`ioc-operator run -v`, as the integration tests use it."""

    def __init__(self, kubeconfig: Path, log_dir: Path) -> None:
        # IOCs deleted while the watch was down (test_faults) leave the directory
        # within one resync period: 10 s here, 60 s by default.
        super().__init__(kubeconfig, log_dir / "operator.log", args=("run", "-v"),
                         env={"IOC_OPERATOR_RESYNC_SECONDS": "10"})
