"""`ioc-operator run` under tracemalloc, for `bench_operator --profile-memory`.

On SIGUSR1 it writes the live allocations, grouped by file and by line, to the file
named by $IOC_BENCH_TRACEMALLOC_OUT. tracemalloc slows the operator down: the timing
figures always come from an untraced run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from types import FrameType

TOP = 30


def _dump(_signum: int, _frame: FrameType | None) -> None:
    out = Path(os.environ["IOC_BENCH_TRACEMALLOC_OUT"])
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    snap = tracemalloc.take_snapshot().filter_traces(ignore)
    lines = []
    for key in ("filename", "lineno"):
        stats = snap.statistics(key)
        total = sum(s.size for s in stats)
        lines.append(f"# by {key}: {total / 2**20:.1f} MiB traced in {len(stats)} sites")
        for s in stats[:TOP]:
            lines.append(f"{s.size / 2**20:8.2f} MiB {s.count:9} blocks  {s.traceback[0]}")
        lines.append("")
    out.write_text("\n".join(lines))


def _watch_peak(threshold_mb: float, out: Path) -> None:
    """Dump once when the traced memory first exceeds the threshold: a transient peak
    is gone by the time anyone sends SIGUSR1."""
    while tracemalloc.get_traced_memory()[0] < threshold_mb * 2**20:
        time.sleep(0.2)
    snap = tracemalloc.take_snapshot()
    lines = [f"# first above {threshold_mb} MiB"]
    for s in snap.statistics("traceback")[:TOP]:
        lines.append(f"{s.size / 2**20:8.2f} MiB {s.count:9} blocks")
        lines += [f"      {frame}" for frame in s.traceback.format()[-12:]]
    out.write_text("\n".join(lines))


def main() -> int:
    frames = int(os.environ.get("IOC_BENCH_TRACEMALLOC_FRAMES", "1"))
    tracemalloc.start(frames)  # 1 frame: the allocating line, cheap enough for 1,000 IOCs
    signal.signal(signal.SIGUSR1, _dump)
    peak = os.environ.get("IOC_BENCH_TRACEMALLOC_PEAK_MB")
    if peak:
        out = Path(os.environ["IOC_BENCH_TRACEMALLOC_OUT"] + ".peak")
        threading.Thread(target=_watch_peak, args=(float(peak), out), daemon=True).start()
    from ioc_operator.cli import main as cli_main
    return cli_main(sys.argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
