"""Datasets other than Sartorius through the whole notebook chain (papermill, ``cellkit chain --smoke``): the classes,
groups, image format and RLE order come from the data (``dataset.json``), and every stage follows them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from cellkit import schema as S
from cellkit.submission import validate_submission

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=900):
    result = subprocess.run([sys.executable, "-m", "cellkit", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _chain(data, out, *params):
    printed = _run("chain", "--data", data, "--out", out, "--smoke", "-p", "K=2", "-p", "N_OVERLAYS=1",
                   *[w for p in params for w in ("-p", p)])
    assert "CV score on" in printed
    return printed


def _check_run(out: Path, data: Path, groups):
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert list(thresholds["thresholds"]) == list(groups)
    assert thresholds["dataset"]["groups"] == list(groups)  # the run carries its dataset
    assert json.loads((out / "cv.json").read_text())["columns"] == ["all", *groups]
    schema = S.schema_of(out / "fold0")
    assert schema == S.schema_of(data) != S.SARTORIUS
    assert json.loads((out / "oof" / "meta.json").read_text())["dataset"] == schema.to_dict()
    return schema


def test_five_classes_512x512_rgb(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    _run("synth", data, "--images", 8, "--test-images", 2, "--seed", 1, "--classes", 5, "--size", "512x512",
         "--channels", 3)
    printed = _chain(data, out)
    schema = _check_run(out, data, [f"class{k}" for k in range(5)])
    assert schema.channels == 3 and "class" in printed.split("CV score on")[1]
    assert not validate_submission(out / "submission.csv", data / "test")
    assert Image.open(next((data / "train").iterdir())).mode == "RGB"


def test_one_class_1024x768_16_bit(tmp_path):
    source, data, out = tmp_path / "source", tmp_path / "data", tmp_path / "run"
    _run("synth", source, "--images", 6, "--test-images", 2, "--seed", 2, "--classes", "cell", "--size", "768x1024",
         "--bit-depth", 16)
    assert Image.open(next((source / "train").iterdir())).mode.startswith("I")
    _chain(data, out, "SOURCE_FORMAT=csv", f"SOURCE={source / 'train.csv'}", f"SOURCE_IMAGES={source / 'train'}",
           f"SOURCE_TEST_IMAGES={source / 'test'}")
    schema = _check_run(out, data, ["cell"])
    assert schema.bit_depth == 16 and Image.open(next((data / "train").iterdir())).mode == "L"  # read as 8-bit
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert set(submission["id"]) == {p.stem for p in (source / "test").iterdir()}


def test_mask_folder_with_column_major_submission(tmp_path):
    source, data, out = tmp_path / "dsb", tmp_path / "data", tmp_path / "run"
    _run("synth", source, "--images", 6, "--test-images", 2, "--seed", 3, "--classes", "cell", "--size", "256x320",
         "--mask-folder")
    _chain(data, out, "SOURCE_FORMAT=masks", f"SOURCE={source / 'train'}", f"SOURCE_TEST_IMAGES={source / 'test'}")
    schema = _check_run(out, data, ["cell"])
    assert schema.rle_order == "column" and schema.submission_columns == ("ImageId", "EncodedPixels")
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["ImageId", "EncodedPixels"]
    assert not validate_submission(out / "submission.csv", data / "test", schema.submission_columns, "column")
    # scored against the synthetic truth (row-major), the column-major strings read in the dataset's order
    scored = json.loads(_run("score", "--truth", source / "test_truth.csv", "--pred", out / "submission.csv",
                             "--dataset", data, "--json"))
    assert scored["n_images"] == 2 and list(scored["per_class"]) == ["cell"]
    assert 0.0 <= scored["mAP"] <= 1.0


@pytest.mark.realdata
def test_livecell_subset_as_the_target_dataset(real_data, tmp_path):
    """LIVECell's shared 20 images: one detector class, thresholds and CV tables per cell line (from the file name)."""
    lc, data, out, test = real_data / "livecell", tmp_path / "data", tmp_path / "run", tmp_path / "test"
    test.mkdir()
    for path in sorted((lc / "images").iterdir())[:2]:  # no hidden test set here: two of the images stand in
        shutil.copy(path, test)
    _chain(data, out, "SOURCE_FORMAT=coco",
           f"SOURCE={lc / 'livecell_coco_val.json'},{lc / 'livecell_coco_test.json'}", f"SOURCE_IMAGES={lc / 'images'}",
           f"SOURCE_TEST_IMAGES={test}", "GROUP_PATTERN=^([A-Za-z0-9]+)_")
    lines = ("A172", "BT474", "Huh7", "MCF7", "SHSY5Y", "SKOV3", "SkBr3")
    schema = _check_run(out, data, lines)
    assert schema.classes == ("cell",) and schema.group_by == "pattern"
    assert not validate_submission(out / "submission.csv", data / "test")
