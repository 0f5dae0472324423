"""cellkit.runtime and cellkit.publish: environment detection, folder globbing, path parameters, kernel and wheels metadata."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cellkit import runtime, publish, cli

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
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    assert env.kind == "kaggle"
    assert env.input_roots == (tmp_path / "kaggle" / "input",)
    assert env.working_dir == tmp_path / "kaggle" / "working"
    assert env.inputs_read_only
    assert env.default_out_dir == tmp_path / "kaggle" / "working" / "cellkit-run"


def test_detect_kaggle_by_its_variable_first(tmp_path):
    env = runtime.detect_environment(tmp_path, environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch", "COLAB_GPU": "1"},
                                    cwd=tmp_path)
    assert env.kind == "kaggle"                       # even before /kaggle/input is looked at


def test_detect_colab_with_kagglehub_mount_is_colab(tmp_path):
    (tmp_path / "kaggle" / "input").mkdir(parents=True)        # kagglehub mounts /kaggle/input on Colab too
    (tmp_path / "content").mkdir()
    env = runtime.detect_environment(tmp_path, environ={"COLAB_RELEASE_TAG": "x"}, cwd=tmp_path)
    assert env.kind == "colab" and env.working_dir == tmp_path / "content"
    assert tmp_path / "kaggle" / "input" in env.input_roots   # its datasets are still found


def test_detect_kaggle_root_variable(tmp_path):
    (tmp_path / "fake" / "input").mkdir(parents=True)
    env = runtime.detect_environment(environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch",
                                             runtime.KAGGLE_ROOT_VARIABLE: str(tmp_path / "fake")}, cwd=tmp_path)
    assert env.input_roots == (tmp_path / "fake" / "input",) and env.working_dir == tmp_path / "fake" / "working"


def test_kaggle_input_is_walked_once(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.KAGGLE_ROOT_VARIABLE, str(tmp_path / "k"))
    monkeypatch.setattr(runtime, "_LISTINGS", {})
    calls = []
    real = runtime._scan
    monkeypatch.setattr(runtime, "_scan", lambda root, depth: calls.append(root) or real(root, depth))
    roots = (tmp_path / "k" / "input",)
    data = competition(tmp_path / "k" / "input" / "competitions" / runtime.COMPETITION)
    wheels = touch(tmp_path / "k" / "input" / "datasets" / "me" / "cellkit-wheels" / "detectron2-0.6-py3-none-any.whl")
    assert runtime.find_competition_dir(roots) == data
    assert runtime.find_dataset_dir(roots, "detectron2-*.whl") == wheels.parent
    assert runtime.find_files(roots, "*.whl") == [wheels]
    assert calls == [roots[0]]                              # one walk for three searches
    other = (tmp_path / "elsewhere",)
    competition(other[0] / "x")
    runtime.find_competition_dir(other)
    runtime.find_competition_dir(other)
    assert calls.count(other[0]) == 2                       # any other root may change: walked each time


def test_detect_colab_needs_its_variable(tmp_path):
    (tmp_path / "content").mkdir()
    assert runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path).kind == "local"
    env = runtime.detect_environment(tmp_path, environ={"COLAB_RELEASE_TAG": "x"}, cwd=tmp_path)
    assert env.kind == "colab" and env.working_dir == tmp_path / "content"
    assert not env.inputs_read_only


def test_detect_local_finds_project_root_from_notebooks_dir(tmp_path):
    env = runtime.detect_environment(tmp_path, environ={}, cwd=ROOT / "notebooks")
    assert env.kind == "local"
    assert env.project_root == ROOT
    assert env.input_roots == (ROOT / "data",)
    assert env.default_out_dir == ROOT / "runs" / "demo"


# ---------------------------------------------------------------------------------------------------- globbing
@pytest.mark.parametrize("layout", ["sartorius-cell-instance-segmentation",
                                    "competitions/sartorius-cell-instance-segmentation",
                                    "datasets/someone/sartorius-copy",
                                    "models/someone/sartorius/other/default/1"])
def test_find_competition_dir_any_layout(tmp_path, layout):
    roots = (tmp_path / "input",)
    expected = competition(tmp_path / "input" / layout)
    touch(tmp_path / "input" / "other-dataset" / "x.csv")
    assert runtime.find_competition_dir(roots) == expected
    assert runtime.find_competition_dir(roots, need="test") == expected


def test_find_competition_dir_prefers_competition_name(tmp_path):
    roots = (tmp_path / "input",)
    competition(tmp_path / "input" / "copy-of-data")
    expected = competition(tmp_path / "input" / "competitions" / runtime.COMPETITION)
    assert runtime.find_competition_dir(roots) == expected


def test_find_competition_dir_ambiguous_and_missing(tmp_path):
    roots = (tmp_path / "input",)
    with pytest.raises(FileNotFoundError, match="no competition data folder"):
        runtime.find_competition_dir(roots)
    competition(tmp_path / "input" / "a")
    competition(tmp_path / "input" / "b")
    with pytest.raises(FileNotFoundError, match="several .* pass the one to use explicitly"):
        runtime.find_competition_dir(roots)


def test_find_dataset_dir_nested_like_kaggle_models(tmp_path):
    roots = (tmp_path / "input",)
    wheels = touch(tmp_path / "input" / "datasets" / "me" / "cellkit-wheels" / "detectron2-0.6-py3-none-any.whl").parent
    touch(tmp_path / "input" / "models" / "me" / "w" / "pytorch" / "default" / "1" / "model_final.pth")
    assert runtime.find_dataset_dir(roots, "detectron2-*.whl") == wheels
    found = runtime.find_dataset_dir(roots, "model_*.pth")
    assert found.name == "1" and (found / "model_final.pth").exists()


# ---------------------------------------------------------------------------------------------------- parameters
def test_resolve_data_dir_auto_on_kaggle(tmp_path):
    data = competition(tmp_path / "kaggle" / "input" / runtime.COMPETITION)
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    assert runtime.resolve_data_dir("", env) == data


def test_resolve_data_dir_submission_needs_only_test(tmp_path):
    data = competition(tmp_path / "kaggle" / "input" / runtime.COMPETITION, test_only=True)
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    assert runtime.resolve_data_dir("", env, need="test") == data
    with pytest.raises(FileNotFoundError, match=r"DATA_DIR='' \(auto\)"):
        runtime.resolve_data_dir("", env, need="train")


def test_resolve_data_dir_errors_name_the_parameter(tmp_path):
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"DATA_DIR='/no/such/dir': not found"):
        runtime.resolve_data_dir("/no/such/dir", env)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"DATA_DIR=.*empty.*missing train.csv, train"):
        runtime.resolve_data_dir(str(tmp_path / "empty"), env)


def test_resolve_relative_against_project_root(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT / "notebooks")
    env = runtime.detect_environment(tmp_path, environ={}, cwd=ROOT / "notebooks")
    assert runtime.resolve_input("cellkit/runtime.py", env, "X") == ROOT / "cellkit" / "runtime.py"


def test_resolve_out_dir(tmp_path):
    (tmp_path / "kaggle" / "input").mkdir(parents=True)
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    assert runtime.resolve_out_dir(str(tmp_path / "run"), env) == (tmp_path / "run").resolve()
    assert (tmp_path / "run").is_dir()
    with pytest.raises(PermissionError, match="OUT_DIR=.*read-only"):
        runtime.resolve_out_dir(str(tmp_path / "kaggle" / "input" / "x"), env)


# ---------------------------------------------------------------------------------------------------- installing
def test_pip_install_command_offline():
    cmd = runtime.pip_install_command(["detectron2", "fvcore"], Path("/w"))
    assert cmd[:3] == [sys.executable, "-m", "pip"]
    assert cmd[cmd.index("--find-links") + 1] == "/w" and "--no-index" in cmd
    assert cmd[-2:] == ["detectron2", "fvcore"]
    assert "--no-index" not in runtime.pip_install_command(["x"])


def test_install_missing_on_kaggle_uses_wheels_dataset(tmp_path, monkeypatch):
    wheels = touch(tmp_path / "kaggle" / "input" / "cellkit-wheels" / "detectron2-0.6-py3-none-any.whl").parent
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    monkeypatch.setattr(runtime, "missing_modules", lambda: ["detectron2", "fvcore"])
    cmd = runtime.install_missing(env, run=False)
    assert cmd[cmd.index("--find-links") + 1] == str(wheels) and "--no-index" in cmd
    monkeypatch.setattr(runtime, "missing_modules", lambda: [])
    assert runtime.install_missing(env, run=False) == []


def test_install_missing_elsewhere_builds_detectron2_from_the_checkout(tmp_path, monkeypatch):
    (tmp_path / "content").mkdir()
    env = runtime.detect_environment(tmp_path, environ={"COLAB_GPU": "1"}, cwd=tmp_path)
    monkeypatch.setattr(runtime, "missing_modules", lambda: ["detectron2", "yacs"])
    cmd = runtime.install_missing(env, run=False)
    assert cmd[cmd.index("--find-links") + 1] == str(tmp_path / "content" / "wheels")
    assert "--no-index" not in cmd                   # Colab has internet: the rest comes from the index


def test_install_missing_detectron2_without_wheels_is_a_clear_error(tmp_path, monkeypatch):
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    monkeypatch.setattr(runtime, "missing_modules", lambda: ["detectron2"])
    monkeypatch.setattr(runtime, "DETECTRON2_SCRIPT", tmp_path / "absent.py")
    with pytest.raises(ModuleNotFoundError, match="make wheels"):
        runtime.install_missing(env, run=False)


def test_missing_modules_sees_this_interpreter():
    assert runtime.missing_modules({"json": "json", "no_such_module_xyz": "xyz"}) == ["xyz"]


# ---------------------------------------------------------------------------------------------------- metadata
def test_submission_kernel_metadata():
    meta = publish.kernel_metadata("submission", "me")
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True
    assert meta["competition_sources"] == ["sartorius-cell-instance-segmentation"]
    assert meta["dataset_sources"] == ["me/cellkit-wheels", "me/cellkit-weights"]
    assert meta["id"] == "me/cellkit-submission" and publish.slugify(meta["title"]) == "cellkit-submission"
    assert meta["code_file"] == "submission.ipynb" and meta["kernel_type"] == "notebook"


@pytest.mark.parametrize("name", sorted(publish.KERNELS))
def test_rendered_kernel(name, tmp_path):
    """kernels/<name>/ is notebooks/<notebook> with the Kaggle parameters injected, plus its metadata."""
    import nbformat
    import papermill as pm

    folder = publish.render_kernel(name, ROOT / "notebooks", tmp_path, owner="someone")
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta == publish.kernel_metadata(name, "someone")
    assert meta["enable_gpu"] is True and meta["machine_shape"] == "NvidiaTeslaT4" and "enable_internet" in meta
    rendered = nbformat.read(folder / f"{name}.ipynb", as_version=4)
    source = nbformat.read(ROOT / "notebooks" / publish.KERNELS[name].notebook, as_version=4)
    tags = [c.metadata.get("tags", []) for c in rendered.cells]
    assert tags.index(["injected-parameters"]) == tags.index(["parameters"]) + 1
    assert [c.source for c in rendered.cells if "injected-parameters" not in c.metadata.get("tags", [])] == \
        [c.source for c in source.cells]
    declared = pm.inspect_notebook(str(ROOT / "notebooks" / publish.KERNELS[name].notebook))
    assert set(publish.KERNELS[name].parameters) <= set(declared), "a kernel parameter the notebook lacks"


def test_rendering_is_reproducible(tmp_path):
    first = publish.render_kernel("finetune", ROOT / "notebooks", tmp_path / "a", owner="me")
    second = publish.render_kernel("finetune", ROOT / "notebooks", tmp_path / "b", owner="me")
    assert (first / "finetune.ipynb").read_bytes() == (second / "finetune.ipynb").read_bytes()


def test_kernel_metadata_machine_pinning_and_resume():
    sub = publish.kernel_metadata("submission", "me")
    assert sub["docker_image_pinning_type"] == "original" and sub["enable_internet"] is False
    assert sub["kernel_sources"] == []
    fine = publish.kernel_metadata("finetune", "me", machine_shape="NvidiaL4", resume=True)
    assert fine["machine_shape"] == "NvidiaL4" and "docker_image_pinning_type" not in fine
    assert fine["kernel_sources"] == ["me/cellkit-finetune"]              # its own previous output
    assert publish.kernel_metadata("submission", "me", resume=True)["kernel_sources"] == []
    with pytest.raises(ValueError, match="MACHINE_SHAPE='NvidiaTeslaP100': its sm_60"):
        publish.kernel_metadata("finetune", "me", machine_shape="NvidiaTeslaP100")
    with pytest.raises(ValueError, match="MACHINE_SHAPE=''"):
        publish.kernel_metadata("finetune", "me", machine_shape="")


def test_kernel_parameters_num_gpus_follow_the_machine():
    assert publish.kernel_parameters("finetune")["NUM_GPUS"] == 2                 # T4 x2
    assert publish.kernel_parameters("pretrain", "NvidiaL4")["NUM_GPUS"] == 1
    assert publish.kernel_parameters("finetune", num_gpus=1)["NUM_GPUS"] == 1
    assert "NUM_GPUS" not in publish.kernel_parameters("submission")
    params = publish.kernel_parameters("finetune")
    assert 0 < params["TIME_BUDGET_MINUTES"] < publish.SESSION_MINUTES          # leaves time for OOF + saving
    with pytest.raises(ValueError, match="NUM_GPUS=0"):
        publish.kernel_parameters("finetune", num_gpus=0)


def test_owner_from_variable_token_or_a_clear_error(tmp_path):
    assert publish.resolve_owner("given", environ={"KAGGLE_USERNAME": "env"}) == "given"
    assert publish.resolve_owner(None, environ={"KAGGLE_USERNAME": "env"}, home=tmp_path) == "env"
    with pytest.raises(ValueError, match=r"no Kaggle user .*KAGGLE_USERNAME.*kaggle.json"):
        publish.resolve_owner(None, environ={}, home=tmp_path)
    touch(tmp_path / ".kaggle" / "kaggle.json", json.dumps({"username": "tokenuser", "key": "k"}))
    assert publish.resolve_owner(None, environ={}, home=tmp_path) == "tokenuser"
    touch(tmp_path / "cfg" / "kaggle.json", json.dumps({"key": "k"}))
    with pytest.raises(ValueError, match="no 'username'"):
        publish.resolve_owner(None, environ={"KAGGLE_CONFIG_DIR": str(tmp_path / "cfg")}, home=tmp_path)
    with pytest.raises(ValueError, match="not a Kaggle user name"):
        publish.resolve_owner("a b")


def test_no_owner_is_committed():
    """No kernel or dataset metadata with a placeholder owner is in the repository: they are rendered."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert not [f for f in tracked if f.endswith(("kernel-metadata.json", "dataset-metadata.json"))]


