"""`fastif visualize`: pictures of one or more influence runs in one offline report.

Reads ``influence.parquet`` and ``tests.parquet`` of each run in ``runs`` (default: the latest
complete ``fastif influence`` run of the experiment) and writes the influence-interaction graph
(``graph.png``, ``graph.svg``), histograms of influence per test group (``histograms.png``,
``histograms.svg``) and ``report.html``: both pictures embedded, plus per-test-point top-k lists
with texts; it needs nothing but a browser (no network, no external files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from fastif.commands import ExperimentSettings
from fastif.config import _check
from fastif.runs import Run


@dataclass
class ReportConfig:
    graph_top: int = field(default=10, metadata={"help": "Edges per test point and direction in the graph (its top-k helpful and harmful training points)."})
    list_top: int = field(default=5, metadata={"help": "Training examples listed per test point and direction in report.html."})
    max_tests: int = field(default=100, metadata={"help": "Test points listed in report.html (0 = all); the pictures always show all."})
    bins: int = field(default=30, metadata={"help": "Bins of the influence histograms."})
    seed: int = field(default=0, metadata={"help": "Seed of the jitter that separates training points at the same place in the graph."})

    def __post_init__(self) -> None:
        _check(self.graph_top >= 1, "report.graph_top", f"got {self.graph_top}, need >= 1", "e.g. report.graph_top=10")
        _check(self.list_top >= 1, "report.list_top", f"got {self.list_top}, need >= 1", "e.g. report.list_top=5")
        _check(self.max_tests >= 0, "report.max_tests", f"got {self.max_tests}, need >= 0", "e.g. report.max_tests=100 (0 = all)")
        _check(self.bins >= 1, "report.bins", f"got {self.bins}, need >= 1", "e.g. report.bins=30")


@dataclass
class VisualizeSettings(ExperimentSettings):
    """Settings of `fastif visualize`."""

    runs: List[str] = field(default_factory=list, metadata={"help": "Influence run folders to draw together; empty = the latest complete `fastif influence` run of the experiment."})
    report: ReportConfig = field(default_factory=ReportConfig, metadata={"help": "What the pictures and the report show."})


SCHEMA = VisualizeSettings


def run_folders(settings: VisualizeSettings) -> List[Path]:
    from fastif.errors import InputError
    from fastif.runs import latest_complete

    if settings.runs:
        return [Path(r).expanduser() for r in settings.runs]
    outputs = Path(settings.paths.outputs)
    latest = latest_complete(outputs, "influence", settings.experiment_name)
    if latest is None:
        raise InputError(f"No complete influence run of experiment '{settings.experiment_name}' under {outputs / 'influence'}. "
                         f"Fix: run 'fastif influence experiment={settings.experiment_name}' first, or set runs=[<run folder>].")
    return [latest]


def execute(settings: VisualizeSettings, run: Run) -> None:
    from fastif import visualize as vis
    from fastif.runs import atomic_write_bytes

    folders = run_folders(settings)
    for folder in folders:
        for name in ("influence.parquet", "tests.parquet"):
            if (folder / name).is_file():
                run.record_input(folder / name, f"influence_run:{name}")
    tables = vis.load_runs(folders)
    report = settings.report
    layout = vis.layout_graph(tables.tests, vis.graph_edges(tables.influence, report.graph_top), seed=report.seed)
    graph = vis.draw_graph(layout, title=f"Influence interactions ({settings.experiment_name}; top {report.graph_top} per direction)")
    histograms = vis.draw_histograms(tables.influence, bins=report.bins)
    images = {}
    for name, figure, caption in (("graph", graph, "Influence-interaction graph"), ("histograms", histograms, "Influence per test group")):
        png = vis.figure_bytes(figure, "png")
        run.write_text(f"{name}.svg", vis.figure_bytes(figure, "svg").decode("utf-8"))
        atomic_write_bytes(run.dir / f"{name}.png", png)
        images[caption] = png
    page = vis.html_report(tables, images, top_k=report.list_top, max_tests=report.max_tests,
                           title=f"FastIF influence report: {settings.experiment_name}")
    run.write_text("report.html", page)
    run.log.info("%d run(s), %d test points in %d groups, %d training points drawn", len(folders), len(tables.tests),
                 tables.tests["test_group"].nunique(), len(layout.train_keys))
    run.log.info("report: %s", run.dir / "report.html")
