"""``bench stability``: the per-chapter runs, their summary, and the floors shared with the chapters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from minis import bench
from minis.bench import stability
from minis.cli import main
from minis.data import make_shapes

BOOK = Path(__file__).resolve().parents[1] / "book"


def test_summary_gives_mean_min_max_spread_and_a_verdict_for_the_asserted_metric():
    rows = [{"chapter": "fcos", "metric": "fcos box AP", "seed": seed, "threads": 2, "value": value, "train_s": 10.0,
             "headline": True} for seed, value in enumerate((0.70, 0.74, 0.72))]
    rows += [{"chapter": "fcos", "metric": "other", "seed": 0, "threads": 2, "value": 0.1, "train_s": 1.0,
              "headline": False}]
    fcos, other = bench.stability_summary(rows)
    assert fcos["runs"] == 3 and fcos["min"] == 0.70 and fcos["max"] == 0.74
    assert fcos["mean"] == pytest.approx(0.72) and fcos["spread"] == pytest.approx(0.04)
    assert fcos["train_s"] == 30.0 and fcos["floor"] == 0.65 and fcos["verdict"] == "ok"
    assert "verdict" not in other  # only the asserted metric is judged
    rows[0]["value"] = 0.60  # below the floor, and a spread of 0.14
    assert bench.stability_summary(rows)[0]["verdict"] == "spread > 0.05, min < floor"


@pytest.fixture(scope="module")
def tiny_roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("stability")
    for name in ("shapes", "shapes_semantic"):
        make_shapes(root / name, num_train=16, num_val=8, image_size=64, progress=False)
    return root


def test_runs_train_each_chapter_per_seed_and_thread_count(tiny_roots):
    rows = bench.bench_stability(["tasks_data_metrics", "fcos"], runs=[(0, 1), (1, 1), (0, 1)],
                                 shapes_root=str(tiny_roots / "shapes"), semantic_root=str(tiny_roots / "shapes_semantic"),
                                 overrides={"epochs": 1}, progress=False)
    assert [(r["chapter"], r["seed"]) for r in rows] == [("tasks_data_metrics", 0), ("tasks_data_metrics", 1),
                                                         ("tasks_data_metrics", 0), ("fcos", 0), ("fcos", 1), ("fcos", 0)]
    assert all(r["headline"] and 0.0 <= r["value"] <= 1.0 and r["train_s"] > 0 for r in rows)
    assert rows[0]["metric"] == "baseline_fcn mIoU" and rows[3]["metric"] == "fcos box AP"
    # the same seed and thread count trains the same model: the measured spread is the seed's and threads'
    assert rows[0]["value"] == rows[2]["value"] and rows[3]["value"] == rows[5]["value"]


def test_command_prints_every_run_and_the_summary(tiny_roots, tmp_path, capsys):
    out = tmp_path / "stability.json"
    status = main(["bench", "stability", "tasks_data_metrics", "--runs", "0@1", "1@1", "--epochs", "1",
                   "--shapes-root", str(tiny_roots / "shapes"), "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "every run" in printed and "per chapter" in printed and "baseline_fcn mIoU" in printed
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 2 and saved["summary"][0]["runs"] == 2 and "machine" in saved


@pytest.mark.parametrize("argv, message", [
    (["bench", "stability", "--runs", "0-2"], "SEED@THREADS"),
    (["bench", "stability", "--runs", "0@0"], "at least 1"),
    (["bench", "stability", "no_such_chapter"], "unknown chapter"),
])
def test_command_reports_mistakes_in_one_line(argv, message, capsys):
    try:
        status = main(argv)  # a mistake the suite finds: a one-line message and status 1
    except SystemExit as exit:  # a mistake argparse finds: its usage line and status 2
        status = exit.code
    assert status != 0
    captured = capsys.readouterr()
    assert message in captured.err + captured.out


def test_every_training_chapter_has_a_headline_and_asserts_its_floor():
    """The floors are written twice, as numbers a reader sees in the chapter's assert and here: they must agree."""
    for chapter, headline in stability.HEADLINES.items():
        (notebook,) = BOOK.glob(f"*/{chapter}.ipynb")
        code = "\n".join("".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"]
                         if cell["cell_type"] == "code")
        floors = [float(value) for value in re.findall(r"^assert .*>= ([0-9.]+)", code, flags=re.MULTILINE)]
        assert headline.floor in floors, f"{notebook.name} asserts no result >= {headline.floor} (found {floors})"
