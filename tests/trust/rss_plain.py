"""Reference for the soak's RSS figures: a plain vLLM (no connector) under the same prompts.

Sends ``--requests`` short completions (max_tokens 1, 4 clients) straight to one plain vLLM server
and prints its RSS (server + engine core) every 200 requests::

    .venv/bin/python -m tests.trust.rss_plain --requests 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import httpx

from lmcache_disagg.tiny_model import TinyModelSpec, build_tiny_model
from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec
from tests.trust.soak import SOAK_LENGTHS
from tests.trust.utils import complete, prompts, rss_mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[2]
    model = build_tiny_model(repo / ".models" / "tiny-f32", TinyModelSpec(dtype="float32"))
    spec = VLLMServerSpec(
        model_dir=str(model), cpu_core=0, extra_args=("--no-enable-prefix-caching",)
    )
    server = VLLMServer(spec, Path(tempfile.mkdtemp(prefix="lmcd-rss-")) / "plain.log")
    server.start()
    samples: dict[int, float] = {}
    lock = threading.Lock()
    items = prompts(SOAK_LENGTHS, seed=31)

    def run(first: int) -> None:
        with httpx.Client(timeout=60) as client:
            for n in range(first, args.requests, args.clients):
                complete(client, server.url, str(model), items[n % len(items)], max_tokens=1)
                if n % 200 == 0:
                    assert server.pid is not None
                    with lock:
                        samples[n] = round(rss_mib(server.pid), 1)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.pid is not None
        samples[args.requests] = round(rss_mib(server.pid), 1)
    finally:
        server.stop()
    print("plain vLLM RSS MiB by request:", dict(sorted(samples.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
