"""What a notebook shows (issue 26): HeadScores' HTML view checked pixel by pixel against the values (colour,
orientation, exact outlines, absent heads), its size and time at 32 x 32 heads x 8 tasks, and ``plot``."""

from __future__ import annotations

import base64
import io
import re
import time

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from headscore.display import cell_pixels
from headscore.errors import HeadscoreError
from headscore.results import HeadScores

PNG = re.compile(r'src="data:image/png;base64,([^"]+)"')


def synthetic(t: int = 3, num_layers: int = 5, num_heads: int = 4, *, exact: bool = True, seed: int = 0,
              tasks: list[str] | None = None) -> HeadScores:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(t, num_layers, num_heads, generator=g, dtype=torch.float64)
    values[:, num_layers - 1, num_heads - 1] = float("nan")  # a head the top layer does not have
    mask = torch.rand(t, num_layers, num_heads, generator=g) < 0.2 if exact else None
    names = tasks or [f"task {i}" for i in range(t)]
    return HeadScores(values, torch.zeros_like(values), torch.arange(1, t + 1), names, "taylor", "tiny <model>",
                      exact=mask)


def images(html: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(m))).convert("RGBA")) for m in PNG.findall(html)]


def test_the_html_grid_shows_the_values():
    s = synthetic(tasks=["geo", "<b>bold</b>", "caf\u00e9"])
    html = s._repr_html_()
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold</b>" not in html and "tiny &lt;model&gt;" in html
    assert "taylor" in html and "3 tasks &times; 5 layers &times; 4 heads" in html and "6 examples" in html
    assert f"{int(s.exact.sum())} exact head values" in html
    panels = images(html)[:3]  # then the colour bar
    py, px = cell_pixels(5, 4)
    assert py * 5 > px * 4  # 5 layers x 4 heads: taller than wide
    vals = s.values.numpy()
    finite = vals[np.isfinite(vals)]
    lo, hi = finite.min(), finite.max()  # one scale for every task
    viridis = colormaps["viridis"]
    for t, img in enumerate(panels):
        assert img.shape == (5 * py, 4 * px, 4)
        for layer in range(5):
            for head in range(4):
                y, x = (4 - layer) * py + py // 2, head * px + px // 2  # layer 0 at the bottom
                if np.isnan(vals[t, layer, head]):
                    assert img[y, x, 3] == 0  # absent head: transparent
                    continue
                want = np.array(viridis((vals[t, layer, head] - lo) / (hi - lo), bytes=True))
                assert np.abs(img[y, x].astype(int) - want.astype(int)).max() <= 1, (t, layer, head)
                corner = img[(4 - layer) * py, head * px]
                assert (tuple(corner) == (0, 0, 0, 255)) == bool(s.exact[t, layer, head]), (t, layer, head)
    rows = re.findall(r"<tr>(.*?)</tr>", html)
    assert len(rows) == 1 + 3 and "exact heads" in rows[0]
    top = s.top_k(1, "geo")[0]
    assert f"L{top[0]}.H{top[1]} ({top[2]:.4g})" in rows[1]
    assert "exact" not in synthetic(exact=False)._repr_html_()


@pytest.mark.parametrize("num_layers,num_heads", [(64, 40), (80, 64)])
def test_exact_heads_are_outlined_on_large_grids(num_layers, num_heads):
    """Qwen2.5-32B's 64 x 40 heads and Llama-3-70B's 80 x 64: cells of 2 pixels could hold no outline, and the view
    said 'outlined' with none drawn; with an exact mask the cells take 4 pixels a side (a ring and 2 x 2 of the
    value's colour inside), and every exact cell (and no other) has its black corner."""
    s = synthetic(1, num_layers, num_heads, seed=3)
    assert cell_pixels(num_layers, num_heads) == (2, 2)
    img = images(s._repr_html_())[0]
    py, px = img.shape[0] // num_layers, img.shape[1] // num_heads
    assert (py, px) == (4, 4) and img.shape[:2] == (num_layers * 4, num_heads * 4)
    corners = img[::py, ::px][::-1]  # [L, H, 4], layer 0 first
    black = (corners == np.array([0, 0, 0, 255], dtype=np.uint8)).all(-1)
    assert torch.equal(torch.from_numpy(black), s.exact[0]) and int(s.exact.sum()) > 100
    plain = synthetic(1, num_layers, num_heads, exact=False)
    assert images(plain._repr_html_())[0].shape[:2] == (num_layers * 2, num_heads * 2)  # no mask: as small as before


def test_the_html_of_32x32_heads_and_8_tasks_is_small_and_fast():
    """The numbers of benchmarks/RESULTS.md (issue 26): under 300 KB and under 1 s."""
    s = synthetic(8, 32, 32)
    s._repr_html_()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        html = s._repr_html_()
        times.append(time.perf_counter() - start)
    assert len(html.encode()) < 300_000 and min(times) < 1.0
    assert len(images(html)) == 9 and images(html)[0].shape[:2] == (32 * 5, 32 * 5) == tuple(
        32 * n for n in cell_pixels(32, 32))
    assert cell_pixels(30, 9) == (5, 9)  # SmolLM2's 30 layers x 9 heads: 150 x 81 pixels, as a 2:1 panel


def test_plot_draws_the_grid_one_task_or_on_given_axes():
    s = synthetic()
    grid = s.plot()
    assert isinstance(grid, Figure) and len([ax for ax in grid.axes if ax.images]) == 3
    one = s.plot("task 1")
    assert len([ax for ax in one.axes if ax.images]) == 1
    np.testing.assert_array_equal(one.axes[0].images[0].get_array().filled(np.nan), s.values[1].numpy())
    fig = Figure()
    ax = fig.add_subplot()
    assert s.plot("task 2", ax=ax) is fig
    np.testing.assert_array_equal(ax.images[0].get_array().filled(np.nan), s.values[2].numpy())
    assert ax.get_title() == "task 2" and len(fig.axes) == 2  # the panel and its colour bar
    outlined = sum(1 for p in ax.patches)
    assert outlined == int(s.exact[2].sum())
    with pytest.raises(HeadscoreError, match=r"plot\(ax=...\) draws one task; name it"):
        s.plot(ax=Figure().add_subplot())
    with pytest.raises(HeadscoreError, match="no task 'nope'"):
        s.plot("nope")
    with pytest.raises(HeadscoreError, match="no per-position maps"):
        s.plot(positions=True)
    g = torch.Generator().manual_seed(1)
    with_positions = HeadScores(s.values, s.stderr, s.counts, s.tasks, s.method, s.model, positions=["end-1", "end"],
                                position_values=torch.randn(3, 5, 4, 2, generator=g, dtype=torch.float64),
                                position_stderr=torch.zeros(3, 5, 4, 2, dtype=torch.float64),
                                position_counts=torch.ones(3, 2, dtype=torch.int64))
    by_position = with_positions.plot("task 0", positions=True)
    assert len([ax for ax in by_position.axes if ax.images]) == 1
    with pytest.raises(HeadscoreError, match=r"plot\(positions=True\) draws its own figure"):
        with_positions.plot("task 0", ax=ax, positions=True)
