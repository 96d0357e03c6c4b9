"""Everything ``--routing cache_aware`` needs in one proxy process, behind one small facade.

:class:`KVRouting` owns the tokenizer (:mod:`.tokenizer`), the index (:mod:`.kvindex`), the KV
events subscriber (:mod:`.kvevents`) and the policy (:mod:`.cache_aware`). The proxy calls, per
request and on its event loop:

1. :meth:`KVRouting.tokens` - the prompt's token ids (None: not predictable; route by load);
2. :meth:`KVRouting.choose` - a worker of one role among ``(name, outstanding_tokens)``;
3. :meth:`KVRouting.skip_prefill` - whether D holds all but a few chunks (conditional
   disaggregation), counted by reason;
4. :meth:`KVRouting.observe` - after the answer, the predicted and actual hit tokens of D (actual
   from D's ``usage.prompt_tokens_details.cached_tokens`` minus what P pushed: in a JSON answer, or
   in the usage event of a stream, which :mod:`.pd` asks D for and drops again when the client did
   not ask for it), whose gap shows when the index is stale.

:meth:`KVRouting.stats` is what the proxy's metrics export. Event source specs on the command line
are ``WORKER=tcp://HOST:PORT`` (``WORKER`` as given in ``--prefill``/``--decode``; the snapshot
endpoint defaults to port + 1, or add ``,snapshot=tcp://HOST:PORT``).

With ``--workers N`` each proxy process builds its own :class:`KVRouting` (the app factory runs in
every process): its own tokenizer, index and subscriber thread. Every subscriber connects a SUB
socket to each worker's PUB endpoint, and PUB sends each message to every subscriber, so every
process applies every event and holds the full index; a process that has to resync asks the
worker's ROUTER for a snapshot itself (the reply goes back to the asking DEALER only). What is
per process:

* outstanding tokens (the load term and the imbalance bound) count only the requests this process
  serves, so with N processes the holder of a hot prefix can take up to N times the bound;
* the ``decisions`` and hit-token counters; Prometheus sums them over the processes, as it does the
  event, loss, resync and invalid-message counters, which therefore count each published event
  once per process. The index and source-state gauges are the largest of any live process.

Workers added through ``/workers`` are followed too (:meth:`KVRouting.follow`): at the
``kv_events`` endpoint given with them, else at their host's ``auto`` port; every process learns
of them through the shared worker list, so each subscribes within one health interval. A removed
worker's entries leave the index. With explicit ``--kv-events`` only and no ``auto``, a worker
added without ``kv_events`` has no subscription and is chosen by load alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from lmcache_disagg.config import split_host_port
from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.cache_aware import CacheAwarePolicy, CacheAwareSettings, Choice
from lmcache_disagg.proxy.kvevents import EventSource, KVEventSubscriber
from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.proxy.kvsync import SyncSettings, SyncState
from lmcache_disagg.proxy.tokenizer import PromptTokenizer
from lmcache_disagg.proxy.usage import cached_tokens_of
from lmcache_disagg.transfer.event_publisher import snapshot_endpoint_for
from lmcache_disagg.transfer.events import DEFAULT_EVENTS_PORT

__all__ = [
    "KVRouting",
    "KVRoutingSettings",
    "KVRoutingStats",
    "KVRoutingStatsDelta",
    "auto_event_source",
    "auto_events_port",
    "event_sources",
    "parse_event_source",
    "reported_cached_tokens",
    "tokenizer_dir_from_models",
]


def parse_event_source(text: str) -> EventSource:
    """``WORKER=tcp://HOST:PORT[,snapshot=tcp://HOST:PORT]`` -> :class:`EventSource`."""
    worker, sep, rest = text.partition("=")
    endpoint, _, extra = rest.partition(",")
    if not sep or not worker or not endpoint.startswith("tcp://"):
        raise ConfigError(
            f"--kv-events {text!r}: expected WORKER=tcp://HOST:PORT[,snapshot=tcp://HOST:PORT]"
        )
    try:
        snapshot = snapshot_endpoint_for(endpoint)
    except ValueError as exc:
        raise ConfigError(f"--kv-events {text!r}: {exc}") from None
    if extra:
        name, eq, value = extra.partition("=")
        if name != "snapshot" or not eq or not value.startswith("tcp://"):
            raise ConfigError(f"--kv-events {text!r}: only snapshot=tcp://HOST:PORT may follow")
        snapshot = value
    return EventSource(worker.strip(), endpoint, snapshot)


