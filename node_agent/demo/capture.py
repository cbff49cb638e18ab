"""`weir demo --capture-only`: capture on a throwaway node, shown connection by connection.

Builds a node and two pods in network namespaces (wired by the reference CNI
plugins, as a runtime would), captures pod `app`, and sends real connections
that show what capture does: ordinary traffic lands on the proxy ports with
its original destination intact, while the proxy's own traffic (UID/GID 1337,
mark 0x539) and loopback go where they were sent. A stand-in listener plays
the node proxy; the full mesh arrives with the proxy and agent issues.
Everything is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from node_agent.constants import (
    INBOUND_PLAINTEXT_CAPTURE_PORT,
    OUTBOUND_CAPTURE_PORT,
    PROXY_GID,
    PROXY_MARK,
    PROXY_UID,
)
from node_agent.localmesh.topology import LocalTopology, Pod
from node_agent.localmesh.traffic import TrafficObserver, connect
from node_agent.redirect.backend import choose_backend, probe_host
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.iptables import IptablesCapture

APP_PORT = 8080
OUTSIDE = "203.0.113.7"  # TEST-NET-3: no such host; only capture can answer


@dataclass(frozen=True)
class Case:
    label: str
    src: str
    dst: str
    port: int
    who: dict[str, int]
    expect: str


def _cases(app: Pod, backend: Pod) -> list[Case]:
    a, b = str(app.ipv4), str(backend.ipv4)
    out, inb = (
        f"app:{OUTBOUND_CAPTURE_PORT} (proxy)",
        f"app:{INBOUND_PLAINTEXT_CAPTURE_PORT} (proxy)",
    )
    return [
        Case("app -> backend", "app", b, APP_PORT, {}, out),
        Case("app -> the internet", "app", OUTSIDE, 443, {}, out),
        Case("backend -> app", "backend", a, APP_PORT, {}, inb),
        Case(
            f"app as uid {PROXY_UID} -> backend", "app", b, APP_PORT, {"uid": PROXY_UID}, "backend"
        ),
        Case(
            f"app as gid {PROXY_GID} -> backend",
            "app",
            b,
            APP_PORT,
            {"uid": 4242, "gid": PROXY_GID},
            "backend",
        ),
        Case(
            f"app, mark {PROXY_MARK:#x} -> backend",
            "app",
            b,
            APP_PORT,
            {"mark": PROXY_MARK},
            "backend",
        ),
        Case("app -> 127.0.0.1 (loopback)", "app", "127.0.0.1", APP_PORT, {}, "app (itself)"),
    ]


def _print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _attempt(seen: TrafficObserver, src: Pod, dst: str, port: int, **who: int) -> tuple[str, str]:
    """(where the connection landed, the original destination the listener recovered)."""
    attempt = connect(src.netns, dst, port, **who)
    arrival = seen.wait_for(attempt.token, timeout=3)
    if arrival is None:
        return f"nowhere ({attempt.outcome})", "-"
    original = arrival.original_dst
    return arrival.listener, f"{original[0]}:{original[1]}" if original else "-"


def run() -> int:
    started = time.monotonic()
    choice = choose_backend(None, probe_host())
    capture = IptablesCapture(choice.backend)
    print(f"iptables backend: {choice.backend} ({choice.reason})")
    failures = 0
    with LocalTopology() as topo, TrafficObserver() as seen:
        node = topo.add_node("node-1", "10.244.1.0/24")
        pods = {"app": topo.add_pod(node, "app"), "backend": topo.add_pod(node, "backend")}
        for name, pod in pods.items():
            print(f"pod {name}: netns {pod.netns.path}, IP {pod.ipv4} (bridge + host-local)")
        app = pods["app"].netns
        seen.listen(app, f"app:{OUTBOUND_CAPTURE_PORT} (proxy)", OUTBOUND_CAPTURE_PORT)
        seen.listen(
            app, f"app:{INBOUND_PLAINTEXT_CAPTURE_PORT} (proxy)", INBOUND_PLAINTEXT_CAPTURE_PORT
        )
        seen.listen(app, "app (itself)", APP_PORT)
        seen.listen(pods["backend"].netns, "backend", APP_PORT)

        capture.apply(app, CaptureConfig())
        drift = capture.check(app, CaptureConfig())
        print(f"captured pod app; rule check: {drift or 'as expected'}\n")

        rows = [("connection", "landed on", "original destination", "as expected")]
        for case in _cases(pods["app"], pods["backend"]):
            landed, original = _attempt(seen, pods[case.src], case.dst, case.port, **case.who)
            failures += landed != case.expect
            verdict = "yes" if landed == case.expect else f"NO (want {case.expect})"
            rows.append((f"{case.label}:{case.port}", landed, original, verdict))
        _print_table(rows)

        capture.remove(app)
        landed, _ = _attempt(seen, pods["app"], str(pods["backend"].ipv4), APP_PORT)
        failures += landed != "backend"
        print(f"\nremoved capture; app -> backend now lands on: {landed}")
    print(f"cleaned up every namespace, link and rule; {time.monotonic() - started:.1f}s")
    print("demo: OK" if not failures else f"demo: {failures} connection(s) not as expected")
    return 0 if not failures else 1
