"""Safetensors files that carry a checksum of their own header and data, verified when read.

A scores file or a checkpoint is a safetensors file: an 8-byte header length, a JSON header (each
tensor's dtype, shape and offsets, and a ``__metadata__`` map of strings) and the tensors' bytes.
:func:`checksummed` adds ``__metadata__["checksum"] = "sha256:<hex>"``, the SHA-256 of the header
(without that one entry, as canonical JSON) and of every data byte, so a flipped bit anywhere, a cut
or an appended byte is found by :func:`read_checked` instead of loading as other numbers. Files without
the entry (written before it existed) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load, save

CHECKSUM_KEY = "checksum"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the header


class ChecksumError(ValueError):
    """The file's bytes do not match the checksum written with them (or cannot be split into header and data)."""


def _digest(header: dict, data: bytes) -> str:
    header = dict(header)
    meta = dict(header.get("__metadata__") or {})
    meta.pop(CHECKSUM_KEY, None)
    header["__metadata__"] = meta
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(data)
    return "sha256:" + h.hexdigest()


def _split(blob: bytes) -> tuple[dict, bytes]:
    if len(blob) < 8:
        raise ChecksumError(f"{len(blob)} bytes: too short for a safetensors file")
    n = int.from_bytes(blob[:8], "little")
    if n > min(_HEADER_LIMIT, len(blob) - 8):
        raise ChecksumError(f"its header claims {n} bytes, the file has {len(blob) - 8} after the length")
    try:
        header = json.loads(blob[8:8 + n])
    except (ValueError, RecursionError) as exc:
        raise ChecksumError(f"its header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ChecksumError("its header is not a JSON object")
    return header, blob[8 + n:]


def checksummed(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` and ``metadata``, with the checksum entry added to the metadata."""
    header, data = _split(save(tensors, metadata=metadata))
    return save(tensors, metadata={**metadata, CHECKSUM_KEY: _digest(header, data)})


def read_checked(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, after checking its checksum where it has one.

    Raises:
        ChecksumError: the bytes do not match the checksum, or the file is no safetensors file.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as fh:
        blob = fh.read()
    header, data = _split(blob)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ChecksumError("its metadata is not a JSON object")
    want = meta.get(CHECKSUM_KEY)
    if want is not None and want != _digest(header, data):
        raise ChecksumError("checksum mismatch: the file was changed or damaged after it was written")
    try:
        tensors = load(blob)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a bad layout
        raise ChecksumError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return {k: v for k, v in meta.items() if k != CHECKSUM_KEY}, tensors
