"""Tests of cellkit.tta (TTA inference to box-cropped probabilities) and ``cellkit predict``.

Everything runs on CPU with tiny randomly initialised models (R18-FPN, narrow heads) on 128x160 images.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.transforms import HFlipTransform, ResizeTransform, TransformList
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Boxes, Instances

from cellkit import predict, predictions, tta
from cellkit.fusion import FusionSettings
from cellkit.cli import main
from cellkit.config import new_config, save_config

H, W = 128, 160


# ------------------------------------------------------------------------------------------------ tiny models
def tiny_cfg(cascade: bool = False):
    """A small random-init Mask R-CNN (or Cascade) on CPU: R18-FPN with GN, narrow heads, 128-px test size."""
    cfg = new_config()
    zoo = ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml" if cascade
           else "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg.merge_from_file(model_zoo.get_config_file(zoo))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random init: keep every detection
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 300
    cfg.TEST.DETECTIONS_PER_IMAGE = 60
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 256
    cfg.TEST.AUG.MIN_SIZES = (128, 160)
    cfg.TEST.AUG.MAX_SIZE = 256
    cfg.TEST.AUG.FLIP = True
    return cfg


def tiny_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def make_image(seed: int = 0) -> np.ndarray:
    """A textured uint8 (H, W, 3) image with a few bright blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    img = 40 + 20 * rng.random((H, W))
    for cy, cx, r in [(30, 40, 12), (80, 110, 18), (100, 30, 9)]:
        img += 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)


