"""Which block configuration each fused-attention kernel may run with on a GPU.

A config is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. The lists below are the configs that Triton's
own compiler builds for the target **without register spills and within its shared memory** (checked on a
CPU, no GPU needed, by ``python -m headscore.kernels.resources``, which CI runs and which writes
``docs/kernel-resources.md``), per kernel, target class, head width (``BLOCK_D``, the head dim rounded up to
a power of two) and element size. The forward, dK/dV and dQ kernels are autotuned over their list; the
backward's preprocessing step, which is not, takes the first entry.

Targets: ``sm80`` (A100: 163 KiB of shared memory per block) and ``sm90`` (H100/H200: 227 KiB). Another
GPU takes the list of the nearest class below it (sm_86/sm_89, with 99 KiB, take sm80's; where one of
those configs needs more shared memory than the GPU has, Triton's autotuner skips it, and every sm80 list
holds a config that fits 99 KiB; the preprocessing step's single sm80 config always does). GPUs older than
sm_80 (a T4, sm_75: 64 KiB) are not served: ``dispatch.kernel_available`` leaves them the model's own attention.
"""

from __future__ import annotations

Config = tuple[int, int, int, int]

KERNELS = ("fwd", "pre", "dkdv", "dq")
TARGETS = {"sm80": (8, 0), "sm90": (9, 0)}
SHARED_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024}
"""Shared memory per block (bytes) that a kernel may use on each target class."""

