"""echoes.py: which child events are the operator's own writes coming back."""

from __future__ import annotations

import copy

from ioc_operator.controller.echoes import is_echo, key, mark, marks


def _sts(generation: int, rv: str, ready: int = 0) -> dict:
    return {"kind": "StatefulSet", "metadata": {"name": "a", "uid": "s1", "generation":
            generation, "resourceVersion": rv}, "status": {"readyReplicas": ready}}


def _svc(rv: str, uid: str = "v1") -> dict:
    return {"kind": "Service", "metadata": {"name": "a", "uid": uid, "resourceVersion": rv}}


def test_statefulset_status_writes_are_echoes_spec_edits_are_not():
    seen = marks([_sts(1, "10"), _svc("11")])
    assert is_echo(seen, _sts(1, "12", ready=1))  # the controller's status write
    assert not is_echo(seen, _sts(2, "13"))  # someone edited the spec


def test_other_kinds_compare_the_resource_version_and_uid():
    seen = marks([_svc("11")])
    assert is_echo(seen, copy.deepcopy(_svc("11")))
    assert not is_echo(seen, _svc("14"))  # edited by hand
    assert not is_echo(seen, _svc("11", uid="v2"))  # deleted and re-created meanwhile
    assert not is_echo(None, _svc("11")) and not is_echo({}, _svc("11"))


def test_keys_are_kind_and_name():
    assert key(_svc("1")) == "Service/a" and key(_sts(1, "1")) == "StatefulSet/a"
    assert mark(_sts(3, "9")) == ("s1", "3") and mark(_svc("9")) == ("v1", "9")
