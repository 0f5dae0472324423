"""cellkit.train / ``cellkit train``: mapper, tiny train + checkpoint + resume, evaluator, errors before work."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("detectron2")
cv2 = pytest.importorskip("cv2")

from cellkit import CELL_TYPES, rle  # noqa: E402
from cellkit.cli import main  # noqa: E402
from cellkit.config import get_preset_cfg, resolve_runtime  # noqa: E402
from cellkit import train as ck_train  # noqa: E402

SIZE = 128
# A model small and fast enough for a few CPU iterations on 128x128 images.
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "1", "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0", "CELLKIT.DATA.NUM_FOLDS", "2", "CELLKIT.LOG_PERIOD", "1",
    "TEST.DETECTIONS_PER_IMAGE", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
]


def _tiny_image(rng, cell_type):
    """A 128x128 grayscale image with a few bright, non-overlapping ellipses, and their masks."""
    img = rng.normal(60, 8, (SIZE, SIZE)).clip(0, 255).astype(np.uint8)
    masks, taken = [], np.zeros((SIZE, SIZE), bool)
    while len(masks) < 4:
        m = np.zeros((SIZE, SIZE), np.uint8)
        c = (int(rng.integers(15, SIZE - 15)), int(rng.integers(15, SIZE - 15)))
        axes = (int(rng.integers(5, 12)), int(rng.integers(3, 8)))
        cv2.ellipse(m, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        m = m.astype(bool)
        if (m & taken).any():
            continue
        masks.append(m)
        taken |= m
        img[m] = 180
    return img, masks


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        cell_type = CELL_TYPES[i % 3]
        img, masks = _tiny_image(rng, cell_type)
        image_id = f"img{i:03d}"
        cv2.imwrite(str(root / "train" / f"{image_id}.png"), img)
        rows += [{"id": image_id, "annotation": rle.encode(m), "width": SIZE, "height": SIZE,
                  "cell_type": cell_type} for m in masks]
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def _train(data, out, *extra, fold="0"):
    return main(["train", "--config", "demo", "--data", str(data), "--fold", fold, "--out", str(out), *extra,
                 *TINY])


# ------------------------------------------------------------------------------------------------ mapper
def _random_masks(rng, h, w, n):
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        x1, y1 = rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1)
        masks[i, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > 0.3
    return masks


def test_transform_annotation_masks_matches_per_mask_transforms():
    from detectron2.data import transforms as T

    from cellkit.gtmasks import transform_annotation_masks

    rng = np.random.default_rng(1)
    h, w, n = 40, 50, 37
    masks = _random_masks(rng, h, w, n)
    masks[5] = False  # an empty annotation stays empty
    segms = [rle.to_coco(rle.encode(m), (h, w)) for m in masks]
    for tfms in ([T.HFlipTransform(w), T.VFlipTransform(h)], [T.RotationTransform(h, w, 8.5, expand=False)],
                 [T.ResizeTransform(h, w, 31, 39)],
                 [T.VFlipTransform(h), T.RotationTransform(h, w, -9, expand=False), T.ResizeTransform(h, w, 83, 104)]):
        tl = T.TransformList(tfms)
        ref = np.stack([tl.apply_segmentation(m.astype(np.uint8)) for m in masks]).astype(bool)
        got = transform_annotation_masks(segms, h, w, tl)
        assert got.image_size == ref.shape[1:] and len(got) == n
        np.testing.assert_array_equal(got.to_full().numpy(), ref)
        np.testing.assert_array_equal(got.nonempty().numpy(), ref.any(axis=(1, 2)))
        # crops, not full planes: the buffer is smaller than one full plane per mask
        assert got.data.numel() < n * ref.shape[1] * ref.shape[2] // 2
    empty = transform_annotation_masks([], h, w, T.TransformList([T.ResizeTransform(h, w, 20, 25)]))
    assert len(empty) == 0 and empty.image_size == (20, 25)


def test_crop_masks_boxes_and_indexing():
    from cellkit.gtmasks import CropMasks

    m = np.zeros((3, 10, 12), bool)
    m[0, 2:5, 3:9] = True
    m[2, 9, 11] = True
    cm = CropMasks.from_full_masks(m)
    np.testing.assert_array_equal(cm.get_bounding_boxes().tensor.numpy(), [[3, 2, 9, 5], [0, 0, 0, 0], [11, 9, 12, 10]])
    np.testing.assert_array_equal(cm.nonempty().numpy(), [True, False, True])
    np.testing.assert_array_equal(cm.area().numpy(), [18, 0, 1])
    np.testing.assert_array_equal(cm[torch.tensor([2, 0, 2])].to_full().numpy(), m[[2, 0, 2]])
    np.testing.assert_array_equal(cm[torch.tensor([True, False, True])].to_full().numpy(), m[[0, 2]])
    np.testing.assert_array_equal(cm[1:].to_full().numpy(), m[1:])
    assert len(cm[0]) == 1 and cm.to("cpu").device.type == "cpu"


def test_crop_masks_targets_match_bitmasks():
    """The mask head's targets from crops equal detectron2's BitMasks.crop_and_resize on the full masks (up to
    samples that land on 0.5 within float rounding: the crop frame shifts the box by whole pixels)."""
    from detectron2.structures import BitMasks

    from cellkit.gtmasks import CropMasks

    rng = np.random.default_rng(0)
    h, w = 60, 80
    total = mismatched = 0
    for _ in range(60):
        n = int(rng.integers(1, 8))
        masks = _random_masks(rng, h, w, n)
        idx = torch.from_numpy(rng.integers(0, n, size=12))  # proposals matched to cells, with repeats
        boxes = []
        for j in range(12):
            x0, x1 = sorted(rng.uniform(0, w, 2))
            y0, y1 = sorted(rng.uniform(0, h, 2))
            boxes.append([0.0, 0.0, float(w), float(h)] if j % 4 == 0 else [x0, y0, x1, y1])  # some at the edges
        boxes = torch.tensor(boxes, dtype=torch.float32)
        ref = BitMasks(torch.from_numpy(masks))[idx].crop_and_resize(boxes, 28)
        got = CropMasks.from_full_masks(masks)[idx].crop_and_resize(boxes, 28)
        assert got.dtype == torch.bool and got.shape == ref.shape
        total += ref.numel()
        mismatched += int((ref != got).sum())
    assert mismatched / total < 1e-4, (mismatched, total)


def _mapper_cfg(*extra):
    cfg = get_preset_cfg("demo", list(extra))
    resolve_runtime(cfg, has_cuda=False)
    return cfg


def test_mapper_output_augmented_size(tiny_data):
    from cellkit.data import load_sartorius_dicts

    cfg = _mapper_cfg("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "100", "CELLKIT.AUG.ROTATION_PROB",
                      "1.0", "CELLKIT.AUG.BRIGHTNESS_PROB", "1.0", "CELLKIT.AUG.HFLIP_PROB", "1.0")
    mapper = ck_train.CellkitDatasetMapper(cfg, is_train=True)
    names = [type(a).__name__ for a in mapper.augmentations.augs]
    assert names == ["RandomFlip", "RandomFlip", "RandomApply", "RandomApply", "ResizeShortestEdge"]
    record = load_sartorius_dicts(tiny_data / "train.csv", tiny_data / "train")[0]
    out = mapper(record)
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, 64, 64)
    inst = out["instances"]
    assert inst.image_size == (64, 64)
    assert 0 < len(inst) <= len(record["annotations"])
    masks = inst.gt_masks.to_full()
    assert masks.dtype == torch.bool and tuple(masks.shape[1:]) == (64, 64) and masks.flatten(1).any(1).all()
    ys, xs = masks.any(2), masks.any(1)
    tight = [[int(x.nonzero().min()), int(y.nonzero().min()), int(x.nonzero().max()) + 1, int(y.nonzero().max()) + 1]
             for x, y in zip(xs, ys)]
    np.testing.assert_array_equal(inst.gt_boxes.tensor.numpy(), tight)
    assert set(inst.gt_classes.tolist()) <= {0, 1, 2}


def test_mapper_flips_are_exact(tiny_data):
    from cellkit.data import load_sartorius_dicts

    cfg = _mapper_cfg("INPUT.MIN_SIZE_TRAIN", f"({SIZE},)", "INPUT.MAX_SIZE_TRAIN", str(SIZE),
                      "CELLKIT.AUG.HFLIP_PROB", "1.0", "CELLKIT.AUG.VFLIP_PROB", "1.0", "CELLKIT.AUG.ROTATION", "0",
                      "CELLKIT.AUG.BRIGHTNESS", "0")
    mapper = ck_train.CellkitDatasetMapper(cfg, is_train=True)
    record = load_sartorius_dicts(tiny_data / "train.csv", tiny_data / "train")[1]
    out = mapper(record)
    truth = np.stack([rle.decode(rle.from_coco(a["segmentation"]), (SIZE, SIZE)) for a in record["annotations"]])
    np.testing.assert_array_equal(out["instances"].gt_masks.to_full().numpy(), truth[:, ::-1, ::-1])
    image = cv2.imread(record["file_name"], cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(out["image"][0].numpy(), image[::-1, ::-1])


def test_mapper_keeps_polygons_as_polygons(tiny_data):
    """LIVECell-style polygon annotations stay polygons (rasterised per proposal), boxes clipped to the image."""
    from detectron2.structures import BoxMode, PolygonMasks

    cfg = _mapper_cfg("INPUT.MIN_SIZE_TRAIN", f"({SIZE},)", "INPUT.MAX_SIZE_TRAIN", str(SIZE),
                      "CELLKIT.AUG.HFLIP_PROB", "1.0", "CELLKIT.AUG.VFLIP_PROB", "0", "CELLKIT.AUG.ROTATION", "0")
    mapper = ck_train.CellkitDatasetMapper(cfg, is_train=True)
    squares = [[10.0, 10.0, 30.0, 10.0, 30.0, 20.0, 10.0, 20.0], [100.0, 90.0, 140.0, 90.0, 140.0, 120.0, 100.0, 120.0]]
    record = {"file_name": str(tiny_data / "train" / "img000.png"), "image_id": "img000", "height": SIZE,
              "width": SIZE, "annotations": [{"bbox": [0, 0, 1, 1], "bbox_mode": BoxMode.XYXY_ABS, "segmentation": [p],
                                              "category_id": 1, "iscrowd": 0} for p in squares]}
    inst = mapper(record)["instances"]
    assert isinstance(inst.gt_masks, PolygonMasks) and len(inst) == 2
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), [[SIZE - 30, 10, SIZE - 10, 20], [0, 90, SIZE - 100, 120]])


# ------------------------------------------------------------------------------------------------ training
def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.json").read_text().splitlines() if line.strip()]


def _checkpoint_iteration(path):
    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


@pytest.mark.slow
def test_train_checkpoint_interrupt_resume(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_run_step = ck_train.CellkitTrainer.run_step

    def crash_at_2(self):
        if self.iter == 2:
            raise RuntimeError("simulated crash")
        return real_run_step(self)

    monkeypatch.setattr(ck_train.CellkitTrainer, "run_step", crash_at_2)
    args = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2", "SOLVER.STEPS", "(3,)"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tiny_data, out, *args)
    assert (out / "config.yaml").is_file() and (out / "folds.csv").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert (out / "model_best.pth").is_file()  # evaluated after iteration 2 (index 1)
    assert not (out / "model_final.pth").exists()
    first = _metrics(out)
    assert max(m["iteration"] for m in first) == 1 and "cellkit/mAP" in first[-1]

    monkeypatch.setattr(ck_train.CellkitTrainer, "run_step", real_run_step)
    assert _train(tiny_data, out, "--resume") == 0
    assert _checkpoint_iteration(out / "model_final.pth") == 3
    after = _metrics(out)
    resumed = [m for m in after[len(first):] if "lr" in m]
    assert [m["iteration"] for m in resumed] == [2, 3]  # continued, not restarted
    # same schedule as an uninterrupted run: warmup over, LR x0.1 from iteration 3
    cfg = get_preset_cfg("demo", TINY)
    base = cfg.SOLVER.BASE_LR
    assert resumed[0]["lr"] == pytest.approx(base) and resumed[1]["lr"] == pytest.approx(base * cfg.SOLVER.GAMMA)
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    hook_states = state["trainer"]["hooks"]
    assert hook_states["CellkitBestCheckpointer"]["best_iter"] == 1
    assert "cellkit/mAP" in after[-1] and 0.0 <= after[-1]["cellkit/mAP"] <= 1.0
    # finished: resuming again does nothing and says so
    assert _train(tiny_data, out, "--resume") == 0
    assert _checkpoint_iteration(out / "model_final.pth") == 3
    # a finished run is not overwritten without --resume
    assert _train(tiny_data, out) == 2


@pytest.mark.slow
def test_early_stopping_stops_and_stays_stopped(tiny_data, tmp_path, capsys):
    out = tmp_path / "es"
    args = ["SOLVER.MAX_ITER", "20", "TEST.EVAL_PERIOD", "1", "CELLKIT.EARLY_STOP_PATIENCE", "1",
            "CELLKIT.EARLY_STOP_MIN_DELTA", "2.0", "SOLVER.CHECKPOINT_PERIOD", "100"]
    assert _train(tiny_data, out, *args) == 0  # min_delta 2 > any mAP gain: stops at the second evaluation
    assert _checkpoint_iteration(out / "model_final.pth") == 1
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["trainer"]["hooks"]["EarlyStopping"]
    assert state["stopped_at"] == 1 and state["bad_evals"] == 1
    assert _train(tiny_data, out, "--resume") == 0
    assert _checkpoint_iteration(out / "model_final.pth") == 1
    assert max(m["iteration"] for m in _metrics(out)) == 1


def test_best_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished or best checkpoint"):
        ck_train.best_weights(tmp_path)
    (tmp_path / "model_0000009.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    (tmp_path / "FAILED").write_text("training failed at iteration 12: RuntimeError: boom\n")
    # a periodic checkpoint alone is for --resume: refused, naming it and why the run failed
    with pytest.raises(FileNotFoundError, match=r"failed \(FAILED: training failed at iteration 12.*model_0000009"):
        ck_train.best_weights(tmp_path)
    (tmp_path / "model_final.pth").write_bytes(b"x")
    assert ck_train.best_weights(tmp_path).name == "model_final.pth"
    (tmp_path / "model_best.pth").write_bytes(b"x")
    assert ck_train.best_weights(tmp_path).name == "model_best.pth"


# ------------------------------------------------------------------------------------------------ evaluator
def test_evaluator_scores_perfect_and_empty(tiny_data):
    from detectron2.structures import Boxes, Instances

    from cellkit.data import register_sartorius
    from cellkit.evaluation import CellkitEvaluator

    register_sartorius("cellkit_test_eval", tiny_data / "train.csv", tiny_data / "train")
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get("cellkit_test_eval")
    ev = CellkitEvaluator("cellkit_test_eval", distributed=False)
    ev.reset()
    for k, record in enumerate(records[:3]):
        truth = np.stack([rle.decode(rle.from_coco(a["segmentation"]), (SIZE, SIZE)) for a in record["annotations"]])
        inst = Instances((SIZE, SIZE))
        n = len(truth) if k < 2 else 0
        inst.pred_masks = torch.from_numpy(truth[:n])
        inst.scores = torch.linspace(0.99, 0.9, n) if n else torch.zeros(0)
        inst.pred_classes = torch.full((n,), CELL_TYPES.index(record["cell_type"]), dtype=torch.int64)
        inst.pred_boxes = Boxes(torch.zeros(n, 4))
        ev.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    res = ev.evaluate()["cellkit"]
    assert res["n_images"] == 3
    assert res["mAP"] == pytest.approx(2 / 3) and res["mAP_cort"] == 0.0  # 2 perfect images, 1 without detections
    assert res["mAP_shsy5y"] == 1.0 and res["mAP_astro"] == 1.0 and res["AP50"] == pytest.approx(2 / 3)
    ev.reset()
    record = records[0]
    truth = np.stack([rle.decode(rle.from_coco(a["segmentation"]), (SIZE, SIZE)) for a in record["annotations"]])
    inst = Instances((SIZE, SIZE))
    inst.pred_masks = torch.from_numpy(np.concatenate([truth, truth[:1]]))  # a lower-scored duplicate...
    inst.scores = torch.tensor([0.9] * len(truth) + [0.8])
    inst.pred_classes = torch.zeros(len(truth) + 1, dtype=torch.int64)
    inst.pred_boxes = Boxes(torch.zeros(len(truth) + 1, 4))
    ev.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    assert ev.evaluate()["cellkit"]["mAP"] == 1.0  # ...loses all its pixels to the overlap removal


def test_validation_map_equals_score_of_the_submission_from_its_store(tiny_data, tmp_path):
    """One post-processing path: the mAP (and kept-mask count) that validation logs for a run equals `cellkit score`
    of the submission `cellkit submit` makes from its `cellkit predict` store, at the evaluator's thresholds."""
    import json

    from cellkit import predictions
    from cellkit.rundir import metric_records

    run = tmp_path / "run"
    assert _train(tiny_data, run, "SOLVER.MAX_ITER", "3", "SEED", "0", "CELLKIT.EVAL.SCORE_THRESHOLD", "0.1") == 0
    logged = [m for m in metric_records(run) if "cellkit/mAP" in m][-1]
    store, sub = tmp_path / "oof", tmp_path / "submission.csv"
    assert main(["predict", "--run", str(run), "--weights", str(run / "model_final.pth"), "--fold", "0",
                 "--data", str(tiny_data), "--out", str(store), "--no-progress"]) == 0
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"thresholds": {c: {"score": 0.1, "mask": 0.5, "min_area": 0}
                                                     for c in CELL_TYPES}}))
    val_ids = predictions.image_ids(store)
    images = tmp_path / "val_images"
    images.mkdir()
    for image_id in val_ids:
        (images / f"{image_id}.png").write_bytes((tiny_data / "train" / f"{image_id}.png").read_bytes())
    assert main(["submit", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(sub)]) == 0
    truth = pd.read_csv(tiny_data / "train.csv")
    truth[truth["id"].isin(val_ids)].to_csv(tmp_path / "truth.csv", index=False)
    scored = json.loads(_score_json(tmp_path / "truth.csv", sub))
    submitted = pd.read_csv(sub, keep_default_na=False)
    assert logged["cellkit/n_images"] == scored["n_images"] == len(val_ids) == 3
    assert logged["cellkit/n_masks"] == int((submitted["predicted"] != "").sum()) > 0
    assert logged["cellkit/mAP"] == pytest.approx(scored["mAP"], abs=1e-12)


