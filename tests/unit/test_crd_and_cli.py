"""The CRD in crds/ is the model's, and the CLI works on the examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ioc_operator.cli import main
from ioc_operator.model.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "iocs.epics-operator.io.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_crd_file_is_not_stale():
    assert CRD_FILE.read_text() == crd_yaml(), (
        "crds/ is stale: run `ioc-operator crd > crds/iocs.epics-operator.io.yaml`")


def walk(schema, path="spec"):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def test_crd_schema_is_structural():
    version = crd()["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in walk(spec):
        assert "$ref" not in node and "title" not in node, path
        if "anyOf" not in node:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
    assert spec["required"] == ["image", "prefix"]
    assert spec["properties"]["network"]["description"]  # kubectl explain ioc.spec.network
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Mode", "Ready", "Node", "CA", "PVA", "Age"} <= columns
    assert version["subresources"] == {"status": {}}
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("sidecar" in r for r in rules)


def test_render_examples(capsys):
    assert EXAMPLES, "examples/ is empty"
    for example in EXAMPLES:
        assert main(["render", "-f", str(example)]) == 0, example
        docs = list(yaml.safe_load_all(capsys.readouterr().out))
        assert any(d["kind"] == "StatefulSet" for d in docs), example


def test_render_several_files_at_once(capsys):
    assert main(["render", *[a for e in EXAMPLES for a in ("-f", str(e))]]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert sum(d["kind"] == "StatefulSet" for d in docs) == len(EXAMPLES)


def test_render_error_names_field_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: epics-operator.io/v1alpha1\nkind: IOC\n"
                   "metadata: {name: x}\nspec: {image: i, prefix: 'A:', network: {mode: lan}}\n")
    proc = subprocess.run([sys.executable, "-m", "ioc_operator.cli", "render", "-f", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "spec.network.mode" in proc.stderr and "bad.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_render_refuses_files_without_iocs(tmp_path, capsys):
    empty = tmp_path / "cm.yaml"
    empty.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert main(["render", "-f", str(empty)]) == 2
    assert "no IOC" in capsys.readouterr().err


def test_rendered_pvagw_config_passes_pvagw_test_config(tmp_path, capsys):
    """The real pvagw parses the rendered config (with the pod IP substituted)."""
    assert main(["render", "-f", str(ROOT / "examples" / "sidecar-classic.yaml")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["pvagw.json"]
    conf = tmp_path / "pvagw.json"
    conf.write_text(text.replace("@POD_IP@", "127.0.0.1"))
    json.loads(conf.read_text())
    pvagw = Path(sys.executable).with_name("pvagw")
    proc = subprocess.run([str(pvagw), "--test-config", str(conf)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr


def host_doc(name: str, **ports) -> str:
    net = {"mode": "host", **({"ports": ports} if ports else {})}
    return yaml.safe_dump({"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
                           "metadata": {"name": name},
                           "spec": {"image": "i", "prefix": f"{name}:", "network": net,
                                    "scheduling": {"nodeName": "n1"}}})


def test_render_allocates_host_ports_across_files(tmp_path, capsys):
    files = []
    for name in ("a", "b", "c"):
        f = tmp_path / f"{name}.yaml"
        f.write_text(host_doc(name))
        files += ["-f", str(f)]
    assert main(["render", *files]) == 0
    seen = []
    for doc in yaml.safe_load_all(capsys.readouterr().out):
        env = {e["name"]: e["value"] for e in doc["spec"]["template"]["spec"]["containers"][0][
            "env"]}
        seen += [env["EPICS_CAS_SERVER_PORT"], env["EPICS_PVAS_SERVER_PORT"],
                 env["EPICS_PVAS_BROADCAST_PORT"]]
    assert len(seen) == len(set(seen)) == 9
    assert seen[:3] == ["5064", "5075", "5076"]


def test_render_refuses_explicit_port_clash(tmp_path, capsys):
    f = tmp_path / "two.yaml"
    f.write_text(host_doc("a", ca=5070) + "---\n" + host_doc("b", ca=5070))
    assert main(["render", "-f", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.count("spec.network.ports") == 1
    assert "IOC default/b" in err and "older IOC(s) default/a" in err


def test_render_and_crd_emit_no_yaml_anchors_or_aliases(capsys):
    """The sidecars share one POD_IP env entry object; plain YAML repeats it."""
    assert main(["render", *[a for e in EXAMPLES for a in ("-f", str(e))]]) == 0
    out = capsys.readouterr().out
    assert "POD_IP" in out
    for text in (out, crd_yaml()):
        events = list(yaml.parse(text))
        assert not [e for e in events if isinstance(e, yaml.AliasEvent)]
        assert not [e for e in events if getattr(e, "anchor", None)]
