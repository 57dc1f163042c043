"""The soak test (vllama/testing/soak.py) in CI: 2 000 requests at concurrency 64 over four fake-engine models
that do not all fit, mixed streaming; nothing lost, nothing left in flight, memory and descriptors flat.
`VLLAMA_SOAK_FULL=1` also runs the full 10 000 requests of `bench/soak.py`."""

from __future__ import annotations

import os

import pytest

from vllama.testing.soak import SoakConfig, SoakResult, run_soak

MIB = 1024 * 1024


def check(result: SoakResult) -> None:
    s = result.summary()
    print(f"soak: {s}")
    assert result.sent == result.config.requests, s
    assert result.lost == 0, (s["failures"], result.failure_examples)
    assert result.evictions >= 10, "no real eviction pressure"
    assert len(result.by_model) == result.config.models
    assert not any(result.in_flight_after.values()) and not any(result.engine_in_flight_after.values()), s
    assert result.daemon_exit == 0 and not result.leftover_processes, s
    assert not result.daemon_errors, result.daemon_errors[:3]
    assert result.rss_end - result.rss_start < 40 * MIB, s  # flat (a leak per request would show at once)
    # descriptors: what is open at the end beyond the idle pool of connections to the engines was open at start
    assert result.fds_end - result.upstream_pool <= result.fds_start + 5, s
    assert result.passed(), s


def test_soak_short() -> None:
    check(run_soak(SoakConfig(requests=2000, concurrency=64, models=4)))


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("VLLAMA_SOAK_FULL"), reason="the full soak runs with VLLAMA_SOAK_FULL=1")
def test_soak_full() -> None:
    check(run_soak(SoakConfig(requests=10_000, concurrency=64, models=4)))
