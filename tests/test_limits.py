"""Resource bounds (``isc.limits``): the refusal states the bound and the CPU count it comes from, and a
value at the bound is accepted. The CLI cases (train/extract --workers 99999, --input-size 99999999,
evaluate --bootstrap 100000000) are rows of ``tests/test_bad_params.py``."""

from __future__ import annotations

import os

import pytest

from isc.errors import ConfigError
from isc.limits import (
    MAX_BOOTSTRAP,
    MAX_INPUT_SIZE,
    MAX_MEMORY_BANK_BYTES,
    MAX_SEED,
    MIN_INPUT_SIZE,
    WORKERS_PER_CPU,
    check_bootstrap,
    check_input_size,
    check_memory_size,
    check_seed,
    check_workers,
    usable_cpus,
)


def test_workers_bound_is_a_multiple_of_the_cpus_this_process_may_use():
    cpus = len(os.sched_getaffinity(0))
    assert usable_cpus() == cpus
    top = max(16, WORKERS_PER_CPU * cpus)
    assert check_workers(top) == top
    with pytest.raises(ConfigError):
        check_workers(top + 1)
    with pytest.raises(ConfigError) as info:
        check_workers(99999)
    msg = str(info.value)
    assert msg.startswith("workers: 99999 is outside") and f"the {cpus} usable CPUs" in msg, msg


def test_input_size_and_bootstrap_bounds():
    assert check_input_size(MAX_INPUT_SIZE) == MAX_INPUT_SIZE
    assert check_input_size(MIN_INPUT_SIZE) == MIN_INPUT_SIZE == 32  # the smoke config's size
    with pytest.raises(ConfigError, match=r"input_size: 1 px < 32 px"):
        check_input_size(1)
    with pytest.raises(ConfigError, match=r"input_size: 99999999 px > 2048 px"):
        check_input_size(99_999_999)
    assert check_bootstrap(MAX_BOOTSTRAP) == MAX_BOOTSTRAP
    with pytest.raises(ConfigError, match=r"bootstrap: 100000000 replicates is outside \[0, 100,000\]"):
        check_bootstrap(100_000_000)


def test_seed_bound_keeps_the_sampler_seed_inside_int64():
    """The sampler seeds an epoch with seed * 1_000_003 + epoch: at MAX_SEED that still fits torch's int64
    generator (2**62 overflowed mid-epoch in the hostile round)."""
    import torch

    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED
    torch.Generator().manual_seed(MAX_SEED * 1_000_003 + 10_000)
    for bad in (-1, MAX_SEED + 1, 2**62, 2**64):
        with pytest.raises(ConfigError, match=rf"seed: {bad} is outside \[0, 2\*\*31 - 1"):
            check_seed(bad)


def test_memory_bank_bound_states_the_largest_size_at_the_dimension():
    top = MAX_MEMORY_BANK_BYTES // (4 * 256 + 8)
    assert check_memory_size(20_000, 256) == 20_000 and check_memory_size(top, 256) == top
    with pytest.raises(ConfigError, match=rf"memory_size: {top + 1} embeddings of dimension 256 .* {top:,} at"):
        check_memory_size(top + 1, 256)
    with pytest.raises(ConfigError, match=r"memory_size: 10000000000000 embeddings"):
        check_memory_size(10**13, 256)
