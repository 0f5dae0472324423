"""cellkit.kaggle: environment detection, folder globbing, path parameters, kernel and wheels metadata."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cellkit import kaggle

ROOT = Path(__file__).resolve().parents[1]


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def competition(folder: Path, test_only: bool = False) -> Path:
    """A minimal competition-layout folder."""
    touch(folder / "sample_submission.csv", "id,predicted\n")
    touch(folder / "test" / "aaa.png")
    if not test_only:
        touch(folder / "train.csv", "id,annotation,width,height,cell_type\n")
        touch(folder / "train" / "bbb.png")
    return folder


# ---------------------------------------------------------------------------------------------------- detection
def test_detect_kaggle(tmp_path):
    (tmp_path / "kaggle" / "input").mkdir(parents=True)
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    assert env.kind == "kaggle"
    assert env.input_roots == (tmp_path / "kaggle" / "input",)
    assert env.working_dir == tmp_path / "kaggle" / "working"
    assert env.inputs_read_only
    assert env.default_out_dir == tmp_path / "kaggle" / "working" / "cellkit-run"


def test_detect_colab_needs_its_variable(tmp_path):
    (tmp_path / "content").mkdir()
    assert kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path).kind == "local"
    env = kaggle.detect_environment(tmp_path, environ={"COLAB_RELEASE_TAG": "x"}, cwd=tmp_path)
    assert env.kind == "colab" and env.working_dir == tmp_path / "content"
    assert not env.inputs_read_only


def test_detect_local_finds_project_root_from_notebooks_dir(tmp_path):
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=ROOT / "notebooks")
    assert env.kind == "local"
    assert env.project_root == ROOT
    assert env.input_roots == (ROOT / "data",)
    assert env.default_out_dir == ROOT / "runs" / "demo"


# ---------------------------------------------------------------------------------------------------- globbing
@pytest.mark.parametrize("layout", ["sartorius-cell-instance-segmentation",
                                    "competitions/sartorius-cell-instance-segmentation",
                                    "datasets/someone/sartorius-copy"])
def test_find_competition_dir_any_layout(tmp_path, layout):
    roots = (tmp_path / "input",)
    expected = competition(tmp_path / "input" / layout)
    touch(tmp_path / "input" / "other-dataset" / "x.csv")
    assert kaggle.find_competition_dir(roots) == expected
    assert kaggle.find_competition_dir(roots, need="test") == expected


def test_find_competition_dir_prefers_competition_name(tmp_path):
    roots = (tmp_path / "input",)
    competition(tmp_path / "input" / "copy-of-data")
    expected = competition(tmp_path / "input" / "competitions" / kaggle.COMPETITION)
    assert kaggle.find_competition_dir(roots) == expected


def test_find_competition_dir_ambiguous_and_missing(tmp_path):
    roots = (tmp_path / "input",)
    with pytest.raises(FileNotFoundError, match="no competition data folder"):
        kaggle.find_competition_dir(roots)
    competition(tmp_path / "input" / "a")
    competition(tmp_path / "input" / "b")
    with pytest.raises(FileNotFoundError, match="several .* pass the one to use explicitly"):
        kaggle.find_competition_dir(roots)


def test_find_dataset_dir_nested_like_kaggle_models(tmp_path):
    roots = (tmp_path / "input",)
    wheels = touch(tmp_path / "input" / "datasets" / "me" / "cellkit-wheels" / "detectron2-0.6-py3-none-any.whl").parent
    touch(tmp_path / "input" / "models" / "me" / "w" / "pytorch" / "default" / "1" / "model_final.pth")
    assert kaggle.find_dataset_dir(roots, "detectron2-*.whl") == wheels
    found = kaggle.find_dataset_dir(roots, "model_*.pth")
    assert found.name == "1" and (found / "model_final.pth").exists()


# ---------------------------------------------------------------------------------------------------- parameters
def test_resolve_data_dir_auto_on_kaggle(tmp_path):
    data = competition(tmp_path / "kaggle" / "input" / kaggle.COMPETITION)
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    assert kaggle.resolve_data_dir("", env) == data


def test_resolve_data_dir_submission_needs_only_test(tmp_path):
    data = competition(tmp_path / "kaggle" / "input" / kaggle.COMPETITION, test_only=True)
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    assert kaggle.resolve_data_dir("", env, need="test") == data
    with pytest.raises(FileNotFoundError, match=r"DATA_DIR='' \(auto\)"):
        kaggle.resolve_data_dir("", env, need="train")


def test_resolve_data_dir_errors_name_the_parameter(tmp_path):
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"DATA_DIR='/no/such/dir': not found"):
        kaggle.resolve_data_dir("/no/such/dir", env)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"DATA_DIR=.*empty.*missing train.csv, train"):
        kaggle.resolve_data_dir(str(tmp_path / "empty"), env)


def test_resolve_relative_against_project_root(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT / "notebooks")
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=ROOT / "notebooks")
    assert kaggle.resolve_input("cellkit/kaggle.py", env, "X") == ROOT / "cellkit" / "kaggle.py"


def test_resolve_out_dir(tmp_path):
    (tmp_path / "kaggle" / "input").mkdir(parents=True)
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    assert kaggle.resolve_out_dir(str(tmp_path / "run"), env) == (tmp_path / "run").resolve()
    assert (tmp_path / "run").is_dir()
    with pytest.raises(PermissionError, match="OUT_DIR=.*read-only"):
        kaggle.resolve_out_dir(str(tmp_path / "kaggle" / "input" / "x"), env)


# ---------------------------------------------------------------------------------------------------- installing
def test_pip_install_command_offline():
    cmd = kaggle.pip_install_command(["detectron2", "fvcore"], Path("/w"))
    assert cmd[:3] == [sys.executable, "-m", "pip"]
    assert cmd[cmd.index("--find-links") + 1] == "/w" and "--no-index" in cmd
    assert cmd[-2:] == ["detectron2", "fvcore"]
    assert "--no-index" not in kaggle.pip_install_command(["x"])


def test_install_missing_on_kaggle_uses_wheels_dataset(tmp_path, monkeypatch):
    wheels = touch(tmp_path / "kaggle" / "input" / "cellkit-wheels" / "detectron2-0.6-py3-none-any.whl").parent
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    monkeypatch.setattr(kaggle, "missing_modules", lambda: ["detectron2", "fvcore"])
    cmd = kaggle.install_missing(env, run=False)
    assert cmd[cmd.index("--find-links") + 1] == str(wheels) and "--no-index" in cmd
    monkeypatch.setattr(kaggle, "missing_modules", lambda: [])
    assert kaggle.install_missing(env, run=False) == []


def test_install_missing_elsewhere_builds_detectron2_from_the_checkout(tmp_path, monkeypatch):
    (tmp_path / "content").mkdir()
    env = kaggle.detect_environment(tmp_path, environ={"COLAB_GPU": "1"}, cwd=tmp_path)
    monkeypatch.setattr(kaggle, "missing_modules", lambda: ["detectron2", "yacs"])
    cmd = kaggle.install_missing(env, run=False)
    assert cmd[cmd.index("--find-links") + 1] == str(tmp_path / "content" / "wheels")
    assert "--no-index" not in cmd                   # Colab has internet: the rest comes from the index


def test_install_missing_detectron2_without_wheels_is_a_clear_error(tmp_path, monkeypatch):
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    monkeypatch.setattr(kaggle, "missing_modules", lambda: ["detectron2"])
    monkeypatch.setattr(kaggle, "DETECTRON2_SCRIPT", tmp_path / "absent.py")
    with pytest.raises(ModuleNotFoundError, match="make wheels"):
        kaggle.install_missing(env, run=False)


def test_missing_modules_sees_this_interpreter():
    assert kaggle.missing_modules({"json": "json", "no_such_module_xyz": "xyz"}) == ["xyz"]


# ---------------------------------------------------------------------------------------------------- metadata
def test_submission_kernel_metadata():
    meta = kaggle.kernel_metadata("submission", owner="me")
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True
    assert meta["competition_sources"] == ["sartorius-cell-instance-segmentation"]
    assert meta["dataset_sources"] == ["me/cellkit-wheels", "me/cellkit-weights"]
    assert meta["id"] == "me/cellkit-submission" and kaggle.slugify(meta["title"]) == "cellkit-submission"
    assert meta["code_file"] == "submission.ipynb" and meta["kernel_type"] == "notebook"


@pytest.mark.parametrize("name", sorted(kaggle.KERNELS))
def test_committed_kernel_metadata_is_current(name):
    committed = json.loads((ROOT / "kernels" / name / "kernel-metadata.json").read_text())
    assert committed == kaggle.kernel_metadata(name), "run `make kernels`"
    assert "enable_internet" in committed and committed["enable_gpu"] is True


@pytest.mark.parametrize("name", sorted(kaggle.KERNELS))
def test_committed_kernel_notebook_is_current(name, tmp_path):
    """kernels/<name>/<name>.ipynb is notebooks/<notebook> with the Kaggle parameters injected."""
    import nbformat

    kaggle.render_kernel(name, ROOT / "notebooks", tmp_path, owner=kaggle.DEFAULT_OWNER)
    fresh = nbformat.read(tmp_path / name / f"{name}.ipynb", as_version=4)
    committed = nbformat.read(ROOT / "kernels" / name / f"{name}.ipynb", as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], "run `make kernels`"
    tags = [c.metadata.get("tags", []) for c in fresh.cells]
    assert tags.index(["injected-parameters"]) == tags.index(["parameters"]) + 1


def test_wheels_dataset_metadata_and_commands(tmp_path):
    meta = kaggle.wheels_dataset_metadata("me")
    assert meta["id"] == "me/cellkit-wheels" and meta["licenses"]
    cmds = kaggle.wheel_commands(tmp_path, "3.11", "manylinux2014_x86_64")
    flat = [" ".join(c) for c in cmds]
    for dist in ("fvcore", "iopath", "yacs", "omegaconf", "hydra-core", "antlr4-python3-runtime", "portalocker"):
        assert any(f" {dist}" in c for c in flat), dist
    binary = next(c for c in cmds if "download" in c)
    assert binary[binary.index("--python-version") + 1] == "3.11" and "--only-binary=:all:" in binary
    assert kaggle.pinned("pytest").startswith("pytest==")
    assert kaggle.pinned("no-such-dist-xyz") == "no-such-dist-xyz"


def test_resolve_artifact(tmp_path):
    weights = touch(tmp_path / "kaggle" / "input" / "cellkit-weights" / "thresholds.json", "{}")
    touch(tmp_path / "kaggle" / "input" / "cellkit-weights" / "config.yaml")
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    local = touch(tmp_path / "run" / "thresholds.json", "{}")
    # an earlier notebook's artifact in the run dir wins, then the dataset found by glob
    assert kaggle.resolve_artifact("", env, "THRESHOLDS", local, pattern="thresholds.json") == local
    assert kaggle.resolve_artifact("", env, "THRESHOLDS", tmp_path / "absent.json",
                                   pattern="thresholds.json") == weights
    assert kaggle.resolve_artifact("", env, "RUN_DIR", None, pattern="config.yaml", folder=True) == weights.parent
    assert kaggle.resolve_artifact("none", env, "WEIGHTS", optional=True) is None
    assert kaggle.resolve_artifact("", env, "WEIGHTS", None, pattern="model_final.pth", optional=True) is None
    with pytest.raises(FileNotFoundError, match=r"WEIGHTS='' \(auto\): no earlier notebook made it here and no "
                                                r"folder with model_final.pth"):
        kaggle.resolve_artifact("", env, "WEIGHTS", None, pattern="model_final.pth")
    with pytest.raises(ValueError, match="RUN_DIR='none': this artifact is required"):
        kaggle.resolve_artifact("none", env, "RUN_DIR")


def test_resolve_livecell(tmp_path):
    env = kaggle.detect_environment(tmp_path, environ={}, cwd=tmp_path)          # local, no data/: nothing found
    assert kaggle.resolve_livecell("", "", "", env) is None                     # auto: pretraining skipped
    assert kaggle.resolve_livecell("none", "", "", env) is None
    root = tmp_path / "LIVECell_dataset_2021"
    train = touch(root / "annotations" / "livecell_coco_train.json", "{}")
    val = touch(root / "annotations" / "livecell_coco_val.json", "{}")
    images = touch(root / "images" / "livecell_train_val_images" / "a.tif").parent
    found = kaggle.resolve_livecell(str(root), "", "", env)
    assert (found.json, found.images, found.val_json) == (train, images, val)
    with pytest.raises(FileNotFoundError, match="LIVECELL_DIR=.*no livecell"):
        kaggle.resolve_livecell(str(images), "", "", env)


def test_presets_and_device():
    assert kaggle.pretrain_preset("paper") == "paper_pretrain"
    assert kaggle.pretrain_preset("demo") in ("demo", "demo_pretrain")
    with pytest.raises(ValueError, match="PRESET='nope': unknown preset"):
        kaggle.check_preset("nope")
    assert kaggle.resolve_device("cpu") == "cpu"
    assert kaggle.resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="DEVICE='tpu'"):
        kaggle.resolve_device("tpu")
