"""``lmcache-disagg bench transfer``: the channel against its raw baseline, in the same run.

Two processes: this one sends, a spawned child receives (and releases each transfer as soon as it
completes, like D's connector would). For ``--channel tcp`` the baseline is a plain socket pair
(``sendall`` / ``recv_into`` with ``MSG_WAITALL``) moving the same bytes in the same chunk size; for
``--channel nixl`` it is a bare NIXL WRITE loop between two agents with the same chunk size and
in-flight depth. Prints GB/s of both, the ratio, and chunks/s.

By default each end runs on its own half of the CPUs (like ``iperf3 -A``), the baseline as much
as the channel: in a real deployment P and D are different hosts, and on a small box the
scheduler moving the two ends' threads across the same CPUs costs more than what is measured.
``--no-pin`` lets the scheduler place them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from lmcache_disagg.config import parse_size

__all__ = ["main"]

_MIB = 1 << 20


def _fingerprint(chunk_bytes: int) -> Any:
    from lmcache_disagg.transfer.protocol import LayoutFingerprint

    if chunk_bytes % 2:
        raise SystemExit("--chunk-bytes must be even")
    half = chunk_bytes // 2
    head_dim = math.gcd(half, 1 << 16)
    return LayoutFingerprint(
        model="bench",
        dtype="uint8",
        num_layers=1,
        num_kv_heads=half // head_dim,
        head_dim=head_dim,
        chunk_size=1,
        tp_rank=0,
        tp_size=1,
    )


def _config(channel: str, chunk_bytes: int, pool_pages: int, send_pages: int) -> Any:
    from lmcache_disagg.config import LMCacheDisaggConfig

    return LMCacheDisaggConfig(
        channel=channel,  # type: ignore[arg-type]
        listen_port=0,
        pool_size=chunk_bytes * pool_pages,
        send_buffer_size=chunk_bytes * send_pages,
        reserve_timeout=30,
        push_deadline=120,
        reservation_ttl=120,
    )


def _in_flight_transfers(chunk_bytes: int, per_transfer: int) -> int:
    """Reserved-but-unacknowledged transfers: enough that round trips never drain the pipe."""
    return max(4, min(16, (512 * _MIB) // (chunk_bytes * per_transfer)))


def _send_pages(chunk_bytes: int) -> int:
    return max(8, min(64, (512 * _MIB) // chunk_bytes))


# -- CPU placement -------------------------------------------------------------------------------

CpuSet = frozenset[int] | None


def cpu_split(pin: bool) -> tuple[CpuSet, CpuSet]:
    """(sender CPUs, receiver CPUs): two halves of the CPUs this process may use, or no pinning."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    half = len(cpus) // 2
    return frozenset(cpus[:half]), frozenset(cpus[half:])