# (kernel, target, BLOCK_D, element size) -> configs, the likely fastest first: from the candidates of
# headscore.kernels.resources (--explore), the first three (one for "pre") that compiled clean for both dtypes
# of that size and every checked call shape, plus, on sm80, one that fits 99 KiB of shared memory where the
# first three do not. The check (docs/kernel-resources.md) vouches for every entry.
_TABLE: dict[tuple[str, str, int, int], list[Config]] = {
    # fwd
    ("fwd", "sm80", 16, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 4)],
    ("fwd", "sm80", 32, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", "sm80", 64, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", "sm80", 128, 2): [(128, 64, 8, 3), (64, 64, 4, 4), (64, 64, 4, 3)],
    ("fwd", "sm80", 256, 2): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    ("fwd", "sm80", 16, 4): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", "sm80", 32, 4): [(64, 32, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2)],
    ("fwd", "sm80", 64, 4): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
    ("fwd", "sm80", 128, 4): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 1)],
    ("fwd", "sm80", 256, 4): [(32, 16, 8, 1), (16, 32, 8, 1), (32, 16, 4, 1)],
    ("fwd", "sm90", 16, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", "sm90", 32, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", "sm90", 64, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", "sm90", 128, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", "sm90", 256, 2): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 4)],
    ("fwd", "sm90", 16, 4): [(128, 64, 8, 3), (64, 64, 4, 4), (64, 64, 4, 3)],
    ("fwd", "sm90", 32, 4): [(64, 32, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2)],
    ("fwd", "sm90", 64, 4): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
    ("fwd", "sm90", 128, 4): [(32, 16, 8, 1), (16, 32, 8, 1), (16, 16, 8, 1)],
    ("fwd", "sm90", 256, 4): [(32, 16, 8, 1), (16, 32, 8, 1), (16, 16, 8, 1)],
    # pre
    ("pre", "sm80", 16, 2): [(64, 32, 4, 2)],
    ("pre", "sm80", 32, 2): [(64, 64, 4, 2)],
    ("pre", "sm80", 64, 2): [(64, 64, 8, 2)],
    ("pre", "sm80", 128, 2): [(64, 64, 8, 2)],
    ("pre", "sm80", 256, 2): [(64, 32, 8, 2)],
    ("pre", "sm80", 16, 4): [(64, 64, 4, 2)],
    ("pre", "sm80", 32, 4): [(64, 32, 4, 2)],
    ("pre", "sm80", 64, 4): [(64, 32, 8, 2)],
    ("pre", "sm80", 128, 4): [(32, 32, 4, 2)],
    ("pre", "sm80", 256, 4): [(32, 16, 8, 1)],
    ("pre", "sm90", 16, 2): [(64, 64, 4, 2)],
    ("pre", "sm90", 32, 2): [(64, 64, 4, 2)],
    ("pre", "sm90", 64, 2): [(64, 64, 8, 2)],
    ("pre", "sm90", 128, 2): [(64, 64, 8, 2)],
    ("pre", "sm90", 256, 2): [(32, 32, 4, 2)],
    ("pre", "sm90", 16, 4): [(64, 64, 4, 2)],
    ("pre", "sm90", 32, 4): [(64, 32, 4, 2)],
    ("pre", "sm90", 64, 4): [(64, 32, 8, 2)],
    ("pre", "sm90", 128, 4): [(64, 32, 8, 2)],
    ("pre", "sm90", 256, 4): [(32, 16, 8, 1)],
    # dkdv
    ("dkdv", "sm80", 16, 2): [(64, 128, 8, 3), (32, 64, 4, 4), (32, 64, 4, 2)],
    ("dkdv", "sm80", 32, 2): [(64, 128, 8, 3), (32, 64, 4, 4), (32, 64, 4, 2)],
    ("dkdv", "sm80", 64, 2): [(32, 64, 4, 4), (32, 32, 8, 2), (32, 32, 4, 2)],
    ("dkdv", "sm80", 128, 2): [(32, 64, 8, 3), (32, 64, 8, 2), (32, 32, 8, 2)],
    ("dkdv", "sm80", 256, 2): [(32, 32, 8, 2), (16, 16, 4, 1)],
    ("dkdv", "sm80", 16, 4): [(32, 64, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ("dkdv", "sm80", 32, 4): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ("dkdv", "sm80", 64, 4): [(32, 64, 8, 3), (32, 32, 8, 2)],
    ("dkdv", "sm80", 128, 4): [(32, 16, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1)],
    ("dkdv", "sm80", 256, 4): [(32, 16, 8, 1), (16, 32, 8, 1), (16, 16, 8, 1)],
    ("dkdv", "sm90", 16, 2): [(64, 128, 8, 3), (32, 64, 4, 4), (32, 64, 4, 2)],
    ("dkdv", "sm90", 32, 2): [(64, 128, 8, 3), (32, 64, 4, 4), (32, 64, 4, 2)],
    ("dkdv", "sm90", 64, 2): [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3)],
    ("dkdv", "sm90", 128, 2): [(32, 64, 8, 3), (32, 64, 8, 2), (32, 32, 8, 2)],
    ("dkdv", "sm90", 256, 2): [(32, 32, 8, 2), (16, 16, 4, 1)],
    ("dkdv", "sm90", 16, 4): [(64, 128, 8, 3), (32, 64, 4, 4), (32, 64, 4, 2)],
    ("dkdv", "sm90", 32, 4): [(32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ("dkdv", "sm90", 64, 4): [(32, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 1)],
    ("dkdv", "sm90", 128, 4): [(32, 32, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1)],
    ("dkdv", "sm90", 256, 4): [(32, 16, 8, 1), (16, 16, 8, 1)],
    # dq
    ("dq", "sm80", 16, 2): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", "sm80", 32, 2): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", "sm80", 64, 2): [(128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 4)],
    ("dq", "sm80", 128, 2): [(64, 64, 8, 2), (64, 64, 4, 3), (64, 32, 8, 2)],
    ("dq", "sm80", 256, 2): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    ("dq", "sm80", 16, 4): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", "sm80", 32, 4): [(32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)],
    ("dq", "sm80", 64, 4): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
    ("dq", "sm80", 128, 4): [(32, 32, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1)],
    ("dq", "sm80", 256, 4): [(32, 32, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1)],
    ("dq", "sm90", 16, 2): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", "sm90", 32, 2): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", "sm90", 64, 2): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2)],
    ("dq", "sm90", 128, 2): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2)],
    ("dq", "sm90", 256, 2): [(128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 4)],
    ("dq", "sm90", 16, 4): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", "sm90", 32, 4): [(64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
    ("dq", "sm90", 64, 4): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
    ("dq", "sm90", 128, 4): [(32, 32, 4, 2), (32, 32, 8, 1), (32, 16, 8, 1)],
    ("dq", "sm90", 256, 4): [(32, 16, 8, 1), (16, 32, 8, 1), (16, 16, 8, 1)],
}


def target_of(capability: tuple[int, int]) -> str:
    """The target class whose lists a GPU of this compute capability uses."""
    return "sm90" if capability >= (9, 0) else "sm80"


def kept(kernel: str, block_d: int, element_size: int, capability: tuple[int, int]) -> list[Config]:
    """The configs ``kernel`` may run with for this head width, element size and compute capability."""
    key = (kernel, target_of(capability), block_d, element_size)
    if key not in _TABLE:
        raise ValueError(f"no checked {kernel} config for BLOCK_D={block_d}, {element_size}-byte elements on "
                         f"{key[1]}")
    return list(_TABLE[key])


def all_configs(kernel: str) -> list[Config]:
    """Every config ``kernel`` may use anywhere (the autotuner's candidates before pruning), in table order."""
    seen: dict[Config, None] = {}
    for (name, *_), table in _TABLE.items():
        if name == kernel:
            seen.update(dict.fromkeys(table))
    return list(seen)
