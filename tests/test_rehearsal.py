"""The offline Kaggle rehearsal: the rendered submission kernel runs as Kaggle runs it, without any network.

A Kaggle-like filesystem is laid out in a temp dir standing for ``/kaggle`` (``CELLKIT_KAGGLE_ROOT``):

- ``input/competitions/sartorius-cell-instance-segmentation/``: the competition folder (tiny synthetic data with
  its test images),
- ``input/datasets/tester/cellkit-wheels/``: the wheels dataset of ``make wheels`` (built here for this
  interpreter's Python, as ``make wheels`` builds it for Kaggle's),
- ``input/datasets/tester/cellkit-weights/``: the weights dataset of ``make weights`` of a tiny trained run (the
  ``demo`` preset, a few iterations on 256-pixel images).

A fresh virtual environment stands for Kaggle's image: it sees this environment's torch, numpy, pandas, jupyter,
papermill... (symlinked) but none of cellkit, detectron2, fvcore, iopath, yacs, hydra-core, omegaconf, portalocker or
pycocotools, which must come from the wheels dataset. The kernel notebook rendered by ``make kernels`` is executed
with papermill in a network namespace of its own holding only the loopback interface (``unshare -n``; jupyter
talks to its kernel over 127.0.0.1), so any download fails; where ``unshare`` cannot be used, pip is held to
``--no-index`` and every proxy variable points at a dead port. The run must end with a valid
``working/submission.csv``.

The wheels need the package registry once per test session (the CI environment has it; pip's own cache serves
repeated runs).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest

from cellkit import runtime, publish

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
OWNER = "tester"

NOT_ON_THE_IMAGE = {"cellkit", "detectron2", "fvcore", "iopath", "yacs", "hydra-core", "omegaconf",
                    "antlr4-python3-runtime", "portalocker", "pycocotools"}
"""Distributions the stand-in image must lack: the wheels dataset brings them."""

NOT_LINKED = {"pip", "setuptools", "wheel", "pytest", "hypothesis", "kaggle", "kagglesdk"}
"""The fresh environment keeps its own pip and setuptools; test-only and CLI packages are left out."""

pytestmark = pytest.mark.slow


def run(cmd, timeout=900, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def image_environment(folder: Path) -> Path:
    """A fresh venv whose site-packages sees this environment's packages except :data:`NOT_ON_THE_IMAGE`.

    Returns:
        Its python.
    """
    run([PY, "-m", "venv", folder], timeout=300)
    python = folder / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # Outside the venv's prefix, so that pip never uninstalls anything there (it would delete the real files).
    image = folder.parent / "image-packages"
    image.mkdir()
    ours = Path(metadata.distribution("numpy").locate_file(""))        # this environment's site-packages
    linked = set()
    for dist in metadata.distributions(path=[str(ours)]):
        name = _normalise(dist.metadata["Name"] or "")
        if name in NOT_ON_THE_IMAGE or name in NOT_LINKED or not dist.files:
            continue
        for file in dist.files:
            top = file.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth") or top.startswith("__editable__"):
                continue
            if top not in linked and (ours / top).exists():
                (image / top).symlink_to(ours / top)
                linked.add(top)
    (site / "kaggle-image.pth").write_text(str(image) + "\n")
    # the image's "python3" kernel: this interpreter (JUPYTER_PATH is searched first)
    spec = folder.parent / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return python


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """Synthetic data and a tiny trained run with thresholds (``cellkit chain``'s layout): (data, run)."""
    base = tmp_path_factory.mktemp("rehearsal-run")
    data, out = base / "data", base / "run"
    cellkit = [PY, "-m", "cellkit"]
    run(cellkit + ["synth", data, "--images", "6", "--test-images", "2", "--seed", "3"])
    run(cellkit + ["folds", data / "train.csv", "--k", "2", "--out", out / "folds.csv"])
    from cellkit.chain import SMOKE_OVERRIDES

    run(cellkit + ["train", "--config", "demo", "--data", data, "--folds", out / "folds.csv", "--fold", "0",
                   "--out", out / "fold0", "MODEL.DEVICE", "cpu", *SMOKE_OVERRIDES])
    run(cellkit + ["predict", "--run", out / "fold0", "--fold", "0", "--data", data, "--folds-csv",
                   out / "folds.csv", "--out", out / "oof", "--device", "cpu", "--no-progress"])
    run(cellkit + ["search", "--pred", out / "oof", "--truth", data / "train.csv", "--out", out / "thresholds.json",
                   "--score-grid", "0.1,0.5", "--mask-grid", "0.5", "--min-area-grid", "0,20", "--no-progress"])
    return data, out


@pytest.fixture(scope="module")
def wheels_dataset(tmp_path_factory) -> Path:
    """``make wheels`` for this interpreter's Python (Kaggle's would be 3.12 and 3.13)."""
    out = tmp_path_factory.mktemp("rehearsal-wheels") / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    publish.build_wheels(out, ROOT, OWNER, (version,))
    return out


def network_isolated(cmd: list) -> tuple[list, dict, str]:
    """``cmd`` in a network namespace with only loopback up, when this machine allows it; else ``cmd`` with pip
    offline and dead proxies. Returns (command, extra environment, mode)."""
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True) \
        if shutil.which("unshare") and shutil.which("ip") else None
    if probe is not None and probe.returncode == 0:
        # the kernel must see exactly one interface (lo) before anything runs
        script = 'ip link set lo up && [ "$(ip -o link show | wc -l)" = 1 ] && exec "$@"'
        return ["unshare", "-n", "sh", "-c", script, "sh", *cmd], {}, "unshare -n (loopback only)"
    dead = "http://127.0.0.1:9"
    return cmd, {"PIP_NO_INDEX": "1", "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead,
                 "https_proxy": dead, "ALL_PROXY": dead, "NO_PROXY": ""}, "pip --no-index, dead proxy"


