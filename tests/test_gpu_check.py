"""``benchmarks/gpu_check.sh --smoke``: the GPU check's three steps, tiny, on the CPU (so the script cannot rot),
and the real-data subset that ``benchmarks/gpu_bundle.py`` carries to the GPU machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_prints_the_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "figures.json"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = lines.index("| step | figure | value |")  # (detectron2 logs tables of its own before)
    table = lines[start:start + 8]
    assert table[1] == "|---|---|---:|" and all(line.startswith("| ") for line in table[2:])
    assert [line.split(" | ")[0] for line in table[2:]] == ["| paper train"] * 2 + ["| paper TTA"] * 2 + [
        "| r50 from scratch"] * 2
    figures = json.loads(out.read_text())
    assert figures["paper_train"]["iters"] == 3 and figures["paper_train"]["s_per_iter"] > 0
    assert figures["paper_train"]["amp"] is False  # CPU: AMP off
    assert figures["tta"]["passes"] == 4 and figures["tta"]["images"] == 1
    assert figures["tta"]["detections_per_img"] == 50  # score threshold 0: every detection slot filled
    assert figures["r50"]["iters"] == 3 and figures["r50"]["untrained_mAP"] == 0.0


def test_gpu_check_without_cuda_or_bundle_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr or "has no train.csv" in proc.stderr


@pytest.mark.realdata
def test_gpu_bundle_data_subset(real_data, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_bundle
    finally:
        sys.path.pop(0)
    from cellkit import data

    ids = gpu_bundle.write_data_subset(real_data / "sartorius", tmp_path / "sub", per_type=2)
    table = data.read_train_csv(tmp_path / "sub" / "train.csv")
    full = data.read_train_csv(real_data / "sartorius" / "train.csv")
    assert sorted(set(table["id"])) == sorted(ids) and len(ids) == 6
    assert table.groupby("id").size().max() == full.groupby("id").size().max()  # the densest image is in
    assert sorted(table.drop_duplicates("id")["cell_type"].value_counts().tolist()) == [2, 2, 2]
    for image_id in ids:  # every row of those images, and their files
        assert (full["id"] == image_id).sum() == (table["id"] == image_id).sum()
        assert data.find_image(tmp_path / "sub" / "train", image_id).is_file()
