"""Size and render time of a HeadScores' notebook view (``_repr_html_``) for 8 tasks x 32 layers x 32 heads.

Random scores of that shape with an ``exact`` mask (5% of the heads) are rendered ``--repeats`` times after one
warm-up; the median wall time and the HTML's size are reported, next to what drawing the same grid as a
matplotlib figure costs (``scores.plot()`` rendered to a PNG at 72 dpi, what the inline backend shows).

    .venv/bin/python benchmarks/notebook_display.py --out benchmarks/results/notebook_display.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from headscore.results import HeadScores


def random_scores(tasks: int = 8, layers: int = 32, heads: int = 32, seed: int = 0) -> HeadScores:
    g = torch.Generator().manual_seed(seed)
    return HeadScores(torch.randn(tasks, layers, heads, generator=g, dtype=torch.float64),
                      torch.rand(tasks, layers, heads, generator=g, dtype=torch.float64) * 0.1,
                      torch.full((tasks,), 50, dtype=torch.int64), [f"task {i}" for i in range(tasks)],
                      "taylor", "random-32x32", exact=torch.rand(tasks, layers, heads, generator=g) < 0.05)


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    result = fn()  # warm-up (imports, colour maps, fonts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    scores = random_scores()
    html_s, html_times, html = timed(scores._repr_html_, args.repeats)

    def figure_png() -> bytes:
        buf = io.BytesIO()
        scores.plot().savefig(buf, format="png", dpi=72)
        return buf.getvalue()

    fig_s, fig_times, png = timed(figure_png, args.repeats)
    row = {"shape": [8, 32, 32], "html_bytes": len(html.encode()), "html_median_s": round(html_s, 4),
           "html_times_s": [round(t, 4) for t in html_times], "figure_png_bytes": len(png),
           "figure_median_s": round(fig_s, 3), "figure_times_s": [round(t, 3) for t in fig_times],
           "load_average": os.getloadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__}
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