def _score_json(truth, sub) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["score", "--truth", str(truth), "--pred", str(sub), "--json"]) == 0
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ errors
def _err(capsys):
    return capsys.readouterr().err


def test_missing_weights_error_before_work(tiny_data, tmp_path, capsys):
    out = tmp_path / "o"
    assert _train(tiny_data, out, "--weights", str(tmp_path / "nope.pth")) == 2
    assert "nope.pth does not exist" in _err(capsys)
    assert not out.exists()
    assert _train(tiny_data, out, "--weights", "detectron2://ImageNetPretrained/MSRA/R-50.pkl") == 2
    assert "never downloads" in _err(capsys)


def test_unknown_preset_and_key(tiny_data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--config", "nope", "--data", str(tiny_data), "--out", str(out)]) == 2
    assert "unknown preset 'nope'" in _err(capsys)
    assert _train(tiny_data, out, "SOLVER.NOPE", "1") == 2
    assert "unknown config key 'SOLVER.NOPE'" in _err(capsys)
    assert not out.exists()


def test_bad_data_dirs(tiny_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(empty, tmp_path / "o1") == 2
    assert "has no train.csv" in _err(capsys)
    no_images = tmp_path / "noimg"
    no_images.mkdir()
    (no_images / "train.csv").write_text((tiny_data / "train.csv").read_text())
    (no_images / "train").mkdir()
    assert _train(no_images, tmp_path / "o2") == 2
    err = _err(capsys)
    assert "the data check found 6 problem(s)" in err  # every missing image listed at once, with its CSV line
    assert "line 2 (id img000)" in err and "line 22 (id img005)" in err and "no image for id 'img005'" in err
    assert _train(tiny_data, tmp_path / "o3", fold="7") == 2
    assert "fold 7 has no images" in _err(capsys)
    assert not (tmp_path / "o3" / "folds.csv").exists()
    folds = tmp_path / "folds.csv"
    pd.DataFrame({"id": [f"img{i:03d}" for i in range(6)], "cell_type": [CELL_TYPES[i % 3] for i in range(6)],
                  "fold": [0, 0, 0, 1, 1, 1]}).to_csv(folds, index=False)
    assert _train(tiny_data, tmp_path / "o4", "--folds", str(folds), fold="3") == 2
    assert "fold 3" in _err(capsys)


# ------------------------------------------------------------------------------------------------ exclusion
def _excluding_cfg(data, out, *extra):
    cfg = get_preset_cfg("demo", TINY + ["CELLKIT.DATA.ROOT", str(data), *extra])
    cfg.OUTPUT_DIR = str(out)
    return cfg


def _registered_ids(name):
    from detectron2.data import DatasetCatalog

    return [r["image_id"] for r in DatasetCatalog.get(name)]


def test_exclude_drops_images_from_the_training_split_only(tiny_data, tmp_path):
    """No training: the config, the data check and the registration, then the registered dataset dicts."""
    from detectron2.data import MetadataCatalog

    folds = tmp_path / "folds.csv"
    pd.DataFrame({"id": [f"img{i:03d}" for i in range(6)], "cell_type": [CELL_TYPES[i % 3] for i in range(6)],
                  "fold": [0, 0, 0, 1, 1, 1]}).to_csv(folds, index=False)
    listed = tmp_path / "exclude.txt"
    listed.write_text("# flagged by the audit\nimg001\nimg004  # in the validation fold\n")
    cfg = _excluding_cfg(tiny_data, tmp_path / "run", "CELLKIT.DATA.FOLDS_CSV", str(folds), "CELLKIT.DATA.FOLD", "1",
                         "CELLKIT.DATA.EXCLUDE", str(listed))
    cfg, specs = ck_train.prepare_config(cfg, has_cuda=False)
    ck_train.register_datasets(cfg, specs)
    assert _registered_ids(ck_train.TRAIN_NAME) == ["img000", "img002"]
    assert _registered_ids(ck_train.VAL_NAME) == ["img003", "img004", "img005"]  # validation keeps every image
    meta = MetadataCatalog.get(ck_train.TRAIN_NAME)
    assert meta.excluded == ("img001",) and meta.image_ids == ("img000", "img002")
    record = (tmp_path / "run" / "excluded_ids.txt").read_text().splitlines()
    assert record[1:] == ["img001", "img004"] and "1 dropped from training, 1 in the validation fold" in record[0]
    # without the key nothing is excluded
    cfg, specs = ck_train.prepare_config(_excluding_cfg(tiny_data, tmp_path / "run2", "CELLKIT.DATA.FOLDS_CSV",
                                                        str(folds), "CELLKIT.DATA.FOLD", "1"), has_cuda=False)
    ck_train.register_datasets(cfg, specs)
    assert _registered_ids(ck_train.TRAIN_NAME) == ["img000", "img001", "img002"]


def test_exclude_top_of_an_audit_csv(tiny_data, tmp_path):
    audit_csv = tmp_path / "audit.csv"
    pd.DataFrame({"id": ["img005", "img002", "img000"], "cell_type": ["cort", "cort", "shsy5y"],
                  "score": [0.4, 0.3, 0.0]}).to_csv(audit_csv, index=False)
    cfg = _excluding_cfg(tiny_data, tmp_path / "run", "CELLKIT.DATA.FOLD", "-1", "CELLKIT.DATA.EXCLUDE",
                         str(audit_csv), "CELLKIT.DATA.EXCLUDE_TOP", "2")
    cfg, specs = ck_train.prepare_config(cfg, has_cuda=False)
    ck_train.register_datasets(cfg, specs)
    assert _registered_ids(ck_train.TRAIN_NAME) == ["img000", "img001", "img003", "img004"]


def test_exclude_errors_name_the_file_before_work(tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("img001\nnot_an_image\n")
    out = tmp_path / "o"
    assert _train(tiny_data, out, "--exclude", str(bad)) == 2
    err = _err(capsys)
    assert f"{bad}: 1 excluded id(s) are not in the train CSV, e.g. 'not_an_image'" in err
    assert not (out / "last_checkpoint").exists() and not (out / "config.yaml").exists()
    audit_csv = tmp_path / "audit.csv"
    pd.DataFrame({"id": ["img001"], "score": [0.5]}).to_csv(audit_csv, index=False)
    assert _train(tiny_data, tmp_path / "o2", "--exclude", str(audit_csv)) == 2
    assert f"{audit_csv}: an audit.csv lists every audited image: give --exclude-top N" in _err(capsys)
    good = tmp_path / "good.txt"
    good.write_text("img001\n")
    assert _train(tiny_data, tmp_path / "o3", "--exclude", str(good), "--exclude-top", "3") == 2
    assert f"{good}: --exclude-top needs an audit.csv" in _err(capsys)
    everything = tmp_path / "all.txt"
    everything.write_text("".join(f"img{i:03d}\n" for i in range(6)))
    assert _train(tiny_data, tmp_path / "o4", "--exclude", str(everything), fold="-1") == 2
    assert f"{everything}: excluding 6 image(s) leaves no training image" in _err(capsys)
    assert not (tmp_path / "o4" / "config.yaml").exists()


def test_pretrain_needs_livecell(tmp_path, capsys):
    assert main(["train", "--config", "r50_pretrain", "--out", str(tmp_path / "p")]) == 2
    assert "LIVECell json" in _err(capsys)


@pytest.mark.slow
def test_time_budget_finishes_cleanly_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "tb"
    args = ["SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "100", "CELLKIT.TIME_BUDGET_MINUTES", "0.00001",
            "SOLVER.CHECKPOINT_PERIOD", "100"]
    assert _train(tiny_data, out, *args) == 0
    assert _checkpoint_iteration(out / "model_final.pth") == 0  # budget spent after the first iteration
    evals = [m for m in _metrics(out) if "cellkit/mAP" in m]
    assert [m["iteration"] for m in evals] == [1]  # the final evaluation ran (logged one past, as detectron2 does)
    assert (out / "model_best.pth").is_file()
    # resumed without a budget, the same schedule runs to MAX_ITER
    assert _train(tiny_data, out, "--resume", "CELLKIT.TIME_BUDGET_MINUTES", "0") == 0
    assert _checkpoint_iteration(out / "model_final.pth") == 2
    assert [m["iteration"] for m in _metrics(out) if "lr" in m][-2:] == [1, 2]


def test_periodic_checkpointer_keeps_the_newest_and_what_last_checkpoint_names(tmp_path):
    from types import SimpleNamespace

    for name in ("model_0000004.pth", "model_0000009.pth", "model_0000014.pth", "model_0000019.pth",
                 "model_best.pth", "model_final.pth", "model_0000002.pth.bak"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")  # e.g. resumed from it
    fake = SimpleNamespace(save_dir=str(tmp_path), path_manager=None)
    hook = ck_train.CellkitPeriodicCheckpointer(fake, period=5, keep=2)
    deleted = hook.prune()
    assert [p.name for p in deleted] == ["model_0000009.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint", "model_0000002.pth.bak", "model_0000004.pth", "model_0000014.pth", "model_0000019.pth",
        "model_best.pth", "model_final.pth"]
    assert ck_train.CellkitPeriodicCheckpointer(fake, period=5, keep=0).prune() == []  # 0 keeps everything


# ------------------------------------------------------------------------------------------------ extra data
@pytest.fixture(scope="module")
def extra_data(tmp_path_factory):
    """A pseudo-label-like folder: 3 other images in the competition layout, with a ``source`` column."""
    root = tmp_path_factory.mktemp("extra")
    (root / "train").mkdir()
    rng = np.random.default_rng(7)
    rows = []
    for i in range(3):
        img, masks = _tiny_image(rng, "astro")
        cv2.imwrite(str(root / "train" / f"pl{i:03d}.png"), img)
        rows += [{"id": f"pl{i:03d}", "annotation": rle.encode(m), "width": SIZE, "height": SIZE,
                  "cell_type": "astro", "source": "pseudo:test"} for m in masks]
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def _registered(data, extra, out, fold, *opts):
    from detectron2.data import DatasetCatalog

    from cellkit.cli import build_parser
    from cellkit.commands.train import build_config

    args = build_parser("train").parse_args(["train", "--config", "demo", "--data", str(data), "--fold", str(fold),
                                             "--out", str(out), "--extra-data", str(extra), *opts, *TINY])
    cfg, specs = ck_train.prepare_config(build_config(args), has_cuda=False)
    ck_train.register_datasets(cfg, specs)
    ids = lambda names: [r["image_id"] for n in names for r in DatasetCatalog.get(n)]  # noqa: E731
    return cfg, ids(cfg.DATASETS.TRAIN), ids(cfg.DATASETS.TEST)


def test_extra_data_only_in_training_of_every_fold(tiny_data, extra_data, tmp_path):
    extra_ids = {"pl000", "pl001", "pl002"}
    seen_val = set()
    for fold in (0, 1):
        cfg, train_ids, val_ids = _registered(tiny_data, extra_data, tmp_path / f"f{fold}", fold)
        assert cfg.DATASETS.TRAIN == (ck_train.TRAIN_NAME, ck_train.EXTRA_NAME)
        assert cfg.DATASETS.TEST == (ck_train.VAL_NAME,)
        assert extra_ids <= set(train_ids) and not extra_ids & set(val_ids)
        assert len(train_ids) == len(set(train_ids)) and val_ids and not set(train_ids) & set(val_ids)
        seen_val |= set(val_ids)
    assert seen_val == {f"img{i:03d}" for i in range(6)}  # every real image validated once, no extra one ever
    cfg, train_ids, val_ids = _registered(tiny_data, extra_data, tmp_path / "all", -1)
    assert set(train_ids) == seen_val | extra_ids and val_ids == []


def test_extra_weight_sets_repeat_factors(tiny_data, extra_data, tmp_path, monkeypatch):
    captured = {}
    monkeypatch.setattr(ck_train, "build_detection_train_loader", lambda cfg, **kw: captured.update(kw))
    cfg, train_ids, _ = _registered(tiny_data, extra_data, tmp_path / "w", 0, "--extra-weight", "3")
    assert cfg.CELLKIT.DATA.EXTRA_WEIGHT == 3.0
    ck_train.CellkitTrainer.build_train_loader(cfg)
    dataset, sampler = captured["dataset"], captured["sampler"]
    extra = np.array([r["image_id"].startswith("pl") for r in dataset])
    assert extra.sum() == 3 and (~extra).sum() == 3  # fold 0 of 2 trains on 3 real images
    draws = np.array([i for _, i in zip(range(6000), iter(sampler))])
    ratio = extra[draws].sum() / (~extra[draws]).sum()
    assert ratio == pytest.approx(3.0, rel=0.1)  # each extra image three times as often as a real one
    np.testing.assert_array_equal(ck_train.extra_repeat_factors(dataset, ["pl001"], 0.5).numpy(),
                                  [0.5 if r["image_id"] == "pl001" else 1.0 for r in dataset])
    captured.clear()
    cfg, _, _ = _registered(tiny_data, extra_data, tmp_path / "w1", 0)  # weight 1: detectron2's default sampler
    ck_train.CellkitTrainer.build_train_loader(cfg)
    assert "sampler" not in captured


def test_extra_data_errors(tiny_data, extra_data, tmp_path, capsys):
    clash = tmp_path / "clash"
    (clash / "train").mkdir(parents=True)
    table = pd.read_csv(extra_data / "train.csv")
    table.loc[table["id"] == "pl001", "id"] = "img004"
    table.to_csv(clash / "train.csv", index=False)
    assert _train(tiny_data, tmp_path / "o1", "--extra-data", str(clash)) == 2
    assert "image id 'img004' is also in" in _err(capsys)
    assert _train(tiny_data, tmp_path / "o2", "--extra-data", str(tmp_path / "nope")) == 2
    assert "needs train.csv and train/" in _err(capsys)
    assert _train(tiny_data, tmp_path / "o3", "--extra-data", str(extra_data), "--extra-weight", "0") == 2
    assert "EXTRA_WEIGHT (--extra-weight) must be a finite number > 0" in _err(capsys)
    assert _train(tiny_data, tmp_path / "o4", "--extra-data", str(extra_data), "--extra-weight", "2",
                  "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler") == 2
    assert "needs DATALOADER.SAMPLER_TRAIN 'TrainingSampler'" in _err(capsys)


def test_tiny_training_with_extra_data(tiny_data, extra_data, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_data, out, "--extra-data", str(extra_data), "--extra-weight", "2", "SOLVER.MAX_ITER", "2",
                  "TEST.EVAL_PERIOD", "0", "CELLKIT.EVAL.AT_END", "False") == 0
    assert (out / "model_final.pth").is_file()
    saved = (out / "config.yaml").read_text()
    assert f"EXTRA_DATA: {extra_data}" in saved and "EXTRA_WEIGHT: 2.0" in saved