def test_kaggle_main_without_owner_stops_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    assert cli.main(["kernels", "--out", str(tmp_path / "k")]) == 2
    assert "no Kaggle user" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_dataset_metadata_rules():
    good = {"id": "me/cellkit-wheels", "title": "cellkit wheels", "subtitle": "x" * 20, "licenses": [{"name": "other"}]}
    assert publish.check_dataset_metadata(good) == good
    for change, message in [({"subtitle": "x" * 81}, "81 characters, must be 20-80"),
                            ({"subtitle": "short"}, "must be 20-80"),
                            ({"title": "abc"}, "title 'abc': 3 characters"),
                            ({"id": "me/Bad_Slug"}, "slug must be"), ({"id": "me/short"[:7]}, "slug must be"),
                            ({"id": "noslash"}, "owner/slug"),
                            ({"licenses": []}, "exactly one"), ({"licenses": [{"name": "nope"}]}, "exactly one")]:
        with pytest.raises(ValueError, match=message):
            publish.check_dataset_metadata({**good, **change})
    for meta in (publish.wheels_dataset_metadata("me"), publish.weights_dataset_metadata("me"),
                 publish.wheels_dataset_metadata("a-rather-long-user-name", ("3.10", "3.11", "3.12"))):
        assert 20 <= len(meta["subtitle"]) <= 80 and 6 <= len(meta["title"]) <= 50


