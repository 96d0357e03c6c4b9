"""Chunk keys: a deterministic, seedless hash chain that carries the layout fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmcache_disagg.connector.keys import KEY_BYTES, chain_root, chunk_keys, chunk_spans
from lmcache_disagg.transfer.protocol import LayoutFingerprint


def fingerprint(**changes: object) -> LayoutFingerprint:
    fields: dict[str, object] = dict(
        model="tiny", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=32,
        chunk_size=4, tp_rank=0, tp_size=1,
    )  # fmt: skip
    fields.update(changes)
    return LayoutFingerprint(**fields)  # type: ignore[arg-type]


TOKENS = list(range(100, 111))  # 11 tokens: chunks of 4, 4, 3


def test_spans_cover_tokens_with_a_partial_last_chunk() -> None:
    assert chunk_spans(11, 4) == [(0, 4), (4, 8), (8, 11)]
    assert chunk_spans(8, 4) == [(0, 4), (4, 8)]
    assert chunk_spans(0, 4) == []
    with pytest.raises(ValueError):
        chunk_spans(3, 0)


def test_keys_are_a_chain() -> None:
    root = chain_root(fingerprint())
    keys = chunk_keys(root, TOKENS, 4)
    assert len(keys) == 3 and all(len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == 3
    # A prefix gives the same leading keys; a change in chunk 0 changes every later key.
    assert chunk_keys(root, TOKENS[:8], 4) == keys[:2]
    changed = chunk_keys(root, [999, *TOKENS[1:]], 4)
    assert all(a != b for a, b in zip(changed, keys, strict=True))
    # A change in chunk 1 leaves chunk 0 alone.
    changed = chunk_keys(root, [*TOKENS[:5], 999, *TOKENS[6:]], 4)
    assert changed[0] == keys[0] and changed[1] != keys[1] and changed[2] != keys[2]


def test_partial_chunk_never_equals_a_full_one() -> None:
    root = chain_root(fingerprint())
    full = chunk_keys(root, [7, 7, 7, 7], 4)
    partial = chunk_keys(root, [7, 7, 7], 4)
    assert full[0] != partial[0]
    assert chunk_keys(root, TOKENS, 4, num_tokens=10)[2] != chunk_keys(root, TOKENS, 4)[2]


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"dtype": "bfloat16"},
        {"num_layers": 3},
        {"num_kv_heads": 4},
        {"head_dim": 64},
        {"chunk_size": 8},
        {"tp_rank": 1, "tp_size": 2},
        {"kv_layout": "canonical-mla-v1"},
    ],
)
def test_every_fingerprint_field_seeds_the_chain(change: dict[str, object]) -> None:
    base = chunk_keys(chain_root(fingerprint()), TOKENS, 4)
    other = chunk_keys(chain_root(fingerprint(**change)), TOKENS, 4)
    assert all(a != b for a, b in zip(base, other, strict=True))


def test_bad_inputs_are_refused() -> None:
    root = chain_root(fingerprint())
    with pytest.raises(ValueError):
        chunk_keys(root, TOKENS, 4, num_tokens=12)
    with pytest.raises(ValueError):
        chunk_keys(root, [1 << 64], 4)


_CHILD = """
import json, sys
from lmcache_disagg.connector.keys import chain_root, chunk_keys
from lmcache_disagg.transfer.protocol import LayoutFingerprint
fp = LayoutFingerprint(model="tiny", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=32,
                       chunk_size=4, tp_rank=1, tp_size=2)
print(json.dumps([k.hex() for k in chunk_keys(chain_root(fp), list(range(100, 111)), 4)]))
"""


def test_keys_do_not_depend_on_pythonhashseed_or_process() -> None:
    outputs = []
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1] == outputs[2]
    here = chunk_keys(chain_root(fingerprint(tp_rank=1, tp_size=2)), TOKENS, 4)
    assert outputs[0] == [k.hex() for k in here]
