"""``lmcache-disagg``: the demo, the benchmarks and the tiny-model builder.

Subcommands:

* ``demo``                       - a local CPU 1P1D cluster on the tiny model (see ``demo.py``).
* ``bench transfer|proxy|kernels|e2e|routing|cache [...]`` - benchmarks; ``--json`` prints one JSON object last.
* ``make-tiny-model DIR [...]``  - build the offline random-weight Llama used by tests and demo.
* ``check [--config FILE] [--prefill ...] [--decode ...]`` - probe a running cluster (``check.py``).
* ``config-reference [--output FILE]`` - write the config reference (``configref.py``).

Each subcommand's module is imported only when it runs, so ``--help`` is instant and the proxy-only
install never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from lmcache_disagg.bench import BENCH_MODULES

__all__ = ["main"]

# bench target -> module exposing ``main(argv: list[str]) -> int`` (see lmcache_disagg.bench)
BENCHES = BENCH_MODULES
COMMANDS = {
    "demo": "lmcache_disagg.demo",
    "make-tiny-model": "lmcache_disagg.tiny_model",
    "check": "lmcache_disagg.check",
    "config-reference": "lmcache_disagg.configref",
}

USAGE = """usage: lmcache-disagg <command> [args]

commands:
  demo                              run a local CPU 1P1D cluster on the tiny model
  bench {transfer,proxy,kernels,e2e,routing,cache} [--json] [...]
                                    benchmarks (each runs its baseline in the same run)
  make-tiny-model DIR [--layers N --hidden H --kv-heads K --dtype D ...]
                                    build the offline random-weight test model
  check [--config FILE] [--prefill HOST:PORT] [--decode HOST:PORT[,kv=HOST:PORT]]
                                    probe a running cluster; one line per problem, exit 1
  config-reference [--output FILE]  write docs/configuration.md from the config schema

run `lmcache-disagg <command> --help` for a command's options.
"""


def _entry(module_name: str) -> Callable[[list[str]], int]:
    module = importlib.import_module(module_name)
    entry: Callable[[list[str]], int] = module.main
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "bench":
        if not rest or rest[0] not in BENCHES:
            print(
                f"usage: lmcache-disagg bench {{{','.join(BENCHES)}}} [--json] [...]",
                file=sys.stderr,
            )
            return 2
        return _entry(BENCHES[rest[0]])(rest[1:])
    if command in COMMANDS:
        return _entry(COMMANDS[command])(rest)
    print(f"lmcache-disagg: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
