"""What a worker tells the outside about itself: the connector's role and KV layout (torch-free).

The API server process builds :func:`layout_labels` from vLLM's config and exports them as the
``lmcache_disagg_layout_info`` gauge (value 1) on the worker's ``/metrics``, from start-up on,
before any request. ``lmcache-disagg check`` reads it to see that our connector is loaded, in
which role, and whether P's layout matches D's handshake fingerprint field by field.

The worker computes its real fingerprint from its KV cache tensors (``connector/kvcache.py``);
these labels are derived from the same config the engine used, so for a supported layout they agree.
"""

from __future__ import annotations

from typing import Any

from lmcache_disagg.config import LMCacheDisaggConfig, load_config

__all__ = ["LAYOUT_INFO_LABELS", "layout_labels", "model_id", "register_layout_info"]

LAYOUT_INFO_LABELS = (
    "role",
    "model",
    "dtype",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "chunk_size",
    "tp_size",
    "channel",
)


def model_id(vllm_config: Any) -> str:
    """The model part of the fingerprint: the served name, else the model path's last part.

    The worker's fingerprint uses it too, so P's labels compare with D's
    handshake fingerprint field by field.

    P and D may mount the same weights at different paths; everything that shapes the KV bytes
    (dtype, layers, heads, head dim) is in the fingerprint separately.
    """
    model_config = vllm_config.model_config
    names = getattr(model_config, "served_model_name", None)
    if isinstance(names, list | tuple) and names:
        names = names[0]
    if isinstance(names, str) and names and names != model_config.model:
        return names
    return str(model_config.model).rstrip("/").rsplit("/", 1)[-1]


def layout_labels(vllm_config: Any, config: LMCacheDisaggConfig) -> dict[str, str]:
    """The ``lmcache_disagg_layout_info`` label values of this worker (all strings)."""
    model_config = vllm_config.model_config
    parallel_config = vllm_config.parallel_config
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    dtype = str(model_config.dtype).removeprefix("torch.") if cache_dtype == "auto" else cache_dtype
    transfer_config = vllm_config.kv_transfer_config
    labels = {
        "role": str(getattr(transfer_config, "kv_role", "") or ""),
        "model": model_id(vllm_config),
        "dtype": dtype,
        "num_layers": str(model_config.get_num_layers(parallel_config)),
        "num_kv_heads": str(model_config.get_num_kv_heads(parallel_config)),
        "head_dim": str(model_config.get_head_size()),
        "chunk_size": str(config.chunk_size),
        "tp_size": str(parallel_config.tensor_parallel_size),
        "channel": config.channel,
    }
    return {name: labels[name] for name in LAYOUT_INFO_LABELS}


def register_layout_info(
    gauge_cls: Any,
    vllm_config: Any,
    labelnames: list[str],
    per_engine_labelvalues: dict[int, list[object]],
) -> Any:
    """Create ``lmcache_disagg_layout_info`` with vLLM's gauge class and set it to 1 per engine.

    None (nothing registered) for a config without a model, as unit tests build it.
    """
    if getattr(vllm_config, "model_config", None) is None:
        return None
    transfer_config = vllm_config.kv_transfer_config
    extra = dict(getattr(transfer_config, "kv_connector_extra_config", None) or {})
    info = layout_labels(vllm_config, load_config(overrides=extra))
    gauge = gauge_cls(
        name="lmcache_disagg_layout_info",
        documentation="lmcache-disagg connector: 1, labelled with the role and KV layout",
        labelnames=[*labelnames, *LAYOUT_INFO_LABELS],
        multiprocess_mode="mostrecent",
    )
    for labels in per_engine_labelvalues.values():
        gauge.labels(*labels, *info.values()).set(1)
    return gauge
