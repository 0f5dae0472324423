"""The six notebooks, the papermill chain and the pictures they draw.

Static checks (fast): the notebooks are what ``scripts/make_notebooks.py`` writes, without outputs, thin (no ``cd``,
no star imports, no function or class definitions), with a ``parameters`` cell whose every parameter has help.
Executed checks (papermill, tiny synthetic data): a wrong parameter stops in the setup cells with a clear message
and papermill exits non-zero naming the notebook; a failing cell fails the chain naming notebook and cell; the whole
chain runs on smoke parameters and leaves a valid submission.csv and the CV score.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from cellkit import chain, viz
from cellkit.commands import chain as chain_cmd

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PAPERMILL = [sys.executable, "-m", "papermill"]


def code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


# ------------------------------------------------------------------------------------------------ static checks
OPTIONAL = ("04b_pseudo_labels",)  # generated and checked like the others, not run by the chain


def test_six_notebooks_in_chain_order():
    assert [p.stem for p in NOTEBOOKS if p.stem not in OPTIONAL] == list(chain.NOTEBOOKS)
    assert {p.stem for p in NOTEBOOKS} >= set(OPTIONAL) and not set(OPTIONAL) & set(chain.NOTEBOOKS)


def test_notebooks_match_generator():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_notebooks.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    for cell in code_cells(path):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_are_thin(path):
    cells = code_cells(path)
    assert cells[0].metadata.get("tags") == ["parameters"]
    for cell in cells:
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)), cell.source[:80]
            if isinstance(node, ast.ImportFrom):
                assert all(alias.name != "*" for alias in node.names), cell.source[:80]
        assert "chdir" not in cell.source and "%cd" not in cell.source and "!cd" not in cell.source
    # every cell after the bootstrap calls cellkit (the setup cell imports it; later ones use its modules)
    for cell in cells[2:]:
        assert "cellkit" in cell.source or any(m in cell.source for m in ("command(", "viz.", "kaggle.", "chain.")), \
            cell.source[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_parameter_has_help(path):
    import papermill as pm

    params = pm.inspect_notebook(str(path))
    assert {"OUT_DIR", "WHEELS_DIR"} <= set(params)
    for name, info in params.items():
        assert info["help"], f"{path.stem}: parameter {name} has no help comment"
        assert info["inferred_type_name"] in ("str", "int", "bool", "float"), (name, info)


def test_help_notebook_lists_parameters():
    path = ROOT / "notebooks" / "04_finetune.ipynb"
    result = subprocess.run(PAPERMILL + ["--help-notebook", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("DATA_DIR", "OUT_DIR", "PRESET", "FOLDS", "ITERATIONS", "DEVICE", "SMOKE", "WEIGHTS"):
        assert f"{name}:" in result.stdout
    assert "folds to train" in result.stdout


# ------------------------------------------------------------------------------------------------ chain helpers
def test_select_parameters_keeps_declared_only():
    declared = {"DATA_DIR": {}, "K": {}}
    assert chain.select_parameters(declared, {"DATA_DIR": "x", "PRESET": "demo"}) == {"DATA_DIR": "x"}


def test_parse_folds():
    table = pd.DataFrame({"id": list("abcd"), "fold": [0, 1, 2, 1]})
    assert chain.parse_folds("all", table) == [0, 1, 2]
    assert chain.parse_folds("2, 0", table) == [0, 2]
    with pytest.raises(ValueError, match=r"FOLDS='7': folds.csv has folds \[0, 1, 2\]"):
        chain.parse_folds("7", table)
    with pytest.raises(ValueError, match="FOLDS='x'"):
        chain.parse_folds("x", table)


def test_train_args():
    args = chain.train_args("cpu", iterations=30, smoke=True, weights=Path("/w.pth"))
    assert args[:2] == ["--weights", "/w.pth"]
    assert args[args.index("MODEL.DEVICE") + 1] == "cpu"
    # an explicit ITERATIONS comes after the smoke overrides, so it wins
    last = len(args) - 1 - args[::-1].index("SOLVER.MAX_ITER")
    assert args[last + 1] == "30"
    assert chain.train_args("cuda") == ["MODEL.DEVICE", "cuda"]


def test_chain_command_line_parsing():
    assert chain_cmd._parameter("K=2") == ("K", 2)
    assert chain_cmd._parameter("TTA=false") == ("TTA", False)
    assert chain_cmd._parameter("WEIGHTS=") == ("WEIGHTS", "")
    assert chain_cmd._select("1,04", chain.NOTEBOOKS) == ["01_eda", "04_finetune"]
    with pytest.raises(ValueError, match="unknown notebook"):
        chain_cmd._select("09", chain.NOTEBOOKS)


def test_run_identity_guards_the_run_dir(tmp_path):
    chain.check_run_identity(tmp_path, {"DATA_DIR": "/a", "PRESET": "demo", "K": 2})
    chain.check_run_identity(tmp_path, {"DATA_DIR": "/a", "PRESET": "demo", "K": 3})   # same run: resumes
    with pytest.raises(ValueError, match=r"DATA_DIR '/a' \(now '/b'\).*another output dir"):
        chain.check_run_identity(tmp_path, {"DATA_DIR": "/b", "PRESET": "demo"})


def test_command_raises_instead_of_exiting(capsys):
    with pytest.raises(ValueError, match=r"cellkit folds: invalid arguments \['--no-such-flag'\]"):
        chain.command("folds", "--no-such-flag")
    with pytest.raises(FileNotFoundError):
        chain.command("folds", "/no/such/train.csv", "--out", "/tmp/never-written-folds.csv")
    assert "$ cellkit folds /no/such/train.csv" in capsys.readouterr().out


def test_fold_runs(tmp_path):
    for name in ("fold10", "fold2", "foldx", "fold3"):
        (tmp_path / name).mkdir()
    for name in ("fold10", "fold2", "foldx"):
        (tmp_path / name / "config.yaml").write_text("")
    assert [p.name for p in chain.fold_runs(tmp_path)] == ["fold2", "fold10"]


def test_format_cv():
    doc = {"metric": {"before": {"mAP": 0.1, "per_class": {}},
                      "after": {"mAP": 0.25, "per_class": {"shsy5y": 0.2, "astro": None, "cort": 0.3}}},
           "search": {"n_images": 12}}
    line = chain.format_cv(doc)
    assert line.startswith("CV score on 12 out-of-fold images: mAP 0.2500")
    assert "cort 0.3000" in line and "astro" not in line and "0.1000" in line


# ------------------------------------------------------------------------------------------------ viz
def test_overlay_colours_masks_and_keeps_background():
    image = np.full((20, 30), 100, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:15] = True
    out = viz.overlay(image, [mask], alpha=0.5)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all()                          # background untouched
    assert not (out[10, 10] == 100).all()                    # inside tinted
    assert (out[5, 10] == viz.instance_colors(1)[0]).all()   # boundary drawn opaque
    with pytest.raises(ValueError, match="mask shape"):
        viz.overlay(image, [np.zeros((5, 5), bool)])


def test_counts_areas_and_samples():
    from cellkit import rle

    mask = np.zeros((4, 6), bool)
    mask[1, 1:4] = True
    df = pd.DataFrame({"id": ["a", "a", "b"], "annotation": [rle.encode(mask)] * 3, "width": 6, "height": 4,
                       "cell_type": ["cort", "cort", "astro"]})
    counts = viz.type_counts(df)
    assert list(counts.index) == ["astro", "cort"]
    assert counts.loc["cort", "images"] == 1 and counts.loc["cort", "cells"] == 2
    assert viz.cell_areas(df)["area"].tolist() == [3, 3, 3]
    assert viz.sample_images(df, per_type=5) == ["b", "a"]
    assert len(viz.image_masks(df, "a")) == 2


def test_masks_per_image_counts_empty_as_zero():
    sub = pd.DataFrame({"id": ["a", "a", "b"], "predicted": ["1 2", "5 1", ""]})
    assert viz.masks_per_image(sub).to_dict() == {"a": 2, "b": 0}


def test_read_metrics_and_curves(tmp_path):
    lines = [{"iteration": 0, "total_loss": 3.0, "loss_mask": 0.7},
             {"iteration": 9, "total_loss": 2.0, "loss_mask": 0.6},
             {"iteration": 9, "cellkit/mAP": 0.1, "cellkit/mAP_cort": 0.2}]
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"iteration\": 1")   # torn last line
    frame = viz.read_metrics(path)
    assert frame["iteration"].tolist() == [0, 9]
    assert frame.loc[1, "total_loss"] == 2.0 and frame.loc[1, "cellkit/mAP"] == 0.1
    assert viz.loss_columns(frame) == ["total_loss", "loss_mask"]
    assert viz.metric_columns(frame) == ["cellkit/mAP", "cellkit/mAP_cort"]
    out = viz.save_figure(viz.plot_training_curves(path), tmp_path / "curves.png")
    assert out.stat().st_size > 1000


# ------------------------------------------------------------------------------------------------ executed
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic competition-layout dataset (the chain's default data, scaled down)."""
    out = tmp_path_factory.mktemp("data") / "demo"
    result = subprocess.run([sys.executable, "-m", "cellkit", "synth", str(out), "--images", "8", "--test-images",
                             "2", "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def run_papermill(notebook: str, out: Path, **params) -> subprocess.CompletedProcess:
    args = PAPERMILL + [str(ROOT / "notebooks" / f"{notebook}.ipynb"), str(out)]
    for name, value in params.items():
        args += ["-p", name, str(value)]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)


def failed_cell(path: Path):
    """The code cell of an executed notebook whose output is an error, and whether any later cell ran."""
    cells = code_cells(path)
    index = next(i for i, c in enumerate(cells) if any(o.output_type == "error" for o in c.outputs))
    return cells[index], any(c.execution_count is not None for c in cells[index + 1:])


@pytest.mark.slow
def test_missing_data_dir_stops_in_setup(tmp_path):
    result = run_papermill("01_eda", tmp_path / "out.ipynb", DATA_DIR="/no/such/dir", OUT_DIR=tmp_path / "run")
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "01_eda.ipynb" in log                                           # papermill names the notebook
    assert "DATA_DIR='/no/such/dir': not found" in log
    cell, later_ran = failed_cell(tmp_path / "out.ipynb")
    assert cell.source.startswith("# Setup 2/2") and not later_ran       # stopped in the setup cell


@pytest.mark.slow
def test_unknown_preset_stops_in_setup(tmp_path, tiny_data):
    result = run_papermill("04_finetune", tmp_path / "out.ipynb", DATA_DIR=tiny_data, OUT_DIR=tmp_path / "run",
                           PRESET="no_such_preset")
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "04_finetune.ipynb" in log and "PRESET='no_such_preset'" in log and "unknown preset" in log
    cell, later_ran = failed_cell(tmp_path / "out.ipynb")
    assert cell.source.startswith("# Setup 2/2") and not later_ran
    assert not (tmp_path / "run" / "fold0").exists()                      # nothing started


@pytest.mark.slow
def test_failing_cell_names_notebook_and_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nb.cells = [nbformat.v4.new_code_cell("X = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print('fine')"),
                nbformat.v4.new_code_cell("raise ValueError(f'broken {X}')")]
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "07_broken.ipynb")
    with pytest.raises(chain.NotebookFailed) as err:
        chain.run_chain({"X": 5, "UNUSED": 1}, tmp_path / "run", ["07_broken"], tmp_path / "nbs",
                        echo=lambda *a, **k: None)
    message = str(err.value)
    assert "notebook 07_broken.ipynb failed at cell In [4] (cell 4 of the executed copy)" in message
    assert "ValueError: broken 5" in message                               # the injected parameter reached it
    assert (tmp_path / "run" / "notebooks" / "07_broken.ipynb").is_file()  # executed copy kept for reading


