"""Fixtures for the network-namespace lab tests (need root, iproute2 and iptables).

One lab per module: node n0 runs IOC pods, n1 runs client pods, n2 is a host network for
host-network IOCs. Every lab is checked to leave nothing behind when it is torn down.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from ioc_testbed.lab import Lab
from ioc_testbed.lab.netns import cleanup_stale


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove namespaces of earlier labs whose process was killed (SIGKILL)."""
    with contextlib.suppress(Exception):  # not root: the lab fixture says so properly
        cleanup_stale()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A three-node lab: n0 for IOC pods, n1 for client pods, n2 for host-network IOCs."""
    the_lab = Lab(nodes=3)
    with the_lab:
        yield the_lab
    assert the_lab.residue() == [], "lab teardown left something behind"
