"""The project's images, built offline from the repository's Dockerfiles.

No registry is reachable here, so:

* the Python base image that the Dockerfiles name (``python:3.11-slim``) is stood in for
  by a Debian bookworm ``debootstrap --variant=minbase`` root filesystem with python3 and
  pip (bookworm's python3 is 3.11), committed as a local image;
* ``buildah bud`` (Debian's buildah, chroot isolation, no daemon) builds each
  ``docker/*.Dockerfile`` unchanged, with ``--build-arg PYTHON_IMAGE=<that base>``;
* the pause image (the pod sandbox) is ``build/pause/linux/pause.c`` from the same
  ``k8s.io/kubernetes`` module as the control plane, compiled with ``gcc -static``.

Each image is saved as a docker-archive under the cache directory, named by a key made of
everything that goes into it (the Dockerfile, the files its COPY lines name, the build
arguments, the base image's key), so a changed input rebuilds it and an unchanged one is
reused at once. buildah's own storage lives in the cache too, never in /var/lib.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .controlplane import cache_root, pinned_version
from .ownership import file_lock

__all__ = [
    "BASE_IMAGE",
    "PAUSE_IMAGE",
    "REGISTRY",
    "BuiltImage",
    "ImageError",
    "build_all",
    "dockerfile_images",
]

REGISTRY = "ghcr.io/epics-operator"
BASE_IMAGE = "localhost/ioc-testbed/python:3.11-bookworm"
PAUSE_IMAGE = "localhost/ioc-testbed/pause:3.10"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What python:3.11-slim offers that the Dockerfiles and examples use: python, pip, TLS.
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3",
                 "ca-certificates", "netbase")
BUILD_TIMEOUT = 3600.0
# Host files a build step may read (pip's TLS trust and settings); mounted read-only
# for RUN steps only, never copied into an image.
BUILD_MOUNTS = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf")
_IGNORED = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".hypothesis"}


class ImageError(RuntimeError):
    """An image could not be built."""


@dataclass(frozen=True)
class BuiltImage:
    name: str  # the reference pods use, e.g. ghcr.io/epics-operator/ioc-operator:0.1.0
    archive: Path  # docker-archive, ready for `ctr images import`
    key: str
    seconds: float  # build time (0 when reused from the cache)


def _log(message: str) -> None:
    print(f"[images] {message}", flush=True)


def _run(argv: Sequence[str], *, timeout: float = BUILD_TIMEOUT, log: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    """Run a build command; on failure raise ImageError with the end of its output."""
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from exc
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise ImageError(f"{shlex.join(argv[:4])} ... failed ({done.returncode}):\n{tail}")
    return done.stdout


class Buildah:
    """buildah with its storage in the cache directory (not /var/lib/containers)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "build.log"
        root.mkdir(parents=True, exist_ok=True)

    def __call__(self, *args: str, timeout: float = BUILD_TIMEOUT) -> str:
        argv = ["buildah", "--root", str(self.root / "storage"),
                "--runroot", str(self.root / "run"), "--storage-driver", "overlay", *args]
        env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
        return _run(argv, timeout=timeout, log=self.log, env=env)

    def prune(self) -> None:
        """Drop working containers and untagged images (replaced images, build stages),
        so the storage stays bounded. Only under the build lock: it owns the storage."""
        for args in (("rm", "--all"), ("rmi", "--prune")):
            try:
                self(*args, timeout=300)
            except ImageError as exc:
                _log(f"buildah {' '.join(args)}: {str(exc).splitlines()[-1]}")

    def exists(self, image: str) -> bool:
        try:
            self("inspect", "--type", "image", "--format", "{{.FromImageID}}", image,
                 timeout=60)
        except ImageError:
            return False
        return True

    def save(self, image: str, archive: Path) -> None:
        tmp = archive.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        self("push", "--quiet", image, f"docker-archive:{tmp}:{image}")
        tmp.rename(archive)


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _files(root: Path, rel: str) -> Iterable[Path]:
    path = root / rel
    if path.is_file():
        yield path
        return
    if not path.is_dir():
        raise ImageError(f"build input {rel} does not exist under {root}")
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED
                             and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if not name.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / name


