"""Hand-edited port lists (drift.py) and IOCs deleted unseen (resync.py): the pure parts."""

from __future__ import annotations

import copy

from ioc_operator.controller.drift import reclaim_patch
from ioc_operator.controller.resync import Tombstones, suspects
from ioc_operator.model.validation import parse_ioc
from ioc_operator.render import render


def _objects(mode: str) -> dict[str, dict]:
    ioc = parse_ioc({"metadata": {"name": "a", "namespace": "ns", "uid": "u1"},
                     "spec": {"image": "reg/ioc:1", "prefix": "A:", "network": {"mode": mode}}})
    return {o["kind"]: o for o in render(ioc)}


def test_unchanged_objects_need_no_patch():
    objs = _objects("pod")
    assert reclaim_patch(copy.deepcopy(objs["Service"]), objs["Service"]) is None
    assert reclaim_patch(copy.deepcopy(objs["StatefulSet"]), objs["StatefulSet"]) is None
    assert reclaim_patch(None, objs["Service"]) is None


def test_a_renumbered_service_port_is_replaced_by_the_rendered_list():
    svc = _objects("pod")["Service"]
    live = copy.deepcopy(svc)
    live["spec"]["ports"][0].update(port=6064, targetPort=6064)
    patch = reclaim_patch(live, svc)
    assert patch == {"spec": {"ports": [*svc["spec"]["ports"], {"$patch": "replace"}]}}


def test_a_missing_service_port_alone_is_left_to_apply():
    svc = _objects("pod")["Service"]
    live = copy.deepcopy(svc)
    del live["spec"]["ports"][0]  # apply adds it back without a conflict
    assert reclaim_patch(live, svc) is None


def test_a_renumbered_container_port_is_replaced_in_that_container_only():
    sts = _objects("pod")["StatefulSet"]
    live = copy.deepcopy(sts)
    ioc = live["spec"]["template"]["spec"]["containers"][0]
    ioc["ports"][0]["containerPort"] = 7064
    patch = reclaim_patch(live, sts)
    fixes = patch["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in fixes] == [ioc["name"]]
    assert fixes[0]["ports"][-1] == {"$patch": "replace"}
    assert fixes[0]["ports"][:-1] == sts["spec"]["template"]["spec"]["containers"][0]["ports"]


def test_suspects_are_indexed_uids_the_list_did_not_return():
    indexed = {"u1": "ns/a", "u2": "ns/b", "u3": "other/c"}
    assert suspects(indexed, {"u1", "u3", "u9"}) == {"u2": "ns/b"}
    assert suspects(indexed, set(indexed)) == {}


def test_tombstones_reach_every_shallow_copy_of_the_memo():
    """kopf gives each object's handlers copy.copy(memo): the resync's findings must be
    visible through copies made before them (rebinding memo.gone was not)."""
    class Memo:
        pass
    memo = Memo()
    memo.gone = Tombstones()
    handlers_copy = copy.copy(memo)
    assert memo.gone.record({"u2"}, {"u1", "u2"}) == {"u2"}
    assert "u2" in handlers_copy.gone and "u1" not in handlers_copy.gone
    assert memo.gone.record({"u2"}, {"u1", "u2"}) == set()  # not new the second time
    memo.gone.record(set(), {"u1"})  # the watch dropped u2's entry: forget it
    assert "u2" not in handlers_copy.gone and len(handlers_copy.gone) == 0
