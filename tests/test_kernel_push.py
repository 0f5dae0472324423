"""``kaggle kernels push``, ``kaggle datasets create`` and ``kaggle competitions submit`` with the real kaggle 2.x
CLI against a fake API server on 127.0.0.1 (``tests/fake_kaggle.py``): the CLI's own validation runs on every
metadata file cellkit writes, and the requests it sends are checked.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import fake_kaggle
from cellkit import runtime, publish
from fake_kaggle import CREATE_DATASET, KAGGLE_CLI, SAVE_KERNEL, START_UPLOAD

ROOT = Path(__file__).resolve().parents[1]

THRESHOLDS = {
    "thresholds": {c: {"score": 0.5, "mask": 0.5, "min_area": 0} for c in ("shsy5y", "astro", "cort")},
    "metric": {"before": {"mAP": 0.2, "per_class": {"shsy5y": 0.1, "astro": None, "cort": 0.3}},
               "after": {"mAP": 0.3, "per_class": {"shsy5y": 0.2, "astro": None, "cort": 0.4}}},
    "search": {"n_images": 4},
}
"""A thresholds.json of a threshold search (``cellkit search``)."""

_SCORES = {"naive": {"all": 0.2, "shsy5y": 0.1, "astro": None, "cort": 0.3},
           "post-processed": {"all": 0.3, "shsy5y": 0.2, "astro": None, "cort": 0.4}}
_ENTRY = {"n_images": {"all": 4, "shsy5y": 2, "astro": 0, "cort": 2}, "scores": _SCORES,
          "n_truth_without_predictions": 0}
CV = {"settings": ["naive", "post-processed"], "per_fold": [{"fold": 0, **_ENTRY}], "overall": _ENTRY,
      "folds_without_predictions": [], "per_image": [{"id": f"i{k}", "fold": 0} for k in range(4)]}
"""A ``cv.json`` of ``cellkit cv`` (:func:`cellkit.cv.cv_report`'s document, the keys its tables read)."""

pytestmark = pytest.mark.skipif(not KAGGLE_CLI.exists(), reason="kaggle CLI not installed in this environment")


@pytest.fixture
def server():
    srv = fake_kaggle.serve()
    yield srv
    srv.shutdown()
    srv.server_close()


def push(folder: Path, server, home: Path):
    return fake_kaggle.kaggle_cli(["kernels", "push", "-p", folder], server, home)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    """``make kernels`` for user ``tester``."""
    out = tmp_path_factory.mktemp("kernels")
    for name in publish.KERNELS:
        publish.render_kernel(name, ROOT / "notebooks", out, owner="tester")
    return out


@pytest.fixture
def kernel_copy(kernels) -> Path:
    return kernels / "submission"


def saved_kernel(server) -> dict:
    calls = server.calls(SAVE_KERNEL)
    assert len(calls) == 1, [p for _, p, _, _ in server.requests]
    return calls[0]


@pytest.mark.parametrize("name", sorted(publish.KERNELS))
def test_push_every_kernel(name, kernels, server, tmp_path):
    result = push(kernels / name, server, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert "successfully pushed" in result.stdout, result.stdout + result.stderr
    assert "Warning" not in result.stderr and "does not resolve" not in result.stdout, result.stdout + result.stderr
    request = saved_kernel(server)
    spec = publish.KERNELS[name]
    assert request["slug"] == f"tester/{publish.slugify(spec.title)}"        # the owner is the pushing user
    assert request["machineShape"] == "NvidiaTeslaT4" and request["enableGpu"] is True
    assert request["enableInternet"] is False
    assert request["datasetDataSources"] == [f"tester/{d}" for d in spec.datasets]
    assert request.get("competitionDataSources", []) == ([runtime.COMPETITION] if spec.competition else [])
    assert request.get("kernelDataSources", []) == []
    if spec.pin_image:
        assert request["dockerImagePinningType"] == "original"
    notebook = json.loads(request["text"])
    injected = next(c for c in notebook["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(injected["source"]).body}
    assert assigned == publish.kernel_parameters(name)
    if "NUM_GPUS" in assigned:
        assert assigned["NUM_GPUS"] == 2                                    # both T4s train


def test_push_resumable_kernel_attaches_its_own_output(server, tmp_path):
    folder = publish.render_kernel("finetune", ROOT / "notebooks", tmp_path, owner="tester", resume=True)
    assert push(folder, server, tmp_path / "home").returncode == 0
    assert saved_kernel(server)["kernelDataSources"] == ["tester/cellkit-finetune"]


def test_push_submission_kernel(kernel_copy, server, tmp_path):
    result = push(kernel_copy, server, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert "Kernel version 7 successfully pushed" in result.stdout, result.stdout + result.stderr

    request = saved_kernel(server)
    meta = json.loads((kernel_copy / "kernel-metadata.json").read_text())
    assert meta["id"] == "tester/cellkit-submission"
    assert request["slug"] == meta["id"]
    assert request["enableInternet"] is False          # explicit: the CLI defaults it to true
    assert request["enableGpu"] is True
    assert request["competitionDataSources"] == ["sartorius-cell-instance-segmentation"]
    owner = meta["id"].split("/")[0]
    assert set(request["datasetDataSources"]) == {f"{owner}/{runtime.WHEELS_DATASET}",
                                                  f"{owner}/{runtime.WEIGHTS_DATASET}"}
    assert request["language"] == "python" and request["kernelType"] == "notebook"

    # The notebook text carries the Kaggle parameters injected by `make kernels` (papermill --prepare-only).
    notebook = json.loads(request["text"])
    injected = [c for c in notebook["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1
    source = injected[0]["source"]
    assert isinstance(source, str)                     # the CLI joins source lines: the server wants one string
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body}
    assert assigned == publish.kernel_parameters("submission")
    assert assigned["OUT_DIR"] == "/kaggle/working"
    assert all(c.get("outputs", []) == [] for c in notebook["cells"] if c["cell_type"] == "code")

    _, _, headers, _ = next(r for r in server.requests if r[1].endswith(SAVE_KERNEL))
    assert headers.get("Authorization", "").startswith("Basic ")   # KAGGLE_USERNAME/KAGGLE_KEY were used


def test_push_reports_server_error(kernel_copy, server, tmp_path):
    server.reply = {"error": "Notebook not found or internet access not allowed"}
    result = push(kernel_copy, server, tmp_path / "home")
    assert result.returncode == 0          # the CLI's exit code does not tell: the output does
    assert "Kernel push error: Notebook not found" in result.stdout
    assert "successfully pushed" not in result.stdout


def test_metadata_without_internet_key_would_enable_it(kernel_copy, server, tmp_path):
    """Why the key is explicit: drop it and the CLI asks for internet."""
    import shutil

    kernel_copy = Path(shutil.copytree(kernel_copy, tmp_path / "copy"))
    meta_path = kernel_copy / "kernel-metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["enable_internet"]
    meta_path.write_text(json.dumps(meta))
    assert push(kernel_copy, server, tmp_path / "home").returncode == 0
    assert saved_kernel(server)["enableInternet"] is True


# ------------------------------------------------------------------------------------------------ datasets
def create_dataset(folder: Path, server, home: Path, *extra) -> dict:
    """``kaggle datasets create -p folder``: the CreateDataset request, after checking the CLI's output."""
    result = fake_kaggle.kaggle_cli(["datasets", "create", "-p", folder, *extra], server, home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Dataset is being created" in result.stdout, result.stdout + result.stderr
    calls = server.calls(CREATE_DATASET)
    assert len(calls) == 1
    return calls[0]


def test_create_wheels_dataset(server, tmp_path):
    """The wheels folder of ``make wheels`` (its files stood in for): flat, so no --dir-mode; .cache/ stays home."""
    wheels = tmp_path / "wheels"
    for name in ("cellkit-0.1.0-py3-none-any.whl", "detectron2-0.6+sal072-py3-none-any.whl",
                 "pycocotools-2.0.10-cp312-abi3-manylinux_2_17_x86_64.whl"):
        (wheels / name).parent.mkdir(parents=True, exist_ok=True)
        (wheels / name).write_bytes(b"PK" + name.encode())
    (wheels / ".cache").mkdir()
    (wheels / ".cache" / "sal_detectron2-0.7.2-cp310-none-any.whl").write_bytes(b"big")
    publish.write_dataset_metadata(wheels, publish.wheels_dataset_metadata("tester"))
    request = create_dataset(wheels, server, tmp_path / "home")
    assert (request["ownerSlug"], request["slug"]) == ("tester", runtime.WHEELS_DATASET)
    assert request["title"] == "cellkit wheels" and 20 <= len(request["subtitle"]) <= 80
    assert request["licenseName"] == "other" and request["isPrivate"] is True
    uploaded = {c["name"] for c in server.calls(START_UPLOAD)}
    assert uploaded == {p.name for p in wheels.glob("*.whl")}
    assert {f["token"] for f in request["files"]} == {f"token-{n}" for n in uploaded}


def test_create_weights_dataset(server, tmp_path):
    """``make weights`` of a run (checkpoints stood in for by tiny ones) uploads with ``--dir-mode zip``."""
    import torch

    run = tmp_path / "run"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "config.yaml").write_text("MODEL:\n  DEVICE: cpu\n")
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {"big": torch.zeros(1000)}, "iteration": 9},
               run / "fold0" / "model_best.pth")
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 4}, run / "fold0" / "model_0000004.pth")
    (run / "fold0" / "last_checkpoint").write_text("model_0000004.pth")
    (run / "fold0" / "metrics.json").write_text('{"iteration": 9, "cellkit/mAP": 0.25}\n')
    (run / "thresholds.json").write_text(json.dumps(THRESHOLDS))
    (run / "cv.json").write_text(json.dumps(CV))                # what `cellkit cv` (notebook 05) left in the run
    out = publish.build_weights(run, tmp_path / "weights", "tester")
    assert sorted(p.name for p in (out / "fold0").iterdir()) == ["config.yaml", "model_best.pth"]
    state = torch.load(out / "fold0" / "model_best.pth", weights_only=False)
    assert set(state) == {"model", "iteration"} and state["iteration"] == 9 and not state["model"]["w"].any()
    readme = (out / "README.md").read_text()
    assert "CV score on 4 out-of-fold images" in readme and "0.2500 (iteration 9)" in readme
    assert re.search(r"\| +all \| post-processed +\| 0\.3000 \|", readme)        # cellkit cv's Table 2
    assert json.loads((out / "cv.json").read_text()) == CV                     # `cellkit cv`'s document

    request = create_dataset(out, server, tmp_path / "home", "--dir-mode", "zip")
    assert (request["ownerSlug"], request["slug"]) == ("tester", runtime.WEIGHTS_DATASET)
    uploaded = {c["name"] for c in server.calls(START_UPLOAD)}
    assert uploaded == {"fold0.zip", "thresholds.json", "cv.json", "README.md"}


def test_weights_need_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="RUN=.*no fold<K>/config.yaml"):
        publish.build_weights(tmp_path, tmp_path / "w", "tester")
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "config.yaml").write_text("")
    with pytest.raises(FileNotFoundError, match="no thresholds.json"):
        publish.build_weights(tmp_path, tmp_path / "w", "tester")


