"""What a facility expects of an IOC, on real nodes (issue 21): a config change rolls
the IOC, a hung IOC is restarted and a slow one is not, a fixed spec replaces a
crash-looping pod at once, the IOC container runs locked down, and init containers
run first. Each IOC is the example image's generic config IOC (config_ioc.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ioc_testbed.incluster import CLIENT_IMAGE, ClientPod, Kubectl, condition
from ioc_testbed.waiting import wait_for

from e2elib import apply_ready, directory_client

NAMESPACE = "e2e-facility"
HEALTH_COMMAND = ["python", "/epics/example/client.py", "--lib", "caproto", "--pv"]
FIND_IOC = ("import os, signal\n"
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try: cmd = open(f'/proc/{p}/cmdline', 'rb').read()\n"
            "    except OSError: continue\n"
            "    if b'config_ioc.py' in cmd and int(p) != os.getpid():\n"
            "        os.kill(int(p), signal.SIGNAL); print(p)\n")


def st_cmd(prefix: str, before_init: str = "") -> str:
    return (f'epicsEnvSet("P", "{prefix}")\n'
            'dbLoadRecords("/epics/example/example.db", "P=$(P)")\n'
            'dbLoadRecords("instance.db", "P=$(P)")\n'
            f"{before_init}iocInit()\n")


def instance_db(version: str) -> str:
    return f'record(stringin, "$(P)version") {{\n    field(VAL, "{version}")\n}}\n'


def config_ioc(name: str, version: str = "v1", before_init: str = "",
               **spec: Any) -> dict[str, Any]:
    prefix = name.upper().replace("-", "") + ":"
    return {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"image": CLIENT_IMAGE, "prefix": prefix,
                     "args": ["python", "/epics/example/config_ioc.py"],
                     "config": {"files": {"st.cmd": st_cmd(prefix, before_init),
                                          "instance.db": instance_db(version)}},
                     **spec}}


def ioc_status(kubectl: Kubectl, name: str) -> dict[str, Any]:
    pod = kubectl.get("pod", f"{name}-0", NAMESPACE) or {}
    return next((c for c in pod.get("status", {}).get("containerStatuses") or []
                 if c["name"] == "ioc"), {})


def ready(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return condition(kubectl.get("ioc", name, NAMESPACE), "Ready")


@pytest.fixture(scope="module")
def client(kubectl: Kubectl, operator: str) -> ClientPod:
    apply_ready(kubectl, NAMESPACE, [config_ioc("fac-anchor")])
    return directory_client(kubectl, NAMESPACE, {}, "name-service")


def test_a_config_change_rolls_the_ioc(kubectl: Kubectl, client: ClientPod) -> None:
    apply_ready(kubectl, NAMESPACE, [config_ioc("fac-roll", "v1")])
    got = wait_for("v1 read", lambda: (r := client.run("p4p", "get", ["FACROLL:version"]))[
        "ok"] and r, 30)
    assert got["results"][0]["value"] == "v1"
    old = kubectl.get("pod", "fac-roll-0", NAMESPACE)["metadata"]["uid"]
    edited = time.time()
    kubectl.apply([config_ioc("fac-roll", "v2")])
    wait_for("a new pod", lambda: (kubectl.get("pod", "fac-roll-0", NAMESPACE) or {}).get(
        "metadata", {}).get("uid") not in (None, old), 60)
    got = wait_for("v2 read", lambda: (r := client.run("pyepics", "get", ["FACROLL:version"]))[
        "ok"] and r["results"][0]["value"] == "v2" and r, 60)
    print(f"\nconfig edit to the new value read by a client: {time.time() - edited:.1f} s")


def test_a_hung_ioc_is_restarted(kubectl: Kubectl, client: ClientPod) -> None:
    health = {"pv": "FACHUNG:counter", "command": HEALTH_COMMAND, "periodSeconds": 5,
              "restartAfterSeconds": 15}
    apply_ready(kubectl, NAMESPACE, [config_ioc("fac-hung", health=health)])
    assert ioc_status(kubectl, "fac-hung")["restartCount"] == 0
    stopped = time.time()
    kubectl("-n", NAMESPACE, "exec", "fac-hung-0", "-c", "ioc", "--", "python", "-c",
            FIND_IOC.replace("SIGNAL", "SIGSTOP"))
    # A stopped IOC still completes TCP handshakes: only the heartbeat read notices.
    wait_for("Ready False while hung", lambda: ready(kubectl, "fac-hung").get("status")
             == "False", 30)
    wait_for("the kubelet restarts the IOC", lambda: ioc_status(kubectl, "fac-hung").get(
        "restartCount", 0) >= 1, 60)
    restarted = time.time()
    cond = wait_for("Ready again", lambda: (c := ready(kubectl, "fac-hung")).get("status")
                    == "True" and c, 60)
    assert "restarted 1 time" in cond["message"], cond
    assert client.run("caproto", "get", ["FACHUNG:value"])["ok"]
    print(f"\nhung IOC restarted {restarted - stopped:.1f} s after it stopped "
          f"(restartAfterSeconds 15, period 5), Ready {time.time() - stopped:.1f} s after")


def test_a_slow_start_is_not_killed(kubectl: Kubectl) -> None:
    """25 s before iocInit (waiting for hardware), longer than restartAfterSeconds:
    the startup probe allows it, the container is never restarted."""
    health = {"pv": "FACSLOW:counter", "command": HEALTH_COMMAND, "periodSeconds": 5,
              "restartAfterSeconds": 10, "startupSeconds": 120}
    kubectl("create", "namespace", NAMESPACE, check=False)
    started = time.time()
    kubectl.apply([config_ioc("fac-slow", before_init="epicsThreadSleep(25)\n",
                              health=health)])
    wait_for("the IOC container to run", lambda: ioc_status(kubectl, "fac-slow").get(
        "state", {}).get("running"), 60)
    assert ready(kubectl, "fac-slow").get("status") == "False"
    wait_for("Ready", lambda: ready(kubectl, "fac-slow").get("status") == "True", 120)
    took = time.time() - started
    assert took > 25 and ioc_status(kubectl, "fac-slow")["restartCount"] == 0
    print(f"\nslow IOC (25 s before iocInit) Ready after {took:.1f} s, never restarted")


def test_a_fixed_spec_replaces_a_crash_looping_pod_at_once(kubectl: Kubectl) -> None:
    kubectl("create", "namespace", NAMESPACE, check=False)
    broken = config_ioc("fac-crash")
    broken["spec"]["args"] = ["python", "/epics/example/config_ioc.py", "/nowhere"]
    kubectl.apply([broken])
    wait_for("crash loop", lambda: ioc_status(kubectl, "fac-crash").get(
        "restartCount", 0) >= 2, 90)
    fixed = time.time()
    kubectl.apply([config_ioc("fac-crash")])
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "ioc/fac-crash",
            "--timeout=90s", timeout=100)
    took = time.time() - fixed
    assert took < 60
    print(f"\nfixed spec Ready {took:.1f} s after the apply over a crash-looping pod")


def test_the_ioc_container_runs_locked_down_and_init_containers_run_first(
        kubectl: Kubectl, client: ClientPod) -> None:
    init = {"name": "check-config", "image": CLIENT_IMAGE,
            "command": ["python", "-c", "import os, sys; sys.exit(not os.path.isfile("
                        "'/epics/ioc/config/st.cmd'))"],
            "volumeMounts": [{"name": "ioc-config", "mountPath": "/epics/ioc/config",
                              "readOnly": True}]}
    extra = {"name": "sidekick", "image": CLIENT_IMAGE,
             "command": ["python", "-c", "import signal; signal.pause()"]}
    apply_ready(kubectl, NAMESPACE, [config_ioc("fac-lock", initContainers=[init],
                                                extraContainers=[extra],
                                                podSecurityContext={"fsGroup": 65532})])
    pod = kubectl.get("pod", "fac-lock-0", NAMESPACE)
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert {c["name"] for c in pod["status"]["containerStatuses"]} == {"ioc", "sidekick"}
    status = kubectl("-n", NAMESPACE, "exec", "fac-lock-0", "-c", "ioc", "--", "python",
                     "-c", "print(open('/proc/self/status').read())").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, fields
    assert fields["NoNewPrivs"].strip() == "1"
    assert "65532" in fields["Groups"]
    assert client.run("caproto", "get", ["FACLOCK:value"])["ok"]


def test_kubectl_rollout_restart_restarts_the_ioc_and_the_operator_keeps_it(
        kubectl: Kubectl, client: ClientPod) -> None:
    """kubectl's restartedAt annotation is kubectl's field: the operator's apply leaves
    it, so the restart is not reverted."""
    old = kubectl.get("pod", "fac-anchor-0", NAMESPACE)["metadata"]["uid"]
    kubectl("-n", NAMESPACE, "rollout", "restart", "statefulset/fac-anchor")
    wait_for("a new pod", lambda: (kubectl.get("pod", "fac-anchor-0", NAMESPACE) or {}).get(
        "metadata", {}).get("uid") not in (None, old), 60)
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "ioc/fac-anchor",
            "--timeout=60s", timeout=70)
    wait_for("read again", lambda: client.run("pyepics", "get", ["FACANCHOR:value"])["ok"], 30)
    time.sleep(3)  # a revert by the operator would roll the pod once more
    sts = kubectl.get("statefulset", "fac-anchor", NAMESPACE)
    assert "kubectl.kubernetes.io/restartedAt" in sts["spec"]["template"]["metadata"][
        "annotations"]
    assert kubectl.get("pod", "fac-anchor-0", NAMESPACE)["status"]["phase"] == "Running"