def test_wheels_dataset_metadata_and_commands(tmp_path):
    meta = publish.wheels_dataset_metadata("me")
    assert meta["id"] == "me/cellkit-wheels" and meta["licenses"]
    assert "3.12" in meta["subtitle"] and "3.13" in meta["subtitle"]
    cmds = publish.wheel_commands(tmp_path)
    flat = [" ".join(c) for c in cmds]
    for dist in ("fvcore", "iopath", "yacs", "omegaconf", "hydra-core", "antlr4-python3-runtime", "portalocker"):
        assert sum(f" {dist}" in c for c in flat) == 1, dist                     # pure Python: once
    assert not any(" setuptools" in c for c in flat)                             # the image's (<82) is kept
    binary = [c for c in cmds if "download" in c]
    assert [c[c.index("--python-version") + 1] for c in binary] == ["3.12", "3.13"]
    assert all("--only-binary=:all:" in c and c[c.index("--platform") + 1] == "manylinux2014_x86_64" for c in binary)
    assert publish.pinned("pytest").startswith("pytest==")
    assert publish.pinned("no-such-dist-xyz") == "no-such-dist-xyz"
    assert publish.parse_python_versions("3.12, 3.13,3.12") == ("3.12", "3.13")
    with pytest.raises(ValueError, match="--python-versions 'py3'"):
        publish.parse_python_versions("py3")