def copy_sources(dockerfile: Path) -> list[str]:
    """The context paths a Dockerfile's COPY/ADD lines read (not those from a stage)."""
    sources: list[str] = []
    for line in _logical_lines(dockerfile.read_text()):
        words = shlex.split(line)
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        sources += args[:-1]
    return sources


def _logical_lines(text: str) -> Iterable[str]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        yield buf + line
        buf = ""
    if buf:
        yield buf


def input_key(context: Path, dockerfile: Path, build_args: dict[str, str],
              base_key: str) -> str:
    """A key for everything that goes into an image built from `dockerfile`."""
    parts: list[str | bytes] = [dockerfile.read_bytes(), repr(sorted(build_args.items())),
                                base_key]
    for rel in sorted(set(copy_sources(dockerfile))):
        for path in _files(context, rel):
            parts += [str(path.relative_to(context)), path.read_bytes()]
    return _digest(*parts)


def dockerfile_images(context: Path, version: str) -> dict[str, Path]:
    """docker/<name>.Dockerfile -> image reference, as kind/create.sh names them."""
    images: dict[str, Path] = {}
    for dockerfile in sorted((context / "docker").glob("*.Dockerfile")):
        name = dockerfile.name.removesuffix(".Dockerfile")
        image = {"operator": "ioc-operator", "gateway": "ioc-gateway"}.get(name, name)
        images[f"{REGISTRY}/{image}:{version}"] = dockerfile
    return images


def chart_version(context: Path) -> str:
    """The chart's appVersion: the tag every image carries."""
    text = (context / "charts" / "ioc-operator" / "Chart.yaml").read_text()
    match = re.search(r'^appVersion:\s*"?([^"\s]+)"?', text, re.MULTILINE)
    if not match:
        raise ImageError("no appVersion in charts/ioc-operator/Chart.yaml")
    return match.group(1)