def _is_auto(text: str) -> bool:
    return text == "auto" or text.startswith("auto:")


def auto_events_port(specs: Sequence[str]) -> int | None:
    """The port of an ``auto[:PORT]`` value among ``--kv-events`` specs (None: none is auto)."""
    port: int | None = None
    for text in specs:
        if _is_auto(text):
            port_text = text.partition(":")[2] or str(DEFAULT_EVENTS_PORT)
            if not port_text.isdigit() or not 0 < int(port_text) < 65535:
                raise ConfigError(f"--kv-events {text!r}: expected auto or auto:PORT")
            port = int(port_text)
    return port


def auto_event_source(worker: str, port: int) -> EventSource:
    """The source of ``worker`` (``HOST:PORT`` of its HTTP server) at its host's events ``port``."""
    host, _ = split_host_port(worker)
    endpoint = f"tcp://{host}:{port}"
    return EventSource(worker, endpoint, snapshot_endpoint_for(endpoint))


def event_sources(specs: Sequence[str], workers: Sequence[str]) -> tuple[EventSource, ...]:
    """The sources of ``--kv-events`` values for the proxy's workers (their ``HOST:PORT``).

    ``auto[:PORT]`` subscribes to every worker's host at ``PORT`` (default
    :data:`~lmcache_disagg.transfer.events.DEFAULT_EVENTS_PORT`); explicit specs must name a
    configured worker.
    """
    sources: dict[str, EventSource] = {}
    port = auto_events_port(specs)
    for text in specs:
        if _is_auto(text):
            continue
        source = parse_event_source(text)
        if source.worker not in workers:
            raise ConfigError(
                f"--kv-events {text!r}: {source.worker!r} is not a --prefill/--decode worker "
                f"({', '.join(workers)})"
            )
        sources[source.worker] = source
    if port is not None:
        for worker in workers:
            sources.setdefault(worker, auto_event_source(worker, port))
    return tuple(sorted(sources.values(), key=lambda s: workers.index(s.worker)))