@pytest.mark.slow
def test_chain_smoke(tmp_path, tiny_data):
    """All six notebooks on tiny data with smoke parameters: submission.csv valid, CV score printed."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cellkit", "chain", "--data", str(tiny_data), "--out", str(out), "--smoke",
         "-p", "K=2", "-p", "N_OVERLAYS=1"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CV score on" in result.stdout and "mAP" in result.stdout
    for name in chain.NOTEBOOKS:
        assert (out / "notebooks" / f"{name}.ipynb").is_file()
    for artifact in ("folds.csv", "fold0/config.yaml", "fold0/metrics.json", "fold0/curves.png", "thresholds.json",
                     "thresholds.png", "cv.json", "cv.png", "submission.csv", "submission.png", "eda/overlays.png",
                     "eda/areas.png"):
        assert (out / artifact).exists(), artifact
    check = subprocess.run([sys.executable, "-m", "cellkit", "validate", str(out / "submission.csv"), "--images",
                            str(tiny_data / "test")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert set(submission["id"]) == {p.stem for p in (tiny_data / "test").iterdir()}
    # the chain's defaults: the test store is predicted as the OOF store the thresholds were fitted on
    from cellkit import predictions

    oof_sig = predictions.read_meta(out / "oof")["signature"]
    test_meta = predictions.read_meta(out / "test_pred")
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["inference"] == oof_sig == test_meta["signature"]
    assert len(test_meta["sources"][0]["members"]) == len(chain.fold_runs(out))


def test_submission_notebook_predicts_like_the_thresholds():
    """06 has no TTA/fusion default of its own that could disagree with 04's: it predicts --like thresholds.json."""
    declared = chain.notebook_parameters(chain.NOTEBOOK_DIR / "06_submission.ipynb")
    assert not {"TTA", "FUSION"} & set(declared)
    assert "TTA" in chain.notebook_parameters(chain.NOTEBOOK_DIR / "04_finetune.ipynb")
    import nbformat

    source = "".join(c.source for c in nbformat.read(chain.NOTEBOOK_DIR / "06_submission.ipynb", 4).cells)
    assert '"--like", thresholds' in source and '"--tta"' not in source


@pytest.mark.slow
@pytest.mark.realdata
def test_pretrain_notebook_on_real_livecell(tmp_path, real_data):
    livecell = real_data / "livecell"
    if not livecell.is_dir():
        pytest.skip(f"{livecell} not found")
    result = run_papermill("03_pretrain", tmp_path / "out.ipynb", LIVECELL_DIR=livecell, OUT_DIR=tmp_path / "run",
                           PRESET="demo", SMOKE=True, ITERATIONS=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "pretrain" / "model_final.pth").is_file()
    assert (tmp_path / "run" / "pretrain" / "curves.png").is_file()
