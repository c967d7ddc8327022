"""Size and headless render time of the interactive report (index.html) for a 32 x 32 model with 8 tasks.

Random scores and ablation files of that shape go through ``headscore.report.write_report``; the page is
then loaded by headless Chromium with the network blocked, ``--repeats`` times, and the wall time of each
load until Chromium has dumped the rendered DOM is taken. Interleaved with it, the same load of an empty
page gives the process's own share; the difference of the medians is reported as the render time.
``--virtual-time-budget`` lets Chromium run the page's timers without waiting for them in real time, so it
dumps once the page is idle. A load counts only if the page's own render check lists all 8 panels.

    .venv/bin/python benchmarks/html_report.py --out benchmarks/results/html_report.json
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from headscore.compare import compare
from headscore.report import write_report
from headscore.results import HeadScores


def random_scores(seed: int, method: str, tasks: int = 8, layers: int = 32, heads: int = 32) -> HeadScores:
    g = torch.Generator().manual_seed(seed)
    return HeadScores(torch.randn(tasks, layers, heads, generator=g, dtype=torch.float64),
                      torch.rand(tasks, layers, heads, generator=g, dtype=torch.float64) * 0.1,
                      torch.full((tasks,), 50, dtype=torch.int64), [f"task {i}" for i in range(tasks)],
                      method, "random-32x32")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("needs chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    scores, ablation = random_scores(0, "taylor"), random_scores(1, "ablation-zero")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_report(scores, Path(tmp) / "rep", ablation=ablation, comparison=compare(scores, ablation))
        write_s = time.perf_counter() - start
        page = paths["html"]
        size = page.stat().st_size
        empty = Path(tmp) / "empty.html"
        empty.write_text("<!DOCTYPE html><html><body><p>empty</p></body></html>")

        def load(url: str) -> tuple[float, str]:
            start = time.perf_counter()
            done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                                   "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
                                   "--virtual-time-budget=15000", "--dump-dom", url],
                                  capture_output=True, text=True, timeout=120)
            return time.perf_counter() - start, done.stdout

        times, baseline = [], []
        for _ in range(args.repeats):  # interleaved, so load drift hits both alike
            baseline.append(load(empty.as_uri())[0])
            seconds, dom = load(page.as_uri())
            times.append(seconds)
            m = re.search(r'<pre id="render-check"[^>]*>(.*?)</pre>', dom, re.S)
            panels = json.loads(html.unescape(m.group(1)))["panels"] if m and m.group(1) else []
            if len(panels) != 8:
                print(f"the page did not render all panels: {panels}", file=sys.stderr)
                return 1
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    doc = {"shape": "8 tasks x 32 layers x 32 heads, with ablation", "bytes": size, "mib": size / 2**20,
           "write_report_seconds": write_s, "load_seconds": times, "empty_page_seconds": baseline,
           "load_median_s": statistics.median(times), "empty_page_median_s": statistics.median(baseline),
           "render_median_s": statistics.median(times) - statistics.median(baseline), "chromium": version}
    print(f"index.html: {size / 2**20:.2f} MiB; write_report {write_s:.2f} s; headless load to rendered DOM: "
          f"median {doc['load_median_s']:.2f} s of {args.repeats} ({', '.join(f'{t:.2f}' for t in times)}); "
          f"an empty page: {doc['empty_page_median_s']:.2f} s; render = the difference: "
          f"{doc['render_median_s']:.2f} s; {version}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
