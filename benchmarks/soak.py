"""The soak benchmark: the CA gateway, the bridge and the name server under an hour of
mixed load in the network lab (root), with memory, file descriptors, CPU and latency
sampled; writes the figures into docs/soak.md.

    sudo .venv/bin/python -m benchmarks.soak                 # an hour, docs/soak.md
    sudo .venv/bin/python -m benchmarks.soak --seconds 600 --no-write

What runs is ioc_testbed.lab.soak (see its docstring and docs/soak.md); the short
version is tests/lab/test_soak.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ioc_testbed.lab.soak import SoakConfig, SoakResult, run_soak, summary

DOC = Path(__file__).resolve().parent.parent / "docs" / "soak.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def _f(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:,.{digits}f}"


def table(result: SoakResult, figures: dict[str, Any]) -> str:
    rows = ["| figure | start | end | change | trend over the run (spread) |",
            "|---|---|---|---|---|"]
    for proc, data in figures["procs"].items():
        rss, fds = data["rss"], data["fds"]
        rows.append(f"| {proc}: RSS (MB) | {_f(rss['start'])} | {_f(rss['end'])} | "
                    f"{rss['end'] - rss['start']:+.1f} | {rss['slope_per_hour']:+.2f} MB/h "
                    f"(±{rss['noise']:.2f}); max {_f(rss['max'])} |")
        rows.append(f"| {proc}: file descriptors | {_f(fds['start'], 0)} | {_f(fds['end'], 0)}"
                    f" | {fds['end'] - fds['start']:+.0f} | {fds['slope_per_hour']:+.1f}/h "
                    f"(±{fds['noise']:.1f}); max {_f(fds['max'], 0)} |")
        if "cpu_percent" in data:
            rows.append(f"| {proc}: CPU (% of one core, whole run) | | {_f(data['cpu_percent'])}"
                        " | | |")
    names = {"ca": "CA get through the gateway (ms)", "pva": "PVA get through the bridge (ms)"}
    for proto, data in figures["latency"].items():
        (s50, s99, sn), (e50, e99, en) = data["start"], data["end"]
        rows.append(f"| {names[proto]}, p50 | {_f(s50, 2)} | {_f(e50, 2)} | "
                    f"{e50 - s50:+.2f} | |")
        rows.append(f"| {names[proto]}, p99 | {_f(s99, 2)} | {_f(e99, 2)} | "
                    f"{e99 - s99:+.2f} | {sn:,} and {en:,} gets; {data['failures']} failed "
                    "in the whole run (IOC restarts) |")
    return "\n".join(rows)


def load_lines(result: SoakResult, figures: dict[str, Any]) -> list[str]:
    cfg = result.config
    out = []
    for role, data in figures["monitors"].items():
        out.append(f"* {role}: {data['rate']:,.0f} updates/s on average after the warm-up "
                   f"(restarts included), {data['changes']} connection changes, "
                   f"{data['last_window']:,} updates in the last {cfg['report']:.0f} s")
    for role, data in figures["churn"].items():
        why = ", ".join(f"{k} {v}" for k, v in sorted(data["why"].items())) or "none"
        out.append(f"* {role}: {data['cycles']:,} connect-use-disconnect cycles, "
                   f"{data['channels']:,} channels; {data['errors']} failed ({why})")
    out.append(f"* IOC restarts: {len(result.restarts)} (at "
               + ", ".join(f"{t:.0f}" for t in result.restarts) + " s)")
    out.append("* still running at the end: " + ", ".join(
        f"{k} {'yes' if v else 'NO'}" for k, v in result.alive.items()))
    for proc, stats in result.stats.items():
        keep = {k: v for k, v in stats.items() if v and not k.startswith(("probes", "cached"))}
        out.append(f"* {proc} counters at the end: " + " ".join(
            f"{k}={v}" for k, v in sorted(keep.items())))
    return out


def render(result: SoakResult, figures: dict[str, Any], seconds: float, args: str) -> str:
    cfg = result.config
    load = os.getloadavg()[0]
    head = (f"Run {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC by "
            f"`sudo .venv/bin/python -m benchmarks.soak{args}`, {seconds:.0f} s; "
            f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, commit {_commit()}; 1-min load average at the "
            f"end {load:.2f} (everything shares these cores). Samples every "
            f"{cfg['sample']:.0f} s; *start* is the first tenth of the run after a "
            f"{cfg['warmup']:.0f} s warm-up, *end* the last tenth; the trend is a "
            "least-squares line through every sample after the warm-up.")
    return "\n".join([head, "", table(result, figures), "", *load_lines(result, figures)])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=DOC.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n\n" + text + "\n\n" + doc[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--restart-every", type=float, default=300.0)
    parser.add_argument("--sample", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=120.0)
    parser.add_argument("--raw", type=Path, help="write every sample and report here (JSON)")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/soak.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the soak runs in the network lab: it needs root", file=sys.stderr)
        return 2
    started = time.monotonic()
    result = run_soak(SoakConfig(seconds=args.seconds, sample=args.sample,
                                 report=args.sample, warmup=args.warmup,
                                 restart_every=args.restart_every))
    figures = summary(result)
    extra = "" if args.seconds == 3600 else f" --seconds {args.seconds:g}"
    text = render(result, figures, time.monotonic() - started, extra)
    print(text)
    if args.raw:
        args.raw.write_text(json.dumps({"config": result.config, "samples": result.samples,
                                        "reports": result.reports,
                                        "restarts": result.restarts, "alive": result.alive,
                                        "stats": result.stats}))
    if not args.no_write:
        write_doc(text)
        print(f"wrote {DOC}")
    return 0 if all(result.alive.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
