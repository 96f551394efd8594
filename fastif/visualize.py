"""Pictures of influence runs: the influence-interaction graph, histograms per group, top-k lists.

The graph follows FastIF's figure: test points sit on a circle, each group of test points on its
own arc; each training point sits at the influence-weighted mean of the positions of the test
points it influences (pulled inside the circle), joined to them by edges coloured by direction
(helpful / harmful) with width by |influence|. Layout is plain numpy; drawing uses
``matplotlib.figure.Figure`` (no pyplot state). :func:`html_report` makes one self-contained
page: images embedded as base64 data URIs, no external resources.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd

from fastif.errors import InputError

DIRECTION_COLOURS = {"helpful": "#1b7837", "harmful": "#b2182b"}
GROUP_GAP = 0.35  # radians between the arcs of two groups
TRAIN_RADIUS = 0.78  # training points are pulled inside the circle of test points


@dataclass
class InfluenceTables:
    """The rows of one or more influence runs; ``test_key`` is unique across runs."""

    influence: pd.DataFrame  # influence.parquet rows + columns run, test_key
    tests: pd.DataFrame  # tests.parquet rows + columns run, test_key
    runs: List[str]


def load_runs(folders: Sequence[str | Path]) -> InfluenceTables:
    """Read ``influence.parquet`` and ``tests.parquet`` of each run folder.

    With several runs, test keys are ``<run name>/<test_id>`` so that equal test ids of
    different runs stay apart; with one run they are the test ids.
    """
    if not folders:
        raise InputError("No influence run to draw. Fix: run 'fastif influence' first, or set runs=[<run folder>, ...].")
    influences, tests, names = [], [], []
    for folder in folders:
        folder = Path(folder).expanduser()
        missing = [name for name in ("influence.parquet", "tests.parquet") if not (folder / name).is_file()]
        if missing:
            raise InputError(f"'{folder}' has no {' and no '.join(missing)}: not a finished influence run. "
                             f"Fix: pass folders written by 'fastif influence' (e.g. outputs/influence/<experiment>/latest).")
        name = folder.resolve().name
        if name in names:
            name = f"{folder.resolve().parent.name}/{name}"
        names.append(name)
        influence = pd.read_parquet(folder / "influence.parquet")
        test = pd.read_parquet(folder / "tests.parquet")
        influences.append(influence.assign(run=name))
        tests.append(test.assign(run=name))
    influence = pd.concat(influences, ignore_index=True)
    test = pd.concat(tests, ignore_index=True)
    several = len(names) > 1
    for frame in (influence, test):
        frame["test_key"] = (frame["run"] + "/" + frame["test_id"].astype(str)) if several else frame["test_id"].astype(str)
        frame["test_group"] = frame["test_group"].astype(str)
    return InfluenceTables(influence=influence, tests=test, runs=names)


@dataclass
class GraphLayout:
    """Positions of the bipartite graph. Arrays are aligned with the key lists."""

    test_keys: List[str]
    test_xy: np.ndarray  # (T, 2) on the unit circle
    test_groups: List[str]
    group_arcs: Dict[str, Tuple[float, float]]  # group -> (start angle, end angle) in radians
    train_keys: List[int]  # training positions (train_index)
    train_xy: np.ndarray  # (N, 2) inside the circle
    edges: pd.DataFrame  # test_key, train_index, influence, direction (the drawn rows)


def graph_edges(influence: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The top-k helpful and top-k harmful rows per test point (the graph's edges)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return (influence[influence["rank"] <= top_k][["test_key", "test_group", "train_index", "influence", "direction"]]
            .reset_index(drop=True))


def layout_graph(tests: pd.DataFrame, edges: pd.DataFrame, seed: int = 0) -> GraphLayout:
    """Test points on group arcs of the unit circle; training points at the |influence|-weighted mean of their test points.

    Each group's arc is proportional to its number of test points, arcs separated by a gap. A
    training point is placed at ``TRAIN_RADIUS`` times the weighted mean of the positions of the
    test points it has edges to (so one influenced test point puts it just inside that test
    point, several put it between them), plus a small seeded jitter that separates points
    influencing the same test points.
    """
    order = tests.sort_values(["test_group", "test_key"], kind="stable")
    test_keys = order["test_key"].tolist()
    groups = order["test_group"].tolist()
    group_names = list(dict.fromkeys(groups))
    counts = {g: groups.count(g) for g in group_names}
    gap = GROUP_GAP if len(group_names) > 1 else 0.0
    usable = 2 * np.pi - gap * len(group_names)
    angles = np.empty(len(test_keys))
    arcs: Dict[str, Tuple[float, float]] = {}
    start, i = np.pi / 2, 0
    for group in group_names:
        span = usable * counts[group] / len(test_keys)
        step = span / counts[group]
        for j in range(counts[group]):
            angles[i] = start - (j + 0.5) * step  # clockwise from the top
            i += 1
        arcs[group] = (start, start - span)
        start -= span + gap
    test_xy = np.column_stack([np.cos(angles), np.sin(angles)])

    where = {key: n for n, key in enumerate(test_keys)}
    edges = edges[edges["test_key"].isin(where)].reset_index(drop=True)
    train_keys = sorted(int(x) for x in edges["train_index"].unique())
    if train_keys:
        position = {key: n for n, key in enumerate(train_keys)}
        rows = edges["train_index"].map(position).to_numpy()
        cols = edges["test_key"].map(where).to_numpy()
        weight = np.abs(edges["influence"].to_numpy(dtype=float)) + 1e-12
        weights = np.zeros((len(train_keys), len(test_keys)))
        np.add.at(weights, (rows, cols), weight)
        train_xy = TRAIN_RADIUS * (weights @ test_xy) / weights.sum(1, keepdims=True)
        rng = np.random.default_rng(seed)
        train_xy = train_xy + rng.normal(scale=0.025, size=train_xy.shape)
    else:
        train_xy = np.zeros((0, 2))
    return GraphLayout(test_keys=test_keys, test_xy=test_xy, test_groups=groups, group_arcs=arcs,
                       train_keys=train_keys, train_xy=train_xy, edges=edges)


def _group_colours(groups: Sequence[str]) -> Dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {g: palette(i % 10) for i, g in enumerate(dict.fromkeys(groups))}


def draw_graph(layout: GraphLayout, title: str = "Influence interactions"):
    """The bipartite influence-interaction graph as a matplotlib Figure."""
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(9, 9), dpi=110, layout="constrained")
    ax = figure.add_subplot()
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title)
    colours = _group_colours(layout.test_groups)
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="#dddddd", linewidth=0.8, zorder=0)
    for group, (start, end) in layout.group_arcs.items():
        arc = np.linspace(start, end, 100)
        ax.plot(1.06 * np.cos(arc), 1.06 * np.sin(arc), color=colours[group], linewidth=5, solid_capstyle="butt")
        middle = (start + end) / 2
        ax.text(1.2 * np.cos(middle), 1.2 * np.sin(middle), group, ha="center", va="center", fontsize=10,
                color=colours[group], fontweight="bold")

    edges = layout.edges
    if len(edges):
        test_at = {k: n for n, k in enumerate(layout.test_keys)}
        train_at = {k: n for n, k in enumerate(layout.train_keys)}
        starts = layout.train_xy[edges["train_index"].map(train_at).to_numpy()]
        ends = layout.test_xy[edges["test_key"].map(test_at).to_numpy()]
        magnitude = np.abs(edges["influence"].to_numpy(dtype=float))
        width = 0.3 + 2.7 * magnitude / max(magnitude.max(), 1e-12)
        # Draw harmful first so helpful edges stay visible where they overlap.
        for direction in ("harmful", "helpful"):
            pick = (edges["direction"] == direction).to_numpy()
            if pick.any():
                segments = np.stack([starts[pick], ends[pick]], axis=1)
                ax.add_collection(LineCollection(segments, colors=DIRECTION_COLOURS[direction], linewidths=width[pick],
                                                 alpha=0.45, zorder=1))
        ax.scatter(layout.train_xy[:, 0], layout.train_xy[:, 1], s=9, color="#333333", zorder=2, linewidths=0)
    ax.scatter(layout.test_xy[:, 0], layout.test_xy[:, 1], s=45, zorder=3, edgecolors="white", linewidths=0.8,
               color=[colours[g] for g in layout.test_groups])
    legend = [Line2D([], [], color=DIRECTION_COLOURS["helpful"], linewidth=2.5, label="helpful (lowers test loss)"),
              Line2D([], [], color=DIRECTION_COLOURS["harmful"], linewidth=2.5, label="harmful (raises test loss)"),
              Line2D([], [], marker="o", color="#333333", linestyle="", markersize=4, label=f"training point ({len(layout.train_keys)})"),
              Line2D([], [], marker="o", color="#999999", linestyle="", markersize=7, label=f"test point ({len(layout.test_keys)})")]
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, -0.06), ncol=2, fontsize=9, frameon=False)
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    return figure


def draw_histograms(influence: pd.DataFrame, bins: int = 30, title: str = "Influence per test group"):
    """Histograms of the influence scores per test group, helpful and harmful rows in their colours."""
    from matplotlib.figure import Figure

    groups = sorted(influence["test_group"].astype(str).unique()) or ["(none)"]
    cols = min(3, len(groups))
    rows = int(np.ceil(len(groups) / cols))
    figure = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=110, layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, cols, squeeze=False)).ravel()
    values = influence["influence"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    edges = np.linspace(finite.min(), finite.max(), bins + 1) if len(finite) and finite.min() < finite.max() else bins
    for ax, group in zip(axes, groups):
        part = influence[influence["test_group"].astype(str) == group]
        for direction in ("helpful", "harmful"):
            scores = part.loc[part["direction"] == direction, "influence"].to_numpy(dtype=float)
            if len(scores):
                ax.hist(scores, bins=edges, color=DIRECTION_COLOURS[direction], alpha=0.75, label=f"{direction} ({len(scores)})")
        ax.axvline(0.0, color="black", linewidth=0.7)
        ax.set_title(f"{group} ({part['test_key'].nunique() if 'test_key' in part else part['test_id'].nunique()} test points)", fontsize=10)
        ax.set_xlabel("influence (negative = helpful)")
        ax.set_ylabel("training points")
        if len(part):
            ax.legend(fontsize=8)
    for ax in axes[len(groups):]:
        ax.axis("off")
    figure.suptitle(title)
    return figure


def figure_bytes(figure, fmt: str) -> bytes:
    """A Figure rendered to PNG or SVG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt)
    return buffer.getvalue()


