"""``lmcache-disagg bench transfer``: the channel against its raw baseline, in the same run.

Two sessions stay up for the whole run, each a sender here and a receiver in a spawned child
(the channel's receiver releases each transfer as soon as it completes, as D's connector would):

- the channel: a KVSender pushing to a KVReceiver;
- the baseline: for ``--channel tcp`` a plain socket pair (``sendall`` / ``recv_into`` with
  ``MSG_WAITALL``) moving the same bytes in the same chunk size; for ``--channel nixl`` a bare
  NIXL WRITE loop between two agents with the same chunk size and in-flight depth.

Each round is one burst of each, in alternating order, so both sample the shared machine at
nearly the same moments. It prints GB/s of both, chunks/s, and the median per-round ratio.

By default each end runs on its own half of the CPUs (like ``iperf3 -A``), the baseline as much
as the channel: in a real deployment P and D are different hosts, and with few CPUs the
scheduler moving the two ends' threads across the same CPUs costs more than what is measured.
``--no-pin`` lets the scheduler place them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from lmcache_disagg.config import parse_size

__all__ = ["main"]

_MIB = 1 << 20
# One transfer is one request's prompt. PD pays off for long prompts; 256 MiB is 2048 tokens of a
# Llama-8B-like model at 32 MiB per 256-token chunk (the default used to be 64 MiB, 512 tokens,
# where the per-request reservation and completion round trips weigh about 4x as much per chunk).
_TRANSFER_BYTES = 256 * _MIB


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


def _config(
    channel: str, chunk_bytes: int, pool_pages: int, send_pages: int, progress_thread: bool
) -> Any:
    from lmcache_disagg.config import LMCacheDisaggConfig

    return LMCacheDisaggConfig(
        channel=channel,  # type: ignore[arg-type]
        nixl_progress_thread=progress_thread,
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


def _stop_child(proc: BaseProcess) -> None:
    """Wait for a session's child to exit on its own, and kill it if it does not."""
    proc.join(30)
    if proc.is_alive():
        proc.kill()


# -- channel session -----------------------------------------------------------------------------


def _channel_receiver(conn: Connection, config: Any, chunk_bytes: int, cpus: CpuSet) -> None:
    _pin_self(cpus)
    from lmcache_disagg.transfer.receiver import KVReceiver
    from lmcache_disagg.transfer.state import RecvState

    rx = KVReceiver(config, _fingerprint(chunk_bytes))
    rx.start()
    try:
        conn.send((rx.endpoint, rx.channel_kind))
        # One message per burst: (burst id, transfers to expect); None ends the session.
        while (order := conn.recv()) is not None:
            burst, n_transfers = order
            for i in range(n_transfers):
                tid = f"bench-{burst}-{i}"
                while True:
                    state = rx.wait(tid, 1.0).state
                    if state is RecvState.COMPLETE:
                        break
                    if state is RecvState.FAILED:
                        conn.send(("failed", tid, rx.poll(tid).reason))
                        return
                rx.release(tid)
            conn.send(("ok", rx.metrics.failures("checksum")))
    finally:
        rx.shutdown()


