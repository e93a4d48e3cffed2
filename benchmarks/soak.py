"""The soak: the CA gateway, the bridge and the name server under an hour of mixed load
in the network lab (root), with memory, file descriptors, CPU and latency sampled;
writes the figures into docs/soak.md between its markers.

    sudo .venv/bin/python -m benchmarks.soak                 # an hour, docs/soak.md
    sudo .venv/bin/python -m benchmarks.soak --seconds 600 --no-write

What runs is ioc_testbed.lab.soak (see its docstring and docs/soak.md); the short
version is tests/lab/test_soak.py. Exit status 1 if a process under test died or a
trend grows beyond its bound.
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

from ioc_testbed.lab.soak import SoakConfig, SoakResult, client_errors, run_soak, summary

DOC = Path(__file__).resolve().parent.parent / "docs" / "soak.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
TARGET = 3600.0


def _f(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def _trend(tr: dict[str, Any], unit: str, digits: int) -> str:
    if math.isnan(tr["slope"]):
        return tr["verdict"]
    return (f"{_f(tr['slope'], digits, True)} {unit}/h [{_f(tr['low'], digits, True)}, "
            f"{_f(tr['high'], digits, True)}], spread ±{_f(tr['spread'], digits)}: "
            f"**{tr['verdict']}** (bound {tr['bound']:g} {unit}/h)")


def proc_table(figures: dict[str, Any]) -> str:
    rows = ["| process | figure | start | end | max | trend per hour [95 % interval], "
            "verdict |", "|---|---|---|---|---|---|"]
    for proc, data in figures["procs"].items():
        rss, fds, cpu = data["rss"], data["fds"], data["cpu"]
        rows.append(f"| {proc} | RSS (MB) | {_f(rss['start'], 2)} | {_f(rss['end'], 2)} | "
                    f"{_f(rss['max'], 2)} | {_trend(rss['trend'], 'MB', 2)} |")
        rows.append(f"| {proc} | open fds | {_f(fds['start'], 0)} | {_f(fds['end'], 0)} | "
                    f"{_f(fds['max'], 0)} | {_trend(fds['trend'], 'fds', 1)} |")
        rows.append(f"| {proc} | CPU (% of one core) | {_f(cpu['start'])} | {_f(cpu['end'])}"
                    f" | | {_f(cpu['all'])} on average after the warm-up |")
    return "\n".join(rows)


def latency_table(figures: dict[str, Any]) -> str:
    names = {"ca": "CA get, latency pod → gateway → IOC",
             "pva": "PVA get, latency pod → bridge → IOC",
             "search": "CA search of up to 12 names at the name server (UDP, until all answered)"}
    rows = ["| what (ms) | p50 start | p99 start | p50 end | p99 end | p50 / p99 / max "
            "outside restarts | p99 / max with restarts | measured | failed (outside / "
            "in restarts) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, data in figures["latency"].items():
        s, e, st, a = data["start"], data["end"], data["steady"], data["all"]
        failed = data.get("failures")
        fail = f"{failed['outside']} / {failed['restart']}" if failed else "see churn"
        rows.append(f"| {names[key]} | {_f(s['p50'], 2)} | {_f(s['p99'], 2)} | "
                    f"{_f(e['p50'], 2)} | {_f(e['p99'], 2)} | {_f(st['p50'], 2)} / "
                    f"{_f(st['p99'], 2)} / {_f(st['max'], 1)} | {_f(a['p99'], 2)} / "
                    f"{_f(a['max'], 1)} | {a['n']:,} | {fail} |")
    return "\n".join(rows)


def load_lines(result: SoakResult, figures: dict[str, Any]) -> list[str]:
    cfg = result.config
    out = []
    for role, data in figures["monitors"].items():
        out.append(f"* {role} (`tick`, about 1 kHz): {data['rate']:,.0f} updates/s after the "
                   f"warm-up, {data['steady_rate']:,.0f}/s outside restarts; "
                   f"{data['changes']} connection changes; {data['last_window']:,} updates in "
                   f"the last {cfg['report']:.0f} s window; connected at the end: "
                   f"{'yes' if data['connected'] else 'NO'}")
    for role, data in figures["churn"].items():
        why = ", ".join(f"{k}: {v}" for k, v in sorted(data["why"].items())) or "none"
        out.append(f"* {role}: {data['cycles']:,} connect-use-disconnect cycles, "
                   f"{data['channels']:,} channels; {data['outside']} failed outside "
                   f"restarts, {data['restart']} during them ({why})")
    errors = client_errors(figures)
    out.append(f"* client errors of every role: {errors['outside']} outside IOC restarts, "
               f"{errors['restart']} during a restart or the {cfg['settle']:.0f} s after it")
    out.append(f"* IOC restarts: {len(result.restarts)} (down at "
               + (", ".join(f"{d:.0f}" for d, _ in result.restarts) or "-") + " s; back in "
               + (", ".join(f"{u - d:.1f}" for d, u in result.restarts) or "-") + " s)")
    stalls = figures["stalls"]
    out.append(f"* sampler stalls (gaps of more than {2 * cfg['sample']:.0f} s between samples)"
               ": " + (", ".join(
                   f"{length:.0f} s at {t:.0f} s" for t, length in stalls) or "none"))
    out.append("* still running at the end: " + ", ".join(
        f"{k} {'yes' if v else 'NO'}" for k, v in result.alive.items()))
    out.append("* load processes: " + ", ".join(
        f"{role} {d['reports']} reports (exit {d['exit']})"
        for role, d in figures["load"].items()))
    for proc, stats in result.stats.items():
        keep = {k: v for k, v in stats.items() if v}
        out.append(f"* {proc} counters at the end: " + " ".join(
            f"{k}={v}" for k, v in sorted(keep.items())))
    return out


def render(result: SoakResult, figures: dict[str, Any], wall: float, args: str,
           note: str, commit: str, when: str) -> str:
    cfg = result.config
    minutes = result.duration / 60
    length = (f"{minutes:.0f} minutes of load" if result.duration >= TARGET - 60 else
              f"**{minutes:.0f} minutes of load only: the target is an hour**")
    head = (f"Run {when} UTC by "
            f"`sudo .venv/bin/python -m benchmarks.soak{args}`: {length} "
            f"({wall:.0f} s with set-up and teardown), {len(result.restarts)} IOC restarts. "
            f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, commit {commit}; 1-min load average "
            f"{figures['loadavg']['mean']:.1f} on average, {figures['loadavg']['max']:.1f} at "
            "most (the IOC, the three processes, the five load clients and anything else on "
            "the machine share these cores)." + (f" {note}" if note else ""))
    method = (f"Samples every {cfg['sample']:.0f} s. The first {cfg['warmup']:.0f} s are a "
              f"warm-up left out of everything below; *start* is the median of the next "
              f"{figures['span']:.0f} s, *end* the median of the last {figures['span']:.0f} s; "
              "the trend is a least-squares line through every sample after the warm-up, "
              "its interval two standard errors widened for the samples' autocorrelation; "
              "*flat* means the whole interval is at or below the bound, *grows* the whole "
              "interval above it, *undecided* neither. Latency: *start*/*end* as above, "
              f"from the {cfg['report']:.0f} s windows that do not meet an IOC restart (or "
              f"the {cfg['settle']:.0f} s after it).")
    return "\n".join([head, "", method, "", proc_table(figures), "", latency_table(figures),
                      "", *load_lines(result, figures)])


def _commit() -> str:
    """HEAD, marked if the code under test (operator/, testbed/) has changes not in it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=DOC.parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "operator", "testbed"],
                               capture_output=True, text=True, check=True,
                               cwd=DOC.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return f"{head} (with uncommitted changes)" if dirty else head


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n\n" + text + "\n\n" + doc[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=TARGET)
    parser.add_argument("--restart-every", type=float, default=300.0)
    parser.add_argument("--sample", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=None,
                        help="s left out of the figures (default 120, or a fifth of a "
                        "shorter run)")
    parser.add_argument("--rss-bound", type=float, default=1.0, help="MB per hour")
    parser.add_argument("--note", default="", help="a sentence added to the doc's header")
    parser.add_argument("--raw", type=Path, help="write every sample and report here (JSON)")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/soak.md")
    parser.add_argument("--from-raw", type=Path,
                        help="no run: the figures of an earlier run's --raw file")
    args = parser.parse_args(argv)
    extra = "" if args.seconds == TARGET else f" --seconds {args.seconds:g}"
    if args.from_raw:
        raw = json.loads(args.from_raw.read_text())
        raw.pop("figures", None)
        wall = raw.pop("wall", 0.0)
        commit = raw.pop("commit", "?")
        when = raw.pop("when", "?")
        result = SoakResult(**{**raw, "restarts": [tuple(r) for r in raw["restarts"]]})
        figures = summary(result)
    else:
        if os.geteuid() != 0:
            print("the soak runs in the network lab: it needs root", file=sys.stderr)
            return 2
        warmup = args.warmup if args.warmup is not None else min(120.0, args.seconds / 5)
        commit = _commit()  # of the code that runs (HEAD may move meanwhile)
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        started = time.monotonic()
        result = run_soak(SoakConfig(seconds=args.seconds, sample=args.sample,
                                     report=args.sample, warmup=warmup,
                                     restart_every=args.restart_every,
                                     rss_bound=args.rss_bound))
        wall = time.monotonic() - started
        if args.raw:
            args.raw.write_text(json.dumps({**result.as_json(), "wall": wall,
                                            "commit": commit, "when": when}))
        figures = summary(result)
    text = render(result, figures, wall, extra, args.note, commit, when)
    print(text)
    if not args.no_write:
        write_doc(text)
        print(f"wrote {DOC}")
    grows = [p for p, d in figures["procs"].items()
             if "grows" in (d["rss"]["trend"]["verdict"], d["fds"]["trend"]["verdict"])]
    return 0 if all(result.alive.values()) and not grows else 1


if __name__ == "__main__":
    sys.exit(main())
