"""py-spy for the benchmarks: one way to start it, and a summary of its collapsed stacks."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

_LINE = re.compile(r":\d+\)$")  # "fn (file.py:12)" -> "fn (file.py)": a function, not a line


def py_spy(pid: int, out: Path, fmt: str, seconds: float | None = None, rate: int = 100,
           native: bool = False, nonblocking: bool = False) -> subprocess.Popen[bytes]:
    """py-spy recording every thread of `pid` into `out` in format `fmt` ("raw" for
    collapsed stacks, "speedscope"), for `seconds` or until it gets SIGINT."""
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--threads", "--rate", str(rate),
            "--format", fmt, "--output", str(out)]
    if seconds is not None:
        argv += ["--duration", str(max(1, round(seconds)))]
    if native:
        argv.append("--native")
    if nonblocking:  # the target is never paused: less exact, costs it nothing
        argv.append("--nonblocking")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def top_functions(collapsed: str, top: int = 25) -> str:
    """The functions with the most samples in py-spy's collapsed stacks ("thread (id);
    outer (file:line);...;inner (file:line) count"): inclusive (anywhere on the stack)
    and self (innermost), in % of all samples (idle threads are not sampled)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_LINE.sub(")", f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread ("))]
        if not count.isdigit() or not frames:
            continue
        n = int(count)
        total += n
        for fn in set(frames):  # a recursive function counts once per sample
            inclusive[fn] += n
        own[frames[-1]] += n
    if not total:
        return "# no samples"
    lines = [f"# {total} samples; inclusive (on the stack):"]
    lines += [f"{n / total * 100:6.1f} %  {fn}" for fn, n in inclusive.most_common(top)]
    lines.append("# self (innermost frame):")
    lines += [f"{n / total * 100:6.1f} %  {fn}" for fn, n in own.most_common(top)]
    return "\n".join(lines)
