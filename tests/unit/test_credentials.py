"""credentials.py: kubeconfig and service-account credentials without the kubernetes
package, read the way kubectl reads them, with errors that say what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ioc_operator import credentials
from ioc_operator.credentials import CredentialsError


def kubeconfig(path: Path, user: dict, cluster: dict | None = None,
               current: str | None = "ctx", namespace: str | None = None) -> Path:
    context = {"cluster": "c", "user": "u", **({"namespace": namespace} if namespace else {})}
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://198.18.0.1:6443"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": context}],
    }
    if current:
        config["current-context"] = current
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kube/config of ours
    monkeypatch.setattr(credentials, "SERVICE_ACCOUNT", tmp_path / "no-sa")
    return monkeypatch


def test_kubeconfig_paths_are_relative_to_the_file_and_token_file_is_read(env, tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "token").write_text("s3cret\n")
    path = kubeconfig(conf / "config", {"client-certificate": "certs/me.crt",
                                        "client-key": "/abs/me.key", "tokenFile": "token"},
                      {"server": "https://198.18.0.1:6443", "certificate-authority": "ca.crt"},
                      namespace="beamline")
    env.setenv("KUBECONFIG", str(path))
    info = credentials.load()
    assert info.server == "https://198.18.0.1:6443"
    assert info.ca_path == str(conf / "ca.crt")
    assert info.certificate_path == str(conf / "certs/me.crt")
    assert info.private_key_path == "/abs/me.key"
    assert info.token == "s3cret"
    assert info.default_namespace == "beamline"
    assert info.as_http_headers() == {"Authorization": "Bearer s3cret"}
    assert not credentials.needs_client_library()


def test_the_first_kubeconfig_naming_an_entry_wins(env, tmp_path):
    first = kubeconfig(tmp_path / "a", {"token": "from-a"}, current=None)
    second = kubeconfig(tmp_path / "b", {"token": "from-b"})
    env.setenv("KUBECONFIG", f"{first}:{second}")
    assert credentials.load().token == "from-a"


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("current-context"), "no current-context"),
    (lambda c: c.update({"current-context": "other"}), "context 'other' is not defined"),
    (lambda c: c["contexts"][0]["context"].update({"cluster": "gone"}),
     "names cluster 'gone', which is not defined"),
    (lambda c: c["clusters"][0]["cluster"].pop("server"), "has no server"),
])
def test_a_broken_kubeconfig_says_what_is_wrong(env, tmp_path, change, words):
    path = kubeconfig(tmp_path / "config", {"token": "t"})
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    env.setenv("KUBECONFIG", str(path))
    with pytest.raises(CredentialsError, match=words):
        credentials.load()


def test_no_credentials_anywhere_is_an_error_naming_where_it_looked(env):
    with pytest.raises(CredentialsError, match=r"KUBECONFIG is not set.*\.kube/config"):
        credentials.load()


def test_exec_and_auth_provider_users_need_the_client_library(env, tmp_path):
    for user in ({"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}},
                 {"auth-provider": {"name": "oidc"}}):
        env.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "config", user)))
        assert credentials.needs_client_library()


def test_in_cluster_service_account(env, tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("pod-token\n")
    (sa / "namespace").write_text("controls\n")
    (sa / "ca.crt").write_text("not read here")
    env.setattr(credentials, "SERVICE_ACCOUNT", sa)
    env.setenv("KUBERNETES_SERVICE_HOST", "198.18.0.1")
    env.setenv("KUBERNETES_SERVICE_PORT", "6443")
    info = credentials.load()
    assert (info.server, info.token, info.default_namespace, info.ca_path) == (
        "https://198.18.0.1:6443", "pod-token", "controls", str(sa / "ca.crt"))
    env.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    assert credentials.load().server == "https://[fd00::1]:6443"
    (sa / "token").write_text("rotated")  # read again on every load
    assert credentials.load().token == "rotated"


def test_blocking_keeps_kopf_from_importing_the_client_models_until_allowed():
    code = (
        "import sys\n"
        "from ioc_operator import credentials\n"
        "credentials.block_client_library()\n"
        "import kopf\n"
        "assert 'kubernetes.client' not in sys.modules\n"
        "credentials.allow_client_library()\n"
        "import kubernetes.config\n"
        "assert 'kubernetes.client' in sys.modules\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
