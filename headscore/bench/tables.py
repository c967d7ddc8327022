"""The bench's results: one :class:`Row` per method, the Markdown table, the json/csv/md files, and the
machine and library versions they were measured with."""

from __future__ import annotations

import csv
import io
import os
import platform
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..output_files import OutputSet, write_bytes
from ..results import json_bytes, library_versions


@dataclass
class Row:
    """One method's figures."""

    method: str
    label: str
    status: str  # ok | extrapolated | unavailable: ... | error: ...
    seconds: float | None = None
    times: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    memory_how: str = ""
    spearman: float | None = None
    note: str = ""

    def ratio_to(self, other: Row | None) -> float | None:
        if other is None or not self.seconds or not other.seconds:
            return None
        return self.seconds / other.seconds


def machine_info() -> dict:
    """CPU model, cores, torch threads, load average, GPU (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["loadavg"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    """Versions of headscore, torch, transformers and the peers (where installed)."""
    out = library_versions()
    for name in ("nnsight", "transformer-lens"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(doc: dict) -> str:
    """The results as a Markdown table (time, ratios to the floor and to taylor, memory, Spearman)."""
    rows = [Row(**r) for r in doc["rows"]]
    by = {r.method: r for r in rows}
    floor, taylor = by.get("floor"), by.get("taylor")
    lines = ["| method | status | wall s (median) | x floor | x taylor | peak MiB | Spearman vs ablation | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.label} (`{r.method}`) | {r.status} | {_fmt(r.seconds, '.3f')} | "
                     f"{_fmt(r.ratio_to(floor), '.2f')} | {_fmt(r.ratio_to(taylor), '.1f')} | "
                     f"{_fmt(r.peak_mib, '.0f')} | {_fmt(r.spearman, '.3f')} | {r.note} |")
    return "\n".join(lines)


def write_outputs(doc: dict, out_dir: str | Path, stem: str = "bench") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``, all or nothing (the
    directory is replaced whole; it must be new, empty or an earlier bench's)."""
    names = {"json": f"{stem}.json", "csv": f"{stem}.csv", "md": f"{stem}.md"}
    fields = ["method", "label", "status", "seconds", "peak_mib", "spearman", "note", "memory_how", "times"]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in doc["rows"]:
        w.writerow({**r, "times": " ".join(f"{t:.4f}" for t in r["times"])})
    with OutputSet() as outputs:
        out = outputs.directory(out_dir, names.values(), label="bench directory")
        write_bytes(out / names["json"], json_bytes(doc))
        write_bytes(out / names["csv"], buf.getvalue().encode())
        write_bytes(out / names["md"], (format_table(doc) + "\n").encode())
    return {kind: Path(out_dir) / name for kind, name in names.items()}
