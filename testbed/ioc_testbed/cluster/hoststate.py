"""Host state a node changes, recorded before and restored after.

A kubelet writes a few global sysctls, creates cgroups, leaves mounts under its root
directory and symlinks in /var/log/containers; containerd's CNI calls create network
namespaces in /run/netns. Everything here is undone at teardown, and `residue` lists
whatever would still be there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..ownership import file_lock

# What the kubelet sets at start-up (pkg/kubelet/cm: setupKernelTunables) and what a
# CNI plugin or kube-proxy might touch outside a node's own namespace.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # the kubelet's, fixed in its code
# Paths the kubelet and containerd use whatever they are told (fixed in their code):
# the device plugin socket, the container log links, go-cni's result cache, the shims'
# sockets. Shared by every cluster on the machine: removed (if a cluster made them) by
# the last one to stop.
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")
SHARED_PATHS = (Path("/var/lib/kubelet"), CONTAINER_LOG_LINKS, Path("/var/lib/cni"),
                Path("/run/containerd"))
STATE_DIR = Path("/run/ioc-testbed")
MADE = STATE_DIR / "shared-paths.list"  # JSON: the shared paths the test bed created


def host_lock(name: str, timeout: float = 120.0) -> contextlib.AbstractContextManager[None]:
    """A lock shared by every cluster of the machine (flock on /run/ioc-testbed/NAME)."""
    return file_lock(STATE_DIR / f"{name}.lock", timeout)


def note_shared_paths() -> None:
    """Before a cluster starts: remember which shared paths do not exist yet."""
    with host_lock("shared-paths"):
        made = set(json.loads(MADE.read_text())) if MADE.exists() else set()
        made |= {str(p) for p in SHARED_PATHS if not p.exists()}
        MADE.write_text(json.dumps(sorted(made)))


def remove_shared_paths(live_clusters: int) -> list[str]:
    """After a cluster stopped: if no other cluster is live, remove the shared paths the
    test bed created (whatever is in them is the clusters' own)."""
    if live_clusters:
        return []
    problems = []
    with host_lock("shared-paths"):
        made = json.loads(MADE.read_text()) if MADE.exists() else []
        for path in map(Path, made):
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                problems.append(f"path {path}")
        MADE.unlink(missing_ok=True)
    return problems


def shared_paths_left() -> list[str]:
    made = json.loads(MADE.read_text()) if MADE.exists() else []
    return [p for p in made if Path(p).exists()]


def made_ns(path: Path) -> int | None:
    """When the file at `path` was last (re)made, in ns since the epoch; None if absent."""
    try:
        return path.stat().st_ctime_ns
    except OSError:
        return None


def read_sysctls() -> dict[str, str]:
    values = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            values[key] = (Path("/proc/sys") / key).read_text().strip()
    return values


def restore_sysctls(saved: dict[str, str]) -> list[str]:
    """Write back what changed; returns the keys that could not be restored."""
    failed = []
    for key, value in saved.items():
        path = Path("/proc/sys") / key
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError:
            failed.append(key)
    return failed


def own_cgroup() -> str:
    """The most specific cgroup (v1) of this process: pods are placed under it."""
    best = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers and len(path) > len(best):
            best = path
    return best


def hierarchies() -> list[Path]:
    """Mount points of the v1 hierarchies (and the hybrid unified one)."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] in ("cgroup", "cgroup2") and parts[1].startswith(str(CGROUP_ROOT)):
            mounts.append(Path(parts[1]))
    return mounts


@dataclass
class CgroupTree:
    """One cgroup path made in every hierarchy, so a kubelet with `cgroupRoot` set to it
    (cgroupfs driver, same path in each controller) keeps all its pods inside it."""

    path: str  # e.g. /process_api/abc/ioc-testbed-1a2b3c-n0
    created: list[Path] = field(default_factory=list)

    def create(self) -> None:
        for mount in hierarchies():
            parts = Path(self.path.lstrip("/")).parts
            here = mount
            for part in parts:
                here = here / part
                if here.is_dir():
                    continue
                here.mkdir()
                self.created.append(here)
                if (here / "cpuset.cpus").exists():  # a v1 cpuset starts empty: inherit
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        (here / name).write_text((here.parent / name).read_text())

    def pids(self) -> set[int]:
        found: set[int] = set()
        for mount in hierarchies():
            top = mount / self.path.lstrip("/")
            for dirpath, _, files in os.walk(top):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError):
                        found |= {int(p) for p in
                                  (Path(dirpath) / "cgroup.procs").read_text().split()}
        return found

    def remove(self) -> list[str]:
        """rmdir every cgroup under the path, deepest first, then the ones we made."""
        problems = []
        for mount in hierarchies():
            top = mount / self.path.lstrip("/")
            if not top.is_dir():
                continue
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        problems.append(f"cgroup {dirpath}: {exc.strerror}")
        for made in reversed(self.created):
            try:
                made.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cgroup {made}: {exc.strerror}")
        return problems

    def residue(self) -> list[str]:
        paths = {m / self.path.lstrip("/") for m in hierarchies()} | set(self.created)
        return [f"cgroup {p}" for p in sorted(paths) if p.exists()]


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first (unmount order)."""
    prefix = str(directory.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(Path(point))
    return sorted(set(points), key=lambda p: -len(p.parts))


def unmount_all(directory: Path) -> list[str]:
    """Unmount everything below `directory` (bounded: each point tried twice, then lazily)."""
    import subprocess

    problems = []
    for _ in range(3):
        points = mounts_under(directory)
        if not points:
            return []
        for point in points:
            subprocess.run(["umount", str(point)], capture_output=True, timeout=20,
                           check=False)
    for point in mounts_under(directory):
        done = subprocess.run(["umount", "-l", str(point)], capture_output=True, text=True,
                              timeout=20, check=False)
        if done.returncode:
            problems.append(f"mount {point}: {done.stderr.strip()}")
    return problems


def container_log_links(targets_under: Iterable[Path]) -> list[Path]:
    """The kubelet's /var/log/containers symlinks that point into our node directories."""
    roots = [str(t) for t in targets_under]
    links = []
    if CONTAINER_LOG_LINKS.is_dir():
        for link in CONTAINER_LOG_LINKS.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(tuple(roots)):
                    links.append(link)
    return links


def cni_netns() -> set[str]:
    """Network namespaces containerd's CNI calls made (cni-<uuid>)."""
    netns = Path("/run/netns")
    return {p.name for p in netns.glob("cni-*")} if netns.is_dir() else set()
