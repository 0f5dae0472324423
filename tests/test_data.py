"""cellkit.data: train.csv validation, dataset dicts, catalog registration (tiny hand-made CSVs and images)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellkit import CELL_TYPES, rle
from cellkit import data as ckdata

W, H = 40, 30  # tiny images keep these tests fast; the module is size-agnostic
COLUMNS = ["id", "annotation", "width", "height", "cell_type"]


def box_mask(y0: int, y1: int, x0: int, x1: int, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def write_png(path, width=W, height=H, mode="L"):
    Image.new(mode, (width, height)).save(path)


def write_set(tmp_path, rows, images=None, name="train.csv"):
    """Write ``rows`` (list of dicts or a DataFrame) as a CSV and a PNG per id; returns (csv_path, image_dir)."""
    image_dir = tmp_path / "train"
    image_dir.mkdir(exist_ok=True)
    frame = pd.DataFrame(rows)
    sizes = images if images is not None else {i: (W, H) for i in frame["id"].unique()}
    for image_id, (w, h) in sizes.items():
        write_png(image_dir / f"{image_id}.png", w, h)
    csv = tmp_path / name
    frame.to_csv(csv, index=False)
    return csv, image_dir


def row(image_id, mask_or_rle, cell_type="cort", width=W, height=H, **extra):
    s = mask_or_rle if isinstance(mask_or_rle, str) else rle.encode(mask_or_rle)
    return {"id": image_id, "annotation": s, "width": width, "height": height, "cell_type": cell_type, **extra}


@pytest.fixture(autouse=True)
def fresh_cache():
    ckdata.clear_cache()
    yield
    ckdata.clear_cache()


@pytest.fixture
def catalog_names():
    """Names registered by a test; removed afterwards so tests do not leak into each other."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names: list[str] = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


# ------------------------------------------------------------------------------------------------ read_train_csv
def test_read_train_csv_types_and_optional_columns(tmp_path):
    rows = [row("00a1", box_mask(1, 4, 2, 6), "shsy5y", sample_id="s1", plate_time="11h30m"),
            row("00a1", "", "shsy5y", sample_id="s1", plate_time="11h30m"),
            row("1e10", box_mask(0, 2, 0, 2), "astro", sample_id="s2", plate_time="")]
    csv, _ = write_set(tmp_path, rows)
    df = ckdata.read_train_csv(csv)
    assert list(df["id"]) == ["00a1", "00a1", "1e10"]  # ids stay strings ("1e10" is not a float)
    assert df["annotation"].iloc[1] == ""
    assert df["width"].dtype == np.int64 and df["height"].tolist() == [H, H, H]
    assert df["sample_id"].tolist() == ["s1", "s1", "s2"]
    assert df.attrs["path"] == str(csv)


def test_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ckdata.read_train_csv(tmp_path / "nope.csv")


@pytest.mark.parametrize("text, message", [
    pytest.param("", r"train\.csv: empty CSV", id="empty"),
    pytest.param(",".join(COLUMNS) + "\n", "no data rows", id="header-only"),
    pytest.param("id,annotation,width,height\na,1 2,40,30\n", r"train\.csv: missing column\(s\) cell_type",
                 id="missing-column"),
    *[pytest.param(f"id,annotation,width,height,cell_type\na,1 2,40,30,cort\nb,1 2,{bad},30,cort\n",
                   r"line 3: width .* is not a positive integer", id=f"bad-width-{bad!r}")
      for bad in ["wide", "0", "-4", "3.5", ""]],
    pytest.param("id,annotation,width,height,cell_type\na,1 2,40,30,cort\na,5 2,41,30,cort\n",
                 r"line 3 \(id a\): size 41x30 differs", id="size-differs-within-image"),
    pytest.param("id,annotation,width,height,cell_type\na,1 2,40,30,cort\n,1 2,40,30,cort\n",
                 "line 3: empty image id", id="empty-id"),
])
def test_bad_csv_names_the_problem(tmp_path, text, message):
    csv = tmp_path / "train.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=message):
        ckdata.read_train_csv(csv)


