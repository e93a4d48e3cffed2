"""Launch a real Kubernetes control plane on loopback for tests and demos.

etcd, kube-apiserver, kube-controller-manager and (optionally) kube-scheduler run as
child processes of this Python process, with a throw-away PKI made with `cryptography`.
The binaries come from ``KUBEBUILDER_ASSETS`` and/or the cache that
``kubernetes/build.sh`` (in this package) fills from the Go module proxy (see
`ensure_binaries`). Pods run only where a `node.Node` joins the cluster.
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import resource

__all__ = [
    "BINARIES",
    "SERVICE_CIDR",
    "ControlPlane",
    "ControlPlaneError",
    "build_script",
    "ensure_binaries",
    "pinned_version",
]

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
            "kubelet", "kube-proxy")
SERVICE_CIDR = "198.19.0.0/16"  # inside the lab's 198.18.0.0/15
FIRST_SERVICE_IP = "198.19.0.1"
LOOPBACK = "127.0.0.1"
SERVING_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
COLD_BUILD_HINT = (
    "a cold build from the Go module proxy takes about 6-7 min on 2 cores "
    "(~600 MB of modules, ~4 GB of Go build cache); cached runs take < 1 s"
)
_LOG_TAIL_LINES = 40


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or used."""


# --------------------------------------------------------------------------- binaries


def build_script() -> Path | None:
    """Path of ``kubernetes/build.sh`` (``IOC_OPERATOR_BUILD_SCRIPT`` overrides)."""
    override = os.environ.get("IOC_OPERATOR_BUILD_SCRIPT")
    path = Path(override) if override else resource("kubernetes/build.sh")
    return path if path.is_file() else None


def pinned_version() -> str | None:
    """The Kubernetes version pinned in ``kubernetes/go.mod``, if available."""
    script = build_script()
    gomod = script.parent / "go.mod" if script else None
    if gomod is None or not gomod.is_file():
        return None
    for line in gomod.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "k8s.io/kubernetes" and parts[1].startswith("v1."):
            return parts[1]
    return None


def cache_root() -> Path:
    if root := os.environ.get("IOC_OPERATOR_CACHE"):
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ioc-operator"


def _complete(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in BINARIES)