def top_k_tables(tables: InfluenceTables, k: int, max_tests: int) -> str:
    """HTML sections: per test point, its text and its top-k helpful and harmful training texts."""
    parts = []
    tests = tables.tests.sort_values(["test_group", "test_key"], kind="stable")
    shown = tests.head(max_tests) if max_tests > 0 else tests
    by_test = {key: part for key, part in tables.influence.groupby("test_key", sort=False)}
    for _, test in shown.iterrows():
        part = by_test.get(test["test_key"], tables.influence.iloc[0:0])
        head = (f"<h3>{_e(test['test_key'])} <span class='group'>{_e(test['test_group'])}</span></h3>"
                f"<p class='text'>{_e(test['text'])}</p>"
                f"<p class='meta'>label {_e(test['test_label'])}, predicted {_e(test['test_pred'])}, "
                f"loss {float(test['loss']):.3f}, {int(test['candidates'])} candidates</p>")
        columns = []
        for direction in ("helpful", "harmful"):
            rows = part[part["direction"] == direction].sort_values("rank").head(k)
            body = "".join(f"<tr><td>{int(r['rank'])}</td><td>{float(r['influence']):.4g}</td><td>{_e(r['train_label'])}</td>"
                           f"<td>{_e(r['train_text'])}</td></tr>" for _, r in rows.iterrows())
            body = body or "<tr><td colspan='4'>none</td></tr>"
            columns.append(f"<div class='col'><h4 class='{direction}'>most {direction}</h4><table><tr><th>rank</th>"
                           f"<th>influence</th><th>label</th><th>training example</th></tr>{body}</table></div>")
        parts.append(f"<section class='test'>{head}<div class='cols'>{''.join(columns)}</div></section>")
    if max_tests > 0 and len(tests) > max_tests:
        parts.append(f"<p class='meta'>{len(tests) - max_tests} more test points are in the influence runs' tests.parquet.</p>")
    return "\n".join(parts)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#222;background:#fff}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 4px} h4{font-size:13px;margin:6px 0} .group{color:#666;font-weight:normal}