def test_unknown_cell_type_names_line_and_id(tmp_path):
    rows = [row("a", box_mask(0, 2, 0, 2)), row("b", box_mask(0, 2, 0, 2), "neuron")]
    csv, _ = write_set(tmp_path, rows)
    with pytest.raises(ValueError, match=r"train\.csv line 3 \(id b\): unknown cell type 'neuron'"):
        ckdata.read_train_csv(csv)


# ------------------------------------------------------------------------------------------------ find_image
def test_find_image_extensions(tmp_path):
    write_png(tmp_path / "a.tif")
    write_png(tmp_path / "b.png")
    assert ckdata.find_image(tmp_path, "a").name == "a.tif"
    assert ckdata.find_image(tmp_path, "b").name == "b.png"
    with pytest.raises(FileNotFoundError, match="no image for id 'c'"):
        ckdata.find_image(tmp_path, "c")
    with pytest.raises(FileNotFoundError, match="image directory does not exist"):
        ckdata.find_image(tmp_path / "missing", "a")


# ------------------------------------------------------------------------------------------------ dataset dicts
def test_dicts_boxes_masks_categories(tmp_path, caplog):
    from detectron2.structures import BoxMode
    from pycocotools import mask as mask_util

    m1, m2 = box_mask(2, 5, 3, 9), box_mask(10, 30, 0, 1)
    m3 = np.zeros((H, W), bool)
    m3[[4, 7], [30, 35]] = True  # two separate pixels: box spans both
    rows = [row("img1", m1, "astro"), row("img1", "", "astro"), row("img1", m2, "astro"),
            row("img2", m3, "shsy5y")]
    csv, image_dir = write_set(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="cellkit.data"):
        dicts = ckdata.load_sartorius_dicts(csv, image_dir)
    assert "dropped 1 empty annotation" in caplog.text
    assert [d["image_id"] for d in dicts] == ["img1", "img2"]
    d1, d2 = dicts
    assert d1["file_name"] == str(image_dir / "img1.png") and (d1["height"], d1["width"]) == (H, W)
    assert d1["cell_type"] == "astro" and d2["cell_type"] == "shsy5y"
    assert [a["bbox"] for a in d1["annotations"]] == [[3, 2, 9, 5], [0, 10, 1, 30]]
    assert d2["annotations"][0]["bbox"] == [30, 4, 36, 8]
    for ann, mask in zip(d1["annotations"] + d2["annotations"], [m1, m2, m3]):
        assert ann["bbox_mode"] == BoxMode.XYXY_ABS
        seg = ann["segmentation"]
        assert seg["size"] == [H, W] and isinstance(seg["counts"], str)
        np.testing.assert_array_equal(mask_util.decode(seg).astype(bool), mask)
    assert [a["category_id"] for a in d1["annotations"]] == [CELL_TYPES.index("astro")] * 2
    assert d2["annotations"][0]["category_id"] == CELL_TYPES.index("shsy5y")
    json.dumps([{k: v for k, v in a.items() if k != "bbox_mode"} for a in d1["annotations"]])


def test_dicts_subset_order_copies_and_cache(tmp_path):
    rows = [row(i, box_mask(0, 3, k, k + 3)) for k, i in enumerate(["a", "b", "c"])]
    csv, image_dir = write_set(tmp_path, rows)
    sub = ckdata.load_sartorius_dicts(csv, image_dir, ["c", "a"])
    assert [d["image_id"] for d in sub] == ["c", "a"]
    sub[0]["annotations"][0]["bbox"][0] = -99  # mutating a returned dict must not reach the cache
    sub[0]["annotations"].clear()
    again = ckdata.load_sartorius_dicts(csv, image_dir, ["c"])
    assert again[0]["annotations"][0]["bbox"] == [2, 0, 5, 3]
    with pytest.raises(ValueError, match="1 image id.* not in the CSV, e.g. 'zz'"):
        ckdata.load_sartorius_dicts(csv, image_dir, ["a", "zz"])


def test_image_without_masks_is_kept_with_no_annotations(tmp_path):
    csv, image_dir = write_set(tmp_path, [row("a", ""), row("b", box_mask(0, 2, 0, 2))])
    dicts = ckdata.load_sartorius_dicts(csv, image_dir)
    assert [len(d["annotations"]) for d in dicts] == [0, 1]