def reported_cached_tokens(body: bytes) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` of a worker's JSON answer, if it has one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return cached_tokens_of(obj.get("usage") if isinstance(obj, dict) else None)


def tokenizer_dir_from_models(models: Any) -> str | None:
    """A local model directory with a tokenizer from a worker's ``/v1/models`` answer."""
    data = models.get("data") if isinstance(models, dict) else None
    for card in data if isinstance(data, list) else ():
        if not isinstance(card, dict):
            continue
        for field_name in ("root", "id"):
            value = card.get(field_name)
            if isinstance(value, str) and (Path(value) / "tokenizer.json").is_file():
                return value
    return None


@dataclass(frozen=True)
class KVRoutingSettings:
    tokenizer_dir: str | None
    """None: found later (:meth:`KVRouting.set_tokenizer`); until then requests route by load."""
    sources: tuple[EventSource, ...]
    policy: CacheAwareSettings = field(default_factory=CacheAwareSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    index_max_keys: int = 1 << 18
    """About 400 bytes per key (two holders): the default bounds the index near 100 MiB."""
    tokenizer_cache_entries: int = 4096
    auto_events_port: int | None = None
    """Workers added at run time without their own events endpoint are followed at this port."""


@dataclass(frozen=True)
class KVRoutingStats:
    index_keys: int
    index_evicted_keys: int
    events_received: int
    batches_received: int
    batches_lost: int
    resyncs: int
    invalid_messages: int
    sources: dict[str, SyncState]
    worker_keys: dict[str, int]
    decisions: dict[str, int]
    untokenized_requests: int
    predicted_hit_tokens: int
    actual_hit_tokens: int
    tokenizer_cache_hits: int


@dataclass
class KVRoutingStatsDelta:
    """Turns the cumulative counters of :class:`KVRoutingStats` into increments (Prometheus)."""

    events_received: int = 0
    batches_lost: int = 0
    resyncs: int = 0
    invalid_messages: int = 0

    def advance(self, stats: KVRoutingStats) -> KVRoutingStatsDelta:
        """The increments since the previous call (which this call then remembers)."""
        delta = KVRoutingStatsDelta(
            stats.events_received - self.events_received,
            stats.batches_lost - self.batches_lost,
            stats.resyncs - self.resyncs,
            stats.invalid_messages - self.invalid_messages,
        )
        self.events_received = stats.events_received
        self.batches_lost = stats.batches_lost
        self.resyncs = stats.resyncs
        self.invalid_messages = stats.invalid_messages
        return delta


class KVRouting:
    def __init__(self, settings: KVRoutingSettings) -> None:
        settings.policy.validate()
        self.settings = settings
        self.tokenizer: PromptTokenizer | None = None
        if settings.tokenizer_dir is not None:
            self.set_tokenizer(settings.tokenizer_dir)
        self.index = KVIndex(settings.index_max_keys)
        self.policy = CacheAwarePolicy(self.index, settings.policy)
        self.subscriber = KVEventSubscriber(settings.sources, self.index, settings.sync)
        self._untokenized = 0
        self._predicted = 0
        self._actual = 0

    def set_tokenizer(self, directory: str) -> None:
        """Load the model's tokenizer from a local directory (ConfigError if it has none)."""
        if not Path(directory).is_dir():
            raise ConfigError(
                f"tokenizer directory {directory!r} not found: cache_aware routing needs the "
                "model's tokenizer (--tokenizer DIR, or workers serving a local model directory)"
            )
        self.tokenizer = PromptTokenizer.from_dir(directory, self.settings.tokenizer_cache_entries)

    def event_source(self, worker: str, kv_events: str | None = None) -> EventSource | None:
        """Where ``worker``'s KV events come from: ``kv_events`` (``tcp://HOST:PORT``
        ``[,snapshot=tcp://HOST:PORT]``) when given, else its start-up source, else its host at
        the ``auto`` port; None when none applies. ConfigError for a bad ``kv_events``."""
        if kv_events is not None:
            try:
                return parse_event_source(f"{worker}={kv_events}")
            except ConfigError:
                raise ConfigError(
                    f"kv_events {kv_events!r}: expected tcp://HOST:PORT[,snapshot=tcp://HOST:PORT]"
                ) from None
        for source in self.settings.sources:
            if source.worker == worker:
                return source
        if self.settings.auto_events_port is None:
            return None
        return auto_event_source(worker, self.settings.auto_events_port)

    def follow(self, workers: Sequence[tuple[str, str | None]]) -> None:
        """Subscribe to the events of exactly these ``(worker, kv_events)`` (the worker pool
        after a ``/workers`` change); a worker no longer listed leaves the index."""
        wanted: dict[str, EventSource] = {}
        for worker, kv_events in workers:
            source = self.event_source(worker, kv_events)
            if source is not None:
                wanted.setdefault(worker, source)
        if set(wanted.values()) != set(self.subscriber.sources()):
            self.subscriber.set_sources(tuple(wanted.values()))

    def start(self) -> KVRouting:
        self.subscriber.start()
        return self

    def close(self) -> None:
        self.subscriber.close()

    # -- per request (event loop) --------------------------------------------------------------
    def tokens(self, body: Mapping[str, Any]) -> list[int] | None:
        ids = self.tokenizer.request_tokens(body) if self.tokenizer is not None else None
        if ids is None:
            self._untokenized += 1
        return ids

    def choose(
        self, token_ids: Sequence[int] | None, candidates: Sequence[tuple[str, int]]
    ) -> Choice | None:
        """The worker among ``(name, outstanding_tokens)`` and its predicted cached tokens."""
        return self.policy.choose_worker(token_ids or (), candidates)

    def skip_prefill(self, token_ids: Sequence[int] | None, decode: Choice) -> bool:
        """Conditional disaggregation: D lacks at most ``skip_prefill_chunks`` chunks."""
        reason = self.policy.prefill_decision(token_ids or (), decode)
        return reason == "cached_on_decode"

    def observe(self, predicted_hit_tokens: int, actual_hit_tokens: int) -> None:
        self._predicted += max(predicted_hit_tokens, 0)
        self._actual += max(actual_hit_tokens, 0)

    def stats(self) -> KVRoutingStats:
        sub = self.subscriber.stats()
        index = self.index.stats()
        return KVRoutingStats(
            index_keys=index.keys,
            index_evicted_keys=index.evicted_keys,
            events_received=sub.totals.events,
            batches_received=sub.totals.batches,
            batches_lost=sub.totals.lost_batches,
            resyncs=sub.totals.resyncs,
            invalid_messages=sub.totals.invalid,
            sources=sub.states,
            worker_keys={w: self.index.worker_keys(w) for w in self.index.fingerprints()},
            decisions=dict(self.policy.counts.by_reason),
            untokenized_requests=self._untokenized,
            predicted_hit_tokens=self._predicted,
            actual_hit_tokens=self._actual,
            tokenizer_cache_hits=self.tokenizer.cache_hits if self.tokenizer is not None else 0,
        )