def as_input(img):
    return {"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))), "height": H, "width": W}


def full_binary(pred, threshold=0.5):
    return np.stack([pred.full_prob(i) >= threshold for i in range(len(pred))]) if len(pred) else np.zeros((0, H, W))


# ------------------------------------------------------------------------------------------------ settings
def test_settings_count_passes():
    cfg = tiny_cfg()
    assert tta.tta_settings(cfg, tta=False) == tta.TTASettings((128,), 256, False)
    assert tta.tta_settings(cfg, tta=False).n_passes == 1
    cfg.TEST.AUG.MIN_SIZES = (128, 160, 192)
    assert tta.tta_settings(cfg, tta=True).n_passes == 6
    cfg.TEST.AUG.FLIP = False
    assert tta.tta_settings(cfg, tta=True).n_passes == 3
    cfg.TEST.AUG.MIN_SIZES = ()
    with pytest.raises(ValueError, match="TEST.AUG.MIN_SIZES"):
        tta.tta_settings(cfg, tta=True)


def test_check_num_classes():
    cfg = tiny_cfg()
    tta.check_num_classes(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 8
    with pytest.raises(ValueError, match="NUM_CLASSES is 8"):
        tta.check_num_classes(cfg)


# ------------------------------------------------------------------------------------------------ pure functions
def test_crop_windows_inside_image_and_cover_box():
    boxes = torch.tensor([[-5.0, -3.0, 20.0, 30.0], [150.0, 100.0, 175.0, 140.0], [10.2, 20.7, 10.9, 21.1],
                          [0.0, 0.0, 160.0, 128.0], [30.5, 40.5, 90.25, 60.75]])
    win = tta.crop_windows(boxes, 28, H, W)
    assert win.dtype == torch.int64
    assert (win[:, 0] >= 0).all() and (win[:, 1] >= 0).all()
    assert (win[:, 2] <= W).all() and (win[:, 3] <= H).all()
    assert (win[:, 2] >= win[:, 0]).all() and (win[:, 3] >= win[:, 1]).all()
    inside = boxes.clone()
    inside[:, 0::2] = inside[:, 0::2].clamp(0, W)
    inside[:, 1::2] = inside[:, 1::2].clamp(0, H)
    assert (win[:, :2] <= inside[:, :2].floor()).all() and (win[:, 2:] >= inside[:, 2:].ceil()).all()


def test_paste_crops_equals_detectron2_full_image_paste():
    rng = np.random.default_rng(1)
    n, m = 40, 28
    masks = torch.as_tensor(rng.random((n, m, m)), dtype=torch.float32)
    x0 = rng.uniform(-10, W - 5, n)
    y0 = rng.uniform(-10, H - 5, n)
    bw, bh = rng.uniform(0.5, 90, n), rng.uniform(0.5, 90, n)
    boxes = torch.as_tensor(np.stack([x0, y0, x0 + bw, y0 + bh], 1), dtype=torch.float32)
    mask_boxes, crops = tta.paste_crops(masks, boxes, H, W, chunk_pixels=20_000)  # several batches
    full, _ = _do_paste_mask(masks[:, None], boxes, H, W, skip_empty=False)
    full_q = predictions.quantize(full.numpy())
    assert mask_boxes.dtype == np.int32 and mask_boxes.shape == (n, 4)
    for i in range(n):
        x0i, y0i, x1i, y1i = mask_boxes[i]
        assert crops[i].dtype == np.uint8 and crops[i].shape == (y1i - y0i, x1i - x0i)
        window = full_q[i, y0i:y1i, x0i:x1i].astype(int)
        assert np.abs(window - crops[i].astype(int)).max(initial=0) <= 1
        outside = full_q[i].copy()
        outside[y0i:y1i, x0i:x1i] = 0
        assert outside.max() == 0, f"instance {i}: probability outside its window"
    # the result is an InstancePredictions-valid crop set
    predictions.InstancePredictions("x", H, W, np.zeros(n), np.ones(n), boxes.numpy(), mask_boxes, crops)


def test_paste_crops_empty():
    mask_boxes, crops = tta.paste_crops(torch.zeros((0, 28, 28)), torch.zeros((0, 4)), H, W)
    assert mask_boxes.shape == (0, 4) and crops == []


def test_deaugment_boxes_undo_resize_and_flip():
    tfm = TransformList([ResizeTransform(H, W, 192, 240), HFlipTransform(240)])
    boxes = np.array([[10.0, 20.0, 50.0, 60.0], [100.0, 5.0, 160.0, 128.0]], dtype=np.float32)
    augmented = torch.as_tensor(tfm.apply_box(boxes), dtype=torch.float32)
    assert not np.allclose(augmented.numpy(), boxes)
    back = tta.deaugment_boxes(augmented, tfm)
    np.testing.assert_allclose(back.numpy(), boxes, atol=1e-3)


def test_deaugment_masks_undo_flip_only():
    pattern = torch.zeros((1, 1, 28, 28))
    pattern[0, 0, 2:20, 1:6] = 1.0  # asymmetric: a bar on the left
    flipped_tfm = TransformList([ResizeTransform(H, W, 192, 240), HFlipTransform(240)])
    resize_tfm = TransformList([ResizeTransform(H, W, 192, 240)])
    assert torch.equal(tta.deaugment_masks(pattern.flip(dims=[3]), flipped_tfm), pattern)
    assert torch.equal(tta.deaugment_masks(pattern, resize_tfm), pattern)


# ------------------------------------------------------------------------------------------------ oracle model
class OracleTTA(tta.CellTTA):
    """CellTTA whose 'network' reads the augmented image: one box around its bright pixels and, as mask, the
    image itself resampled into the box (ROIAlign). A correct de-augmentation must give back the original shape."""

    def _features(self, aug_input):
        self.passes_run += 1
        return aug_input["image"], None

    @staticmethod
    def _sample(image, boxes, m=28):
        gray = image[None, :1].float() / 255.0
        rois = torch.cat([torch.zeros((len(boxes), 1)), boxes.float()], dim=1)
        return roi_align(gray, rois, output_size=m, spatial_scale=1.0, sampling_ratio=2, aligned=True)

    def _detect(self, images, features, with_masks):
        ys, xs = torch.nonzero(images[0] > 128, as_tuple=True)
        box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        inst = Instances(tuple(images.shape[1:]), pred_boxes=Boxes(box), scores=torch.tensor([0.9]),
                         pred_classes=torch.tensor([1]))
        if with_masks:
            inst.pred_masks = self._sample(images, box)
        return inst

    def _masks_for_boxes(self, images, features, instances):
        return self._sample(images, instances.pred_boxes.tensor)


def l_shape() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[20:100, 30:52] = True   # vertical bar on the left
    mask[80:100, 30:120] = True  # foot to the right
    return mask


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("use_tta", [True, False])
def test_oracle_flip_and_scale_undone(use_tta):
    cfg = tiny_cfg()
    cfg.TEST.AUG.MIN_SIZES = (128, 192, 100)
    truth = l_shape()
    image = np.repeat((truth * 200 + 20).astype(np.uint8)[:, :, None], 3, axis=2)
    oracle = OracleTTA(cfg, tiny_model(cfg), tta=use_tta)
    pred = oracle.predict(image, "l")
    assert oracle.passes_run == oracle.n_passes == (6 if use_tta else 1)
    assert len(pred) == 1 and pred.classes.tolist() == [1]
    ys, xs = np.nonzero(truth)
    np.testing.assert_allclose(pred.boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.5)
    prob = pred.full_prob(0)
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    binary = prob >= 0.5
    mirrored = np.zeros_like(truth)
    mirrored[:, 30:120] = truth[:, 30:120][:, ::-1]  # the L flipped inside its box
    assert iou(binary, truth) > 0.9
    assert iou(binary, mirrored) < 0.6
    # probabilities kept, not binarised: soft values along the edges
    assert ((prob > 0.05) & (prob < 0.95)).sum() > 20


# ------------------------------------------------------------------------------------------------ real tiny models
@pytest.fixture(scope="module", params=[False, True], ids=["mask_rcnn", "cascade"])
def tiny(request):
    cfg = tiny_cfg(cascade=request.param)
    return cfg, tiny_model(cfg)


def assert_matches_reference(pred, ref, box_atol, check_classes=True):
    """``pred`` equals detectron2's ``ref`` Instances sorted by descending score (boxes within ``box_atol`` px)."""
    assert len(pred) == len(ref) > 10
    order = np.argsort(-ref.scores.numpy(), kind="stable")
    np.testing.assert_allclose(pred.boxes, ref.pred_boxes.tensor.numpy()[order], atol=box_atol)
    np.testing.assert_allclose(pred.scores, ref.scores.numpy()[order], atol=1e-6)
    if check_classes:
        np.testing.assert_array_equal(pred.classes, ref.pred_classes.numpy()[order])
    assert (full_binary(pred) != ref.pred_masks.numpy()[order]).mean() < 1e-4


def test_single_pass_matches_plain_model(tiny):
    cfg, model = tiny
    img = make_image()
    pred = tta.CellTTA(cfg, model, tta=False).predict(img, "img")
    with torch.no_grad():
        ref = model([as_input(img)])[0]["instances"]
    assert_matches_reference(pred, ref, box_atol=1e-4)


def test_tta_matches_detectron2_tta(tiny):
    cfg, model = tiny
    img = make_image(1)
    ours = tta.CellTTA(cfg, model, tta=True, fusion=FusionSettings(score="max"))  # detectron2 keeps one pass's score
    pred = ours.predict(img, "img")
    assert ours.passes_run == ours.n_passes == len(cfg.TEST.AUG.MIN_SIZES) * 2
    d2 = GeneralizedRCNNWithTTA(cfg, model, tta_mapper=DatasetMapperTTA(cfg), batch_size=1)
    with torch.no_grad():
        ref = d2([as_input(img)])[0]["instances"]
    assert_matches_reference(pred, ref, box_atol=1e-3, check_classes=False)
    # probabilities in [0, 1], soft, crops inside the image
    probs = np.concatenate([pred.prob(i).ravel() for i in range(len(pred))])
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert ((probs > 0.05) & (probs < 0.95)).mean() > 0.05
    mb = pred.mask_boxes
    assert (mb[:, :2] >= 0).all() and (mb[:, 2] <= W).all() and (mb[:, 3] <= H).all()
    assert np.all(np.diff(pred.scores) <= 0)
    # recomputing the features for the mask pass (detectron2's way) gives identical predictions
    no_cache = tta.CellTTA(cfg, model, tta=True, cache_features=False, fusion=FusionSettings(score="max"))
    recomputed = no_cache.predict(img, "img")
    assert no_cache.passes_run == 2 * no_cache.n_passes
    np.testing.assert_array_equal(pred.boxes, recomputed.boxes)
    assert all(np.array_equal(a, b) for a, b in zip(pred.masks, recomputed.masks))


def test_no_detections_gives_empty_predictions(tmp_path):
    cfg = tiny_cfg()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.999  # a random-init model scores about 0.25
    pred = tta.CellTTA(cfg, tiny_model(cfg), tta=True).predict(make_image(), "empty")
    assert len(pred) == 0 and (pred.height, pred.width) == (H, W)
    assert len(predictions.load(predictions.save(pred, tmp_path))) == 0


# ------------------------------------------------------------------------------------------------ predict CLI
def make_run(run, fold: int, seed: int | None = None):
    """A run directory as `cellkit train` leaves it: config.yaml + model_final.pth (tiny, random init; the seed is
    the fold's unless given)."""
    cfg = tiny_cfg()
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.TEST.AUG.MIN_SIZES = (128, 144)
    cfg.CELLKIT.DATA.FOLD = fold
    save_config(cfg, run)
    DetectionCheckpointer(tiny_model(cfg, seed=fold if seed is None else seed), save_dir=str(run)).save("model_final")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The run that held out fold 0."""
    return make_run(tmp_path_factory.mktemp("run0"), 0)


@pytest.fixture(scope="module")
def run_dir1(tmp_path_factory):
    """The run that held out fold 1."""
    return make_run(tmp_path_factory.mktemp("run1"), 1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Competition-layout data: train/<id>.png (grayscale 160x128) and folds.csv with two folds."""
    from PIL import Image

    data = tmp_path_factory.mktemp("data")
    (data / "train").mkdir()
    ids = ["img_a", "img_b", "img_c"]
    for k, image_id in enumerate(ids):
        Image.fromarray(make_image(k)[:, :, 0]).save(data / "train" / f"{image_id}.png")
    (data / "folds.csv").write_text("id,fold\nimg_a,0\nimg_b,1\nimg_c,0\n")
    return data


def cli(*args) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


def test_predict_cli_writes_and_resumes(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "pred"
    assert cli("--run", run_dir, "--images", data_dir / "train", "--out", out) == 0
    assert predictions.image_ids(out) == ["img_a", "img_b", "img_c"]
    meta = predictions.read_meta(out)
    assert meta["signature"]["passes"]["n_passes"] == 1
    assert meta["signature"]["fusion"] == {"mode": "nms", "iou": 0.5, "score": "mean"}
    assert meta["sources"][0]["members"][0]["weights"].endswith("model_final.pth")
    assert len(meta["sources"][0]["members"][0]["sha256"]) == 64
    pred = predictions.load(out / "img_b.npz")
    assert (pred.height, pred.width) == (H, W) and 0 < len(pred) <= 20
    capsys.readouterr()
    # resume: nothing to do, files untouched; a deleted file is predicted again
    stamp = (out / "img_a.npz").stat().st_mtime_ns
    (out / "img_c.npz").unlink()
    assert cli("--run", run_dir, "--images", data_dir / "train", "--out", out) == 0
    assert "1 image(s) written, 2 already there" in capsys.readouterr().out
    assert (out / "img_a.npz").stat().st_mtime_ns == stamp
    again = predictions.load(out / "img_c.npz")
    assert len(again) > 0
    # the same directory with other TTA settings is refused
    assert cli("--run", run_dir, "--images", data_dir / "train", "--out", out, "--tta") == 2
    assert "other settings (passes min_sizes=[128] max_size=256 flip=False vs" in capsys.readouterr().err


def test_predict_cli_tta_and_fold(run_dir, run_dir1, data_dir, tmp_path):
    out = tmp_path / "oof"
    assert cli("--run", run_dir, "--fold", 0, "--data", data_dir, "--out", out, "--tta") == 0
    assert predictions.image_ids(out) == ["img_a", "img_c"]
    assert cli("--run", run_dir1, "--fold", 1, "--data", data_dir, "--out", out, "--tta") == 0
    assert predictions.image_ids(out) == ["img_a", "img_b", "img_c"]
    meta = predictions.read_meta(out)
    assert meta["signature"]["passes"] == {"min_sizes": [128, 144], "max_size": 256, "flip": True, "n_passes": 4}
    assert sorted(s["fold"] for s in meta["sources"]) == [0, 1]


def test_predict_oof_collects_all_folds(run_dir, run_dir1, data_dir, tmp_path):
    out = tmp_path / "oof"
    result = predict.predict_oof({0: run_dir, 1: run_dir1}, data_dir, out, progress=False)
    assert {k: v["written"] for k, v in result.items()} == {0: 2, 1: 1}
    assert predictions.image_ids(out) == ["img_a", "img_b", "img_c"]
    sources = {s["fold"]: s["members"][0]["run"] for s in predictions.read_meta(out)["sources"]}
    assert sources == {0: str(run_dir.resolve()), 1: str(run_dir1.resolve())}
    # every fold is checked before any prediction: a missing run, a run that trained on the fold
    with pytest.raises(FileNotFoundError, match="fold 2"):
        predict.predict_oof({0: run_dir, 2: tmp_path / "missing"}, data_dir, tmp_path / "oof2", progress=False)
    with pytest.raises(ValueError, match="not be out-of-fold"):
        predict.predict_oof({0: run_dir, 1: run_dir}, data_dir, tmp_path / "oof2", progress=False)
    assert not (tmp_path / "oof2").exists()


@pytest.mark.parametrize("case", ["no_run", "no_config", "no_weights", "bad_weights", "empty_images", "no_source",
                                  "fold_without_data", "unknown_fold", "url_weights", "not_held_out"])
def test_predict_cli_errors_before_work(case, run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "pred"
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = tmp_path / "bare_run"
    bare.mkdir()
    images = ["--images", data_dir / "train"]
    args = {
        "no_run": ["--run", tmp_path / "nope", *images],
        "no_config": ["--run", bare, *images],
        "no_weights": ["--run", bare, *images],
        "bad_weights": ["--run", run_dir, *images, "--weights", tmp_path / "missing.pth"],
        "url_weights": ["--run", run_dir, *images, "--weights", "detectron2://x/model_final.pkl"],
        "empty_images": ["--run", run_dir, "--images", empty],
        "no_source": ["--run", run_dir],
        "fold_without_data": ["--run", run_dir, "--fold", 0],
        "unknown_fold": ["--run", bare, "--fold", 7, "--data", data_dir],
        "not_held_out": ["--run", run_dir, "--fold", 1, "--data", data_dir],
    }[case]
    if case in ("no_weights", "unknown_fold"):
        cfg = tiny_cfg()
        cfg.CELLKIT.DATA.FOLD = 7
        save_config(cfg, bare)
        if case == "unknown_fold":
            (bare / "model_final.pth").write_bytes(b"")
    assert cli(*args, "--out", out) == 2
    err = capsys.readouterr().err
    expected = {"no_run": "run directory does not exist", "no_config": "config.yaml",
                "no_weights": "model_best.pth or model_final.pth", "bad_weights": "missing.pth",
                "url_weights": "URL", "empty_images": "no images", "no_source": "--images",
                "fold_without_data": "--data", "unknown_fold": "fold 7", "not_held_out": "out-of-fold"}[case]
    assert expected in err
    assert not out.exists()


def test_predict_help_lists_command(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "--tta" in capsys.readouterr().out


REAL = Path(os.environ.get("CELLKIT_REAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.mark.realdata
def test_real_image_predicts_inside_the_image():
    image_dir = REAL / "sartorius" / "train"
    if not image_dir.is_dir():
        pytest.skip(f"no real data at {image_dir}")
    image_id, path = predict.list_images(image_dir)[0]
    cfg = tiny_cfg()
    image = predict.read_image(path, cfg.INPUT.FORMAT)
    assert image.shape == (520, 704, 3) and image.dtype == np.uint8
    pred = tta.CellTTA(cfg, tiny_model(cfg), tta=False).predict(image, image_id)
    assert (pred.height, pred.width) == (520, 704) and len(pred) > 0
    assert (pred.mask_boxes[:, 2] <= 704).all() and (pred.mask_boxes[:, 3] <= 520).all()
    assert (pred.boxes[:, 2] <= 704).all() and (pred.boxes[:, 3] <= 520).all()