class _ChannelSession:
    """A KVSender here and a KVReceiver in a child process, kept up across bursts."""

    def __init__(
        self,
        channel: str,
        chunk_bytes: int,
        n_chunks: int,
        per_transfer: int,
        rx_cpus: CpuSet,
        progress_thread: bool,
    ) -> None:
        from lmcache_disagg.transfer.sender import KVSender

        self.chunk_bytes = chunk_bytes
        self.per_transfer = min(per_transfer, n_chunks)
        n_transfers = math.ceil(n_chunks / self.per_transfer)
        self.in_flight = min(_in_flight_transfers(chunk_bytes, self.per_transfer), n_transfers)
        pool_pages = self.per_transfer * self.in_flight * 2
        send_pages = min(_send_pages(chunk_bytes), n_chunks + 1)
        sizes = (channel, chunk_bytes, pool_pages)
        self.bursts = 0
        self.checksum_failures = 0
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_channel_receiver,
            args=(child, _config(*sizes, 2, progress_thread), chunk_bytes, rx_cpus),
            name="lmcd-bench-rx",
        )
        self.proc.start()
        self.tx = KVSender(_config(*sizes, send_pages, progress_thread), _fingerprint(chunk_bytes))
        try:
            self.tx.start()
            if not self.conn.poll(120):
                raise SystemExit("receiver did not start")
            self.endpoint, self.receiver_kind = self.conn.recv()
            self.tx.send_pool.pages.random_(0, 255)
            # Handshake and connection set-up are not part of any measurement.
            self.burst(1)
            self.kind = self.tx.channel_for(self.endpoint)
        except BaseException:
            self.close()
            raise

    def burst(self, n_chunks: int) -> float:
        """Push ``n_chunks`` chunks; seconds from the first reservation to the last ack."""
        from lmcache_disagg.transfer.state import PushState

        tx, chunk_bytes, key = self.tx, self.chunk_bytes, b"k" * 16
        counts = [
            min(self.per_transfer, n_chunks - start)
            for start in range(0, n_chunks, self.per_transfer)
        ]
        burst = self.bursts
        self.bursts += 1
        self.conn.send((burst, len(counts)))
        # Like the connector, reservations are opened on their own thread ahead of the writes,
        # so a control round trip never stalls the data path; at most ``in_flight`` transfers
        # are reserved and unacknowledged at a time.
        slots = threading.Semaphore(self.in_flight)
        opened: queue.Queue[Any] = queue.Queue()

        def opener() -> None:
            for t, count in enumerate(counts):
                slots.acquire()
                try:
                    opened.put(tx.open(self.endpoint, f"bench-{burst}-{t}", count))
                except Exception as exc:
                    opened.put(exc)
                    return

        pending: collections.deque[Any] = collections.deque()
        done: list[Any] = []

        def reap(block: bool) -> None:
            while pending:
                status = pending[0].wait(0.05) if block else pending[0].status()
                if status.state is PushState.PENDING:
                    return
                done.append(pending.popleft())
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
        elapsed = time.perf_counter() - started
        thread.join(10)
        failed = [p.status() for p in done if p.status().state is not PushState.DONE]
        if not self.conn.poll(60):
            raise SystemExit("receiver did not report")
        report = self.conn.recv()
        if failed or report[0] != "ok":
            raise SystemExit(f"bench transfer failed: {failed or report}")
        self.checksum_failures = report[1]
        return elapsed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.tx.shutdown()
        _stop_child(self.proc)


# -- raw baselines -------------------------------------------------------------------------------


def _raw_tcp_receiver(port: int, chunk_bytes: int, cpus: CpuSet) -> None:
    _pin_self(cpus)
    from lmcache_disagg.transfer.pool import allocate_pages, host_view

    # Same allocator as the pools (huge pages, pre-faulted), so memory is not the difference.
    buf = allocate_pages(1, chunk_bytes, "cpu")
    view = host_view(buf)
    assert view is not None
    count = bytearray(8)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Each burst: an 8-byte chunk count, the chunks, then one byte back.
        while sock.recv_into(count, 8, socket.MSG_WAITALL) == 8:
            for _ in range(int.from_bytes(count, "little")):
                got = 0
                while got < chunk_bytes:
                    k = sock.recv_into(view[got:], chunk_bytes - got, socket.MSG_WAITALL)
                    if k == 0:
                        return
                    got += k
            sock.sendall(b"!")


