"""The compile check of the fused-attention kernels (issue 14, part 1), run on the CPU.

Every config that ``headscore.kernels.configs`` lets a kernel run with is compiled by Triton for sm_80
and sm_90 (no GPU needed) with a real call's specialisation; none may spill registers or need more
shared memory than the target has. docs/kernel-resources.md is that check's table and must list the
same compiles. The check itself is shown to fail on a config that spills and on one that overflows.

The two tests that compile are in the slow tier (``make test-slow``; about 7 minutes on 2 cores with an empty
Triton cache). A passing check's table is kept under ``$HEADSCORE_CACHE/kernel-check/`` (default
``~/.cache/headscore``), named by a hash of every source in headscore/kernels (the kernels, their configs and
the check itself) and of Triton's, torch's and Python's versions: an unchanged tree reuses it instead of
compiling again, and every assertion below still runs on it. A fresh machine (CI) has no such file and
compiles; ``HEADSCORE_KERNEL_CHECK_CACHE=0`` compiles regardless.
"""

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from headscore.kernels import configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kernel-resources.md"
ROW = re.compile(r"^\| (\w+) \| (\d+) x (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\w+) \| (sm\d+) \| ([\w-]+) \|(.*)\|\s*$")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles GPU code
    return {**env, "TRITON_DEFAULT_FP_FUSION": "1"}


def _rows(text: str) -> dict[tuple, str]:
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.groups()[:9]] = m.group(10)
    return rows


def check_key() -> str:
    """What the compile check's outcome depends on: every source of headscore/kernels, Triton's, torch's and
    Python's versions and the machine type (the compile itself is deterministic given those)."""
    import torch
    import triton

    digest = hashlib.sha256()
    for path in sorted((ROOT / "headscore" / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"triton {triton.__version__} torch {torch.__version__} python {sys.version} "
                  f"{platform.machine()}".encode())
    return digest.hexdigest()[:32]


def cached_check() -> Path | None:
    """Where a passing check of this exact tree and toolchain is kept (None: caching turned off)."""
    if os.environ.get("HEADSCORE_KERNEL_CHECK_CACHE", "1").lower() in ("0", "off", "no", "false"):
        return None
    base = Path(os.environ.get("HEADSCORE_CACHE") or Path.home() / ".cache" / "headscore")
    return base / "kernel-check" / f"{check_key()}.md"


def _keep(table: Path, cached: Path | None) -> None:
    """Keep a passing check's table for the next run of the same tree; a cache that cannot be written is
    only a slower next run."""
    if cached is None:
        return
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_name(f".{cached.name}.{os.getpid()}")
        shutil.copyfile(table, part)
        os.replace(part, cached)
    except OSError:
        pass


@pytest.mark.slow
@pytest.mark.compile
def test_every_kept_config_compiles_without_spills_within_shared_memory(tmp_path):
    table = tmp_path / "kernel-resources.md"
    cached = cached_check()
    if cached is not None and cached.is_file():
        print(f"the compile check of this tree and toolchain passed before: {cached}")
        shutil.copyfile(cached, table)
    else:
        done = subprocess.run([sys.executable, "-m", "headscore.kernels.resources", "--markdown", str(table),
                               "--workers", str(os.cpu_count() or 1)], capture_output=True, text=True, env=_env(),
                              cwd=ROOT, timeout=1800)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = _rows(table.read_text())
    expected = {(k, str(m), str(n), str(w), str(s), str(d), dt, t, shape)
                for k in configs.KERNELS for d in (16, 32, 64, 128, 256) for dt, elt in (("bf16", 2), ("fp16", 2),
                                                                                        ("fp32", 4))
                for t, cap in configs.TARGETS.items() for shape in ("T512-gqa", "T250-gqa", "T250-mha")
                for m, n, w, s in configs.kept(k, d, elt, cap)}
    assert set(rows) == expected
    assert all(cells.rstrip().endswith("| yes") for cells in rows.values())
    _keep(table, cached)
    assert set(_rows(DOC.read_text())) == expected, (
        "docs/kernel-resources.md is not the check of today's configs: regenerate it with "
        "python -m headscore.kernels.resources --markdown docs/kernel-resources.md")


@pytest.mark.slow
@pytest.mark.compile
def test_the_check_fails_on_a_spilling_and_an_overflowing_config():
    """Two candidates that the table leaves out: 4 warps on a 128 x 64 forward tile at D = 128 spill on sm_90;
    a 128 x 64 forward tile with 3 stages at D = 256 needs more shared memory (256 KiB) than the H100 has."""
    code = (
        "from headscore.kernels import resources as r\n"
        "import torch\n"
        "args, meta = r.recorded_calls(128, torch.bfloat16, 'T512-gqa')['fwd']\n"
        "spill = r.compile_one(('fwd', args, meta, (128, 64, 4, 3), 'sm90', 128, 'bf16', 'T512-gqa'))\n"
        "args, meta = r.recorded_calls(256, torch.bfloat16, 'T512-gqa')['fwd']\n"
        "big = r.compile_one(('fwd', args, meta, (128, 64, 8, 3), 'sm90', 256, 'bf16', 'T512-gqa'))\n"
        "print(spill['stack'], spill['spills'], r.clean(spill), big['shared'], big['shared_ok'], r.clean(big))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stack, spills, spill_clean, shared, shared_ok, big_clean = done.stdout.split()
    assert int(stack) > 0 and spills == "True" and spill_clean == "False", done.stdout
    assert int(shared) > configs.SHARED_LIMIT["sm90"] and shared_ok == "False" and big_clean == "False", done.stdout


@pytest.mark.parametrize("kernel", configs.KERNELS)
def test_every_head_width_and_dtype_has_a_config_on_every_target(kernel):
    for block_d in (16, 32, 64, 128, 256):
        for elt in (2, 4):
            for cap in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:
                kept = configs.kept(kernel, block_d, elt, cap)
                assert kept and len(set(kept)) == len(kept)
                assert set(kept) <= set(configs.all_configs(kernel))


def test_a_missing_entry_is_a_clear_error():
    with pytest.raises(ValueError, match="no checked fwd config for BLOCK_D=512"):
        configs.kept("fwd", 512, 2, (9, 0))


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("dtype_size", [2, 4])
def test_the_autotuner_tries_only_the_checked_configs(kernel, dtype_size):
    """The autotuner's pruning hook keeps, of every candidate, exactly the checked list for the call's head
    width, element size and device (a CPU tensor reads as the sm80 class here)."""
    import importlib

    import torch
    import triton

    ga = importlib.import_module("headscore.kernels.gated_attention")
    candidates = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                  for m, n, w, s in configs.all_configs(kernel)]
    q = torch.zeros(1, dtype=torch.float16 if dtype_size == 2 else torch.float32)
    for block_d in (16, 32, 64, 128, 256):
        kept = ga._prune_configs(kernel)(candidates, {"Q": q}, BLOCK_D=block_d)
        got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
        assert sorted(got) == sorted(configs.kept(kernel, block_d, dtype_size, (8, 0)))