def test_submit_the_kernel(server, tmp_path):
    """The README's last step: the code-competition submission of the pushed kernel's version."""
    result = fake_kaggle.kaggle_cli(["competitions", "submit", runtime.COMPETITION, "-k", "tester/cellkit-submission",
                                     "-v", "7", "-f", "submission.csv", "-m", "cellkit"], server, tmp_path / "home")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = server.calls(fake_kaggle.CODE_SUBMISSION)
    assert len(calls) == 1 and calls[0]["kernelSlug"] == "cellkit-submission"
    assert calls[0]["competitionName"] == runtime.COMPETITION and calls[0]["fileName"] == "submission.csv"
    assert calls[0]["kernelVersion"] == 7


def test_the_cli_rejects_what_cellkit_refuses(server, tmp_path):
    """The rule cellkit checks is the CLI's: yesterday's 87-character subtitle fails ``datasets create``."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "x.whl").write_bytes(b"PK")
    meta = {**publish.wheels_dataset_metadata("tester"),
            "subtitle": "Offline wheels for cellkit's Kaggle kernels: cellkit, detectron2 (pure Python) and deps"}
    (folder / "dataset-metadata.json").write_text(json.dumps(meta))
    result = fake_kaggle.kaggle_cli(["datasets", "create", "-p", folder], server, tmp_path / "home")
    assert "Subtitle length must be between 20 and 80 characters" in result.stdout + result.stderr
    assert server.calls(CREATE_DATASET) == []
    with pytest.raises(ValueError, match="87 characters"):
        publish.check_dataset_metadata(meta)
