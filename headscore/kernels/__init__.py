"""Triton kernels for headscore.

* :func:`gated_attention` - fused flash attention with a per-head output gate; the gate gradient comes
  out of the backward's preprocessing pass for almost nothing.
* :mod:`.dispatch` - which attention calls the fused kernel can serve (CUDA, triton, causal, no dropout,
  a key-padding mask at most) and the call itself, for :func:`headscore.patch`.

Importing this package never requires Triton; calling a Triton kernel without it raises a clear error.
On a CPU the kernels run through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before
triton is first imported.
"""

from ._compat import triton_available
from .gated_attention import gated_attention

__all__ = ["gated_attention", "triton_available"]
