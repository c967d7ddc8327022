"""Kernel tests: run Triton through its CPU interpreter when there is no CUDA GPU.

TRITON_INTERPRET must be in the environment before the kernel modules are imported (the @triton.jit
decorator picks the interpreter at definition time), so it is set here, at conftest import, before any
test module imports triton or headscore.kernels.
"""

import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (through the interpreter on a CPU)")


def fresh_seed() -> int:
    """A new seed every run (HEADSCORE_TEST_SEED=<n> replays one); tests put it in assertion messages."""
    env = os.environ.get("HEADSCORE_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def seed(request) -> int:
    s = fresh_seed()
    print(f"[{request.node.name}] seed={s}  (replay with HEADSCORE_TEST_SEED={s})")
    return s


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Kernel output/grad buffers start as NaN, so any element a kernel forgets to write fails the test."""
    monkeypatch.setenv("HEADSCORE_KERNEL_DEBUG", "1")
