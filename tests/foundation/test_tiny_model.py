"""The offline tiny model: deterministic, chat-capable, and with wide greedy margins."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmcache_disagg.tiny_model import TinyModelSpec, build_tiny_model

FLOAT32_NOISE = 1e-3  # orders of magnitude above float32 rounding of a 2-layer, 128-wide model


def _digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def test_same_spec_gives_identical_weights_and_tokenizer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    rebuilt = build_tiny_model(tmp_path / "again", TinyModelSpec(dtype="float32"))
    assert _digest(rebuilt) == _digest(tiny_model_dir)
    assert (rebuilt / "tokenizer.json").read_text() == (
        tiny_model_dir / "tokenizer.json"
    ).read_text()


def test_greedy_margin_is_wide_and_output_depends_on_context(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    text = "The prefill worker computes the key and value cache for every token of the prompt " * 4
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
        altered = ids.clone()
        altered[0, 1] = (altered[0, 1] + 7) % tokenizer.vocab_size
        altered_logits = model(altered).logits[0]
    top2 = logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    assert margins.min().item() > FLOAT32_NOISE
    # Changing one early token changes later greedy choices: the KV cache really matters.
    changed = (logits.argmax(-1)[2:] != altered_logits.argmax(-1)[2:]).sum().item()
    assert changed > ids.shape[1] // 4


def test_chat_template_renders_roles(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<s><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_cli_builds_a_custom_shape(tmp_path: Path) -> None:
    out = tmp_path / "m"
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "make-tiny-model", str(out),
         "--layers", "3", "--hidden", "64", "--heads", "4", "--kv-heads", "1", "--dtype", "bfloat16"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = (out / "config.json").read_text()
    assert '"num_hidden_layers": 3' in config and '"num_key_value_heads": 1' in config
    assert '"bfloat16"' in config


def test_cli_rejects_bad_shape_with_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "make-tiny-model", str(tmp_path / "m"),
         "--hidden", "100", "--heads", "3"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--hidden (100) must be a multiple of --heads (3)" in result.stderr


@pytest.mark.parametrize(
    ("field", "flag"),
    [("layers", "--layers"), ("kv_heads", "--kv-heads"), ("heads", "--heads"),
     ("hidden", "--hidden"), ("intermediate", "--intermediate")],
)  # fmt: skip
def test_zero_sizes_are_refused_by_name(field: str, flag: str) -> None:
    with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
        dataclasses.replace(TinyModelSpec(), **{field: 0}).validate()
