"""The lab runs sidecar commands with their volume mounts rewritten to directories."""

from __future__ import annotations

from pathlib import Path

from ioc_testbed.lab.runner import mount_paths

MOUNTS = [{"name": "cfg", "mountPath": "/etc/pvagw"}, {"name": "run", "mountPath": "/run/pvagw"},
          {"name": "tmp", "mountPath": "/tmp"}]
VOLUMES = {n: Path(f"/tmp/lab-1/volumes/ioc/{n}") for n in ("cfg", "run", "tmp")}


def test_each_mount_is_rewritten_once_even_under_another_mount():
    """pvagw mounts /tmp; the lab's directories live under /tmp. Rewriting one mount
    after another turned /etc/pvagw into /tmp/... and then that /tmp again."""
    script = 'sed "s/@P@/$P/g" /etc/pvagw/pvagw.json > /run/pvagw/pvagw.json && exec pvagw'
    assert mount_paths(script, MOUNTS, VOLUMES) == (
        'sed "s/@P@/$P/g" /tmp/lab-1/volumes/ioc/cfg/pvagw.json > '
        "/tmp/lab-1/volumes/ioc/run/pvagw.json && exec pvagw")


def test_only_whole_paths_are_rewritten():
    assert mount_paths("/tmp", MOUNTS, VOLUMES) == "/tmp/lab-1/volumes/ioc/tmp"
    assert mount_paths("/tmp/x", MOUNTS, VOLUMES) == "/tmp/lab-1/volumes/ioc/tmp/x"
    assert mount_paths("/tmpfile", MOUNTS, VOLUMES) == "/tmpfile"
    assert mount_paths("/var/tmp/x", MOUNTS, VOLUMES) == "/var/tmp/x"
    assert mount_paths("anything", [], {}) == "anything"
