"""Triton kernels for headscore (installed as ``headscore.kernels``).

* :func:`gated_attention` - fused flash attention with a per-head output gate; the gate gradient comes
  out of the backward's preprocessing pass for almost nothing.
* :func:`gate_grad` - single-pass Triton reduction of the gate gradient for the unfused path
  (attention computed elsewhere); :func:`gate_grad_torch` is the plain PyTorch expression.
* :func:`gate_grad_cuda` - the same reduction as an optional CUDA C++ extension (built on first use).

Importing this package never requires Triton; calling a Triton kernel without it raises a clear error.
On a CPU the kernels run through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before
triton is first imported.
"""

from ._compat import triton_available
from .gate_grad import gate_grad, gate_grad_torch
from .gate_grad_cuda import cuda_ext_available, gate_grad_cuda
from .gated_attention import gated_attention

__all__ = ["cuda_ext_available", "gate_grad", "gate_grad_cuda", "gate_grad_torch", "gated_attention",
           "triton_available"]
