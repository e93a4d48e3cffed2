"""Credentials for the API server, read without the kubernetes package.

kopf's session and the operator's own requests (kube.py) use the same
`kopf.ConnectionInfo`. Where from: $KUBECONFIG when set, else the pod's service
account, else ~/.kube/config. From a kubeconfig, the current context's server, CA,
client certificate, token or tokenFile, or basic auth; file paths are relative to the
kubeconfig that names them, as kubectl reads them.

A user that authenticates through an exec plugin or an auth-provider (most cloud
clusters, outside a pod) goes through the kubernetes package, which runs those. It is
imported only then: its ~700 client model classes cost ~10 MB of the operator's memory.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # kopf is imported by the functions: block_client_library comes first
    import kopf

log = logging.getLogger(__name__)
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# kubeconfig user fields only the kubernetes package can act on
PLUGINS = ("exec", "auth-provider")


class CredentialsError(Exception):
    """No usable credentials: says where it looked and what was wrong."""


DEFAULT_KUBECONFIG = "~/.kube/config"


def _kubeconfigs() -> list[Path] | None:
    """The kubeconfig files to read (not all need exist), or None: the service account."""
    if os.environ.get("KUBECONFIG"):
        value = os.environ["KUBECONFIG"]
        return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]
    if _in_cluster():
        return None
    return [Path(DEFAULT_KUBECONFIG).expanduser()]


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (
        SERVICE_ACCOUNT / "token").exists()


def _current(paths: list[Path]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any],
                                          dict[str, Path]]:
    """The current context, its cluster and user (the first file naming each wins, as
    in kubectl), and the directory of the file each of those came from."""
    current: str | None = None
    found: dict[str, dict[str, Any]] = {"contexts": {}, "clusters": {}, "users": {}}
    origin: dict[str, Path] = {}
    for path in paths:
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CredentialsError(f"kubeconfig {path}: {exc}") from None
        current = current or config.get("current-context")
        for section, key in (("contexts", "context"), ("clusters", "cluster"),
                             ("users", "user")):
            for item in config.get(section) or []:
                name = f"{section}/{item.get('name')}"
                if name not in origin:
                    found[section][item.get("name")] = item.get(key) or {}
                    origin[name] = path.parent
    if not current:
        raise CredentialsError(f"kubeconfig {os.pathsep.join(map(str, paths))}: "
                               "no current-context")
    context = found["contexts"].get(current)
    if context is None:
        raise CredentialsError(f"kubeconfig: context {current!r} is not defined")
    cluster = found["clusters"].get(context.get("cluster"))
    if cluster is None:
        raise CredentialsError(f"kubeconfig: context {current!r} names cluster "
                               f"{context.get('cluster')!r}, which is not defined")
    user = found["users"].get(context.get("user"), {})
    dirs = {"cluster": origin[f"clusters/{context.get('cluster')}"],
            "user": origin.get(f"users/{context.get('user')}", Path("."))}
    return context, cluster, user, dirs


def needs_client_library() -> bool:
    """Whether the credentials in use need the kubernetes package (exec or
    auth-provider users). A broken kubeconfig says no: `load` then reports it."""
    paths = _kubeconfigs()
    existing = [p for p in paths or [] if p.exists()]
    try:
        _, _, user, _ = _current(existing)
    except CredentialsError:
        return False
    return any(user.get(k) for k in PLUGINS)


def load(settings: kopf.OperatorSettings | None = None) -> kopf.ConnectionInfo:
    """Fresh credentials (a rotated service account token or tokenFile is read again)."""
    trust_env = settings.networking.trust_env if settings else False
    paths = _kubeconfigs()
    if paths is None:
        return _from_service_account(trust_env)
    existing = [p for p in paths if p.exists()]
    if not existing and not os.environ.get("KUBECONFIG"):
        raise CredentialsError("no credentials: $KUBECONFIG is not set, this is not a pod "
                               f"with a service account, and {paths[0]} does not exist")
    if not existing:
        raise CredentialsError(f"kubeconfig {os.pathsep.join(map(str, paths))}: "
                               "no such file")
    return _from_kubeconfig(existing, trust_env, settings)


def _from_service_account(trust_env: bool) -> kopf.ConnectionInfo:
    import kopf

    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    namespace = SERVICE_ACCOUNT / "namespace"
    ca = SERVICE_ACCOUNT / "ca.crt"
    return kopf.ConnectionInfo(
        server=f"https://{host}:{port}",
        ca_path=str(ca) if ca.exists() else None,
        token=(SERVICE_ACCOUNT / "token").read_text().strip() or None,
        default_namespace=namespace.read_text().strip() if namespace.exists() else None,
        trust_env=trust_env,
    )


def _from_kubeconfig(paths: list[Path], trust_env: bool,
                     settings: kopf.OperatorSettings | None) -> kopf.ConnectionInfo:
    import kopf

    context, cluster, user, dirs = _current(paths)
    if any(user.get(k) for k in PLUGINS):
        return _via_client_library(settings)
    if not cluster.get("server"):
        raise CredentialsError("kubeconfig: the current context's cluster has no server")

    def path(value: str | None, where: str) -> str | None:
        return str(dirs[where] / Path(value).expanduser()) if value else None

    token = user.get("token")
    if not token and user.get("tokenFile"):
        token_file = path(user["tokenFile"], "user")
        try:
            token = Path(token_file or "").read_text().strip()
        except OSError as exc:
            raise CredentialsError(f"kubeconfig tokenFile: {exc}") from None
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=path(cluster.get("certificate-authority"), "cluster"),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        certificate_path=path(user.get("client-certificate"), "user"),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=path(user.get("client-key"), "user"),
        private_key_data=user.get("client-key-data"),
        token=token or None,
        username=user.get("username"),
        password=user.get("password"),
        default_namespace=context.get("namespace"),
        proxy_url=cluster.get("proxy-url"),
        trust_env=trust_env,
    )


def _via_client_library(settings: kopf.OperatorSettings | None) -> kopf.ConnectionInfo:
    import kopf

    allow_client_library()
    info = kopf.login_via_client(logger=log, settings=settings or kopf.OperatorSettings())
    if info is None:
        raise CredentialsError("the kubeconfig's user needs an exec plugin or an "
                               "auth-provider, which needs the kubernetes package: "
                               "pip install kubernetes")
    return info


def block_client_library() -> None:
    """Keep kopf from importing the kubernetes package: it does whenever the package is
    installed, only to recognise its model objects, which this operator never hands
    it. Call before kopf is imported; `allow_client_library` undoes it."""
    if "kubernetes" not in sys.modules:
        sys.modules["kubernetes"] = None  # type: ignore[assignment]  # import -> ImportError


def allow_client_library() -> None:
    if "kubernetes" in sys.modules and sys.modules["kubernetes"] is None:
        del sys.modules["kubernetes"]