def test_offline_submission_kernel(tmp_path, tiny_run, wheels_dataset):
    data, trained = tiny_run
    fs = tmp_path / "kaggle"
    competition = fs / "input" / "competitions" / runtime.COMPETITION
    competition.mkdir(parents=True)
    for name in ("test", "train"):
        shutil.copytree(data / name, competition / name)
    for name in ("train.csv", "sample_submission.csv"):
        shutil.copy2(data / name, competition / name)
    datasets = fs / "input" / "datasets" / OWNER
    # what `kaggle datasets create` uploads (the CLI skips .cache/)
    shutil.copytree(wheels_dataset, datasets / runtime.WHEELS_DATASET, ignore=shutil.ignore_patterns(".cache"))
    publish.build_weights(trained, datasets / runtime.WEIGHTS_DATASET, OWNER)           # make weights
    (fs / "working").mkdir()

    python = image_environment(tmp_path / "image")
    check = subprocess.run([python, "-c", "import torch, papermill, ipykernel, numpy, pandas, cv2"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for module in ("cellkit", "detectron2", "fvcore", "iopath", "yacs", "hydra", "omegaconf", "pycocotools"):
        absent = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, cwd=tmp_path,
                                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert absent.returncode != 0, f"the stand-in image must not have {module}"

    kernel = publish.render_kernel("submission", ROOT / "notebooks", tmp_path / "kernels", OWNER)   # make kernels
    executed = fs / "working" / "submission.executed.ipynb"
    # Kaggle's GPU is not here: CPU; every other parameter is the kernel's own (papermill replaces the injected
    # cell, so they are all passed again). The passes come from thresholds.json: those of the OOF predictions.
    params = {**publish.kernel_parameters("submission"), "DEVICE": "cpu"}
    assert params["OUT_DIR"] == "/kaggle/working"
    cmd = [str(python), "-m", "papermill", str(kernel / "submission.ipynb"), str(executed),
           "-y", json.dumps(params), "--cwd", str(fs / "working"), "--no-progress-bar"]
    cmd, extra, mode = network_isolated(cmd)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "JUPYTER_PATH", "JUPYTER_DATA_DIR") and "PROXY" not in k.upper()}
    env.update(extra, HOME=str(tmp_path / "home"), JUPYTER_PATH=str(tmp_path / "jupyter"), KAGGLE_KERNEL_RUN_TYPE="Batch", MPLBACKEND="Agg",
               PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_CACHE_DIR=str(tmp_path / "pip-cache"),
               **{runtime.KAGGLE_ROOT_VARIABLE: str(fs)})
    (tmp_path / "home").mkdir()
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=fs / "working")
    seconds = time.perf_counter() - start
    print(f"rehearsal ({mode}): the submission kernel ran in {seconds:.0f} s")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]

    submission = fs / "working" / "submission.csv"
    assert submission.is_file()
    valid = subprocess.run([PY, "-m", "cellkit", "validate", submission, "--images", competition / "test"],
                           capture_output=True, text=True)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    frame = pd.read_csv(submission, keep_default_na=False)
    assert set(frame["id"]) == {p.stem for p in (competition / "test").iterdir()}
    # the packages came from the wheels dataset into the stand-in image, not from anywhere else
    installed = run([python, "-m", "pip", "list", "--format", "freeze"], env=env).stdout.lower()
    for dist in ("cellkit", "detectron2", "fvcore", "pycocotools"):
        assert f"{dist}==" in installed, dist
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    assert nb.metadata.papermill.get("exception") is not True
    log = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "kaggle run" in log and str(datasets / runtime.WEIGHTS_DATASET / "fold0") in log


def test_upload_both_datasets_with_the_real_cli(tmp_path, tiny_run, wheels_dataset):
    """``kaggle datasets create`` accepts what ``make wheels`` and ``make weights`` write (fake API, real CLI)."""
    fake_kaggle = pytest.importorskip("fake_kaggle")
    if not fake_kaggle.KAGGLE_CLI.exists():
        pytest.skip("kaggle CLI not installed in this environment")
    weights = publish.build_weights(tiny_run[1], tmp_path / "weights", OWNER)
    for folder, extra, slug in ((wheels_dataset, [], runtime.WHEELS_DATASET),
                                (weights, ["--dir-mode", "zip"], runtime.WEIGHTS_DATASET)):
        server = fake_kaggle.serve()
        try:
            result = fake_kaggle.kaggle_cli(["datasets", "create", "-p", folder, *extra], server, tmp_path / "home")
            assert "Dataset is being created" in result.stdout, result.stdout + result.stderr
            (request,) = server.calls(fake_kaggle.CREATE_DATASET)
            assert (request["ownerSlug"], request["slug"]) == (OWNER, slug)
            uploaded = set(server.uploads)
        finally:
            server.shutdown()
            server.server_close()
        files = {p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name != "dataset-metadata.json"}
        if slug == runtime.WEIGHTS_DATASET:
            files = {f"{n}.zip" if (folder / n).is_dir() else n for n in files}
        assert uploaded == files, slug
