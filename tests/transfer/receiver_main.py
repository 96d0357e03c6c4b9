"""Child process: a KVReceiver that prints {"event": "ready", "endpoint": ...} and serves until
stdin closes or it is killed. argv[1] is a JSON spec: config overrides and fingerprint fields."""

from __future__ import annotations

import json
import sys

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.receiver import KVReceiver


def main() -> int:
    spec = json.loads(sys.argv[1])
    receiver = KVReceiver(
        LMCacheDisaggConfig(**spec["config"]), LayoutFingerprint(**spec["fingerprint"])
    )
    receiver.start()
    try:
        print(
            json.dumps(
                {"event": "ready", "endpoint": receiver.endpoint, "channel": receiver.channel_kind}
            ),
            flush=True,
        )
        for line in sys.stdin:
            if line.strip() == "occupancy":
                print(json.dumps({"event": "occupancy", "pages": receiver.occupancy()}), flush=True)
        return 0
    finally:
        receiver.shutdown()


if __name__ == "__main__":
    sys.exit(main())
