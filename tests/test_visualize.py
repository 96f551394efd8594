"""fastif.visualize and `fastif visualize` on synthetic influence runs (no model needed)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastif import visualize as vis
from fastif.pipeline import INFLUENCE_COLUMNS, TESTS_COLUMNS

GROUPS = ("lexical_overlap", "subsequence", "constituent")


def fake_influence_run(folder: Path, n_tests: int = 9, top_m: int = 4, seed: int = 0, prefix: str = "t") -> Path:
    """A folder with influence.parquet and tests.parquet in the documented columns."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    tests, rows = [], []
    for i in range(n_tests):
        test_id, group = f"{prefix}{i:03d}", GROUPS[i % len(GROUPS)]
        label = int(rng.integers(2))
        pred = label if i % 2 == 0 else 1 - label
        tests.append({"test_id": test_id, "split": "challenge", "test_group": group, "n_examples": 1,
                      "text": f"Premise {i} & <b>bold</b> => hypothesis {i}", "test_label": label, "test_pred": pred,
                      "loss": float(rng.uniform(0.1, 3)), "accuracy": float(label == pred), "s_test_norm": 1.0,
                      "solver": "lissa", "solver_steps": 100, "relative_change": 0.01, "candidates": 50,
                      "seconds": 0.1, "chunk": 0})
        for direction, sign in (("helpful", -1.0), ("harmful", 1.0)):
            scores = np.sort(rng.uniform(0.1, 5.0, size=top_m))[::-1] * sign
            for rank, score in enumerate(scores, start=1):
                train_index = int(rng.integers(0, 30))  # shared between test points: a real graph
                rows.append({"test_id": test_id, "train_id": f"train-{train_index:04d}", "train_index": train_index,
                             "influence": float(score), "influence_se": float("nan"), "rank": rank, "direction": direction,
                             "knn_rank": rank, "knn_distance": 0.5, "train_label": int(rng.integers(2)), "test_label": label,
                             "test_pred": pred, "test_group": group,
                             "train_text": f"Training text {train_index} <script>alert(1)</script>"})
    pd.DataFrame(rows, columns=INFLUENCE_COLUMNS).to_parquet(folder / "influence.parquet")
    pd.DataFrame(tests, columns=TESTS_COLUMNS).to_parquet(folder / "tests.parquet")
    return folder


def test_layout_places_groups_on_arcs_and_training_points_between_their_tests():
    tests = pd.DataFrame({"test_key": ["a", "b", "c", "d"], "test_group": ["g1", "g1", "g2", "g2"]})
    edges = pd.DataFrame({
        "test_key": ["a", "a", "b", "c"],
        "test_group": ["g1", "g1", "g1", "g2"],
        "train_index": [10, 20, 20, 30],
        "influence": [-2.0, -1.0, 1.0, 3.0],
        "direction": ["helpful", "helpful", "harmful", "harmful"],
    })
    layout = vis.layout_graph(tests, edges, seed=0)
    assert np.allclose(np.linalg.norm(layout.test_xy, axis=1), 1.0)
    assert layout.test_keys == ["a", "b", "c", "d"]
    # Arcs of equal groups have equal length and do not overlap.
    (s1, e1), (s2, e2) = layout.group_arcs["g1"], layout.group_arcs["g2"]
    assert s1 - e1 == pytest.approx(s2 - e2) and e1 > s2
    at = dict(zip(layout.train_keys, layout.train_xy))
    test_at = dict(zip(layout.test_keys, layout.test_xy))
    jitter = 0.1
    # One influenced test point: just inside it. Two with equal |influence|: midway between them.
    assert np.linalg.norm(at[10] - vis.TRAIN_RADIUS * test_at["a"]) < jitter
    assert np.linalg.norm(at[30] - vis.TRAIN_RADIUS * test_at["c"]) < jitter
    assert np.linalg.norm(at[20] - vis.TRAIN_RADIUS * (test_at["a"] + test_at["b"]) / 2) < jitter
    assert np.all(np.linalg.norm(layout.train_xy, axis=1) < 1.0)