@contextlib.contextmanager
def _pinned(cpus: CpuSet) -> Iterator[None]:
    """Run the calling thread, and the threads it starts meanwhile, on ``cpus``."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _pin_self(cpus: CpuSet) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


# -- channel run ---------------------------------------------------------------------------------


def _channel_receiver(
    conn: Connection,
    channel: str,
    chunk_bytes: int,
    pool_pages: int,
    n_transfers: int,
    cpus: CpuSet,
) -> None:
    _pin_self(cpus)
    from lmcache_disagg.transfer.receiver import KVReceiver
    from lmcache_disagg.transfer.state import RecvState

    rx = KVReceiver(_config(channel, chunk_bytes, pool_pages, 2), _fingerprint(chunk_bytes))
    rx.start()
    try:
        conn.send((rx.endpoint, rx.channel_kind))
        for i in range(n_transfers):
            tid = f"bench-{i}"
            while True:
                state = rx.wait(tid, 1.0).state
                if state is RecvState.COMPLETE:
                    break
                if state is RecvState.FAILED:
                    conn.send(("failed", tid, rx.poll(tid).reason))
                    return
            rx.release(tid)
        conn.send(("ok", rx.metrics.failures("checksum")))
        conn.recv()
    finally:
        rx.shutdown()


def _run_channel(
    channel: str, chunk_bytes: int, n_chunks: int, per_transfer: int, pin: bool = True
) -> dict[str, Any]:
    tx_cpus, rx_cpus = cpu_split(pin)
    with _pinned(tx_cpus):
        return _run_channel_pinned(channel, chunk_bytes, n_chunks, per_transfer, rx_cpus)


def _run_channel_pinned(
    channel: str, chunk_bytes: int, n_chunks: int, per_transfer: int, rx_cpus: CpuSet
) -> dict[str, Any]:
    from lmcache_disagg.transfer.sender import KVSender
    from lmcache_disagg.transfer.state import PushState

    n_transfers = math.ceil(n_chunks / per_transfer)
    per_transfer = min(per_transfer, n_chunks)
    in_flight = min(_in_flight_transfers(chunk_bytes, per_transfer), n_transfers)
    pool_pages = per_transfer * in_flight * 2
    send_pages = min(_send_pages(chunk_bytes), n_chunks + 1)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_channel_receiver,
        args=(child, channel, chunk_bytes, pool_pages, n_transfers, rx_cpus),
        name="lmcd-bench-rx",
    )
    proc.start()
    tx = KVSender(_config(channel, chunk_bytes, pool_pages, send_pages), _fingerprint(chunk_bytes))
    tx.start()
    try:
        if not parent.poll(120):
            raise SystemExit("receiver did not start")
        endpoint, rx_kind = parent.recv()
        tx.send_pool.pages.random_(0, 255)
        key = b"k" * 16
        # Warm-up: handshake and connection set-up are not part of the measurement.
        warm = tx.open(endpoint, "warmup", 1)
        warm.write(0, tx.acquire_page(10), chunk_bytes, 1, key)
        warm.finish()
        while warm.status().state is PushState.PENDING:
            time.sleep(0.001)
        kind = tx.channel_for(endpoint)
        # Like the connector, reservations are opened on their own thread ahead of the writes,
        # so a control round trip never stalls the data path; at most ``in_flight`` transfers
        # are reserved and unacknowledged at a time.
        slots = threading.Semaphore(in_flight)
        opened: queue.Queue[Any] = queue.Queue()
        counts = [min(per_transfer, n_chunks - t * per_transfer) for t in range(n_transfers)]

        def opener() -> None:
            for t, count in enumerate(counts):
                slots.acquire()
                try:
                    opened.put(tx.open(endpoint, f"bench-{t}", count))
                except Exception as exc:
                    opened.put(exc)
                    return

        pending: list[Any] = []
        done: list[Any] = []

        def reap(block: bool) -> None:
            while pending:
                status = pending[0].wait(0.05) if block else pending[0].status()
                if status.state is PushState.PENDING:
                    return
                done.append(pending.pop(0))
                slots.release()

        thread = threading.Thread(target=opener, name="lmcd-bench-opener", daemon=True)
        started = time.perf_counter()
        thread.start()
        for count in counts:
            while True:
                try:
                    push = opened.get(timeout=0.002)
                    break
                except queue.Empty:
                    reap(block=False)
            if isinstance(push, Exception):
                raise SystemExit(f"open failed: {push!r}")
            for i in range(count):
                push.write(i, tx.acquire_page(60), chunk_bytes, 1, key)
            push.finish()
            pending.append(push)
            reap(block=False)
        while pending:
            reap(block=True)
        thread.join(10)
        elapsed = time.perf_counter() - started
        failed = [p.status() for p in done if p.status().state is not PushState.DONE]
        if not parent.poll(60):
            raise SystemExit("receiver did not report")
        report = parent.recv()
        parent.send("bye")
        if failed or report[0] != "ok":
            raise SystemExit(f"bench transfer failed: {failed or report}")
    finally:
        tx.shutdown()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return {
        "kind": kind,
        "receiver_kind": rx_kind,
        "seconds": elapsed,
        "checksum_failures": report[1],
        "in_flight_transfers": in_flight,
        "chunks_per_transfer": per_transfer,
    }


# -- raw baselines -------------------------------------------------------------------------------


def _raw_tcp_receiver(
    conn: Connection, port: int, chunk_bytes: int, n_chunks: int, cpus: CpuSet
) -> None:
    _pin_self(cpus)
    from lmcache_disagg.transfer.pool import allocate_pages, host_view

    # Same allocator as the pools (huge pages, pre-faulted), so memory is not the difference.
    buf = allocate_pages(1, chunk_bytes, "cpu")
    view = host_view(buf)
    assert view is not None
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n_chunks):
            got = 0
            while got < chunk_bytes:
                k = sock.recv_into(view[got:], chunk_bytes - got, socket.MSG_WAITALL)
                if k == 0:
                    return
                got += k
        sock.sendall(b"!")


def _run_raw_tcp(chunk_bytes: int, n_chunks: int, pin: bool = True) -> float:
    tx_cpus, rx_cpus = cpu_split(pin)
    with _pinned(tx_cpus):
        return _run_raw_tcp_pinned(chunk_bytes, n_chunks, rx_cpus)


def _run_raw_tcp_pinned(chunk_bytes: int, n_chunks: int, rx_cpus: CpuSet) -> float:
    ctx = mp.get_context("spawn")
    with socket.create_server(("127.0.0.1", 0)) as server:
        _parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_raw_tcp_receiver,
            args=(child, server.getsockname()[1], chunk_bytes, n_chunks, rx_cpus),
            name="lmcd-bench-raw",
        )
        proc.start()
        server.settimeout(120)
        sock, _ = server.accept()
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            from lmcache_disagg.transfer.pool import allocate_pages, host_view

            pages = allocate_pages(1, chunk_bytes, "cpu")
            pages.random_(0, 255)
            payload = host_view(pages)
            assert payload is not None
            sock.sendall(payload)  # warm-up chunk is part of n_chunks; timing starts after it
            started = time.perf_counter()
            for _ in range(n_chunks - 1):
                sock.sendall(payload)
            sock.settimeout(120)
            sock.recv(1)
            elapsed = time.perf_counter() - started
        proc.join(30)
    return elapsed * n_chunks / max(1, n_chunks - 1)


def _raw_nixl_receiver(conn: Connection, chunk_bytes: int, pages: int, cpus: CpuSet) -> None:
    _pin_self(cpus)
    from lmcache_disagg.transfer.nixl_agent import NixlAgent
    from lmcache_disagg.transfer.pool import allocate_pages

    agent = NixlAgent("lmcd-bench-raw-rx", ("UCX",))
    buf = allocate_pages(pages, chunk_bytes, "cpu")
    agent.register(buf)
    conn.send((agent.metadata(), agent.base_address))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if agent.get_new_notifs():
            break
        time.sleep(0.0005)
    conn.send("done")
    conn.recv()
    agent.close()


def _run_raw_nixl(chunk_bytes: int, n_chunks: int, depth: int, pin: bool = True) -> float:
    tx_cpus, rx_cpus = cpu_split(pin)
    with _pinned(tx_cpus):
        return _run_raw_nixl_pinned(chunk_bytes, n_chunks, depth, rx_cpus)


def _run_raw_nixl_pinned(chunk_bytes: int, n_chunks: int, depth: int, rx_cpus: CpuSet) -> float:
    from lmcache_disagg.transfer.nixl_agent import NixlAgent
    from lmcache_disagg.transfer.pool import allocate_pages

    pages = max(2, depth)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_raw_nixl_receiver,
        args=(child, chunk_bytes, pages, rx_cpus),
        name="lmcd-bench-raw",
    )
    proc.start()
    agent = NixlAgent("lmcd-bench-raw-tx", ("UCX",))
    local = allocate_pages(pages, chunk_bytes, "cpu")
    local.random_(0, 255)
    agent.register(local)
    try:
        metadata, base = parent.recv()
        remote = agent.add_remote(metadata)

        def write(i: int, notif: bytes) -> Any:
            slot = i % pages
            return agent.write(
                local_addr=agent.local_base + slot * chunk_bytes,
                remote_addr=base + slot * chunk_bytes,
                nbytes=chunk_bytes,
                remote_agent=remote,
                remote_mem="DRAM",
                remote_dev=0,
                notif=notif,
            )

        warm = write(0, b"w")
        while agent.check(warm) == "PROC":
            pass
        agent.release_xfer(warm)
        started = time.perf_counter()
        inflight: list[Any] = []
        for i in range(n_chunks):
            while len(inflight) >= depth:
                still = []
                for x in inflight:
                    if agent.check(x) == "PROC":
                        still.append(x)
                    else:
                        agent.release_xfer(x)
                inflight = still
            inflight.append(write(i, b"last" if i == n_chunks - 1 else b"c"))
        for x in inflight:
            while agent.check(x) == "PROC":
                pass
            agent.release_xfer(x)
        elapsed = time.perf_counter() - started
        parent.recv()
        parent.send("bye")
    finally:
        agent.close()
        proc.join(30)
    return elapsed


# -- entry point ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-disagg bench transfer", description=__doc__)
    parser.add_argument("--channel", choices=("tcp", "nixl"), default="tcp")
    parser.add_argument("--chunk-bytes", default="32MiB", help="bytes per chunk (e.g. 128KiB)")
    parser.add_argument(
        "--total",
        default=None,
        help="bytes to move per run (default: 4GiB, or 16384 chunks for chunks under 1MiB)",
    )
    parser.add_argument("--chunks-per-transfer", type=int, default=None)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating baseline/channel rounds (noise)"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the scheduler place both ends (default: each end on its own half of the CPUs)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    try:
        chunk_bytes = parse_size(args.chunk_bytes)
        total = parse_size(args.total) if args.total is not None else 0
    except ValueError as exc:
        parser.error(str(exc))
    if chunk_bytes < 2 or chunk_bytes % 2:
        parser.error(f"--chunk-bytes must be an even number of bytes >= 2, got {chunk_bytes}")
    if args.chunks_per_transfer is not None and args.chunks_per_transfer < 1:
        parser.error("--chunks-per-transfer must be >= 1")
    if args.total is None:
        total = 4 << 30 if chunk_bytes >= _MIB else chunk_bytes * 16384
    n_chunks = max(2, total // chunk_bytes)
    per_transfer = args.chunks_per_transfer or max(1, min(64, (64 * _MIB) // chunk_bytes))
    per_transfer = min(per_transfer, n_chunks)
    moved = n_chunks * chunk_bytes
    tx_cpus, rx_cpus = cpu_split(args.pin)
    rounds = []
    run: dict[str, Any] = {}
    for _ in range(max(1, args.rounds)):
        if args.channel == "tcp":
            raw = _run_raw_tcp(chunk_bytes, n_chunks, args.pin)
        else:
            # as many WRITEs in flight as the channel has staging pages
            depth = min(_send_pages(chunk_bytes), n_chunks + 1)
            raw = _run_raw_nixl(chunk_bytes, n_chunks, depth, args.pin)
        run = _run_channel(args.channel, chunk_bytes, n_chunks, per_transfer, args.pin)
        rounds.append({"raw_s": raw, "channel_s": run["seconds"], "ratio": raw / run["seconds"]})
        print(
            f"  round {len(rounds)}: channel {moved / run['seconds'] / 1e9:.2f} GB/s "
            f"({n_chunks / run['seconds']:.0f} chunks/s), raw {moved / raw / 1e9:.2f} GB/s, "
            f"ratio {raw / run['seconds']:.1%}",
            flush=True,
        )
    best_channel = min(r["channel_s"] for r in rounds)
    best_raw = min(r["raw_s"] for r in rounds)
    ratios = sorted(r["ratio"] for r in rounds)
    result = {
        "bench": "transfer",
        "channel": args.channel,
        "channel_used": run["kind"],
        "chunk_bytes": chunk_bytes,
        "chunks": n_chunks,
        "total_bytes": moved,
        "rounds": len(rounds),
        "channel_gbps": moved / best_channel / 1e9,
        "raw_gbps": moved / best_raw / 1e9,
        "ratio": ratios[len(ratios) // 2],
        "ratio_best_vs_best": best_raw / best_channel,
        "channel_chunks_per_s": n_chunks / best_channel,
        "raw_chunks_per_s": n_chunks / best_raw,
        "per_round": rounds,
        "checksum_failures": run["checksum_failures"],
        "chunks_per_transfer": per_transfer,
        "in_flight_transfers": run["in_flight_transfers"],
        "cpus": {
            "sender": sorted(tx_cpus) if tx_cpus else "any",
            "receiver": sorted(rx_cpus) if rx_cpus else "any",
        },
    }
    print(
        f"{args.channel} ({run['kind']}), best of {len(rounds)}: "
        f"{result['channel_gbps']:.2f} GB/s, {result['channel_chunks_per_s']:.0f} chunks/s | "
        f"raw baseline {result['raw_gbps']:.2f} GB/s | median per-round ratio "
        f"{result['ratio']:.1%} ({n_chunks} chunks of {chunk_bytes} bytes)"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
