"""Every use of transformers' private attributes, in one place, behind a minimum-version check.

headscore gates heads through transformers' attention registry. The public parts of that API
(``AttentionInterface.register``, ``model.set_attn_implementation``) are not enough: removing a
registration, reading which attention a model runs, copying the mask function of an implementation
and telling whether a model routes attention through the registry at all need private attributes.
They are read here and nowhere else in the library, so a transformers release that renames one breaks
one module, and ``tests/test_compat.py`` names it.

transformers' registries are imported inside the functions that use them: importing
``transformers.modeling_utils`` takes seconds, and the command line must start without it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import version as installed_version

import torch
from packaging.version import Version

from .errors import UnsupportedModelError

MIN_TRANSFORMERS = "5.0"
"""Oldest transformers whose private attention attributes match what this module reads (pyproject: >=5.0)."""


def check_transformers(version: str | None = None) -> None:
    """Raise UnsupportedModelError if transformers (or ``version``) is older than MIN_TRANSFORMERS."""
    version = version or installed_version("transformers")
    if Version(version) < Version(MIN_TRANSFORMERS):
        need = MIN_TRANSFORMERS
        raise UnsupportedModelError(
            f"headscore needs transformers>={need} (its attention registry); this is transformers {version}: "
            f"pip install 'transformers>={need},<6'")


def can_route_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` sends its attention through the registry (so its heads can be gated)."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    return bool(can_set is not None and can_set())


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The name of the attention implementation ``model`` runs now (``sdpa``, ``eager``, a registered key)."""
    return model.config._attn_implementation


def force_attention_implementation(model: torch.nn.Module, name: str) -> None:
    """Set the implementation name in the config directly, for when ``set_attn_implementation`` refuses."""
    model.config._attn_implementation_internal = name


def sub_config_implementations(model: torch.nn.Module) -> list[tuple[object, str | None]]:
    """Each sub-config of ``model``'s config (at any depth: a multimodal model's text and vision towers) with the
    implementation name it holds now (None where it holds none), for :func:`restore_sub_config_implementations`:
    ``set_attn_implementation`` with one name sets every tower, so restoring the top name alone is not enough."""
    found, queue, seen = [], [model.config], {id(model.config)}
    while queue:
        config = queue.pop()
        for name in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, name, None)
            if sub is not None and id(sub) not in seen and hasattr(sub, "_attn_implementation_internal"):
                seen.add(id(sub))
                found.append((sub, sub._attn_implementation_internal))
                queue.append(sub)
    return found


def restore_sub_config_implementations(recorded: list[tuple[object, str | None]]) -> None:
    """Put back the names :func:`sub_config_implementations` recorded."""
    for config, name in recorded:
        config._attn_implementation_internal = name


def attention_function(name: str) -> Callable:
    """The attention function registered as ``name``; ``eager`` is the model module's own function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        return lambda module, *args, **kwargs: eager_attention(module)(module, *args, **kwargs)
    try:
        return ALL_ATTENTION_FUNCTIONS[name]
    except KeyError as exc:
        raise UnsupportedModelError(f"attention implementation {name!r} is not in transformers' registry") from exc


def eager_attention(module: torch.nn.Module) -> Callable:
    """The ``eager_attention_forward`` of the modelling module that defines ``module``'s class."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no eager_attention_forward in its module; load the model with "
            "attn_implementation='sdpa'")
    return fn


def register_attention(key: str, fn: Callable, *, masks_like: str) -> None:
    """Register ``fn`` as attention ``key``, with the mask function of implementation ``masks_like``
    (without one, transformers builds no causal mask for the new key)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(key, fn)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(masks_like)
    if mask_fn is not None:
        AttentionMaskInterface.register(key, mask_fn)


def checkpointing_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that can checkpoint their activations (transformers' layers have a
    ``gradient_checkpointing`` flag from the start, on or off): what :func:`activation_checkpointing` reads."""
    return [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]


def activation_checkpointing(model: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> str | None:
    """How ``model``'s layers checkpoint activations in a training forward pass now: None (they do not),
    ``"reentrant"`` or ``"non-reentrant"`` (torch's ``checkpoint``, as ``activation_checkpointing_enable`` sets
    it), or ``"other"`` (another function: transformers' offloading wrapper, a user's own; or a mix).
    ``modules``: :func:`checkpointing_modules` of the model, found once (reading every module of a model
    each forward pass costs about a millisecond for a 400-module model)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    modes = set()
    for module in model.modules() if modules is None else modules:
        if module.training and getattr(module, "gradient_checkpointing", False) is True:
            fn = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(fn, partial) and fn.func is checkpoint and not fn.args:
                # torch's default when use_reentrant is not given (with a warning) is re-entrant
                modes.add("non-reentrant" if fn.keywords.get("use_reentrant", True) is False else "reentrant")
            else:
                modes.add("other")
    return None if not modes else modes.pop() if len(modes) == 1 else "other"