def test_missing_image_names_csv_line_and_id(tmp_path):
    csv, image_dir = write_set(tmp_path, [row("a", box_mask(0, 2, 0, 2)), row("b", box_mask(0, 2, 0, 2))],
                               images={"a": (W, H)})
    with pytest.raises(FileNotFoundError, match=r"train\.csv line 3 \(id b\): .*no image for id 'b'"):
        ckdata.load_sartorius_dicts(csv, image_dir)


def test_wrong_image_size(tmp_path):
    csv, image_dir = write_set(tmp_path, [row("a", box_mask(0, 2, 0, 2))], images={"a": (W + 1, H)})
    with pytest.raises(ValueError, match=rf"line 2 \(id a\): image .*a\.png is {W + 1}x{H} \(WxH\), "
                                         rf"the CSV says {W}x{H}"):
        ckdata.load_sartorius_dicts(csv, image_dir)


@pytest.mark.parametrize("bad, message", [("1 2 3", "odd number of tokens"), ("0 3", "start 0 < 1"),
                                          ("5 x", "not an integer"), (f"{W * H} 2", "past the image end"),
                                          ("10 2 5 1", "unsorted")])
def test_bad_rle_names_line_id_and_problem(tmp_path, bad, message):
    csv, image_dir = write_set(tmp_path, [row("a", box_mask(0, 2, 0, 2)), row("a", "1 1"), row("a", bad)])
    with pytest.raises(ValueError, match=rf"train\.csv line 4 \(id a\): bad annotation: .*{message}"):
        ckdata.load_sartorius_dicts(csv, image_dir)


def test_edited_csv_is_reread(tmp_path):
    csv, image_dir = write_set(tmp_path, [row("a", box_mask(0, 2, 0, 2))])
    assert len(ckdata.load_sartorius_dicts(csv, image_dir)[0]["annotations"]) == 1
    write_set(tmp_path, [row("a", box_mask(0, 2, 0, 2)), row("a", box_mask(5, 7, 0, 2))])
    import os
    os.utime(csv, ns=(1, 1))  # a distinct mtime even on coarse clocks
    assert len(ckdata.load_sartorius_dicts(csv, image_dir)[0]["annotations"]) == 2


# ------------------------------------------------------------------------------------------------ registration
def folds_file(tmp_path, assignment: dict) -> str:
    path = tmp_path / "folds.csv"
    pd.DataFrame({"id": list(assignment), "fold": list(assignment.values())}).to_csv(path, index=False)
    return str(path)


def test_register_sartorius_all_and_idempotent(tmp_path, catalog_names):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    csv, image_dir = write_set(tmp_path, [row("a", box_mask(0, 2, 0, 2), "cort"), row("b", box_mask(0, 3, 0, 3))])
    catalog_names.append("ck_test_all")
    for _ in range(2):  # a re-run notebook cell
        assert ckdata.register_sartorius("ck_test_all", csv, image_dir) == "ck_test_all"
    meta = MetadataCatalog.get("ck_test_all")
    assert meta.thing_classes == list(CELL_TYPES) and meta.split == "all" and meta.image_ids == ("a", "b")
    assert [d["image_id"] for d in DatasetCatalog.get("ck_test_all")] == ["a", "b"]
    # re-registering the same name with different data replaces it (metadata included)
    csv2, image_dir2 = write_set(tmp_path, [row("z", box_mask(0, 2, 0, 2))], name="other.csv")
    ckdata.register_sartorius("ck_test_all", csv2, image_dir2)
    assert [d["image_id"] for d in DatasetCatalog.get("ck_test_all")] == ["z"]
    assert MetadataCatalog.get("ck_test_all").csv_file == str(csv2)


def test_register_sartorius_folds(tmp_path, catalog_names):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    ids = ["a", "b", "c", "d"]
    csv, image_dir = write_set(tmp_path, [row(i, box_mask(0, 2, 0, 2)) for i in ids])
    folds = folds_file(tmp_path, {"a": 0, "b": 1, "c": 0, "d": 1})
    catalog_names += ["ck_f0_train", "ck_f0_val"]
    ckdata.register_sartorius("ck_f0_train", csv, image_dir, folds, fold=0, split="train")
    ckdata.register_sartorius("ck_f0_val", csv, image_dir, folds, fold=0, split="val")
    assert [d["image_id"] for d in DatasetCatalog.get("ck_f0_train")] == ["b", "d"]
    assert [d["image_id"] for d in DatasetCatalog.get("ck_f0_val")] == ["a", "c"]
    meta = MetadataCatalog.get("ck_f0_val")
    assert (meta.fold, meta.split, meta.folds_csv) == (0, "val", folds)


