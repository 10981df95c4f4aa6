"""Resource bounds checked before any run opens (the hostile round: ``--workers 99999`` started DataLoader
workers until the OOM killer ended the main process, ~200 of them survived holding ~12 GB and the run
stayed RUNNING; ``--input-size 99999999`` ended in a MemoryError traceback; ``--bootstrap 100000000``
ran for ever). Each bound is far above what the recipe uses and gives a one-line ``ConfigError``.
"""

from __future__ import annotations

import os

from isc.errors import ConfigError

WORKERS_PER_CPU = 4  # DataLoader decoding processes per usable CPU: beyond it they only contend for cores
MIN_MAX_WORKERS = 16  # a floor, so the stage configs' workers: 8 still run on a 1-CPU machine
# px; below the backbones' stride of 32 the last feature map is one padded pixel, and train's perspective
# augmentation has no solution at a few px (--input-size 1 was a torch LinAlgError traceback). The smoke
# config trains at 32; `isc settings --sizes` already takes 32-2048.
MIN_INPUT_SIZE = 32
MAX_INPUT_SIZE = 2048  # px; the recipe trains at 256-512 and extracts at 512 (a 2048^2 batch of 64 is ~3 GB)
MAX_BOOTSTRAP = 100_000  # query-bootstrap replicates; the default 1,000 already gives a stable 95 % interval
# Cross-batch memory: the bank holds memory_size embeddings of dim float32 (+ an int64 label each), allocated
# whole when the loss is built (--memory-size 1e13 was an allocator traceback asking for 10 PB). The seed's
# 20,000 x 256 is 20 MB; 4 GiB is ~4M slots at 256-d, and every step also scores the batch against it.
MAX_MEMORY_BANK_BYTES = 4 * 2**30
# Training seeds: torch.manual_seed takes a signed 64-bit value, and the sampler seeds each epoch with
# seed * 1_000_003 + epoch (2**62 overflowed mid-epoch, 2**64 failed at start, both as tracebacks);
# below 2**31 that product stays far inside int64. The recipe's seeds are 0-90.
MAX_SEED = 2**31 - 1


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and Slurm restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_workers() -> int:
    return max(MIN_MAX_WORKERS, WORKERS_PER_CPU * usable_cpus())


def check_workers(workers: int, param: str = "workers") -> int:
    """``workers`` when 0 <= workers <= ``max_workers()``; a ConfigError naming the CPU count otherwise."""
    limit = max_workers()
    if workers < 0 or workers > limit:
        raise ConfigError(param, f"{workers} is outside [0, {limit}] ({WORKERS_PER_CPU} x the {usable_cpus()} "
                                 f"usable CPUs, at least {MIN_MAX_WORKERS}): more DataLoader processes only "
                                 "exhaust memory")
    return workers


def check_input_size(size: int, param: str = "input_size") -> int:
    if size < MIN_INPUT_SIZE:
        raise ConfigError(param, f"{size} px < {MIN_INPUT_SIZE} px: the backbones downsample by 32, and the "
                                 "augmentations need a few pixels to transform")
    if size > MAX_INPUT_SIZE:
        raise ConfigError(param, f"{size} px > {MAX_INPUT_SIZE} px: one image alone would need "
                                 f"{3 * 4 * size * size / 2**30:.3g} GiB as a float tensor")
    return size


def check_seed(seed: int, param: str = "seed") -> int:
    if seed < 0 or seed > MAX_SEED:
        raise ConfigError(param, f"{seed} is outside [0, 2**31 - 1 = {MAX_SEED}]: the per-epoch sampler seed "
                                 "(seed x 1,000,003 + epoch) must fit torch's 64-bit generator")
    return seed


def check_memory_size(memory_size: int, dim: int, param: str = "memory_size") -> int:
    """``memory_size`` whose bank (memory_size x (dim float32 + int64 label)) fits MAX_MEMORY_BANK_BYTES."""
    per_slot = 4 * dim + 8
    if memory_size * per_slot > MAX_MEMORY_BANK_BYTES:
        top = MAX_MEMORY_BANK_BYTES // per_slot
        raise ConfigError(param, f"{memory_size} embeddings of dimension {dim} need "
                                 f"{memory_size * per_slot / 2**30:.3g} GiB > the {MAX_MEMORY_BANK_BYTES // 2**30} GiB "
                                 f"bound on the memory bank (at most {top:,} at this dimension; the seed uses 20,000)")
    return memory_size


def check_bootstrap(n: int, param: str = "bootstrap") -> int:
    if n < 0 or n > MAX_BOOTSTRAP:
        raise ConfigError(param, f"{n} replicates is outside [0, {MAX_BOOTSTRAP:,}] (1,000 gives a stable 95 % "
                                 "interval)")
    return n
