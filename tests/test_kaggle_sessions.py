"""The finetune notebook across Kaggle sessions: it stops cleanly when ``TIME_BUDGET_MINUTES`` are spent, and the
next session, given the first one's output (``RESUME_DIR``; on Kaggle found among the inputs), continues from it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def papermill(out: Path, **params) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "04_finetune.ipynb"), str(out)]
    for name, value in params.items():
        args += ["-p", name, str(value)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def printed(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_time_budget_stops_and_the_next_session_resumes(tmp_path):
    data = tmp_path / "data"
    made = subprocess.run([sys.executable, "-m", "cellkit", "synth", str(data), "--images", "6", "--test-images", "1",
                           "--seed", "5"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    first, second = tmp_path / "session1", tmp_path / "session2"
    common = dict(DATA_DIR=data, PRESET="demo", FOLDS="0", K=2, DEVICE="cpu")

    # Session 1: far more iterations than 0.4 minutes allow: training stops at the budget, no OOF for the fold.
    papermill(tmp_path / "s1.ipynb", OUT_DIR=first, ITERATIONS=100000, TIME_BUDGET_MINUTES=0.4, **common)
    log = printed(tmp_path / "s1.ipynb")
    assert "time budget spent during fold 0: it resumes in the next session" in log
    run = first / "fold0"
    checkpoint = (run / "last_checkpoint").read_text().strip()
    assert (run / checkpoint).is_file() and not (first / "oof").exists()
    assert re.search(r"time budget of 0\.\d min reached", (run / "log.txt").read_text())  # the trainer's clean stop
    assert {p.name for p in run.glob("model_*.pth")} <= {checkpoint, "model_best.pth", "model_final.pth"}

    # Session 2: a fresh output dir with session 1's output attached and 2 iterations in all: it resumes from
    # session 1's checkpoint, finishes the fold and predicts it.
    papermill(tmp_path / "s2.ipynb", OUT_DIR=second, ITERATIONS=2, RESUME_DIR=first, **common)
    log = printed(tmp_path / "s2.ipynb")
    assert f"resuming fold0 from {run}" in log
    assert (second / "folds.csv").read_text() == (first / "folds.csv").read_text()
    assert (second / "fold0" / checkpoint).is_file()
    assert (second / "oof" / "meta.json").is_file()                           # the finished fold's OOF predictions