def test_register_sartorius_exclude(tmp_path, catalog_names):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    ids = ["a", "b", "c", "d"]
    csv, image_dir = write_set(tmp_path, [row(i, box_mask(0, 2, 0, 2)) for i in ids])
    folds = folds_file(tmp_path, {"a": 0, "b": 1, "c": 0, "d": 1})
    catalog_names += ["ck_ex_train"]
    ckdata.register_sartorius("ck_ex_train", csv, image_dir, folds, fold=0, split="train", exclude=["d", "a"])
    assert [d["image_id"] for d in DatasetCatalog.get("ck_ex_train")] == ["b"]
    meta = MetadataCatalog.get("ck_ex_train")
    assert meta.excluded == ("d",) and meta.image_ids == ("b",)  # "a" is in the other split: nothing to drop
    with pytest.raises(ValueError, match=r"1 excluded id\(s\) not in .*train\.csv, e\.g\. 'zz'"):
        ckdata.register_sartorius("ck_ex_train", csv, image_dir, exclude=["zz"])
    with pytest.raises(ValueError, match="excluding 2 image\\(s\\) leaves none in the train split"):
        ckdata.register_sartorius("ck_ex_train", csv, image_dir, folds, fold=0, split="train", exclude=["b", "d"])


def test_register_sartorius_errors(tmp_path, catalog_names):
    csv, image_dir = write_set(tmp_path, [row("a", box_mask(0, 2, 0, 2)), row("b", box_mask(0, 2, 0, 2))])
    catalog_names.append("ck_bad")
    with pytest.raises(ValueError, match="fold=0 given without folds_csv"):
        ckdata.register_sartorius("ck_bad", csv, image_dir, fold=0)
    folds = folds_file(tmp_path, {"a": 0, "b": 1})
    with pytest.raises(ValueError, match="folds_csv given without fold"):
        ckdata.register_sartorius("ck_bad", csv, image_dir, folds)
    with pytest.raises(ValueError, match=r"fold 7 is not in the folds table"):
        ckdata.register_sartorius("ck_bad", csv, image_dir, folds, fold=7)
    with pytest.raises(ValueError, match="split must be one of train, val"):
        ckdata.register_sartorius("ck_bad", csv, image_dir, folds, fold=0, split="test")
    foreign = folds_file(tmp_path, {"a": 0, "q": 1})
    with pytest.raises(ValueError, match=r"folds\.csv: 1 id\(s\) not in .*train\.csv, e\.g\. 'q'"):
        ckdata.register_sartorius("ck_bad", csv, image_dir, foreign, fold=0)
    with pytest.raises(FileNotFoundError, match="image directory does not exist"):
        ckdata.register_sartorius("ck_bad", csv, tmp_path / "nowhere")


def livecell_json(tmp_path) -> tuple:
    """A two-image LIVECell-style COCO json (polygons, one category 'cell') with its TIFs."""
    root = tmp_path / "images"
    root.mkdir()
    images, annotations = [], []
    for k, name in enumerate(["A172_Phase_C7_1_00d00h00m_1.tif", "MCF7_Phase_G4_2_02d16h00m_1.tif"], start=1):
        write_png(root / name)
        images.append({"id": k, "width": W, "height": H, "file_name": name})
        annotations.append({"id": 10 + k, "image_id": k, "category_id": 1, "iscrowd": 0, "area": 16.0,
                            "bbox": [2.0, 3.0, 4.0, 4.0], "segmentation": [[2, 3, 6, 3, 6, 7, 2, 7]]})
    path = tmp_path / "livecell_coco_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cell", "supercategory": "cell"}]}))
    return path, root