def ensure_binaries(*, build: bool = True, timeout: float = 3 * 3600) -> Path:
    """Return a directory holding all of `BINARIES`, building them if needed.

    With the build script available, it decides (it honours ``KUBEBUILDER_ASSETS`` and
    reuses its cache, so a warm call takes well under a second). Without it,
    ``KUBEBUILDER_ASSETS`` or an already filled cache directory must be complete.
    """
    script = build_script()
    if script is not None and build:
        try:
            done = subprocess.run(
                ["bash", str(script)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
                timeout=timeout,
                check=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise ControlPlaneError(f"{script} failed ({COLD_BUILD_HINT}): {exc}") from exc
        lines = done.stdout.strip().splitlines()
        bin_dir = Path(lines[-1]) if lines else Path()
        if not _complete(bin_dir):
            raise ControlPlaneError(f"{script} printed {bin_dir!s}, which lacks binaries")
        return bin_dir
    candidates = []
    if assets := os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(assets))
    version = pinned_version()
    if version:
        candidates.append(cache_root() / f"kubernetes-{version}" / "bin")
    candidates += sorted(cache_root().glob("kubernetes-v*/bin"), reverse=True)
    for candidate in candidates:
        if _complete(candidate):
            return candidate
    raise ControlPlaneError(
        f"no directory with {', '.join(BINARIES)}: set KUBEBUILDER_ASSETS or run "
        f"{resource('kubernetes/build.sh')} ({COLD_BUILD_HINT})"
    )


# ------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class _Pair:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, orgs: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in orgs]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    usages: Sequence[x509.ObjectIdentifier] = (),
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """Sign a certificate (self-signed CA when `issuer` is None)."""
    now = dt.datetime.now(dt.UTC)
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        ).add_extension(x509.ExtendedKeyUsage(list(usages)), False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), False)
    return builder.sign(signer, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    """Files of the throw-away PKI of one control plane."""

    directory: Path
    ca: _Pair
    serving: _Pair
    admin: _Pair
    controller_manager: _Pair
    scheduler: _Pair
    front_proxy_ca: _Pair
    front_proxy_client: _Pair
    kubelet_client: _Pair
    sa_private: Path
    sa_public: Path

    @classmethod
    def create(cls, directory: Path, addresses: Sequence[str] = ()) -> Pki:
        """Generate CA, serving and client certificates and the service-account keys.
        `addresses`: more IPs the API server is reached at (its serving certificate)."""
        directory.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue(_name("ioc-operator-test-ca"), ca_key, None)
        ca = cls._save(directory, "ca", ca_cert, ca_key)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVING_DNS_NAMES]
        sans += [x509.IPAddress(ipaddress.ip_address(ip))
                 for ip in dict.fromkeys((LOOPBACK, FIRST_SERVICE_IP, *addresses))]

        def leaf(stem: str, subject: x509.Name, *usages: x509.ObjectIdentifier) -> _Pair:
            key = ec.generate_private_key(ec.SECP256R1())
            is_server = ExtendedKeyUsageOID.SERVER_AUTH in usages
            cert = _issue(
                subject, key, (ca_cert, ca_key), usages=usages, sans=sans if is_server else ()
            )
            return cls._save(directory, stem, cert, key)

        client = ExtendedKeyUsageOID.CLIENT_AUTH
        # Separate CA for the aggregation layer's request-header authentication.
        fp_key = ec.generate_private_key(ec.SECP256R1())
        fp_cert = _issue(_name("ioc-operator-test-front-proxy-ca"), fp_key, None)
        fp_client_key = ec.generate_private_key(ec.SECP256R1())
        fp_client = _issue(
            _name("front-proxy-client"), fp_client_key, (fp_cert, fp_key), usages=[client]
        )
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        sa_pub = sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(
            directory=directory,
            ca=ca,
            serving=leaf("apiserver", _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH),
            admin=leaf("admin", _name("admin", ["system:masters"]), client),
            controller_manager=leaf("kcm", _name("system:kube-controller-manager"), client),
            scheduler=leaf("scheduler", _name("system:kube-scheduler"), client),
            front_proxy_ca=cls._save(directory, "front-proxy-ca", fp_cert, fp_key),
            front_proxy_client=cls._save(directory, "front-proxy-client", fp_client, fp_client_key),
            # The API server's identity towards kubelets (logs, attach, exec).
            kubelet_client=leaf("apiserver-kubelet-client",
                                _name("kube-apiserver-kubelet-client", ["system:masters"]),
                                client),
            sa_private=_write(directory / "sa.key", _key_pem(sa_key), private=True),
            sa_public=_write(directory / "sa.pub", sa_pub),
        )

    def issue_client(self, stem: str, common_name: str, orgs: Sequence[str] = ()) -> _Pair:
        """One more client certificate from this PKI's CA (a node's kubelet, kube-proxy)."""
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca.key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(_name(common_name, orgs), key, (ca_cert, ca_key),
                      usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._save(self.directory, stem, cert, key)

    @staticmethod
    def _save(
        directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> _Pair:
        return _Pair(
            cert=_write(directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            key=_write(directory / f"{stem}.key", _key_pem(key), private=True),
        )


def write_kubeconfig(path: Path, server: str, ca: Path, client: _Pair, user: str) -> Path:
    """Write a self-contained kubeconfig (certificates embedded) and return its path."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "ioc-test",
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert),
                    "client-key-data": b64(client.key),
                },
            }
        ],
        "contexts": [{"name": "ioc-test", "context": {"cluster": "ioc-test", "user": user}}],
        "current-context": "ioc-test",
    }
    # JSON is valid YAML; kubectl and the Python client both read it.
    _write(path, json.dumps(config, indent=2).encode(), private=True)
    return path


# ----------------------------------------------------------------------- processes


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(exclude: Iterable[int] = (), address: str = LOOPBACK) -> int:
    """A free TCP port on `address`, below the ephemeral range when possible.

    Ports outside the ephemeral range are not handed out to outgoing connections, so a
    stopped apiserver can get its port back on restart.
    """
    taken = set(exclude)
    ceiling = _ephemeral_floor()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, ceiling) if ceiling > 21000 else 0
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                continue
            chosen = sock.getsockname()[1]
        if chosen not in taken:
            return chosen
    raise ControlPlaneError(f"no free port on {address} after 200 attempts")


def _parent_death_signal() -> None:  # pragma: no cover - runs in the child
    """Make the child die with its parent (Linux), so crashed test runs leak nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def polls(timeout: float, interval: float = 0.25) -> Iterator[int]:
    """Yield attempt numbers, sleeping `interval` between; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for attempt in range(int(timeout / interval) + 1):
        yield attempt
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def _loopback_opener(context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    """An HTTPS opener that ignores *_proxy variables: traffic stays on loopback."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


@dataclass
class ChildProcess:
    """One control-plane component: fixed argv, log file, optional running Popen."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.running:
            return
        self._log = self.log_path.open("ab")
        self._log.write(f"\n==== {time.strftime('%H:%M:%S')} start {self.name}\n".encode())
        self._log.flush()
        in_main = threading.current_thread() is threading.main_thread()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_parent_death_signal if in_main and sys.platform == "linux" else None,
        )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate by PID, wait bounded, then kill."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout=timeout)
            self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def describe(self) -> str:
        state = "not started"
        if self.popen is not None:
            code = self.popen.poll()
            state = f"pid {self.popen.pid} " + ("running" if code is None else f"exited {code}")
        return f"--- {self.name} ({state}), {self.log_path}:\n{log_tail(self.log_path)}"


# --------------------------------------------------------------------- control plane


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager (+ kube-scheduler) on 127.0.0.1.

    Use as a context manager, or call `start` and `stop`. Logs, PKI, etcd data and the
    admin kubeconfig live in `workdir`, removed on a clean stop unless `keep_logs` is set
    (the context manager keeps them when the body raised).
    """

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        scheduler: bool = False,
        keep_logs: bool = False,
        workdir: Path | None = None,
        ready_timeout: float = 90.0,
        verbosity: int = 1,
        extra_args: dict[str, Sequence[str]] | None = None,
        address: str = LOOPBACK,
    ) -> None:
        """`address`: where the API server listens and what it advertises. Loopback
        unless nodes join: then an address their pods reach (the `kubernetes` Service's
        endpoint), and the API server keeps that endpoint with a lease."""
        self.address = address
        self.bin_dir = bin_dir
        self.with_scheduler = scheduler
        self.keep_logs = keep_logs
        self.ready_timeout = ready_timeout
        self.verbosity = verbosity
        self.extra_args = {name: list(args) for name, args in (extra_args or {}).items()}
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ioc-controlplane-"))
        self.pki: Pki | None = None
        self.ports: dict[str, int] = {}
        self._procs: dict[str, ChildProcess] = {}
        self._started = False
        self._stopped = False

    # -- properties

    @property
    def server(self) -> str:
        """HTTPS URL of the apiserver."""
        return f"https://{self.address}:{self.ports['apiserver']}"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user `admin`, group `system:masters`)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    # -- lifecycle

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.stop(keep_logs=True if exc_type is not None else None)

    def start(self) -> ControlPlane:
        """Start everything and wait until the apiserver is ready (bounded)."""
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            self.bin_dir = self.bin_dir or ensure_binaries()
            self._prepare()
            self._procs["etcd"].start()
            self.start_apiserver()
            self._procs["kube-controller-manager"].start()
            if self.with_scheduler:
                self._procs["kube-scheduler"].start()
            self._wait_component("kube-controller-manager", self.ports["kcm"])
            if self.with_scheduler:
                self._wait_component("kube-scheduler", self.ports["scheduler"])
            self._wait_default_service_account()
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def stop(self, keep_logs: bool | None = None) -> None:
        """Stop all processes (by PID, bounded); remove the workdir unless logs are kept."""
        atexit.unregister(self.stop)
        if self._stopped:
            return
        self._stopped = True
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self._procs:
                self._procs[name].stop()
        keep = self.keep_logs if keep_logs is None else keep_logs
        if not self._own_workdir or not self.workdir.exists():
            return
        if keep:
            print(f"control plane logs kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_controllers(self) -> None:
        """Stop kube-controller-manager and kube-scheduler (a teardown that deletes pods
        must not have them re-created)."""
        for name in ("kube-scheduler", "kube-controller-manager"):
            if name in self._procs:
                self._procs[name].stop()

    def stop_apiserver(self) -> None:
        """Stop only kube-apiserver (fault tests); `start_apiserver` brings it back."""
        self._procs["kube-apiserver"].stop()

    def start_apiserver(self) -> None:
        """(Re)start kube-apiserver on the same port with the same certificates; wait ready."""
        self._procs["kube-apiserver"].start()
        self.wait_ready()

    def restart_controllers(self) -> None:
        """Restart kube-controller-manager (and scheduler) on the same ports.

        After an apiserver outage their informers back off (client-go: up to ~30 s plus
        jitter), so garbage collection etc. may lag; a restart makes them prompt again.
        """
        names = ["kube-controller-manager"] + (["kube-scheduler"] if self.with_scheduler else [])
        for name in names:
            self._procs[name].stop()
            self._procs[name].start()
        self._wait_component("kube-controller-manager", self.ports["kcm"])
        if self.with_scheduler:
            self._wait_component("kube-scheduler", self.ports["scheduler"])

    def processes(self) -> list[ChildProcess]:
        return list(self._procs.values())

    @property
    def apiserver_running(self) -> bool:
        return self._procs["kube-apiserver"].running

    # -- readiness

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the apiserver's /readyz until it answers `ok`; fail with the log tails."""
        timeout = timeout or self.ready_timeout
        last = "no answer yet"
        for _ in polls(timeout):
            for name in ("etcd", "kube-apiserver"):
                if not self._procs[name].running:
                    self._fail(f"{name} exited while waiting for /readyz")
            try:
                status, body = self.request("/readyz")
                if status == 200 and body.strip() == "ok":
                    return
                last = f"HTTP {status}: {body[-500:]}"
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
        self._fail(f"kube-apiserver not ready within {timeout:.0f}s: {last}")

    def request(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET `path` from the apiserver as admin; returns (status, body)."""
        opener = _loopback_opener(self._ssl_context())
        try:
            with opener.open(self.server + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def version(self) -> dict[str, Any]:
        """The apiserver's /version document."""
        status, body = self.request("/version")
        if status != 200:
            raise ControlPlaneError(f"/version: HTTP {status}: {body}")
        result: dict[str, Any] = json.loads(body)
        return result

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.pki is not None
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        return context

    def _wait_component(self, name: str, port: int, timeout: float = 60.0) -> None:
        """Wait for a component's /healthz (self-signed serving cert, so no verification)."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        opener = _loopback_opener(context)
        for _ in polls(timeout):
            if not self._procs[name].running:
                self._fail(f"{name} exited during start-up")
            try:
                url = f"https://{LOOPBACK}:{port}/healthz"
                with opener.open(url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
        self._fail(f"{name} not healthy within {timeout:.0f}s")

    def _wait_default_service_account(self, timeout: float = 60.0) -> None:
        """The serviceaccount controller is up once `default/default` exists."""
        for _ in polls(timeout):
            try:
                status, _ = self.request("/api/v1/namespaces/default/serviceaccounts/default")
            except (OSError, urllib.error.URLError):
                continue
            if status == 200:
                return
        self._fail(f"no default ServiceAccount within {timeout:.0f}s")

    def _fail(self, message: str) -> None:
        tails = "\n".join(p.describe() for p in self._procs.values())
        raise ControlPlaneError(f"{message}\n{tails}")

    # -- kubectl and CRDs

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as admin; returns the CompletedProcess (text, captured output)."""
        assert self.bin_dir is not None
        argv = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        done = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def apply_crds(self, paths: Iterable[Path | str], timeout: float = 60.0) -> list[str]:
        """Server-side apply CRD manifests; wait until each is Established. Returns names."""
        names: list[str] = []
        for path in paths:
            done = self.kubectl(
                "apply", "--server-side", "--force-conflicts", "-o", "name", "-f", str(path)
            )
            names += [n for n in done.stdout.split() if n.startswith("customresourcedefinition")]
        if names:
            self.kubectl(
                "wait",
                "--for=condition=Established",
                f"--timeout={timeout:.0f}s",
                *names,
                timeout=timeout + 15,
            )
        return names

    # -- configuration

    def _prepare(self) -> None:
        """Create PKI, kubeconfigs, ports and the process definitions."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki = Pki.create(self.workdir / "pki", [self.address])
        for name in ("etcd", "etcd-peer", "kcm", "scheduler"):
            self.ports[name] = free_port(self.ports.values())
        self.ports["apiserver"] = free_port(self.ports.values(), self.address)
        write_kubeconfig(self.kubeconfig, self.server, pki.ca.cert, pki.admin, "admin")
        kcm_kubeconfig = write_kubeconfig(
            self.workdir / "kcm.kubeconfig",
            self.server,
            pki.ca.cert,
            pki.controller_manager,
            "system:kube-controller-manager",
        )
        sched_kubeconfig = write_kubeconfig(
            self.workdir / "scheduler.kubeconfig",
            self.server,
            pki.ca.cert,
            pki.scheduler,
            "system:kube-scheduler",
        )
        argvs = {
            "etcd": self._etcd_args(),
            "kube-apiserver": self._apiserver_args(pki),
            "kube-controller-manager": self._kcm_args(pki, kcm_kubeconfig),
        }
        if self.with_scheduler:
            argvs["kube-scheduler"] = self._scheduler_args(sched_kubeconfig)
        assert self.bin_dir is not None
        for name, args in argvs.items():
            argv = [str(self.bin_dir / name), *args, *self.extra_args.get(name, ())]
            self._procs[name] = ChildProcess(name, argv, self.log_dir / f"{name}.log")

    def _etcd_args(self) -> list[str]:
        client = f"http://{LOOPBACK}:{self.ports['etcd']}"
        peer = f"http://{LOOPBACK}:{self.ports['etcd-peer']}"
        return [
            "--name=ioc-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=ioc-test={peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self, pki: Pki) -> list[str]:
        return [
            f"--etcd-servers=http://{LOOPBACK}:{self.ports['etcd']}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving.cert}",
            f"--tls-private-key-file={pki.serving.key}",
            f"--client-ca-file={pki.ca.cert}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki.sa_public}",
            f"--service-account-signing-key-file={pki.sa_private}",
            f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
            f"--proxy-client-key-file={pki.front_proxy_client.key}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            "--profiling=false",
            # Pods reach the API server through the `kubernetes` Service only when it
            # has an endpoint; without nodes there are no pods, and loopback is no endpoint.
            f"--endpoint-reconciler-type={'none' if self.address == LOOPBACK else 'lease'}",
            # Node names are not in any DNS here: logs and attach go to the node's IP.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki.kubelet_client.cert}",
            f"--kubelet-client-key={pki.kubelet_client.key}",
            "--shutdown-watch-termination-grace-period=5s",  # else watches block a stop
            f"--v={self.verbosity}",
        ]

    def _kcm_args(self, pki: Pki, kubeconfig: Path) -> list[str]:
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={self.ports['kcm']}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--controllers=*",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--root-ca-file={pki.ca.cert}",
            f"--service-account-private-key-file={pki.sa_private}",
            f"--cluster-signing-cert-file={pki.ca.cert}",
            f"--cluster-signing-key-file={pki.ca.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-name=ioc-test",
            # Its default, /usr/libexec/kubernetes/..., would be created on the host.
            f"--flex-volume-plugin-dir={self.workdir / 'flexvolume'}",
            f"--v={self.verbosity}",
        ]

    def _scheduler_args(self, kubeconfig: Path) -> list[str]:
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={self.ports['scheduler']}",
            "--leader-elect=false",
            f"--v={self.verbosity}",
        ]
