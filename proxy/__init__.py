"""lmcache_disagg.proxy: the OpenAI-compatible disaggregated prefill/decode proxy.

Run it with ``lmcache-disagg-proxy --prefill HOST:PORT --decode HOST:PORT[,kv=HOST:PORT]``
(see :mod:`lmcache_disagg.proxy.cli`). This package never imports torch, vLLM or NIXL.
"""
