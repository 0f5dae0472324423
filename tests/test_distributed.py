"""Distributed training and evaluation on CPU: 2 processes (gloo) through detectron2's ``launch``.

What Kaggle's "T4 x2" runs with ``--num-gpus 2``, exercised here without a GPU: DDP over CPU processes, the sharded
validation loader, and the evaluator's ``all_gather`` of per-image results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("detectron2")
cv2 = pytest.importorskip("cv2")

from cellkit import CELL_TYPES, rle  # noqa: E402

SIZE = 96
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0", "CELLKIT.DATA.NUM_FOLDS", "2", "CELLKIT.LOG_PERIOD", "1",
    "TEST.DETECTIONS_PER_IMAGE", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "3",
    "CELLKIT.EVAL.SCORE_THRESHOLD", "0.0",
]


def _write_data(root: Path, n_images: int = 6) -> Path:
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        img = rng.normal(60, 8, (SIZE, SIZE)).clip(0, 255).astype(np.uint8)
        for _ in range(3):
            m = np.zeros((SIZE, SIZE), np.uint8)
            cv2.ellipse(m, (int(rng.integers(15, SIZE - 15)), int(rng.integers(15, SIZE - 15))),
                        (int(rng.integers(5, 10)), int(rng.integers(3, 7))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
            img[m > 0] = 180
            rows.append({"id": f"im{i}", "annotation": rle.encode(m.astype(bool)), "width": SIZE, "height": SIZE,
                         "cell_type": CELL_TYPES[i % 3]})
        cv2.imwrite(str(root / "train" / f"im{i}.png"), img)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_process_cpu_training_gathers_the_single_process_evaluation(tmp_path):
    data = _write_data(tmp_path / "data")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cellkit", "train", "--config", "demo", "--data", str(data),
                           "--fold", "0", "--out", str(out), "--num-gpus", "2", *TINY],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 CPU processes (gloo)" in proc.stderr
    assert (out / "model_final.pth").is_file()
    evals = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if "cellkit/mAP" in line]
    gathered = {k.split("/", 1)[1]: v for k, v in evals[-1].items() if k.startswith("cellkit/")}

    # the same final model evaluated by one process on the same validation fold
    from detectron2.data import DatasetCatalog

    from cellkit.config import load_run_config
    from cellkit.modeling import load_model
    from cellkit.train import CellkitTrainer, VAL_NAME, check_data, register_datasets

    cfg = load_run_config(out)
    cfg.MODEL.DEVICE = "cpu"
    register_datasets(cfg, check_data(cfg))
    n_val = len(DatasetCatalog.get(VAL_NAME))
    model = load_model(cfg, out / "model_final.pth")
    single = CellkitTrainer.test(cfg, model)["cellkit"]
    assert gathered["n_images"] == single["n_images"] == n_val == 3
    assert gathered.keys() == single.keys()
    for key, value in single.items():
        assert gathered[key] == pytest.approx(value, abs=1e-9), key


# ----------------------------------------------------------------------------------- evaluator, 2 processes
def _fake_outputs(record: dict, keep: int):
    """Instances predicting the first ``keep`` true masks of a record exactly, plus one spurious mask."""
    from detectron2.structures import Instances

    h, w = int(record["height"]), int(record["width"])
    masks = [rle.decode(rle.from_coco(a["segmentation"]), (h, w)) for a in record["annotations"][:keep]]
    spurious = np.zeros((h, w), bool)
    spurious[:4, :4] = True
    masks.append(spurious)
    inst = Instances((h, w))
    inst.pred_masks = torch.from_numpy(np.stack(masks))
    inst.scores = torch.linspace(0.9, 0.6, len(masks))
    inst.pred_classes = torch.full((len(masks),), CELL_TYPES.index(record["cell_type"]), dtype=torch.int64)
    return {"instances": inst}


def _evaluate_shard(csv_path: str, image_dir: str, result_path: str) -> None:
    """One rank: evaluate its share of the images (rank r takes images r, r + world, ...), gather, write."""
    from detectron2.utils import comm

    from cellkit import data
    from cellkit.evaluation import CellkitEvaluator

    data.register_sartorius("dist_eval", csv_path, image_dir)
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get("dist_eval")
    evaluator = CellkitEvaluator("dist_eval", score_threshold=0.5, distributed=comm.get_world_size() > 1)
    evaluator.reset()
    for i, record in enumerate(records):
        if i % comm.get_world_size() == comm.get_rank():
            evaluator.process([{"image_id": record["image_id"]}], [_fake_outputs(record, keep=i % 4)])
    result = evaluator.evaluate()["cellkit"]
    if comm.is_main_process():
        Path(result_path).write_text(json.dumps(result))


def test_evaluator_gathers_per_image_results_across_two_processes(tmp_path):
    from detectron2.engine import launch

    data = _write_data(tmp_path / "data", n_images=7)
    csv_path, image_dir = str(data / "train.csv"), str(data / "train")
    launch(_evaluate_shard, 2, dist_url="auto", args=(csv_path, image_dir, str(tmp_path / "two.json")))
    _evaluate_shard(csv_path, image_dir, str(tmp_path / "one.json"))
    two, one = json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert one["n_images"] == two["n_images"] == 7
    assert 0.1 < one["mAP"] < 0.9  # partial predictions: a non-trivial score
    assert two == pytest.approx(one, abs=1e-12)
