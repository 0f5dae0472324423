"""``cellkit import`` and the dataset schema: formats in, the kit's layout out, bad input named before any write."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellkit import importers as I, rle, schema as S


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ------------------------------------------------------------------------------------------------------------ schema
def test_schema_round_trips_and_sartorius_is_the_default(tmp_path):
    assert S.schema_of(tmp_path) == S.SARTORIUS and S.SARTORIUS.groups == S.SARTORIUS.classes
    livecell = S.DatasetSchema(classes=("cell",), groups=("A172", "BV2"), group_by="pattern",
                               group_pattern="^([A-Za-z0-9]+)_", name="livecell")
    S.save_schema(livecell, tmp_path)
    assert S.schema_of(tmp_path) == livecell
    assert livecell.image_group("A172_Phase_C7_1") == "A172"
    with pytest.raises(ValueError, match="'MCF7'.*not one of the groups"):
        livecell.image_group("MCF7_Phase_1")


@pytest.mark.parametrize("doc, message", [
    ({"classes": []}, "classes.*non-empty"),
    ({"classes": ["a", "a"]}, "'a' is listed twice"),
    ({"classes": ["all"]}, "'all' is not a usable name"),
    ({"classes": ["a"], "group_by": "image"}, "group_by='image'"),
    ({"classes": ["a"], "group_by": "pattern", "groups": ["g"], "group_pattern": "abc"}, "needs a capture group"),
    ({"classes": ["a"], "rle_order": "diagonal"}, "rle_order='diagonal'"),
    ({"classes": ["a"], "channels": 2}, "channels=2"),
    ({"classes": ["a"], "colour": 1}, "unknown key 'colour'"),
])
def test_bad_schema_names_the_key(tmp_path, doc, message):
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        S.schema_of(tmp_path)


def test_convert_order_round_trips():
    mask = np.zeros((5, 7), bool)
    mask[1:4, 2] = mask[4, 6] = True
    row = rle.encode(mask)
    column = rle.convert_order(row, (5, 7), "row", "column")
    assert column == rle.encode(mask.T)  # column-major numbering is the transposed image's row-major one
    assert rle.convert_order(column, (5, 7), "column", "row") == row


# --------------------------------------------------------------------------------------------------------------- csv
def _csv_dataset(tmp_path, order="column"):
    shapes = {"a1": (40, 60), "b1": (50, 30)}
    rows = []
    for image_id, shape in shapes.items():
        _png(tmp_path / "img" / f"{image_id}.png", np.full(shape, 100, np.uint8))
        for k, (cy, cx) in enumerate([(10, 10), (25, 20)]):
            mask = _disk(shape, cy, cx, 5)
            text = rle.encode(mask.T if order == "column" else mask)
            rows.append({"ImageId": image_id, "Pixels": text, "kind": "round" if k == 0 else "long"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return shapes


def test_csv_with_column_major_rle_and_another_class_column(tmp_path):
    shapes = _csv_dataset(tmp_path)
    schema = I.import_csv(tmp_path / "labels.csv", tmp_path / "img", tmp_path / "out", class_column="kind",
                          id_column="ImageId", annotation_column="Pixels", rle_order="column",
                          classes=("round", "long"), submission_columns=("ImageId", "EncodedPixels"))
    assert schema.classes == ("round", "long") and schema.groups == schema.classes
    assert schema.rle_order == "column" and schema.size is None
    assert S.schema_of(tmp_path / "out") == schema
    table = pd.read_csv(tmp_path / "out" / "train.csv")
    assert list(table.columns) == ["id", "annotation", "width", "height", "cell_type"]
    first = table.iloc[0]
    assert (first["height"], first["width"]) == shapes["a1"]
    assert np.array_equal(rle.decode(first["annotation"], shapes["a1"]), _disk(shapes["a1"], 10, 10, 5))
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["a1.png", "b1.png"]


@pytest.mark.parametrize("change, message", [
    (dict(classes=("round",)), r"labels.csv: class 'long' is not one of those given \(round\)"),
    (dict(classes=("round", "long", "star")), "labels.csv: class 'star' has no annotation"),
    (dict(size=(40, 60)), r"b1.png: 30x50 image, but .*labels.csv requires every image to be 60x40"),
    (dict(group_pattern="^(z)"), "labels.csv: image 'a1' does not match the group pattern"),
])
def test_csv_bad_input_is_named_and_nothing_is_written(tmp_path, change, message):
    _csv_dataset(tmp_path)
    with pytest.raises(ValueError, match=message):
        I.import_csv(tmp_path / "labels.csv", tmp_path / "img", tmp_path / "out", class_column="kind",
                     id_column="ImageId", annotation_column="Pixels", rle_order="column", **change)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_csv_annotation_outside_its_image_names_the_line(tmp_path):
    _csv_dataset(tmp_path, order="row")
    rows = pd.read_csv(tmp_path / "labels.csv")
    rows.loc[2, "Pixels"] = "1490 30"  # b1 has 50 x 30 = 1500 pixels
    rows.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"labels.csv: line 4: image 'b1'"):
        I.import_csv(tmp_path / "labels.csv", tmp_path / "img", tmp_path / "out", class_column="kind",
                     id_column="ImageId", annotation_column="Pixels")


def test_import_into_a_non_empty_directory_is_refused(tmp_path):
    _csv_dataset(tmp_path, order="row")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        I.import_csv(tmp_path / "labels.csv", tmp_path / "img", tmp_path / "out", class_column="kind",
                     id_column="ImageId", annotation_column="Pixels")


# -------------------------------------------------------------------------------------------------------------- coco
def _coco(tmp_path, points):
    _png(tmp_path / "img" / "BV2_x_1.png", np.zeros((20, 30, 3), np.uint8))
    doc = {"images": [{"id": 7, "file_name": "BV2_x_1.png", "width": 30, "height": 20}],
           "categories": [{"id": 1, "name": "cell"}],
           "annotations": [{"id": 70, "image_id": 7, "category_id": 1, "segmentation": [points], "iscrowd": 0}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))


def test_coco_polygons_with_groups_from_the_file_name(tmp_path):
    _coco(tmp_path, [2, 2, 12, 2, 12, 8, 2, 8])
    schema = I.import_coco(tmp_path / "a.json", tmp_path / "img", tmp_path / "out", group_pattern="^([A-Za-z0-9]+)_")
    assert (schema.classes, schema.groups, schema.channels) == (("cell",), ("BV2",), 3)
    table = pd.read_csv(tmp_path / "out" / "train.csv")
    assert table["cell_type"].tolist() == ["cell"] and 50 <= rle.area(table["annotation"][0], (20, 30)) <= 80


def test_coco_point_outside_the_image_names_the_annotation(tmp_path):
    _coco(tmp_path, [2, 2, 42, 2, 12, 8])
    with pytest.raises(ValueError, match=r"a.json: annotation 70: polygon point \(42, 2\) is outside the 30x20"):
        I.import_coco(tmp_path / "a.json", tmp_path / "img", tmp_path / "out")


@pytest.mark.realdata
def test_livecell_subset_imports_with_a_group_per_cell_line(real_data, tmp_path):
    lc = real_data / "livecell"
    schema = I.import_coco([lc / "livecell_coco_val.json", lc / "livecell_coco_test.json"], lc / "images",
                           tmp_path / "lc", group_pattern="^([A-Za-z0-9]+)_", name="livecell")
    assert schema.classes == ("cell",) and len(schema.groups) == 7 and "SHSY5Y" in schema.groups
    table = pd.read_csv(tmp_path / "lc" / "train.csv")
    assert table["id"].nunique() == 20 and len(table) == 3285 + 1243


# ------------------------------------------------------------------------------------------------------------- masks
def test_mask_folder_16_bit_with_varying_sizes(tmp_path):
    for image_id, shape in (("p", (32, 48)), ("q", (40, 40))):
        _png(tmp_path / "dsb" / image_id / "images" / f"{image_id}.png", np.full(shape, 40000, np.uint16))
        for k, centre in enumerate([(8, 8), (20, 20)]):
            _png(tmp_path / "dsb" / image_id / "masks" / f"m{k}.png", _disk(shape, *centre, 4).astype(np.uint8) * 255)
    schema = I.import_masks(tmp_path / "dsb", tmp_path / "out")
    assert (schema.classes, schema.bit_depth, schema.channels, schema.rle_order) == (("cell",), 16, 1, "column")
    assert schema.submission_columns == ("ImageId", "EncodedPixels")
    table = pd.read_csv(tmp_path / "out" / "train.csv")
    assert len(table) == 4 and set(zip(table["height"], table["width"])) == {(32, 48), (40, 40)}


def test_mask_of_another_size_is_named(tmp_path):
    _png(tmp_path / "dsb" / "p" / "images" / "p.png", np.zeros((32, 48), np.uint8))
    _png(tmp_path / "dsb" / "p" / "masks" / "m.png", np.ones((30, 48), np.uint8))
    with pytest.raises(ValueError, match=r"m.png: mask is 48x30, its image 48x32"):
        I.import_masks(tmp_path / "dsb", tmp_path / "out")


def test_import_command_line(tmp_path):
    _csv_dataset(tmp_path, order="row")
    proc = subprocess.run([sys.executable, "-m", "cellkit", "import", "csv", str(tmp_path / "labels.csv"),
                           "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"), "--class-column",
                           "kind", "--id-column", "ImageId", "--annotation-column", "Pixels"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "classes long, round" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "cellkit", "import", "csv", str(tmp_path / "labels.csv"),
                          "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out2")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "labels.csv: no column 'id'" in bad.stderr


# ------------------------------------------------------------------------------------------ errors before any work
def test_a_fixed_size_is_checked_when_the_data_is_read(tmp_path):
    from cellkit import data

    _csv_dataset(tmp_path, order="row")
    I.import_csv(tmp_path / "labels.csv", tmp_path / "img", tmp_path / "out", class_column="kind",
                 id_column="ImageId", annotation_column="Pixels")
    schema = S.schema_of(tmp_path / "out")
    S.save_schema(S.from_dict({**schema.to_dict(), "size": [40, 60]}), tmp_path / "out")  # a rule b1 breaks
    with pytest.raises(ValueError, match=r"train.csv line \d+ \(id b1\): size 30x50, but .*dataset.json "
                                         r"requires every image to be 60x40"):
        data.read_train_csv(tmp_path / "out" / "train.csv")


def test_thresholds_without_a_group_of_the_store_are_refused(tmp_path):
    from cellkit import postprocess as pp

    schema = S.DatasetSchema(classes=("cell",), groups=("A", "B"), group_by="pattern", group_pattern="^([AB])_")
    doc = {"thresholds": {"A": {"score": 0.5, "mask": 0.5, "min_area": 0}}, "dataset": schema.to_dict()}
    (tmp_path / "thresholds.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"thresholds.json: thresholds: missing class 'B' \(every class of A, B"):
        pp.load_thresholds(tmp_path / "thresholds.json")
    with pytest.raises(ValueError, match="missing class 'B'"):
        pp.validate_thresholds(doc["thresholds"], "thresholds.json", schema.groups)


def test_group_view_maps_classes_to_groups():
    from cellkit import postprocess as pp
    from cellkit.predictions import InstancePredictions

    masks = [np.full((2, 2), 255, np.uint8)] * 2
    pred = InstancePredictions("B_1", 8, 8, [0, 0], [0.9, 0.8], [[0, 0, 2, 2]] * 2, [[0, 0, 2, 2]] * 2, masks)
    schema = S.DatasetSchema(classes=("cell",), groups=("A", "B"), group_by="pattern", group_pattern="^([AB])_")
    assert pp.group_view(pred, schema).classes.tolist() == [1, 1]
    assert pp.group_view(pred, S.SARTORIUS) is pred
    wrong = InstancePredictions("x", 8, 8, [0, 5], [0.9, 0.8], [[0, 0, 2, 2]] * 2, [[0, 0, 2, 2]] * 2, masks)
    with pytest.raises(ValueError, match=r"image 'x': classes must be in 0..2 \(shsy5y, astro, cort\), got 0..5"):
        pp.group_view(wrong, S.SARTORIUS)


def test_coco_results_json_holds_the_kept_masks(tmp_path):
    from pycocotools import mask as mask_util

    from cellkit import postprocess as pp
    from cellkit.predictions import InstancePredictions
    from cellkit.submission import write_coco_results

    probs = np.zeros((2, 20, 30), np.float32)
    probs[0, 2:8, 3:12] = 0.9
    probs[1, 10:18, 15:25] = 0.8
    pred = InstancePredictions.from_full_masks("img", [1, 0], [0.9, 0.7], [[3, 2, 12, 8], [15, 10, 25, 18]], probs)
    kept = pp.apply_predictions(pred, pp.seed_thresholds())
    write_coco_results([("img", kept, pred.classes[kept.indices])], tmp_path / "results.json", {"img": 7})
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["image_id"], r["category_id"], r["score"]) for r in results] == [(7, 2, 0.9), (7, 1, 0.7)]
    for r, full in zip(results, kept.full_masks()):
        assert np.array_equal(mask_util.decode({**r["segmentation"], "counts": r["segmentation"]["counts"]}) > 0,
                              full)
