"""Child process: a KVSender pushing deterministic chunks (see tests.transfer.utils).

argv[1] is a JSON spec: endpoint, config overrides, fingerprint fields, transfers
[{id, seed, n_chunks, last_tokens}], optional ``interleave`` (round-robin chunk writes across
transfers) and ``hang_after`` (stop after that many writes, print {"event": "hung"} and sleep).
Prints one JSON line {"event": "result", ...} at the end.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState
from tests.transfer.utils import chunk_data, chunk_key, chunk_plan


def main() -> int:
    spec = json.loads(sys.argv[1])
    config = LMCacheDisaggConfig(**spec["config"])
    sender = KVSender(config, LayoutFingerprint(**spec["fingerprint"]))
    sender.start()
    errors: dict[str, list[str]] = {}
    handles = {}
    try:
        for t in spec["transfers"]:
            try:
                handles[t["id"]] = sender.open(spec["endpoint"], t["id"], t["n_chunks"])
            except Exception as exc:
                errors[t["id"]] = [type(exc).__name__, str(exc)]
        print(
            json.dumps({"event": "opened", "channel": sender.channel_for(spec["endpoint"])}),
            flush=True,
        )
        writes = []
        for t in spec["transfers"]:
            if t["id"] in handles:
                plan = chunk_plan(t["seed"], t["n_chunks"], t["last_tokens"])
                writes.append([(t, i, nb, nt) for i, (nb, nt) in enumerate(plan)])
        if spec.get("interleave"):
            longest = max((len(w) for w in writes), default=0)
            order = [w[i] for i in range(longest) for w in writes if i < len(w)]
        else:
            order = [item for w in writes for item in w]
        hang_after = spec.get("hang_after")
        remaining = {t["id"]: t["n_chunks"] for t in spec["transfers"] if t["id"] in handles}
        for count, (t, index, nbytes, ntok) in enumerate(order):
            if hang_after is not None and count == hang_after:
                print(json.dumps({"event": "hung"}), flush=True)
                time.sleep(3600)
            page = sender.acquire_page(5.0)
            page.data[:nbytes].copy_(chunk_data(t["seed"], index, nbytes))
            handle = handles[t["id"]]
            handle.write(index, page, nbytes, ntok, chunk_key(t["seed"], index))
            remaining[t["id"]] -= 1
            if remaining[t["id"]] == 0:
                handle.finish()
        deadline = time.monotonic() + config.push_deadline + 5
        while time.monotonic() < deadline:
            if all(h.status().state is not PushState.PENDING for h in handles.values()):
                break
            time.sleep(0.005)
        results = {tid: [h.status().state.value, h.status().reason] for tid, h in handles.items()}
        print(
            json.dumps(
                {
                    "event": "result",
                    "results": results,
                    "errors": errors,
                    "pages_in_use": sender.send_pool.in_use(),
                }
            ),
            flush=True,
        )
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        sender.shutdown()


if __name__ == "__main__":
    sys.exit(main())