def test_requirements_keep_the_images_setuptools():
    text = (ROOT / "requirements.txt").read_text()
    assert "setuptools<82" in text and "setuptools<81" not in text


def test_resolve_artifact(tmp_path):
    weights = touch(tmp_path / "kaggle" / "input" / "cellkit-weights" / "thresholds.json", "{}")
    touch(tmp_path / "kaggle" / "input" / "cellkit-weights" / "config.yaml")
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)
    local = touch(tmp_path / "run" / "thresholds.json", "{}")
    # an earlier notebook's artifact in the run dir wins, then the dataset found by glob
    assert runtime.resolve_artifact("", env, "THRESHOLDS", local, pattern="thresholds.json") == local
    assert runtime.resolve_artifact("", env, "THRESHOLDS", tmp_path / "absent.json",
                                   pattern="thresholds.json") == weights
    assert runtime.resolve_artifact("", env, "RUN_DIR", None, pattern="config.yaml", folder=True) == weights.parent
    assert runtime.resolve_artifact("none", env, "WEIGHTS", optional=True) is None
    assert runtime.resolve_artifact("", env, "WEIGHTS", None, pattern="model_final.pth", optional=True) is None
    with pytest.raises(FileNotFoundError, match=r"WEIGHTS='' \(auto\): no earlier notebook made it here and no "
                                                r"folder with model_final.pth"):
        runtime.resolve_artifact("", env, "WEIGHTS", None, pattern="model_final.pth")
    with pytest.raises(ValueError, match="RUN_DIR='none': this artifact is required"):
        runtime.resolve_artifact("none", env, "RUN_DIR")