class _RawTcpSession:
    """A plain socket pair: ``sendall`` of one buffer, ``recv_into`` with MSG_WAITALL."""

    def __init__(self, chunk_bytes: int, rx_cpus: CpuSet) -> None:
        from lmcache_disagg.transfer.pool import allocate_pages, host_view

        ctx = mp.get_context("spawn")
        self.server = socket.create_server(("127.0.0.1", 0))
        self.proc = ctx.Process(
            target=_raw_tcp_receiver,
            args=(self.server.getsockname()[1], chunk_bytes, rx_cpus),
            name="lmcd-bench-raw",
        )
        self.proc.start()
        self.server.settimeout(120)
        self.sock, _ = self.server.accept()
        self.sock.settimeout(120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pages = allocate_pages(1, chunk_bytes, "cpu")
        self.pages.random_(0, 255)
        payload = host_view(self.pages)
        assert payload is not None
        self.payload = payload
        self.burst(1)

    def burst(self, n_chunks: int) -> float:
        started = time.perf_counter()
        self.sock.sendall(n_chunks.to_bytes(8, "little"))
        for _ in range(n_chunks):
            self.sock.sendall(self.payload)
        if self.sock.recv(1) != b"!":
            raise SystemExit("raw TCP receiver went away")
        return time.perf_counter() - started

    def close(self) -> None:
        self.sock.close()
        self.server.close()
        _stop_child(self.proc)


def _raw_nixl_receiver(
    conn: Connection, chunk_bytes: int, pages: int, cpus: CpuSet, progress_thread: bool
) -> None:
    _pin_self(cpus)
    from lmcache_disagg.transfer.nixl_agent import NixlAgent
    from lmcache_disagg.transfer.pool import allocate_pages

    agent = NixlAgent("lmcd-bench-raw-rx", ("UCX",), progress_thread)
    buf = allocate_pages(pages, chunk_bytes, "cpu")
    agent.register(buf)
    conn.send((agent.metadata(), agent.base_address))
    try:
        # Report each burst's last notification; the parent closing the pipe ends the session.
        while not conn.poll(0):
            notifs = agent.get_new_notifs()
            for batch in notifs.values():
                for notif in batch:
                    if notif.startswith(b"last"):
                        conn.send(notif)
            if not notifs:
                time.sleep(0.0005)
    finally:
        agent.close()


class _RawNixlSession:
    """Two bare NIXL agents: WRITE loop with ``depth`` in flight, a notification per WRITE."""

    def __init__(
        self, chunk_bytes: int, depth: int, rx_cpus: CpuSet, progress_thread: bool
    ) -> None:
        from lmcache_disagg.transfer.nixl_agent import NixlAgent
        from lmcache_disagg.transfer.pool import allocate_pages

        self.chunk_bytes = chunk_bytes
        self.depth = depth
        self.pages = max(2, depth)
        self.bursts = 0
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_raw_nixl_receiver,
            args=(child, chunk_bytes, self.pages, rx_cpus, progress_thread),
            name="lmcd-bench-raw",
        )
        self.proc.start()
        self.agent = NixlAgent("lmcd-bench-raw-tx", ("UCX",), progress_thread)
        self.local = allocate_pages(self.pages, chunk_bytes, "cpu")
        self.local.random_(0, 255)
        self.agent.register(self.local)
        try:
            if not self.conn.poll(120):
                raise SystemExit("raw NIXL receiver did not start")
            metadata, self.remote_base = self.conn.recv()
            self.remote = self.agent.add_remote(metadata)
            self.burst(1)
        except BaseException:
            self.close()
            raise

    def _write(self, i: int, notif: bytes) -> Any:
        slot = i % self.pages
        return self.agent.write(
            local_addr=self.agent.local_base + slot * self.chunk_bytes,
            remote_addr=self.remote_base + slot * self.chunk_bytes,
            nbytes=self.chunk_bytes,
            remote_agent=self.remote,
            remote_mem="DRAM",
            remote_dev=0,
            notif=notif,
        )

    def burst(self, n_chunks: int) -> float:
        agent, depth = self.agent, self.depth
        last = b"last-%d" % self.bursts
        self.bursts += 1
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
            inflight.append(self._write(i, last if i == n_chunks - 1 else b"c"))
        for x in inflight:
            while agent.check(x) == "PROC":
                pass
            agent.release_xfer(x)
        elapsed = time.perf_counter() - started
        if not self.conn.poll(60) or self.conn.recv() != last:
            raise SystemExit("raw NIXL receiver did not see the burst's last WRITE")
        return elapsed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        _stop_child(self.proc)
        self.agent.close()


# -- entry point ---------------------------------------------------------------------------------


