"""The README's first command works: `ioc-testbed demo` passes, every IOC reachable."""

from __future__ import annotations

import subprocess
import sys


def test_demo_reaches_every_example_ioc():
    proc = subprocess.run([sys.executable, "-m", "ioc_testbed.cli", "demo"],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo passed" in proc.stdout
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("IOC ") and "MODE" in line)
    rows = [line.split() for line in lines[head + 1:] if line and not line.startswith(
        ("==>", "demo "))]
    assert len(rows) >= 6
    assert all("FAIL" not in " ".join(r) for r in rows)
    assert sum(r[1] == "host" for r in rows) >= 2  # two host-mode IOCs share a node
    assert {"host", "pod", "sidecar"} <= {r[1] for r in rows}
    # every IOC Ready in `kubectl get iocs`
    top = next(i for i, line in enumerate(lines) if line.startswith("NAME ") and "READY" in line)
    listing = [line.split() for line in lines[top + 1:top + 1 + len(rows)]]
    assert all(cols[2] == "True" for cols in listing), listing
