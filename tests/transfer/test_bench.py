"""Smoke test of ``lmcache-disagg bench transfer`` (tiny sizes; no performance assertions)."""

from __future__ import annotations

import json
import os

import pytest

from lmcache_disagg.bench.transfer import main
from lmcache_disagg.config import parse_size


@pytest.mark.parametrize(
    ("channel", "chunk"),
    # 5 MiB chunks go out in 2 MiB slices over TCP, the last one partial; the receiver checks
    # every chunk's checksum, and a failed one fails the bench.
    [("tcp", "1MiB"), ("tcp", "5MiB"), ("nixl", "1MiB")],
)
def test_bench_prints_one_json_object_last(
    channel: str, chunk: str, capsys: pytest.CaptureFixture[str]
) -> None:
    total = parse_size(chunk) * 8
    argv = ["--channel", channel, "--chunk-bytes", chunk, "--total", str(total), "--rounds", "1"]
    assert main([*argv, "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["channel_used"] == channel and result["chunks"] == 8
    assert result["channel_gbps"] > 0 and result["raw_gbps"] > 0
    assert result["checksum_failures"] == 0
    assert result["rounds"] == 1 and len(result["per_round"]) == 1


def test_each_end_runs_on_its_own_cpus_unless_told_not_to(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--channel", "tcp", "--chunk-bytes", "64KiB", "--total", "1MiB", "--rounds", "2"]
    assert main([*argv, "--json"]) == 0
    pinned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cpus"]
    allowed = os.sched_getaffinity(0)
    if len(allowed) >= 2:
        assert pinned["sender"] and pinned["receiver"]
        assert not set(pinned["sender"]) & set(pinned["receiver"])
        assert set(pinned["sender"]) | set(pinned["receiver"]) == allowed
    else:
        assert pinned == {"sender": "any", "receiver": "any"}
    # the bench hands the CPUs back: this process may use all of them again
    assert os.sched_getaffinity(0) == allowed
    assert main([*argv, "--no-pin", "--json"]) == 0
    unpinned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cpus"]
    assert unpinned == {"sender": "any", "receiver": "any"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chunk-bytes", "0"], "even number of bytes"),
        (["--chunk-bytes", "3"], "even number of bytes"),
        (["--chunk-bytes", "lots"], "expected a size"),
        (["--total", "xyz"], "expected a size"),
        (["--chunks-per-transfer", "0"], "--chunks-per-transfer must be >= 1"),
        (["--rounds", "0"], "--rounds must be >= 1"),
    ],
)
def test_bad_arguments_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_nixl_progress_thread_can_be_turned_on_for_both_sides(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--channel", "nixl", "--chunk-bytes", "1MiB", "--total", "4MiB", "--rounds", "1"]
    assert main([*argv, "--nixl-progress-thread", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["nixl_progress_thread"] is True and result["channel_used"] == "nixl"
    assert result["checksum_failures"] == 0
