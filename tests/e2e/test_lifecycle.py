"""What an IOC's owner does with a running IOC, on real nodes: restart it and keep its
autosave data, reach its shell, and run the project's images as their non-root user."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from typing import Any

import pytest

from ioc_testbed.incluster import CLIENT_IMAGE, Kubectl, condition
from ioc_testbed.waiting import wait_for

from e2elib import EXAMPLES_NS

IMAGES = {
    "operator": "ghcr.io/epics-operator/ioc-operator:0.1.0",
    "gateway": "ghcr.io/epics-operator/ioc-gateway:0.1.0",
    "example-ioc": CLIENT_IMAGE,
}


def pod_uid(kubectl: Kubectl, name: str) -> str | None:
    pod = kubectl.get("pod", name, EXAMPLES_NS)
    return pod["metadata"]["uid"] if pod else None


def test_autosave_volume_survives_a_pod_restart(
        kubectl: Kubectl, example_iocs: dict[str, dict[str, Any]]) -> None:
    name = next(n for n, i in example_iocs.items()
                if (i["spec"].get("autosave") or {}).get("enabled"))
    pod = f"{name}-0"
    path = f"{example_iocs[name]['spec']['autosave'].get('mountPath', '/autosave')}/e2e-mark"
    token = uuid.uuid4().hex
    kubectl("-n", EXAMPLES_NS, "exec", pod, "-c", "ioc", "--", "python", "-c",
            f"open({path!r}, 'w').write({token!r})")
    old = pod_uid(kubectl, pod)
    kubectl("-n", EXAMPLES_NS, "delete", "pod", pod, "--wait=true", timeout=90)
    wait_for("the IOC's new pod", lambda: pod_uid(kubectl, pod) not in (None, old), 60)
    kubectl("-n", EXAMPLES_NS, "wait", "--for=condition=Ready", f"pod/{pod}",
            "--timeout=90s", timeout=100)
    wait_for(f"IOC {name} Ready again", lambda: condition(
        kubectl.get("ioc", name, EXAMPLES_NS), "Ready").get("status") == "True", 60)
    got = kubectl("-n", EXAMPLES_NS, "exec", pod, "-c", "ioc", "--", "cat", path).stdout
    assert got == token


def test_kubectl_attach_reaches_the_ioc_shell(
        kubectl: Kubectl, example_iocs: dict[str, dict[str, Any]]) -> None:
    """`kubectl attach -it` from a terminal (script(1) gives kubectl one), as a user
    would; the soft IOC's shell lists its records."""
    name = next(n for n, i in example_iocs.items()
                if "pvxslibs.ioc" in i["spec"].get("args", [])
                and i["spec"]["network"]["mode"] == "pod")
    prefix = example_iocs[name]["spec"]["prefix"]
    attach = (f"{kubectl.binary} --kubeconfig={kubectl.kubeconfig} -n {EXAMPLES_NS} "
              f"attach -it {name}-0 -c ioc")
    script = shutil.which("script")
    assert script, "script(1) from util-linux gives kubectl a terminal"
    proc = subprocess.Popen([script, "-qec", attach, "/dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None
        time.sleep(3)  # attached: kubectl says "If you don't see a command prompt..."
        proc.stdin.write('\nioc("dbl")\n')
        proc.stdin.flush()
        time.sleep(2)
        proc.stdin.write("\x10\x11")  # Ctrl-P Ctrl-Q: detach, the IOC keeps running
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert f"{prefix}counter" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    pod = kubectl.get("pod", f"{name}-0", EXAMPLES_NS)
    assert pod is not None
    assert all(s["ready"] for s in pod["status"]["containerStatuses"])


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_images_run_as_their_non_root_user(kubectl: Kubectl, operator: str,
                                           image: str) -> None:
    """uid 65532 has a passwd entry: kopf's peering id and caproto's client name come
    from getpass.getuser(), which crashed the operator pod (KeyError: 'getpwuid(): uid
    not found: 65532') before the images had one."""
    pod = f"whoami-{image}"
    code = ("import getpass, caproto.threading.client as c; "
            "print('user', getpass.getuser()); c.Context().disconnect()"
            if image != "example-ioc" else
            "import getpass; print('user', getpass.getuser())")
    kubectl.apply([{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": EXAMPLES_NS},
        "spec": {"restartPolicy": "Never",
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                 "containers": [{"name": "main", "image": IMAGES[image],
                                 "imagePullPolicy": "IfNotPresent",
                                 "command": ["python", "-c", code]}]}}])
    phase = wait_for(f"pod {pod} to finish", lambda: (kubectl.get("pod", pod, EXAMPLES_NS)
                     or {}).get("status", {}).get("phase") in ("Succeeded", "Failed")
                     and kubectl.get("pod", pod, EXAMPLES_NS)["status"]["phase"], 60)
    logs = kubectl("-n", EXAMPLES_NS, "logs", pod).stdout
    kubectl("-n", EXAMPLES_NS, "delete", "pod", pod, "--wait=false")
    assert phase == "Succeeded", logs
    assert "user ioc" in logs


def test_operator_pod_runs_without_restarts(kubectl: Kubectl, operator: str) -> None:
    pods = kubectl.json("-n", operator, "get", "pods", "-l",
                        "app.kubernetes.io/name=ioc-operator")["items"]
    assert len(pods) == 1
    status = pods[0]["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, status
    logs = kubectl("-n", operator, "logs", pods[0]["metadata"]["name"]).stdout
    assert "Traceback" not in logs, logs[-3000:]
