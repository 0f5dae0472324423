"""The fault-injection suite: kills at the worst moment, corrupted files and broken inputs, on tiny synthetic data.

Kills are deterministic: the subprocess runs with ``tests/faults`` first on ``PYTHONPATH``, whose ``sitecustomize``
SIGKILLs it at a chosen ``os.replace``/``os.rename`` (``CELLKIT_FAULT=WHEN:GLOB:N``, see that file); one predict
kill at a random moment complements them. Every case checks that the command (or its re-run) ends as it should:
a resumed run equal to an uninterrupted one, the previous file or none (never a partial one), or a non-zero exit
with a message naming the file (and CSV line) and no new output that looks finished.

Run: ``pytest -m faults tests/test_faults.py --durations=10`` (one tiny training run is shared by the module).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("detectron2")
cv2 = pytest.importorskip("cv2")

from cellkit import CELL_TYPES, rle  # noqa: E402
from cellkit.cli import main  # noqa: E402

from test_train import SIZE, TINY, _tiny_image  # noqa: E402

pytestmark = pytest.mark.faults

FAULTS = Path(__file__).resolve().parent / "faults"
REPO = Path(__file__).resolve().parents[1]
FINISHED = ("model_final.pth", "last_checkpoint", "metrics.json", "config.yaml")


# --------------------------------------------------------------------------------------------------------- helpers
def _main(args) -> int:
    """``cellkit`` in this process (no start-up cost), arguments as strings."""
    return main([str(a) for a in args])


def _cellkit(args, fault: str | None = None, timeout: float = 300, **popen):
    """Run ``python -m cellkit ARGS`` in a subprocess (with ``CELLKIT_FAULT`` = ``fault``); returns CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FAULTS), str(REPO), env.get("PYTHONPATH", "")])
    env.pop("CELLKIT_FAULT", None)
    if fault:
        env["CELLKIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "cellkit", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def _make_data(root: Path, n: int = 6) -> Path:
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        cell_type = CELL_TYPES[i % 3]
        img, masks = _tiny_image(rng, cell_type)
        image_id = f"img{i:03d}"
        cv2.imwrite(str(root / "train" / f"{image_id}.png"), img)
        rows += [{"id": image_id, "annotation": rle.encode(m), "width": SIZE, "height": SIZE,
                  "cell_type": cell_type} for m in masks]
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def _train_args(data, out, *extra):
    return ["train", "--config", "demo", "--data", str(data), "--fold", "0", "--out", str(out), *extra, *TINY]


def _snapshot(directory: Path) -> dict:
    """``{relative path: bytes}`` of every file under ``directory`` (hidden ones included)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _store_arrays(store: Path) -> dict:
    out = {}
    for p in sorted(q for q in store.glob("*.npz") if not q.name.startswith(".")):
        with np.load(p, allow_pickle=False) as npz:
            out[p.name] = {k: npz[k] for k in npz.files}
    return out


def _assert_same_store(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())  # no leftovers either
    arrays_a, arrays_b = _store_arrays(a), _store_arrays(b)
    assert arrays_a.keys() == arrays_b.keys() and arrays_a
    for name in arrays_a:
        for key in arrays_a[name]:
            np.testing.assert_array_equal(arrays_a[name][key], arrays_b[name][key], err_msg=f"{name}:{key}")
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert meta_a == meta_b


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _make_data(tmp_path_factory.mktemp("faultdata"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One tiny finished training run (2 iterations, model_final.pth), shared by the predict tests."""
    out = tmp_path_factory.mktemp("faultrun") / "run"
    assert _main(_train_args(data, out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
                            "TEST.EVAL_PERIOD", "0")) == 0
    assert (out / "model_final.pth").is_file() and not (out / "FAILED").exists()
    return out


@pytest.fixture(scope="module")
def ref_store(run, data, tmp_path_factory):
    """The predictions of ``run`` on the tiny images by an uninterrupted ``cellkit predict``."""
    ref = tmp_path_factory.mktemp("faultref") / "ref"
    assert _main(["predict", "--run", run, "--images", data / "train", "--out", ref, "--no-progress"]) == 0
    return ref


@pytest.fixture(scope="module")
def store(data, tmp_path_factory):
    """A fakepred store of the tiny data (for search and submit) and a thresholds.json searched on it."""
    root = tmp_path_factory.mktemp("faultstore")
    assert _main(["fakepred", "--truth", data / "train.csv", "--out", root / "pred", "--no-progress"]) == 0
    assert _main(["search", "--pred", root / "pred", "--truth", data / "train.csv", "--out",
                 root / "thresholds.json", "--score-grid", "0.3,0.5", "--mask-grid", "0.5", "--min-area-grid",
                 "0,10", "--workers", "1", "--rounds", "1", "--options", "seed", "--no-progress"]) == 0
    return root


# ------------------------------------------------------------------------------------------------ kill: training
def test_train_killed_mid_checkpoint_resumes_to_a_loadable_final_model(data, tmp_path):
    out = tmp_path / "run"
    args = _train_args(data, out, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0",
                       "SOLVER.STEPS", "(2,)", "CELLKIT.KEEP_CHECKPOINTS", "2")
    # killed half-way through writing the second periodic checkpoint (model_0000001.pth)
    proc = _cellkit(args, fault="partial:model_0000001.pth:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "model_final.pth").exists() and not (out / "model_0000001.pth").exists()
    assert (out / "last_checkpoint").read_text().strip() == "model_0000000.pth"
    torch.load(out / "model_0000000.pth", map_location="cpu", weights_only=False)  # whole
    # a plain re-run refuses the directory; --resume reaches the planned iteration
    assert _main(args) == 2
    assert _main(args + ["--resume"]) == 0
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2
    periodic = sorted(p.name for p in out.glob("model_[0-9]*.pth"))
    assert periodic == ["model_0000001.pth", "model_0000002.pth"]  # model_0000000 from before --resume pruned
    assert not list(out.glob(".*"))  # the killed save's temporary file was cleaned up on resume
    from cellkit.config import load_run_config
    from cellkit.modeling import load_model

    load_model(load_run_config(out), out / "model_final.pth")  # loadable


def test_failed_training_leaves_failed_marker_not_a_finished_run(data, tmp_path, monkeypatch, capsys):
    from cellkit import train as ck_train

    out = tmp_path / "run"
    real_run_step = ck_train.CellkitTrainer.run_step

    def crash(self):
        if self.iter == 0:
            raise RuntimeError("simulated failure in the first batch")
        return real_run_step(self)

    monkeypatch.setattr(ck_train.CellkitTrainer, "run_step", crash)
    args = _train_args(data, out, "SOLVER.MAX_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "1")
    with pytest.raises(RuntimeError, match="simulated failure"):
        _main(args)
    failed = (out / "FAILED").read_text()
    assert failed.startswith("training failed at iteration 0: RuntimeError: simulated failure in the first batch")
    assert not (out / "model_final.pth").exists() and not (out / "last_checkpoint").exists()
    assert not list(out.glob("model_*.pth"))
    assert _main(["predict", "--run", out, "--images", data / "train", "--out", tmp_path / "p"]) == 2
    assert "the run failed (FAILED: training failed at iteration 0" in capsys.readouterr().err
    # fixed, the same command simply starts (no --resume needed) and the marker goes
    monkeypatch.setattr(ck_train.CellkitTrainer, "run_step", real_run_step)
    assert _main(args) == 0
    assert (out / "model_final.pth").is_file() and not (out / "FAILED").exists()
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()]
    assert iterations == sorted(iterations)  # the failed attempt's metrics were not kept


# ------------------------------------------------------------------------------------------------- kill: predict
def test_predict_killed_halfway_then_rerun_equals_an_uninterrupted_run(run, ref_store, data, tmp_path, capsys):
    images = data / "train"
    ref, store = ref_store, tmp_path / "store"
    cmd = ["predict", "--run", run, "--images", images, "--out", store, "--no-progress"]
    proc = _cellkit(cmd, fault="partial:img003.npz:1")  # mid-write of the 4th of 6 images
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _visible(store) == ["img000.npz", "img001.npz", "img002.npz", "meta.json"]
    assert list(store.glob(".img003.npz.*"))  # the half-written temporary file, invisible to readers
    assert _main(cmd) == 0  # the same command, in this process (no second start-up)
    assert "3 image(s) written, 3 already there" in capsys.readouterr().out
    _assert_same_store(ref, store)


def test_predict_killed_at_a_random_moment_then_rerun_equals(run, ref_store, data, tmp_path):
    images = data / "train"
    ref, store = ref_store, tmp_path / "store"
    cmd = ["predict", "--run", run, "--images", images, "--out", store, "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    seed = random.randrange(1 << 30)
    proc = subprocess.Popen([sys.executable, "-m", "cellkit", *map(str, cmd)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (store / "meta.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the model is loaded: from here every moment is a write moment
    time.sleep(random.Random(seed).uniform(0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for p in (q for q in store.glob("*.npz") if not q.name.startswith(".")):  # whatever is visible is whole
        from cellkit.predictions import load

        load(p)
    assert _main(cmd) == 0, f"seed {seed}"
    _assert_same_store(ref, store)


# -------------------------------------------------------------------------------------------------- kill: writers
def _writer_cases(data, store, tmp):
    """(name, target file, first command, second command writing different content) per writer."""
    th = store / "thresholds.json"
    search = ["search", "--pred", store / "pred", "--truth", data / "train.csv", "--out", tmp / "thresholds.json",
              "--mask-grid", "0.5", "--min-area-grid", "0", "--workers", "1", "--rounds", "1", "--options", "seed",
              "--no-progress"]
    sub = ["submit", "--pred", store / "pred", "--thresholds", th, "--images", data / "train", "--no-progress"]
    # cv writes tmp/cv.png then tmp/cv.json (killed at the json; the png goes through the same cellkit.atomic path as
    # the search plot); it runs after the cases above wrote tmp/folds.csv and tmp/thresholds.json
    cv = ["cv", tmp, "--pred", store / "pred", "--truth", data / "train.csv", "--folds", tmp / "folds.csv",
          "--no-progress"]
    cv_first, cv_second = cv + ["--thresholds", th], cv + ["--thresholds", tmp / "thresholds.json"]
    return [
        ("folds", "folds.csv", ["folds", data / "train.csv", "--k", "2", "--out", tmp / "folds.csv"],
         ["folds", data / "train.csv", "--k", "2", "--seed", "1", "--out", tmp / "folds.csv"]),
        ("score --per-image", "per_image.csv",
         ["score", "--truth", data / "train.csv", "--pred", data / "train.csv", "--per-image", tmp / "per_image.csv"],
         ["score", "--truth", data / "train.csv", "--pred", tmp / "half.csv", "--per-image", tmp / "per_image.csv"]),
        ("search", "thresholds.json", search + ["--score-grid", "0.3"], search + ["--score-grid", "0.5,0.7"]),
        ("search plot", "plot.png", search[:6] + [tmp / "plot.json"] + search[7:] + ["--score-grid", "0.3"],
         search[:6] + [tmp / "plot.json"] + search[7:] + ["--score-grid", "0.5,0.7"]),
        ("submit", "submission.csv", sub + ["--out", tmp / "submission.csv"], None),
        ("cv", "cv.json", cv_first, cv_second),
    ]


def _readable(path: Path):
    """A complete file's content, read in full (timings inside thresholds.json vary between runs: keys only)."""
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        return sorted(doc), sorted(doc["thresholds"])
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return im.size
    return pd.read_csv(path, keep_default_na=False).to_dict("list")


@pytest.mark.parametrize("when", ["partial", "after"])
def test_writers_killed_leave_the_previous_file_or_none(data, store, tmp_path, when):
    pd.read_csv(data / "train.csv").head(9).to_csv(tmp_path / "half.csv", index=False)
    for name, target, first, second in _writer_cases(data, store, tmp_path):
        if when == "after" and name not in ("search", "submit"):
            continue  # the same cellkit.atomic rename as the others: two writers show the renamed file is whole
        path = tmp_path / target
        # no previous file: killed before its rename, nothing visible; killed after, the whole new file
        proc = _cellkit(first, fault=f"{'partial' if when == 'partial' else 'after'}:{target}:1")
        assert proc.returncode == -signal.SIGKILL, (name, proc.stderr[-2000:])
        if when == "partial":
            assert not path.exists(), name
            assert _main(first) == 0, name
        previous = path.read_bytes()
        if when == "after":
            killed = _readable(path)
            assert _main(first) == 0, name
            assert killed == _readable(path), name  # what the killed run renamed into place was complete
            previous = path.read_bytes()
        if second is not None and when == "partial":
            proc = _cellkit(second, fault=f"partial:{target}:1")
            assert proc.returncode == -signal.SIGKILL, (name, proc.stderr[-2000:])
            assert path.read_bytes() == previous, name  # the previous file, untouched


def test_synth_killed_leaves_the_previous_folder_or_none(tmp_path):
    out = tmp_path / "demo"
    proc = _cellkit(["synth", out, "--images", "1", "--test-images", "1", "--seed", "0"], fault="before:demo:1")
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert _main(["synth", out, "--images", "1", "--test-images", "1", "--seed", "0"]) == 0
    before = _snapshot(out)
    # killed before the old folder is moved aside: untouched; between the two renames: none (never a mix)
    proc = _cellkit(["synth", out, "--images", "1", "--test-images", "1", "--seed", "1", "--force"],
                    fault="before:.demo.old-*:1")
    assert proc.returncode == -signal.SIGKILL and _snapshot(out) == before
    proc = _cellkit(["synth", out, "--images", "1", "--test-images", "1", "--seed", "1", "--force"],
                    fault="before:demo:1")
    assert proc.returncode == -signal.SIGKILL and not out.exists()


def test_fakepred_killed_leaves_whole_files_and_resumes(data, tmp_path):
    from cellkit.predictions import load

    out = tmp_path / "fp"
    cmd = ["fakepred", "--truth", data / "train.csv", "--out", out, "--no-progress"]
    proc = _cellkit(cmd, fault="partial:img002.npz:1")
    assert proc.returncode == -signal.SIGKILL
    assert _visible(out) == ["img000.npz", "img001.npz", "meta.json"]
    for p in out.glob("img*.npz"):
        load(p)
    ref = tmp_path / "ref"
    assert _main(cmd) == 0 and _main(["fakepred", "--truth", data / "train.csv", "--out", ref, "--no-progress"]) == 0
    assert _store_arrays(out).keys() == _store_arrays(ref).keys()
    for name, arrays in _store_arrays(ref).items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(_store_arrays(out)[name][key], value)


def test_config_yaml_killed_mid_write_leaves_nothing_finished(data, tmp_path):
    out = tmp_path / "run"
    args = _train_args(data, out, "SOLVER.MAX_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0")
    proc = _cellkit(args, fault="partial:config.yaml:1")
    assert proc.returncode == -signal.SIGKILL
    assert not any((out / name).exists() for name in FINISHED)
    assert not list(out.glob("model_*.pth"))


# ------------------------------------------------------------------------------------------- corrupted files
def _err(capsys) -> str:
    return capsys.readouterr().err


def test_corrupted_checkpoint_is_named(run, data, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    blob = (run / "model_final.pth").read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    assert _main(["predict", "--run", run, "--images", data / "train", "--out", tmp_path / "p",
                 "--weights", bad]) == 2
    assert f"{bad}: cannot load checkpoint" in _err(capsys)
    assert not (tmp_path / "p").exists()
    # resuming from a corrupted last checkpoint: an error naming it, a FAILED marker, no model_final
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    last = copy / (copy / "last_checkpoint").read_text().strip()
    last.write_bytes(b"not a checkpoint")
    assert _main(["train", "--out", copy, "--resume", "--data", data]) == 2
    assert f"{last}: cannot load checkpoint" in _err(capsys)
    assert (copy / "FAILED").read_text().startswith("training failed before training started: ValueError: "
                                                    f"{last}: cannot load checkpoint")


def test_corrupted_npz_in_a_store_is_named(store, data, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(store / "pred", pred)
    blob = (pred / "img004.npz").read_bytes()
    (pred / "img004.npz").write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "submission.csv"
    assert _main(["submit", "--pred", pred, "--thresholds", store / "thresholds.json", "--images", data / "train",
                 "--out", out, "--no-progress"]) == 2
    assert f"{pred / 'img004.npz'}: not a cellkit predictions file" in _err(capsys)
    assert not out.exists()
    assert _main(["search", "--pred", pred, "--truth", data / "train.csv", "--out", tmp_path / "t.json",
                 "--score-grid", "0.5", "--mask-grid", "0.5", "--min-area-grid", "0", "--workers", "1",
                 "--rounds", "1", "--options", "seed", "--no-progress"]) == 2
    assert f"{pred / 'img004.npz'}" in _err(capsys)
    assert not (tmp_path / "t.json").exists()


def test_truncated_thresholds_json_is_named(store, data, tmp_path, capsys):
    th = tmp_path / "thresholds.json"
    text = (store / "thresholds.json").read_text()
    th.write_text(text[: len(text) // 2])
    out = tmp_path / "submission.csv"
    assert _main(["submit", "--pred", store / "pred", "--thresholds", th, "--images", data / "train", "--out",
                 out, "--no-progress"]) == 2
    assert f"{th}: invalid JSON" in _err(capsys)
    assert not out.exists()


def test_store_made_by_another_model_is_named(run, ref_store, data, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(ref_store, store)
    before = _snapshot(store)
    other = tmp_path / "other.pth"  # other weights (a byte-identical copy would be the same model: same sha256)
    import torch

    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = checkpoint["model"][name] + 1
    torch.save(checkpoint, other)
    assert _main(["predict", "--run", run, "--images", data / "train", "--out", store, "--weights", other,
                 "--no-progress"]) == 2
    err = _err(capsys)
    assert f"{store / 'meta.json'}: the store holds predictions" in err and "made by other models" in err
    assert _snapshot(store) == before


# ------------------------------------------------------------------------------------------------ bad inputs
def _break(kind: str, root: Path) -> tuple[str, str]:
    """Break a copy of the tiny data in one way; returns (file the message must name, text it must contain)."""
    csv = root / "train.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    img = root / "train" / "img002.png"
    if kind == "bad RLE":
        df.loc[5, "annotation"] = "1 2 3"
        df.loc[13, "annotation"] = "5 0"
        df.to_csv(csv, index=False)
        return str(csv), "line 7 (id img001): bad annotation"  # and line 15: every bad row at once
    if kind == "RLE past the image end":
        df.loc[0, "annotation"] = f"{SIZE * SIZE} 5"
        df.to_csv(csv, index=False)
        return str(csv), "line 2 (id img000): bad annotation"
    if kind == "unknown cell type":
        df.loc[[3, 17, 18], "cell_type"] = "neuron"
        df.to_csv(csv, index=False)
        return str(csv), "line 5 (id img000): unknown cell type 'neuron'"
    if kind == "non-integer width":
        df.loc[4, "width"] = "12.5"
        df.to_csv(csv, index=False)
        return str(csv), "line 6: width '12.5' is not a positive integer"
    if kind == "sizes disagree within an image":
        df.loc[1, "height"] = "64"
        df.to_csv(csv, index=False)
        return str(csv), "line 3 (id img000): size 128x64 differs"
    if kind == "missing column":
        df.drop(columns=["cell_type"]).to_csv(csv, index=False)
        return str(csv), "missing column(s) cell_type"
    if kind == "empty CSV":
        csv.write_text("")
        return str(csv), "empty CSV"
    if kind == "header only":
        csv.write_text("id,annotation,width,height,cell_type\n")
        return str(csv), "no data rows"
    if kind == "missing image":
        img.unlink()
        return str(csv), "line 10 (id img002)"
    if kind == "image of the wrong size":
        cv2.imwrite(str(img), np.zeros((SIZE, SIZE + 8), np.uint8))
        return str(img), "is 136x128 (WxH), expected 128x128"
    if kind == "truncated image":
        blob = img.read_bytes()
        img.write_bytes(blob[: len(blob) // 2])
        return str(img), "cannot read image (image file is truncated"
    if kind == "not an image":
        img.write_bytes(b"this is not a png")
        return str(img), "cannot read image"
    if kind == "16-bit image":
        cv2.imwrite(str(img), np.full((SIZE, SIZE), 1000, np.uint16))
        return str(img), "image mode 'I;16' is not an 8-bit mode"
    raise AssertionError(kind)


BAD_INPUTS = ["bad RLE", "RLE past the image end", "unknown cell type", "non-integer width",
              "sizes disagree within an image", "missing column", "empty CSV", "header only", "missing image",
              "image of the wrong size", "truncated image", "not an image", "16-bit image"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_train_refuses_bad_input_before_work(kind, data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    named, text = _break(kind, root)
    out = tmp_path / "run"
    assert _main(_train_args(root, out, "SOLVER.MAX_ITER", "1")) == 2
    err = _err(capsys)
    assert named in err and text in err, err
    if kind == "bad RLE":
        assert "line 15 (id img003): bad annotation" in err and "2 problem(s)" in err
    if kind == "unknown cell type":  # every bad row at once
        assert f"the same problem on 2 more line(s) of {named}: 19, 20" in err
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())  # nothing written at all


def test_16_bit_images_are_predicted_as_8_bit_and_refused_for_training_and_eda(run, data, tmp_path, capsys):
    """A 16-bit test image is read as the model reads every 16-bit image (``data.to_8bit``); the training layout and
    the EDA refuse it, naming the file and how to convert it (``cellkit import``)."""
    from cellkit import viz

    root = tmp_path / "data"
    shutil.copytree(data, root)
    named, text = _break("16-bit image", root)
    store = tmp_path / "store"
    assert _main(["predict", "--run", run, "--images", root / "train", "--out", store, "--no-progress"]) == 0
    assert (store / "img002.npz").is_file()
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"id": [f"img{i:03d}" for i in range(6)], "predicted": ""}).to_csv(sub, index=False)
    assert _main(["validate", sub, "--images", root / "train"]) == 0
    with pytest.raises(ValueError, match=re.escape(text) + ".*cellkit import` converts 16-bit images"):
        viz.read_image(named)


@pytest.mark.parametrize("kind", ["truncated image", "not an image"])
def test_image_readers_name_the_broken_file(kind, run, data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    named, text = _break(kind, root)
    images = root / "train"
    # predict: every image checked before the model runs; nothing written
    store = tmp_path / "store"
    assert _main(["predict", "--run", run, "--images", images, "--out", store, "--no-progress"]) == 2
    err = _err(capsys)
    assert named in err and text in err and "nothing was predicted" in err, err
    assert not store.exists()
    # validate / submit (reading the test images' sizes)
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"id": [f"img{i:03d}" for i in range(6)], "predicted": ""}).to_csv(sub, index=False)
    assert _main(["validate", sub, "--images", images]) == 2
    err = _err(capsys)
    assert named in err and text in err, err
    # EDA
    from cellkit import viz

    with pytest.raises(ValueError, match=re.escape(text)):
        viz.read_image(named)
    # the training mapper (a file that broke after the data check)
    from cellkit import train as ck_train
    from cellkit.config import get_preset_cfg, resolve_runtime

    cfg = get_preset_cfg("demo", ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160"])
    resolve_runtime(cfg, has_cuda=False)
    mapper = ck_train.CellkitDatasetMapper(cfg, is_train=True)
    record = {"file_name": named, "image_id": "img002", "height": SIZE, "width": SIZE, "annotations": []}
    with pytest.raises(ValueError, match="cannot read image"):
        mapper(record)


def test_data_check_is_remembered_and_redone_for_a_changed_file(data, tmp_path):
    from cellkit import datacheck

    root = tmp_path / "data"
    shutil.copytree(data, root)
    first = datacheck.check_sartorius(root / "train.csv", root / "train", progress=False)
    assert first["images_read"] == 6 and first["annotations_parsed"] == 24
    second = datacheck.check_sartorius(root / "train.csv", root / "train", progress=False)
    assert second["images_read"] == 0 and second["annotations_parsed"] == 0
    _break("truncated image", root)  # size and mtime change: read again, and the problem is found
    with pytest.raises(datacheck.DataCheckError, match="img002.png: cannot read image"):
        datacheck.check_sartorius(root / "train.csv", root / "train", progress=False)
    cv2.imwrite(str(root / "train" / "img002.png"), cv2.imread(str(data / "train" / "img002.png"), 0))
    third = datacheck.check_sartorius(root / "train.csv", root / "train", progress=False)
    assert third["images_read"] == 1 and third["annotations_parsed"] == 0


def test_data_check_in_worker_processes_reports_every_problem(data, tmp_path, monkeypatch):
    from cellkit import datacheck

    root = tmp_path / "data"
    shutil.copytree(data, root)
    _break("bad RLE", root)
    _break("truncated image", root)
    (root / "train" / "img004.png").unlink()
    monkeypatch.setattr(datacheck, "_MIN_FOR_PROCESSES", 1)  # the tiny data through the forked-worker path
    with pytest.raises(datacheck.DataCheckError) as info:
        datacheck.check_sartorius(root / "train.csv", root / "train", workers=2, progress=False)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"the data check found 4 problem(s) in {root / 'train.csv'}")
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        f"{root / 'train.csv'} line {n}" + suffix for n, suffix in
        [(7, " (id img001)"), (10, " (id img002)"), (15, " (id img003)"), (18, " (id img004)")]]
    assert "img002.png: cannot read image" in lines[2] and "no image for id 'img004'" in lines[4]


def test_livecell_check_names_every_bad_entry(tmp_path, capsys):
    from cellkit import datacheck

    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("A172_Phase_A7_1_00d00h00m_1.tif", (40, 30)), ("BV2_Phase_B1_1_00d00h00m_2.tif", (40, 30)),
                       ("Huh7_Phase_C1_1_00d00h00m_3.tif", (44, 30)), ("Foo_Phase_D1_1_00d00h00m_4.tif", (40, 30))):
        cv2.imwrite(str(images / name), np.zeros((size[1], size[0]), np.uint8))
    entries = [{"id": k + 1, "file_name": n, "width": 40, "height": 30} for k, n in enumerate(sorted(
        p.name for p in images.iterdir()))] + [{"id": 9, "file_name": "MCF7_missing.tif", "width": 40, "height": 30}]
    poly = [1, 1, 10, 1, 10, 10]
    anns = [{"id": 100, "image_id": 1, "segmentation": [poly], "bbox": [1, 1, 9, 9]},
            {"id": 101, "image_id": 2, "segmentation": [[1, 2, 3]], "bbox": [1, 1, 9, 9]},
            {"id": 102, "image_id": 77, "segmentation": [poly], "bbox": [1, 1, 9, 9]},
            {"id": 103, "image_id": 1, "segmentation": [poly], "bbox": [1, 1]}]
    doc = tmp_path / "live.json"
    doc.write_text(json.dumps({"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "cell"}]}))
    with pytest.raises(datacheck.DataCheckError) as info:
        datacheck.check_livecell(doc, images, progress=False)
    msg = str(info.value)
    assert "found 6 problem(s)" in msg, msg
    assert f"{doc} images[2] (id 3, Foo_Phase_D1_1_00d00h00m_4.tif): file name does not start with a LIVECell" in msg
    assert "Huh7_Phase_C1_1_00d00h00m_3.tif): " in msg and "is 44x30 (WxH), expected 40x30" in msg
    assert "MCF7_missing.tif): " in msg and "no such image file" in msg
    assert f"{doc} annotations[1] (id 101): polygon 0 must be a list of an even number" in msg
    assert f"{doc} annotations[2] (id 102): image_id 77 is not in 'images'" in msg
    assert f"{doc} annotations[3] (id 103): bbox must be 4 finite numbers" in msg
    # the same through `cellkit train` in pretrain mode: exit 2 before any work, nothing written
    out = tmp_path / "run"
    assert _main(["train", "--config", "demo", "--livecell", doc, "--livecell-images", images, "--out", out]) == 2
    assert "found 6 problem(s)" in _err(capsys) and (not out.exists() or not any(out.iterdir()))
    doc.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"{re.escape(str(doc))}: invalid JSON"):
        datacheck.check_livecell(doc, images, progress=False)


@pytest.mark.realdata
def test_data_check_passes_on_the_real_data(real_data):
    from cellkit import datacheck

    stats = datacheck.check_sartorius(real_data / "sartorius" / "train.csv", real_data / "sartorius" / "train",
                                      progress=False)
    assert stats["images"] == 392 and stats["annotations"] == 32105
    live = real_data / "livecell"
    for name in ("livecell_coco_test.json", "livecell_coco_val.json"):
        if (live / name).is_file():
            assert datacheck.check_livecell(live / name, live / "images", progress=False)["images"] > 0


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_outputs_get_the_umask_permissions(tmp_path, umask):
    """An atomic output has the mode a plain ``open(path, "w")`` would give it (0666 & ~umask), not mkstemp's 0600."""
    from cellkit import atomic

    old = os.umask(umask)
    try:
        written = [atomic.write_text(tmp_path / "a.txt", "x"), atomic.write_bytes(tmp_path / "b.bin", b"x"),
                   atomic.write_json(tmp_path / "c.json", {"a": 1})]
        with open(tmp_path / "plain.txt", "w") as plain:
            plain.write("x")
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in written] == [0o666 & ~umask] * 3
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask
