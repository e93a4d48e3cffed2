"""What the test bed holds on the machine, shared by concurrent runs: file locks, and
markers saying which process owns what (so a run killed with SIGKILL is cleaned up by
the next one, and never one whose owner still lives)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, poll: float = 0.1) -> Iterator[None]:
    """An exclusive flock on `path`, waited for at most `timeout` s (TimeoutError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} busy for {timeout:.0f} s") from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def proc_start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), None if it is gone: a
    PID with the same start time is the same process, not a reused PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_marker(path: Path, info: dict[str, Any]) -> None:
    """Record `info` as owned by this process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "start": proc_start_time(os.getpid()),
                                **info}))


def markers(state_dir: Path) -> Iterator[tuple[Path, dict[str, Any], bool]]:
    """(marker, its info, whether its owner lives) for every readable marker."""
    if not state_dir.is_dir():
        return
    for marker in sorted(state_dir.glob("*.json")):
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict):
            alive = proc_start_time(int(info.get("pid", 0))) == info.get("start")
            yield marker, info, alive
