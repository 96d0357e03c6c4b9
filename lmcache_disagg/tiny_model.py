"""Build a deterministic random-weight Llama and a byte-level BPE tokenizer, fully offline.

Used by the tests, the demo and the benchmarks: nothing is ever downloaded from a model hub.

* The weights come from a seeded generator, so the same arguments give the same model on every
  machine.
* The tokenizer is byte-level BPE (every string tokenizes) trained on a small built-in corpus and
  ships a chat template, so ``/v1/chat/completions`` works.
* Greedy decoding must not sit on near-ties, or token-identity tests would flake on rounding.
  The output layer is therefore scaled up (``lm_head_scale``): the logits spread over tens of
  units, so the top-1/top-2 gap is many orders of magnitude above float32 rounding noise.
  Hidden layers use a larger init range than the HF default so attention is far from uniform and
  the next token really depends on the cached KV (wrong KV changes the output).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["TinyModelSpec", "build_tiny_model", "main"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A few KB of varied English text; BPE merges learnt from it make realistic token lengths.
_CORPUS = (
    """
The prefill worker computes the key and value cache for every token of the prompt, and the decode
worker generates the answer one token at a time. Splitting the two lets each run at its best batch
size. A chunk is the cache of two hundred and fifty six tokens for every layer of the model.
In the beginning the river ran quietly through the valley, past farms, mills and small towns.
Children played by the water while their parents worked the fields under a wide and open sky.
Numbers such as 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1000 4096 appear in logs, tables and reports.
Question: what is the capital of France? Answer: Paris is the capital and largest city of France.
def add(a, b):\n    return a + b\n\nclass Cache:\n    def get(self, key):\n        return self.store[key]
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Networks move bytes between machines; memory holds them close to the processor that needs them.
A careful engineer measures before tuning, writes tests that fail for the right reason, and
documents the contract of every function so that the next reader understands why it exists.
Weather report: cloudy in the morning, sunny in the afternoon, light rain expected at night.
She opened the letter, read it twice, and smiled: the long journey had finally come to an end.
"""
    * 3
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the generated model. The defaults are the tiny test model."""

    layers: int = 2
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    max_positions: int = 8192
    dtype: str = "float32"
    seed: int = 1234
    init_range: float = 0.15
    lm_head_scale: float = 8.0

    def validate(self) -> None:
        for flag, value in (
            ("--layers", self.layers), ("--hidden", self.hidden),
            ("--intermediate", self.intermediate), ("--heads", self.heads),
            ("--kv-heads", self.kv_heads), ("--max-positions", self.max_positions),
        ):  # fmt: skip
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.hidden % self.heads:
            raise ValueError(
                f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads})"
            )
        if self.heads % self.kv_heads:
            raise ValueError(
                f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.vocab < 300:
            raise ValueError("--vocab must be at least 300 (256 bytes plus specials and merges)")


def _train_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tokenizer


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a HF-format Llama (config, safetensors, tokenizer) to ``out_dir`` and return it.

    Idempotent: if ``out_dir`` already holds a model built from the same spec, nothing is redone.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec.validate()
    out = Path(out_dir)
    stamp = out / "lmcache_disagg_spec.json"
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(spec):
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    raw = _train_tokenizer(spec.vocab)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = spec.max_positions
    tokenizer.save_pretrained(tmp)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config)
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * spec.init_range)
        model.lm_head.weight.mul_(spec.lm_head_scale)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(tmp, safe_serialization=True)
    stamp_tmp = tmp / stamp.name
    stamp_tmp.write_text(json.dumps(asdict(spec), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TinyModelSpec()
    parser.add_argument("out_dir", help="directory to write the model into")
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2 x hidden")
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads)
    parser.add_argument("--vocab", type=int, default=defaults.vocab)
    parser.add_argument("--max-positions", type=int, default=defaults.max_positions)
    parser.add_argument(
        "--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)


def spec_from_args(args: argparse.Namespace) -> TinyModelSpec:
    return TinyModelSpec(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate or 2 * args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        max_positions=args.max_positions,
        dtype=args.dtype,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-disagg make-tiny-model", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args)
        path = build_tiny_model(args.out_dir, spec)
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0
