"""Optional CUDA C++ version of :func:`headscore.kernels.gate_grad` (source: ``csrc/gate_grad.cu``).

The extension is compiled with ``torch.utils.cpp_extension.load`` the first time it is used, and only when
a CUDA build of torch, a visible GPU and nvcc are all present. Nothing here is needed to import the
package or to run on a CPU. ``HEADSCORE_NO_CUDA_EXT=1`` disables it. ``HEADSCORE_CSRC`` may point at the
directory holding ``gate_grad.cu`` (default: ``csrc/`` next to the ``kernels/`` directory, i.e. a source
checkout or an editable install).

The op is registered as ``torch.ops.headscore.gate_grad_cuda`` (with a fake implementation, so it
traces under torch.compile / FakeTensorMode).
"""

import os
import threading
from pathlib import Path

import torch

__all__ = ["cuda_ext_available", "gate_grad_cuda", "load_extension"]

_LOCK = threading.Lock()
_EXT = None
_EXT_ERROR: str | None = None


def _source() -> Path:
    root = os.environ.get("HEADSCORE_CSRC")
    base = Path(root) if root else Path(__file__).resolve().parent.parent / "csrc"
    return base / "gate_grad.cu"


def _why_unavailable() -> str | None:
    if os.environ.get("HEADSCORE_NO_CUDA_EXT", "0") not in ("", "0"):
        return "disabled by HEADSCORE_NO_CUDA_EXT"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc / CUDA_HOME not found"
    if not _source().is_file():
        return f"source {_source()} not found (set HEADSCORE_CSRC)"
    return None


def cuda_ext_available() -> bool:
    """Whether the extension could be built/loaded here (does not compile it)."""
    return _EXT is not None or _why_unavailable() is None


def load_extension():
    """Compile (first call; cached by torch under ~/.cache/torch_extensions) and return the extension module."""
    global _EXT, _EXT_ERROR
    if _EXT is not None:
        return _EXT
    with _LOCK:
        if _EXT is not None:
            return _EXT
        why = _why_unavailable()
        if why is not None:
            raise RuntimeError(f"headscore gate_grad CUDA extension unavailable: {why}")
        if _EXT_ERROR is not None:
            raise RuntimeError(f"headscore gate_grad CUDA extension failed to build earlier: {_EXT_ERROR}")
        from torch.utils.cpp_extension import load

        try:
            _EXT = load(name="headscore_gate_grad", sources=[str(_source())],
                        extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=False)
        except Exception as exc:  # compiler errors: remember and report
            _EXT_ERROR = repr(exc)
            raise RuntimeError(f"building the headscore gate_grad CUDA extension failed: {exc}") from exc
    return _EXT


def _gate_grad_cuda_impl(o: torch.Tensor, dy: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
    return load_extension().gate_grad(o, dy, baseline)


def _gate_grad_cuda_fake(o: torch.Tensor, dy: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
    return o.new_empty((o.shape[0], o.shape[2]), dtype=torch.float32)


def _register():
    """torch.ops.headscore.gate_grad_cuda; reuse an existing registration (module imported twice)."""
    existing = getattr(getattr(torch.ops, "headscore", None), "gate_grad_cuda", None)
    if existing is not None:
        return existing
    try:
        op = torch.library.custom_op("headscore::gate_grad_cuda", mutates_args=())(_gate_grad_cuda_impl)
        op.register_fake(_gate_grad_cuda_fake)
        return op
    except Exception:  # pragma: no cover - old torch without custom_op, or a registration clash
        return _gate_grad_cuda_impl


try:
    _OP = _register()
except Exception:  # pragma: no cover
    _OP = _gate_grad_cuda_impl


def gate_grad_cuda(o: torch.Tensor, dy: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t <o[b, t, h] - baseline[h], dy[b, t, h]>`` -> [B, H] float32, with the CUDA C++ kernel.

    o, dy: [B, T, H, D] CUDA tensors (any strides, same dtype); baseline: optional [H, D].
    Raises RuntimeError when the extension is unavailable (see :func:`cuda_ext_available`).
    """
    if not (o.is_cuda and dy.is_cuda):
        raise RuntimeError("gate_grad_cuda needs CUDA tensors; use gate_grad (Triton) or gate_grad_torch on a CPU")
    return _OP(o, dy, baseline)
