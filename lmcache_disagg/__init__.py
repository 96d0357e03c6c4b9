"""lmcache-disagg: disaggregated prefill/decode for vLLM.

Subpackages:

* ``lmcache_disagg.proxy``     - the OpenAI-compatible PD proxy (torch-free).
* ``lmcache_disagg.connector`` - the vLLM KV connector (the only place that imports vLLM).
* ``lmcache_disagg.transfer``  - NIXL and TCP channels into a reserved receive pool.
* ``lmcache_disagg.kernels``   - gather/scatter between vLLM paged KV and canonical chunks.

Importing any of them has no side effects (no threads, sockets or device initialisation).
"""

__version__ = "0.1.0"