class ImageBuilder:
    """Builds (or reuses) the base, pause and Dockerfile images; see the module doc."""

    def __init__(self, context: Path, cache: Path | None = None) -> None:
        self.context = context.resolve()
        self.cache = cache or cache_root() / "images"
        self.archives = self.cache / "archives"
        self.archives.mkdir(parents=True, exist_ok=True)
        self.buildah = Buildah(self.cache / "buildah")

    def lock(self, timeout: float = BUILD_TIMEOUT) -> contextlib.AbstractContextManager[None]:
        """One builder at a time per cache (concurrent test sessions share it)."""
        return file_lock(self.cache / "build.lock", timeout, poll=1.0)

    # -- the base
    def base_key(self) -> str:
        return _digest(DEBIAN_SUITE, DEBIAN_MIRROR, *BASE_PACKAGES, "v2")

    def base(self) -> str:
        """Commit the debootstrap root filesystem as BASE_IMAGE (once per key)."""
        key = self.base_key()
        marker = self.cache / f"base-{key}.done"
        if marker.exists() and self.buildah.exists(BASE_IMAGE):
            return key
        start = time.monotonic()
        _log(f"debootstrap {DEBIAN_SUITE} minbase + {' '.join(BASE_PACKAGES)} (about 1-2 min)")
        for tool in ("debootstrap", "buildah"):
            if not shutil.which(tool):
                raise ImageError(f"{tool} not found (apt-get install {tool})")
        with tempfile.TemporaryDirectory(dir=self.cache, prefix="rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                  DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR], log=self.buildah.log)
            # As in the python images: pip may install system-wide, no apt caches.
            for junk in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
                junk.unlink()
            for sub in ("var/lib/apt/lists", "var/cache/apt"):
                for item in (rootfs / sub).glob("*"):
                    if item.is_file():
                        item.unlink()
            container = self.buildah("from", "scratch").strip()
            try:
                mount = self.buildah("mount", container).strip()
                _run(["cp", "-a", f"{rootfs}/.", mount])
                self.buildah("config", "--env", "LANG=C.UTF-8",
                             "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                             "/sbin:/bin", "--cmd", "python3", container)
                self.buildah("commit", "--rm", container, BASE_IMAGE)
            except BaseException:
                self.buildah("rm", container)
                raise
        marker.write_text(BASE_IMAGE)
        _log(f"base image {BASE_IMAGE} in {time.monotonic() - start:.0f} s")
        return key

    # -- the pause image
    def pause(self) -> BuiltImage:
        version = pinned_version() or "unknown"
        source = self._pause_source(version)
        key = _digest(source.read_bytes(), version)
        archive = self.archives / f"pause-{key}.tar"
        if archive.exists():
            return BuiltImage(PAUSE_IMAGE, archive, key, 0.0)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            binary = Path(tmp) / "pause"
            _run(["gcc", "-Os", "-static", "-o", str(binary), str(source)])
            _run(["strip", str(binary)])
            container = self.buildah("from", "scratch").strip()
            try:
                self.buildah("copy", container, str(binary), "/pause")
                self.buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535",
                             container)
                self.buildah("commit", "--rm", container, PAUSE_IMAGE)
            except BaseException:
                self.buildah("rm", container)
                raise
        self.buildah.save(PAUSE_IMAGE, archive)
        return BuiltImage(PAUSE_IMAGE, archive, key, time.monotonic() - start)

    @staticmethod
    def _pause_source(version: str) -> Path:
        """pause.c from the module cache (the control-plane build downloaded the module)."""
        gomodcache = _run(["go", "env", "GOMODCACHE"], timeout=60).strip()
        source = Path(gomodcache) / f"k8s.io/kubernetes@{version}/build/pause/linux/pause.c"
        if not source.is_file():
            _run(["go", "mod", "download", f"k8s.io/kubernetes@{version}"], timeout=900)
        if not source.is_file():
            raise ImageError(f"no {source} in the Go module cache")
        return source

    # -- Dockerfile images
    def build(self, image: str, dockerfile: Path, base_key: str) -> BuiltImage:
        version = image.rsplit(":", 1)[1]
        build_args = {"PYTHON_IMAGE": BASE_IMAGE, "VERSION": version}
        key = input_key(self.context, dockerfile, build_args, base_key)
        stem = image.rsplit("/", 1)[1].replace(":", "-")
        archive = self.archives / f"{stem}-{key}.tar"
        if archive.exists():
            return BuiltImage(image, archive, key, 0.0)
        _log(f"building {image} from {dockerfile.relative_to(self.context)}")
        start = time.monotonic()
        # No --layers: buildah 1.28 then binds a cached stage's base, not the stage, for
        # `RUN --mount=type=bind,from=<stage>` (the second image missed its wheels).
        args = ["bud", "--pull=never", "--isolation=chroot", "--network=host",
                "--file", str(dockerfile), "--tag", image]
        for name, value in build_args.items():
            args += ["--build-arg", f"{name}={value}"]
        for path in BUILD_MOUNTS:
            if Path(path).is_file():
                args += ["--volume", f"{path}:{path}:ro"]
        self.buildah(*args, str(self.context))
        for old in self.archives.glob(f"{stem}-*.tar"):
            old.unlink()
        self.buildah.save(image, archive)
        self.buildah.prune()
        seconds = time.monotonic() - start
        _log(f"{image} built in {seconds:.0f} s")
        return BuiltImage(image, archive, key, seconds)


def build_all(context: Path, names: Iterable[str] | None = None) -> list[BuiltImage]:
    """Build (or reuse) the pause image and every docker/*.Dockerfile image.

    `names` limits the Dockerfile images (e.g. ``["ioc-operator"]``); the pause image is
    always included, since every node needs it.
    """
    builder = ImageBuilder(context)
    context = builder.context
    wanted = set(names) if names is not None else None
    with builder.lock():
        builder.buildah.prune()  # leftovers of a build that was killed
        base_key = builder.base()
        built = [builder.pause()]
        for image, dockerfile in dockerfile_images(context, chart_version(context)).items():
            short = image.rsplit("/", 1)[1].split(":")[0]
            if wanted is None or short in wanted:
                built.append(builder.build(image, dockerfile, base_key))
    return built
