"""The README's first command works: `make demo` (ioc-testbed demo) on real nodes passes,
every example IOC written and read over every protocol it serves."""

from __future__ import annotations

import subprocess
import sys

from e2elib import REPO


def test_demo_on_real_nodes_reaches_every_example_ioc() -> None:
    proc = subprocess.run([sys.executable, "-m", "ioc_testbed.cli", "demo"], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout
    print(out[-6000:])
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "==> running on real nodes" in out and "demo on real nodes passed" in out
    assert "nothing left behind" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("IOC ") and "MODE" in line)
    rows = [line.split() for line in lines[head + 1:] if line.strip()
            and not line.startswith(("==>", "demo ", "    "))]
    assert len(rows) >= 7, rows
    assert all("FAIL" not in " ".join(r) for r in rows)
    assert {"host", "pod", "sidecar"} <= {r[1] for r in rows}
    host_nodes = {r[2] for r in rows if r[1] == "host"}
    assert len([r for r in rows if r[1] == "host"]) >= 2 and len(host_nodes) == 1
    assert all(r[3] == "True" for r in rows)  # Ready
    # every IOC written and read back over each protocol it serves
    assert sum("ok 4.25" in " ".join(r) for r in rows) >= 6
    assert sum("ok 4.5" in " ".join(r) for r in rows) >= 5
