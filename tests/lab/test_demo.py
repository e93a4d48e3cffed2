"""The README's first command works: `ioc-operator demo` passes, every IOC reachable."""

from __future__ import annotations

import subprocess
import sys


def test_demo_reaches_every_example_ioc():
    proc = subprocess.run([sys.executable, "-m", "ioc_operator.cli", "demo"],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo passed" in proc.stdout
    table = proc.stdout.split("IOC ", 1)[1]
    rows = [line for line in table.splitlines()[1:] if line and not line.startswith("==>")]
    rows = [r for r in rows if not r.startswith("demo ")]
    assert len(rows) >= 6
    assert all("FAIL" not in r for r in rows)
    assert sum(" host " in r for r in rows) >= 2  # two host-mode IOCs share a node
    assert {"host", "pod", "sidecar"} <= {r.split()[1] for r in rows}
    # every IOC Ready in `kubectl get iocs`
    listing = proc.stdout.split("kubectl get iocs", 1)[1].split("\n\n", 1)[0]
    iocs = [line.split() for line in listing.splitlines()[2:] if line.strip()]
    assert iocs and all(cols[2] == "True" for cols in iocs), listing