def test_register_livecell_keeps_json_classes_and_is_idempotent(tmp_path, catalog_names):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    path, root = livecell_json(tmp_path)
    catalog_names.append("ck_livecell")
    for _ in range(2):
        ckdata.register_livecell("ck_livecell", path, root)
    dicts = DatasetCatalog.get("ck_livecell")
    assert len(dicts) == 2 and all(len(d["annotations"]) == 1 for d in dicts)
    assert dicts[0]["annotations"][0]["category_id"] == 0
    assert MetadataCatalog.get("ck_livecell").thing_classes == ["cell"]
    assert MetadataCatalog.get("ck_livecell").evaluator_type == "coco"


def test_register_livecell_cell_line_classes(tmp_path, catalog_names):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    path, root = livecell_json(tmp_path)
    catalog_names.append("ck_livecell_lines")
    ckdata.register_livecell("ck_livecell_lines", path, root)
    ckdata.register_livecell("ck_livecell_lines", path, root, cell_line_classes=True)  # switch mode on re-run
    dicts = DatasetCatalog.get("ck_livecell_lines")
    lines = ckdata.LIVECELL_CELL_LINES
    assert [d["annotations"][0]["category_id"] for d in dicts] == [lines.index("A172"), lines.index("MCF7")]
    assert MetadataCatalog.get("ck_livecell_lines").thing_classes == list(lines)


def test_register_livecell_errors(tmp_path, catalog_names):
    path, root = livecell_json(tmp_path)
    catalog_names.append("ck_lc_bad")
    with pytest.raises(FileNotFoundError, match="no such LIVECell json"):
        ckdata.register_livecell("ck_lc_bad", tmp_path / "x.json", root)
    with pytest.raises(FileNotFoundError, match="image folder does not exist"):
        ckdata.register_livecell("ck_lc_bad", path, tmp_path / "nowhere")
    doc = json.loads(path.read_text())
    doc["images"][0]["file_name"] = "HeLa_1.tif"
    write_png(root / "HeLa_1.tif")
    path.write_text(json.dumps(doc))
    from detectron2.data import DatasetCatalog

    ckdata.register_livecell("ck_lc_bad", path, root, cell_line_classes=True)
    with pytest.raises(ValueError, match="'HeLa_1.tif' does not start with a LIVECell cell line"):
        DatasetCatalog.get("ck_lc_bad")


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_real_dicts_boxes_agree_with_masks(real_train_csv):
    from pycocotools import mask as mask_util

    table = ckdata.read_train_csv(real_train_csv)
    ids = [table.loc[table["cell_type"] == t, "id"].iloc[0] for t in CELL_TYPES]
    dicts = ckdata.load_sartorius_dicts(real_train_csv, real_train_csv.parent / "train", ids)
    for record, cell_type in zip(dicts, CELL_TYPES):
        truth = table.loc[(table["id"] == record["image_id"]) & (table["annotation"] != ""), "annotation"]
        assert (record["height"], record["width"]) == (520, 704) and record["cell_type"] == cell_type
        assert len(record["annotations"]) == len(truth) > 0
        for ann, s in zip(record["annotations"], truth):
            mask = rle.decode(s)
            np.testing.assert_array_equal(mask_util.decode(ann["segmentation"]).astype(bool), mask)
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert ann["category_id"] == CELL_TYPES.index(cell_type)


@pytest.mark.realdata
def test_real_livecell_registers(real_data, catalog_names):
    from detectron2.data import DatasetCatalog

    json_path = real_data / "livecell" / "livecell_coco_val.json"
    if not json_path.is_file():
        pytest.skip(f"{json_path} not found")
    catalog_names.append("ck_real_livecell")
    ckdata.register_livecell("ck_real_livecell", json_path, real_data / "livecell" / "images",
                             cell_line_classes=True)
    dicts = DatasetCatalog.get("ck_real_livecell")
    assert len(dicts) == 5 and sum(len(d["annotations"]) for d in dicts) == 1243
    assert all((d["height"], d["width"]) == (520, 704) for d in dicts)


def test_find_image_matches_the_extension_in_any_case(tmp_path):
    from cellkit.data import find_image

    (tmp_path / "a.PNG").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    assert find_image(tmp_path, "a") == tmp_path / "a.PNG"
    assert find_image(tmp_path, "b") == tmp_path / "b.png"
    with pytest.raises(FileNotFoundError, match="no image for id 'c'"):
        find_image(tmp_path, "c")