def test_resolve_livecell(tmp_path):
    env = runtime.detect_environment(tmp_path, environ={}, cwd=tmp_path)          # local, no data/: nothing found
    assert runtime.resolve_livecell("", "", "", env) is None                     # auto: pretraining skipped
    assert runtime.resolve_livecell("none", "", "", env) is None
    root = tmp_path / "LIVECell_dataset_2021"
    train = touch(root / "annotations" / "livecell_coco_train.json", "{}")
    val = touch(root / "annotations" / "livecell_coco_val.json", "{}")
    images = touch(root / "images" / "livecell_train_val_images" / "a.tif").parent
    found = runtime.resolve_livecell(str(root), "", "", env)
    assert (found.json, found.images, found.val_json) == (train, images, val)
    with pytest.raises(FileNotFoundError, match="LIVECELL_DIR=.*no livecell"):
        runtime.resolve_livecell(str(images), "", "", env)


def test_resolve_livecell_real_layout_on_kaggle(tmp_path):
    """The competition's LIVECell_dataset_2021/: json in annotations/LIVECell/, images in images/<split>_images/."""
    root = tmp_path / "kaggle" / "input" / "competitions" / runtime.COMPETITION / "LIVECell_dataset_2021"
    ann = root / "annotations" / "LIVECell"
    train = touch(ann / "livecell_coco_train.json", "{}")
    val = touch(ann / "livecell_coco_val.json", "{}")
    touch(ann / "livecell_coco_test.json", "{}")
    touch(root / "images" / "livecell_test_images" / "t.tif")          # sorts before train_val: must not win
    images = touch(root / "images" / "livecell_train_val_images" / "a.tif").parent
    env = runtime.detect_environment(tmp_path, environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, cwd=tmp_path)
    for given in ("", str(root)):
        found = runtime.resolve_livecell(given, "", "", env)
        assert (found.json, found.images, found.val_json) == (train.resolve(), images.resolve(), val.resolve()), given


