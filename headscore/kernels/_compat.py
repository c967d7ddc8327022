"""Optional-Triton plumbing shared by the kernel modules.

Importing ``headscore.kernels`` must work without Triton installed: the kernel modules
define their ``@triton.jit`` functions against a tiny stand-in when the import fails, and
every public entry point calls :func:`require_triton` first, which raises a clear error.
"""

import os

import torch

try:  # pragma: no cover - exercised by whichever environment runs the tests
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a broken install raising something else
    _TRITON_ERROR = exc

    class _TritonStandIn:
        """Just enough of ``triton`` / ``triton.language`` for the module bodies to be defined."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _TritonStandIn()  # type: ignore[assignment]
    tl = _TritonStandIn()  # type: ignore[assignment]


def triton_available() -> bool:
    """True when Triton imported successfully (the kernels can at least run in the interpreter)."""
    return _TRITON_ERROR is None


def require_triton() -> None:
    if _TRITON_ERROR is not None:
        raise RuntimeError(
            "headscore.kernels needs Triton (pip install 'headscore[triton]' or pip install triton); "
            f"importing it failed with: {_TRITON_ERROR!r}"
        )


def is_interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel was built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if _TRITON_ERROR is not None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """CPU tensors only work through the interpreter; say so instead of failing deep inside Triton."""
    dev = tensors[0].device
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on the same device; got {dev} and {t.device}")
    if dev.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {dev}). To run them on the CPU, set TRITON_INTERPRET=1 "
            "in the environment before triton is first imported (slow; meant for tests)."
        )


def debug_poison() -> bool:
    """HEADSCORE_KERNEL_DEBUG=1: kernel output buffers start as NaN so unwritten elements show up in tests."""
    return os.environ.get("HEADSCORE_KERNEL_DEBUG", "0") not in ("", "0", "false", "False")


def alloc(shape, *, dtype, device) -> torch.Tensor:
    if debug_poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_d(head_dim: int) -> int:
    """The tile width a kernel gives a head of ``head_dim``: rounded up to a power of two, at least 16 (tl.dot's
    smallest)."""
    return max(16, next_pow2(head_dim))