def _measure(
    args: argparse.Namespace, chunk_bytes: int, n_chunks: int, per_transfer: int
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Alternate raw and channel bursts over sessions that stay up, so both sample the same
    (noisy, shared) machine at nearly the same moments; returns per-round times and info."""
    tx_cpus, rx_cpus = cpu_split(args.pin)
    moved = n_chunks * chunk_bytes
    rounds: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_pinned(tx_cpus))
        raw: _RawTcpSession | _RawNixlSession
        if args.channel == "tcp":
            raw = _RawTcpSession(chunk_bytes, rx_cpus)
        else:
            # as many WRITEs in flight as the channel has staging pages
            depth = min(_send_pages(chunk_bytes), n_chunks + 1)
            raw = _RawNixlSession(chunk_bytes, depth, rx_cpus, args.nixl_progress_thread)
        stack.callback(raw.close)
        channel = _ChannelSession(
            args.channel, chunk_bytes, n_chunks, per_transfer, rx_cpus, args.nixl_progress_thread
        )
        stack.callback(channel.close)
        for r in range(max(1, args.rounds)):
            # Alternate who goes first, so a drift in the machine's speed favours neither.
            if r % 2:
                channel_s = channel.burst(n_chunks)
                raw_s = raw.burst(n_chunks)
            else:
                raw_s = raw.burst(n_chunks)
                channel_s = channel.burst(n_chunks)
            rounds.append({"raw_s": raw_s, "channel_s": channel_s, "ratio": raw_s / channel_s})
            print(
                f"  round {len(rounds)}: channel {moved / channel_s / 1e9:.2f} GB/s "
                f"({n_chunks / channel_s:.0f} chunks/s), raw {moved / raw_s / 1e9:.2f} GB/s, "
                f"ratio {raw_s / channel_s:.1%}",
                flush=True,
            )
    info = {
        "kind": channel.kind,
        "receiver_kind": channel.receiver_kind,
        "checksum_failures": channel.checksum_failures,
        "in_flight_transfers": channel.in_flight,
        "chunks_per_transfer": channel.per_transfer,
        "cpus": {
            "sender": sorted(tx_cpus) if tx_cpus else "any",
            "receiver": sorted(rx_cpus) if rx_cpus else "any",
        },
    }
    return rounds, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-disagg bench transfer", description=__doc__)
    parser.add_argument("--channel", choices=("tcp", "nixl"), default="tcp")
    parser.add_argument("--chunk-bytes", default="32MiB", help="bytes per chunk (e.g. 128KiB)")
    parser.add_argument(
        "--total",
        default=None,
        help="bytes per burst (default: 4GiB, or 16384 chunks for chunks under 1MiB)",
    )
    parser.add_argument(
        "--chunks-per-transfer",
        type=int,
        default=None,
        help="chunks per transfer, i.e. per request (default: 256MiB worth, at most 64: a "
        "2k-token prompt of an 8B model at 32MiB chunks)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="rounds of one baseline and one channel burst each (the machine is noisy)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the scheduler place both ends (default: each end on its own half of the CPUs)",
    )
    parser.add_argument(
        "--nixl-progress-thread",
        action="store_true",
        help="start NIXL's own progress thread on every agent, the baseline's too (config "
        "nixl_progress_thread; off by default)",
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
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.total is None:
        total = 4 << 30 if chunk_bytes >= _MIB else chunk_bytes * 16384
    n_chunks = max(2, total // chunk_bytes)
    per_transfer = args.chunks_per_transfer or max(1, min(64, _TRANSFER_BYTES // chunk_bytes))
    per_transfer = min(per_transfer, n_chunks)
    moved = n_chunks * chunk_bytes
    rounds, info = _measure(args, chunk_bytes, n_chunks, per_transfer)
    channel_times = sorted(r["channel_s"] for r in rounds)
    raw_times = sorted(r["raw_s"] for r in rounds)
    ratios = sorted(r["ratio"] for r in rounds)
    result = {
        "bench": "transfer",
        "channel": args.channel,
        "channel_used": info["kind"],
        "receiver_kind": info["receiver_kind"],
        "chunk_bytes": chunk_bytes,
        "chunks": n_chunks,
        "total_bytes": moved,
        "rounds": len(rounds),
        "channel_gbps": moved / channel_times[0] / 1e9,
        "raw_gbps": moved / raw_times[0] / 1e9,
        "ratio": statistics.median(ratios),
        "ratio_best_vs_best": raw_times[0] / channel_times[0],
        "channel_chunks_per_s": n_chunks / channel_times[0],
        "channel_chunks_per_s_median": n_chunks / statistics.median(channel_times),
        "raw_chunks_per_s": n_chunks / raw_times[0],
        "per_round": rounds,
        "checksum_failures": info["checksum_failures"],
        "chunks_per_transfer": info["chunks_per_transfer"],
        "in_flight_transfers": info["in_flight_transfers"],
        "cpus": info["cpus"],
        "nixl_progress_thread": args.nixl_progress_thread,
    }
    print(
        f"{args.channel} ({info['kind']}), best of {len(rounds)}: "
        f"{result['channel_gbps']:.2f} GB/s, {result['channel_chunks_per_s']:.0f} chunks/s "
        f"(median {result['channel_chunks_per_s_median']:.0f}) | raw baseline "
        f"{result['raw_gbps']:.2f} GB/s | median per-round ratio {result['ratio']:.1%} "
        f"({n_chunks} chunks of {chunk_bytes} bytes per burst)"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
