"""The reachability probe reads real servers with exactly an IOC's published settings."""

from __future__ import annotations

import json
import sys

from ioc_operator.render import parse_ioc, render_all
from ioc_testbed.lab.runner import LabRunner


def test_probe_reads_ca_and_pva_with_published_settings(lab):
    manifests = [
        {"metadata": {"name": "probe-pod", "namespace": "lab"},
         "spec": {"image": "lab", "prefix": "PRB:POD:"}},
        {"metadata": {"name": "probe-side", "namespace": "lab"},
         "spec": {"image": "lab", "prefix": "PRB:SIDE:", "network": {"mode": "sidecar"},
                  "servers": {"pva": {"implementation": "classic"}}}},
    ]
    runner = LabRunner(lab)
    running = [runner.run(r, 0) for r in render_all([parse_ioc(m) for m in manifests])]
    client = lab.add_pod(1, name="prober")
    for r in running:
        out = lab.exec(client, [sys.executable, "-m", "ioc_operator.probe", "--pv",
                                r.server.pv("value"), "--ca", "--pva"], r.client_env,
                       timeout=30)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["ca"]["ok"] and result["pva"]["ok"], (r.ioc.metadata.name, result)
        assert 0 < result["ca"]["ms"] < 3000 and 0 < result["pva"]["ms"] < 3000
    # and a PV nobody serves is reported, not hung
    out = lab.exec(client, [sys.executable, "-m", "ioc_operator.probe", "--pv", "NOBODY:HOME",
                            "--ca", "--pva", "--timeout", "1"], running[0].client_env,
                   timeout=30)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["ca"]["ok"] and not result["pva"]["ok"]