.helpful{color:#1b7837} .harmful{color:#b2182b} .meta{color:#666;font-size:12px;margin:2px 0}
.text{font-style:italic;margin:2px 0} img{max-width:100%;height:auto;display:block;margin:8px auto}
.cols{display:flex;gap:16px;flex-wrap:wrap} .col{flex:1 1 520px}
table{border-collapse:collapse;font-size:12px;width:100%} td,th{border:1px solid #e3e3e3;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f6f6f6} section.test{border-top:1px solid #eee}
"""


def html_report(tables: InfluenceTables, images: Dict[str, bytes], top_k: int, max_tests: int, title: str) -> str:
    """One self-contained HTML page: ``images`` (caption -> PNG bytes) embedded as data URIs, then the top-k lists."""
    n_tests, n_rows = len(tables.tests), len(tables.influence)
    figures = "\n".join(f"<h2>{_e(caption)}</h2><img alt='{_e(caption)}' src='{data_uri(png, 'image/png')}'>"
                        for caption, png in images.items())
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f"<p class='meta'>runs: {_e(', '.join(tables.runs))}; {n_tests} test points, {n_rows} influence rows. "
        "influence = predicted change of the test loss when the training point is up-weighted: "
        "negative = helpful, positive = harmful.</p>"
        f"{figures}<h2>Top {top_k} training examples per test point</h2>{top_k_tables(tables, top_k, max_tests)}"
        "</body></html>\n"
    )


def screenshot(html_path: str | Path, png_path: str | Path, browser: str = "chromium", size: Tuple[int, int] = (1200, 900),
               timeout: float = 120) -> Path:
    """Render a local HTML file in headless Chromium and save a screenshot (PNG); RuntimeError if none appears."""
    import subprocess
    import tempfile

    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    with tempfile.TemporaryDirectory(prefix="fastif-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                   f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}", html_path.as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not png_path.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return png_path


def image_spread(png_path: str | Path) -> Tuple[float, float]:
    """(pixel standard deviation, fraction of non-white pixels) of a PNG: both near 0 for a blank page."""
    from matplotlib.image import imread

    pixels = imread(str(png_path))[..., :3].astype(float)
    pixels = pixels / 255.0 if pixels.max() > 1.0 else pixels
    return float(pixels.std()), float((pixels.min(-1) < 0.95).mean())
