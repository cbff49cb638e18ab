"""The cyclic GC stays out of the way of connection churn (node_agent.proxy.proxy).

A finished connection is freed by reference counting (test_connection_cycles),
so what a GC pass would scan is the connections still in flight, all alive:
work for nothing, and a pause for every connection waiting on the loop.
"""

from __future__ import annotations

import json

from testbed.memory import in_fresh_interpreter

# 64 CONNECT streams in flight at a time, twice bench/proxy_hbone.py's crr
# phase, over two HBONE connections joined in memory.
CHURN = """
import asyncio, gc, json
import uvloop
from node_agent.proxy import proxy
from tests.unit.test_connection_cycles import peer_in_memory
from tests.unit.test_hbone_pending import joined_pair, shuttle

if {tune}:
    proxy.tune_collector()
passes = []
gc.callbacks.append(lambda phase, info: phase == "start" and passes.append(info["generation"]))

async def main():
    ends, served = await joined_pair()
    (client, _), (server, _) = ends
    before = len(passes)
    for _round in range(20):
        streams = [client.open_stream("10.0.0.1:80") for _ in range(64)]
        await shuttle(*ends)
        workloads = []
        for far in served:
            server.respond(far, 200)
            peer, _ = peer_in_memory()
            far.attach(peer)
            workloads.append(peer)
        await shuttle(*ends)
        for stream in streams:
            stream.attach(peer_in_memory()[0])
            stream.on_data(b"x" * 100)
            stream.on_eof()
        await shuttle(*ends)
        for peer in workloads:
            peer.eof_received()
        await shuttle(*ends)
        assert all(s.flow.done.done() for s in streams + served)
        served.clear()
        del streams, workloads, peer
    return len(passes) - before

print(json.dumps({{"passes": uvloop.run(main())}}))
"""


def test_connection_churn_runs_no_collector_pass() -> None:
    tuned = json.loads(in_fresh_interpreter(CHURN.format(tune=True)))
    assert tuned["passes"] == 0, tuned

    # CPython's default threshold, for contrast: the same churn is scanned over and over.
    default = json.loads(in_fresh_interpreter(CHURN.format(tune=False)))
    assert default["passes"] > 5, default