def test_layout_weights_positions_by_influence():
    tests = pd.DataFrame({"test_key": ["a", "b"], "test_group": ["g", "g"]})
    edges = pd.DataFrame({"test_key": ["a", "b"], "test_group": ["g", "g"], "train_index": [1, 1],
                          "influence": [-3.0, 1.0], "direction": ["helpful", "harmful"]})
    layout = vis.layout_graph(tests, edges, seed=0)
    expected = vis.TRAIN_RADIUS * (0.75 * layout.test_xy[0] + 0.25 * layout.test_xy[1])
    assert np.linalg.norm(layout.train_xy[0] - expected) < 0.1
    assert np.linalg.norm(layout.train_xy[0] - layout.test_xy[0]) < np.linalg.norm(layout.train_xy[0] - layout.test_xy[1])


def test_graph_edges_keep_the_top_k_per_direction(tmp_path):
    tables = vis.load_runs([fake_influence_run(tmp_path / "run")])
    edges = vis.graph_edges(tables.influence, top_k=2)
    assert len(edges) == 9 * 2 * 2
    assert edges.groupby(["test_key", "direction"]).size().eq(2).all()


def test_load_runs_keeps_tests_of_several_runs_apart(tmp_path):
    first = fake_influence_run(tmp_path / "a" / "run1")
    second = fake_influence_run(tmp_path / "b" / "run2", n_tests=4, seed=1)
    tables = vis.load_runs([first, second])
    assert tables.runs == ["run1", "run2"]
    assert len(tables.tests) == 13 and tables.tests["test_key"].is_unique
    assert set(tables.influence["test_key"]) == set(tables.tests["test_key"])
    from fastif.errors import InputError

    with pytest.raises(InputError, match="not a finished influence run"):
        vis.load_runs([tmp_path / "nothing"])


def test_html_report_is_self_contained_and_escapes_texts(tmp_path):
    tables = vis.load_runs([fake_influence_run(tmp_path / "run")])
    layout = vis.layout_graph(tables.tests, vis.graph_edges(tables.influence, 3))
    png = vis.figure_bytes(vis.draw_graph(layout), "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = vis.html_report(tables, {"graph": png}, top_k=2, max_tests=5, title="report")
    assert page.count("src='data:image/png;base64,") == 1
    assert not re.search(r"https?://", page)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("class='test'") == 5 and "4 more test points" in page


def test_fastif_visualize_writes_pictures_and_an_offline_report(fastif_cli, outputs, tmp_path):
    first = fake_influence_run(tmp_path / "runs" / "first")
    second = fake_influence_run(tmp_path / "runs" / "second", n_tests=5, seed=2, prefix="u")
    result = fastif_cli("visualize", f"runs=[{first},{second}]", "report.graph_top=3", timeout=120)
    assert result.returncode == 0, result.stderr
    run = outputs / "visualize" / "demo" / "latest"
    for name in ("graph.png", "graph.svg", "histograms.png", "histograms.svg", "report.html"):
        assert (run / name).stat().st_size > 1000, name
    assert (run / "graph.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing to fetch
    assert not re.search(r"https?://", page)
    assert "14 test points" in page
    assert "14 test points in 3 groups" in result.stderr


def test_fastif_visualize_without_an_influence_run_says_what_to_do(fastif_cli):
    result = fastif_cli("visualize", timeout=60)
    assert result.returncode != 0
    message = " ".join(result.stderr.split())  # the CLI wraps its one-paragraph error
    assert "run 'fastif influence experiment=demo' first" in message and "Traceback" not in message


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    tables = vis.load_runs([fake_influence_run(tmp_path / "run")])
    layout = vis.layout_graph(tables.tests, vis.graph_edges(tables.influence, 3))
    images = {"graph": vis.figure_bytes(vis.draw_graph(layout), "png"),
              "histograms": vis.figure_bytes(vis.draw_histograms(tables.influence), "png")}
    report = tmp_path / "report.html"
    report.write_text(vis.html_report(tables, images, top_k=3, max_tests=10, title="render check"))
    shot = vis.screenshot(report, tmp_path / "shot.png", size=(1200, 900))
    spread, inked = vis.image_spread(shot)
    assert spread > 0.05 and inked > 0.03, (spread, inked)
    # A blank page gives neither (the measure can fail).
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    blank_spread, blank_inked = vis.image_spread(vis.screenshot(blank, tmp_path / "blank.png"))
    assert blank_spread < 0.01 and blank_inked < 0.001