class FakeCuda:
    """What resolve_device asks torch.cuda, for a machine without the GPU."""

    def __init__(self, capability, archs, name="Tesla P100-PCIE-16GB", count=1):
        self.capability, self.archs, self.name, self.count = capability, archs, name, count

    def is_available(self):
        return True

    def device_count(self):
        return self.count

    def get_device_capability(self, index=0):
        return self.capability

    def get_arch_list(self):
        return self.archs

    def get_device_name(self, index=0):
        return self.name


def test_resolve_device_refuses_a_gpu_torch_cannot_run(monkeypatch):
    import torch

    archs = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    monkeypatch.setattr(torch, "cuda", FakeCuda((6, 0), archs))
    for value in ("cuda", "auto", "cuda:0"):
        with pytest.raises(ValueError, match=r"Tesla P100-PCIE-16GB \(compute capability 6.0\) is not supported.*"
                                             r"GPU T4 x2.*NvidiaTeslaT4"):
            runtime.resolve_device(value)
    with pytest.raises(ValueError, match="sees 1 CUDA device"):
        runtime.resolve_device("cuda:1")
    monkeypatch.setattr(torch, "cuda", FakeCuda((7, 5), archs, "Tesla T4", 2))
    assert runtime.resolve_device("cuda") == "cuda" and runtime.resolve_device("cuda:1") == "cuda:1"
    assert runtime.resolve_device("auto") == "cuda"


def test_arch_supported():
    assert runtime.arch_supported((8, 9), ["sm_80"])                 # same major, lower minor: binary compatible
    assert not runtime.arch_supported((7, 0), ["sm_75", "sm_80"])
    assert runtime.arch_supported((9, 0), ["sm_80", "compute_80"])  # PTX compiled at load time
    assert not runtime.arch_supported((6, 0), ["sm_70", "compute_70"])


def test_session_clock():
    now = [0.0]
    clock = runtime.SessionClock(10, clock=lambda: now[0])
    assert clock.train_args() == ["CELLKIT.TIME_BUDGET_MINUTES", "10.00"] and not clock.spent()
    now[0] = 9.5 * 60
    assert clock.train_args() is None                                   # under a minute left: next session
    now[0] = 10 * 60
    assert clock.spent()
    short = runtime.SessionClock(0.5, clock=lambda: now[0])             # a budget under ten minutes: a tenth of it
    now[0] += 0.4 * 60
    assert short.train_args() == ["CELLKIT.TIME_BUDGET_MINUTES", "0.10"]
    now[0] += 0.06 * 60
    assert short.train_args() is None and not short.spent()
    assert runtime.SessionClock(0).train_args() == [] and not runtime.SessionClock(0).spent()
    with pytest.raises(ValueError, match="TIME_BUDGET_MINUTES=-1"):
        runtime.SessionClock(-1)


