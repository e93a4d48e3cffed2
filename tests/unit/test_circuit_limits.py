"""Circuit bounds of the CA gateway and the name server (gateways/limits.py): a total
lowered to what the file descriptor limit leaves, and a quarter of it per client host,
so a client opening thousands of circuits neither runs the process out of descriptors
nor locks the other clients out. (The CA gateway's own tests are in
test_ca_gateway_fuzz.py; over real sockets in tests/lab/test_bounds.py.)"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys

from test_name_server_hostile import Transport, make_server  # type: ignore[import-not-found]

from ioc_operator.gateways.limits import FD_RESERVE, CircuitLimit
from ioc_operator.nameserver import server as srv


def test_one_host_takes_a_quarter_and_the_total_holds():
    limit = CircuitLimit(100)
    assert [limit.admit("a") for _ in range(30)].count("") == 25
    assert all(limit.admit(f"h{i}") == "" for i in range(75))
    assert limit.admit("z").startswith("100 circuits open")
    limit.release("a")
    assert limit.admit("z") == "" and limit.count == 100


def test_the_total_is_lowered_to_the_descriptor_limit():
    """Before: the name server took 4,096 circuits per protocol whatever the descriptor
    limit (1,024 is a common default): accept() then failed with EMFILE for every
    client, and the prober's sockets could not be made."""
    code = ("import json, resource; resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300));"
            "from ioc_operator.gateways.limits import CircuitLimit;"
            "print(json.dumps([CircuitLimit(4096).total, CircuitLimit(4096, fd_share=2).total]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert json.loads(out.stdout) == [300 - FD_RESERVE, (300 - FD_RESERVE) // 2]


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = ("import resource; from ioc_operator.gateways.limits import descriptors;"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard}));"
            "print(descriptors(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == [str(hard), str(hard)]


def test_the_name_server_keeps_room_for_other_hosts():
    """Before: the first 4,096 circuits from anywhere were taken, all from one client if
    it opened them first."""
    loop = asyncio.new_event_loop()
    try:
        server = make_server(loop)
        total = server.limits["ca"].total
        circuits = []
        for _ in range(total):
            circuit = srv.CaCircuit(server)
            transport = Transport()  # every one from the same client address
            circuit.connection_made(transport)
            circuits.append((circuit, transport))
        admitted = [c for c, t in circuits if not t.closed]
        assert len(admitted) == total // 4
        assert server.stats["circuits_refused"] == total - total // 4
        other = srv.CaCircuit(server)
        other_transport = Transport()
        other_transport.get_extra_info = lambda name, default=None: {  # type: ignore[method-assign]
            "peername": ("198.18.17.99", 1), "sockname": ("198.18.16.9", 5064)}.get(name)
        other.connection_made(other_transport)
        assert not other_transport.closed
        for circuit, _ in circuits:
            circuit.connection_lost(None)
        other.connection_lost(None)
        assert server.limits["ca"].count == 0 and not server.circuits["ca"]
    finally:
        loop.close()
