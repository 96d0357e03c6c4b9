"""docs/configuration.md is generated from the config schema and must not go stale."""

from __future__ import annotations

import re
from pathlib import Path

from lmcache_disagg.config import ENV_PREFIX, InstanceConfig, LMCacheDisaggConfig
from lmcache_disagg.configref import LMCACHE_EQUIVALENTS, main, render

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = REPO_ROOT / "docs" / "configuration.md"


def test_reference_is_up_to_date() -> None:
    assert REFERENCE.read_text() == render(), (
        "docs/configuration.md is stale: run `make docs` (lmcache-disagg config-reference)"
    )


def test_every_key_has_a_row_with_type_default_and_env() -> None:
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in REFERENCE.read_text().splitlines()
        if line.startswith("| `")
    }
    for name in LMCacheDisaggConfig.model_fields:
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", rows[name])[1:-1]]
        assert len(cells) == 6, rows[name]
        key_cell, type_text, default, env, lmcache, _ = cells
        assert key_cell == f"`{name}`" and type_text and default, name
        assert env == f"`{ENV_PREFIX}{name.upper()}`"
        assert lmcache == (f"`{LMCACHE_EQUIVALENTS[name]}`" if name in LMCACHE_EQUIVALENTS else "-")
    for name in InstanceConfig.model_fields:
        assert name in rows


def test_check_flag_reports_a_stale_file(tmp_path: Path) -> None:
    copy = tmp_path / "configuration.md"
    copy.write_text(render())
    assert main(["--output", str(copy), "--check"]) == 0
    copy.write_text(render().replace("| `chunk_size` |", "| `chunk_sizes` |"))
    assert main(["--output", str(copy), "--check"]) == 1
    assert main(["--output", str(copy)]) == 0
    assert copy.read_text() == render()