def test_restore_runs_from_an_earlier_session(tmp_path):
    earlier = tmp_path / "kaggle" / "input" / "notebooks" / "me" / "cellkit-finetune"
    touch(earlier / "folds.csv", "id,fold\n")
    run = earlier / "fold0"
    for name in ("config.yaml", "metrics.json", "model_0000499.pth", "model_0000999.pth", "model_best.pth"):
        touch(run / name, name)
    touch(run / "last_checkpoint", "model_0000999.pth")
    touch(earlier / "fold1" / "config.yaml")                 # never checkpointed: nothing to resume
    env = runtime.detect_environment(tmp_path, environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, cwd=tmp_path)
    out = tmp_path / "kaggle" / "working"
    restored = runtime.restore_runs(out, env, ["fold0", "fold1"])
    assert restored == [out / "fold0"]
    assert sorted(p.name for p in (out / "fold0").iterdir()) == ["config.yaml", "last_checkpoint", "metrics.json",
                                                                 "model_0000999.pth", "model_best.pth"]
    assert (out / "folds.csv").is_file()
    touch(out / "fold0" / "last_checkpoint", "model_0001499.pth")
    assert runtime.restore_runs(out, env, ["fold0"]) == []       # this session's own run wins
    assert runtime.restore_runs(tmp_path / "other", env, ["fold0"], "none") == []
    local = runtime.detect_environment(tmp_path / "nowhere", environ={}, cwd=tmp_path)
    assert runtime.restore_runs(tmp_path / "o2", local, ["fold0"]) == []
    assert runtime.restore_runs(tmp_path / "o3", local, ["fold0"], str(earlier)) == [tmp_path / "o3" / "fold0"]


def test_presets_and_device():
    assert runtime.pretrain_preset("paper") == "paper_pretrain"
    assert runtime.pretrain_preset("demo") in ("demo", "demo_pretrain")
    with pytest.raises(ValueError, match="PRESET='nope': unknown preset"):
        runtime.check_preset("nope")
    assert runtime.resolve_device("cpu") == "cpu"
    assert runtime.resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="DEVICE='tpu'"):
        runtime.resolve_device("tpu")


def test_prune_checkpoints_keeps_last_and_best(tmp_path):
    for name in ("model_0000249.pth", "model_0000499.pth", "model_0000749.pth", "model_best.pth", "metrics.json"):
        touch(tmp_path / name)
    assert runtime.prune_checkpoints(tmp_path) == []                        # no last_checkpoint: nothing known
    touch(tmp_path / "last_checkpoint", "model_0000749.pth")
    deleted = runtime.prune_checkpoints(tmp_path)
    assert [p.name for p in deleted] == ["model_0000249.pth", "model_0000499.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "metrics.json", "model_0000749.pth",
                                                          "model_best.pth"]


def test_starting_weights_never_come_from_an_earlier_sessions_fold(tmp_path):
    """With its own output attached to resume, the finetune kernel must not start fold 1 from fold 0's model."""
    touch(tmp_path / "kaggle" / "input" / "notebooks" / "me" / "cellkit-finetune" / "fold0" / "model_final.pth")
    env = runtime.detect_environment(tmp_path, environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, cwd=tmp_path)
    args = dict(pattern="model_final.pth", prefer=runtime.PRETRAINED_DATASET, optional=True)
    assert runtime.resolve_artifact("", env, "WEIGHTS", None, **args) is not None      # what a plain search finds
    assert runtime.resolve_artifact("", env, "WEIGHTS", None, exclude="fold*", **args) is None
    pretrained = touch(tmp_path / "kaggle" / "input" / "datasets" / "me" / "cellkit-pretrained" / "model_final.pth")
    assert runtime.resolve_artifact("", env, "WEIGHTS", None, exclude="fold*", **args) == pretrained
