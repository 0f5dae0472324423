"""The Kaggle kernels and datasets cellkit publishes (``cellkit kernels``, ``cellkit wheels``, ``cellkit weights``).

Kernels (``kernels/<name>/``, rendered per user, not committed): :data:`KERNELS` holds each kernel's notebook,
Kaggle parameters and metadata; ``cellkit kernels`` renders them for the user of :func:`resolve_owner`
(``make kernels``). ``cellkit wheels`` builds the offline wheel set (``make wheels``) that the kernels install with
``pip install --no-index``; ``cellkit weights`` builds the weights dataset of a finished run (``make weights``).
``tests/test_rehearsal.py`` runs the rendered submission kernel offline on both.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from cellkit import atomic, rundir
from cellkit.runtime import (COMPETITION, DEFAULT_MACHINE_SHAPE, PRETRAINED_DATASET, WEIGHTS_DATASET,
                             WHEELS_DATASET)

# ----------------------------------------------------------------------------------------------------------------
# Owner and machine
# ----------------------------------------------------------------------------------------------------------------
def resolve_owner(value: str | None = None, environ: Mapping[str, str] | None = None,
                  home: Path | None = None) -> str:
    """The Kaggle user owning the kernels and datasets cellkit renders.

    Order: ``value`` (``--owner``, ``make ... KAGGLE_USER=``), ``KAGGLE_USERNAME``, then the ``username`` of the
    API token ``kaggle.json`` in ``$KAGGLE_CONFIG_DIR`` or ``~/.kaggle`` (what the kaggle CLI itself uses).

    Raises:
        ValueError: no owner anywhere, a token without ``username``, or a name that is not a Kaggle user name.
    """
    environ = os.environ if environ is None else environ
    owner, origin = value, "--owner"
    if not owner and environ.get("KAGGLE_USERNAME"):
        owner, origin = environ["KAGGLE_USERNAME"], "KAGGLE_USERNAME"
    if not owner:
        token = (Path(environ["KAGGLE_CONFIG_DIR"]) if environ.get("KAGGLE_CONFIG_DIR") else
                 Path(home or Path.home()) / ".kaggle") / "kaggle.json"
        if not token.is_file():
            raise ValueError(f"no Kaggle user to own the kernels and datasets: set KAGGLE_USERNAME, put your API "
                             f"token at {token} (kaggle.com > Settings > API > Create New Token) or pass "
                             f"KAGGLE_USER=<name> to make")
        try:
            owner = json.loads(token.read_text(encoding="utf-8")).get("username", "")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{token}: not a Kaggle API token ({exc})") from None
        origin = str(token)
        if not owner:
            raise ValueError(f"{token}: no 'username' in the Kaggle API token")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,49}", owner):
        raise ValueError(f"Kaggle user {owner!r} (from {origin}): not a Kaggle user name")
    return owner


#: GPUs per machine shape, for the training kernels' ``NUM_GPUS`` (a shape not listed: 1).
MACHINE_GPUS = {"NvidiaTeslaT4": 2}

#: Shapes cellkit refuses to render (the kaggle CLI only warns about them).
RETIRED_MACHINE_SHAPES = {"NvidiaTeslaP100": "its sm_60 is not supported by the image's torch"}


def check_machine_shape(shape: str) -> str:
    """Return ``shape`` when a GPU kernel may run on it.

    Raises:
        ValueError: naming ``MACHINE_SHAPE`` for an empty or retired shape.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", shape or ""):
        raise ValueError(f"MACHINE_SHAPE={shape!r}: expected a Kaggle machine shape such as "
                         f"{DEFAULT_MACHINE_SHAPE!r} (GPU T4 x2)")
    if shape in RETIRED_MACHINE_SHAPES:
        raise ValueError(f"MACHINE_SHAPE={shape!r}: {RETIRED_MACHINE_SHAPES[shape]}; use {DEFAULT_MACHINE_SHAPE!r} "
                         f"(GPU T4 x2)")
    return shape


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSpec:
    """One Kaggle kernel: which notebook it runs, with which parameters, on which inputs (every kernel runs on a GPU,
    without internet).

    Attributes:
        notebook: file name in ``notebooks/``.
        title: kernel title (its slug is derived from it and must match the metadata id).
        parameters: papermill parameters injected for Kaggle (empty strings mean "find it by glob"); a training
            kernel's ``NUM_GPUS`` is replaced by the machine's GPU count at rendering.
        datasets: dataset slugs (owner added at rendering) attached as inputs.
        competition: attach the competition's data.
        pin_image: pin the docker image of the kernel's first run (``docker_image_pinning_type: original``), so
            that the rerun on the hidden test set runs the image the wheels were built and tested for.
        resumable: the kernel trains in chunks: rendered with ``--resume`` it attaches its own previous output
            (``kernel_sources``) and continues from it.
    """

    notebook: str
    title: str
    parameters: dict = field(default_factory=dict)
    datasets: tuple[str, ...] = ()
    competition: bool = True
    pin_image: bool = False
    resumable: bool = False


#: Kaggle's limit on one GPU session (a code competition's submission run: 9 h).
SESSION_MINUTES = 12 * 60

#: The kernels ``make kernels`` renders into ``kernels/<name>/``.
KERNELS: dict[str, KernelSpec] = {
    "submission": KernelSpec(
        notebook="06_submission.ipynb",
        title="cellkit submission",
        parameters={"DATA_DIR": "", "OUT_DIR": "/kaggle/working", "RUNS": "", "THRESHOLDS": "",
                    "WHEELS_DIR": "", "DEVICE": "cuda", "SMOKE": False},
        datasets=(WHEELS_DATASET, WEIGHTS_DATASET),
        pin_image=True,
    ),
    "finetune": KernelSpec(
        notebook="04_finetune.ipynb",
        title="cellkit finetune",
        # 600 of the session's 720 minutes train; the rest predicts the held-out images and saves the output.
        parameters={"DATA_DIR": "", "OUT_DIR": "/kaggle/working", "PRESET": "paper", "FOLDS": "0,1,2,3,4",
                    "TIME_BUDGET_MINUTES": 600, "NUM_GPUS": 1, "RESUME_DIR": "", "WEIGHTS": "", "WHEELS_DIR": "",
                    "DEVICE": "cuda", "SMOKE": False},
        datasets=(WHEELS_DATASET, PRETRAINED_DATASET),
        resumable=True,
    ),
    "pretrain": KernelSpec(
        notebook="03_pretrain.ipynb",
        title="cellkit pretrain",
        parameters={"LIVECELL_DIR": "", "OUT_DIR": "/kaggle/working", "PRESET": "paper", "TIME_BUDGET_MINUTES": 660,
                    "NUM_GPUS": 1, "RESUME_DIR": "", "WEIGHTS": "", "WHEELS_DIR": "", "DEVICE": "cuda",
                    "SMOKE": False},
        # LIVECell comes with the competition's data (LIVECell_dataset_2021/), found by resolve_livecell
        datasets=(WHEELS_DATASET, PRETRAINED_DATASET),
        resumable=True,
    ),
}


def slugify(title: str) -> str:
    """Kaggle's slug of a title: lower case, runs of non-alphanumerics become one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def kernel_metadata(name: str, owner: str, machine_shape: str = DEFAULT_MACHINE_SHAPE, resume: bool = False) -> dict:
    """Return ``kernel-metadata.json`` for kernel ``name`` (every key explicit, ``enable_internet`` included).

    The kaggle CLI defaults ``enable_internet`` to true when the key is absent, which a code competition rejects,
    so it is always written. A GPU kernel names its ``machine_shape``: without one Kaggle may give a P100.

    Args:
        name: a key of :data:`KERNELS`.
        owner: the Kaggle user (:func:`resolve_owner`).
        machine_shape: the GPU (:func:`check_machine_shape`).
        resume: a resumable kernel attaches its own previous output (``kernel_sources``).
    """
    spec = KERNELS[name]
    kernel_id = f"{owner}/{slugify(spec.title)}"
    return {
        "id": kernel_id,
        "title": spec.title,
        "code_file": f"{name}.ipynb",
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": False,  # a code competition's submission kernel must have none
        "dataset_sources": [f"{owner}/{slug}" for slug in spec.datasets],
        "competition_sources": [COMPETITION] if spec.competition else [],
        "kernel_sources": [kernel_id] if (resume and spec.resumable) else [],
        "model_sources": [],
        "machine_shape": check_machine_shape(machine_shape),
        **({"docker_image_pinning_type": "original"} if spec.pin_image else {}),  # the first run's image
    }


def kernel_parameters(name: str, machine_shape: str = DEFAULT_MACHINE_SHAPE, num_gpus: int | None = None) -> dict:
    """The papermill parameters of kernel ``name``: :data:`KERNELS`' with ``NUM_GPUS`` set for the machine."""
    params = dict(KERNELS[name].parameters)
    if "NUM_GPUS" in params:
        gpus = MACHINE_GPUS.get(machine_shape, 1) if num_gpus is None else int(num_gpus)
        if gpus < 1:
            raise ValueError(f"NUM_GPUS={num_gpus!r}: must be >= 1")
        params["NUM_GPUS"] = gpus
    return params


def render_kernel(name: str, notebooks_dir: Path, kernels_dir: Path, owner: str,
                  machine_shape: str = DEFAULT_MACHINE_SHAPE, num_gpus: int | None = None,
                  resume: bool = False) -> Path:
    """Write ``kernels/<name>/kernel-metadata.json`` and ``<name>.ipynb`` (the notebook with Kaggle parameters).

    The notebook is rendered with ``papermill`` ``prepare_only`` (parameters injected, nothing executed), then made
    byte-identical across renderings: papermill gives the injected cell a random id and records absolute (temporary)
    paths; the id becomes ``injected-parameters`` and the paths repository-relative.

    Returns:
        The kernel folder.
    """
    import nbformat
    import papermill as pm

    spec = KERNELS[name]
    meta = kernel_metadata(name, owner, machine_shape, resume)
    params = kernel_parameters(name, machine_shape, num_gpus)
    source = Path(notebooks_dir) / spec.notebook
    if not source.is_file():
        raise FileNotFoundError(f"kernel {name}: notebook {source} not found")
    folder = Path(kernels_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(folder / meta["code_file"], suffix=".ipynb") as tmp:
        pm.execute_notebook(str(source), str(tmp), parameters=params, prepare_only=True,
                            kernel_name="python3", progress_bar=False, log_output=False)
        nb = nbformat.read(tmp, as_version=4)
        for cell in nb.cells:
            if "injected-parameters" in cell.metadata.get("tags", []):
                cell.id = "injected-parameters"
        nb.metadata.setdefault("papermill", {}).update(input_path=f"notebooks/{spec.notebook}",
                                                       output_path=f"kernels/{name}/{meta['code_file']}")
        nbformat.write(nb, tmp)
    atomic.write_json(folder / "kernel-metadata.json", meta)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Datasets cellkit makes: metadata
# ----------------------------------------------------------------------------------------------------------------
#: Licence names ``dataset-metadata.json`` may carry (``kaggle datasets create`` wants exactly one).
DATASET_LICENSES = ("CC0-1.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "CC-BY-4.0", "CC-BY-NC-4.0", "GPL-2.0",
                    "GPL-3.0", "LGPL-3.0", "AGPL-3.0", "ODbL-1.0", "DbCL-1.0", "Apache-2.0", "MIT", "BSD-3-Clause",
                    "other", "unknown")


def check_dataset_metadata(meta: Mapping) -> dict:
    """Check a ``dataset-metadata.json`` against what ``kaggle datasets create`` and Kaggle accept.

    The CLI's own checks: ``id`` ``owner/slug`` with a 6-50 character slug, a 6-50 character title, a 20-80
    character subtitle, exactly one licence. Kaggle's: the slug is lower-case letters, digits and hyphens.

    Raises:
        ValueError: naming the field and its rule.
    """
    ref = str(meta.get("id", ""))
    owner, _, slug = ref.partition("/")
    if not owner or not slug:
        raise ValueError(f"dataset-metadata.json id {ref!r}: expected 'owner/slug'")
    if not 6 <= len(slug) <= 50 or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug):
        raise ValueError(f"dataset-metadata.json id {ref!r}: the slug must be 6-50 lower-case letters, digits and "
                         f"single hyphens")
    title = str(meta.get("title", ""))
    if not 6 <= len(title) <= 50:
        raise ValueError(f"dataset-metadata.json title {title!r}: {len(title)} characters, must be 6-50")
    subtitle = meta.get("subtitle")
    if subtitle is not None and not 20 <= len(subtitle) <= 80:
        raise ValueError(f"dataset-metadata.json subtitle {subtitle!r}: {len(subtitle)} characters, must be 20-80")
    licenses = meta.get("licenses") or []
    if len(licenses) != 1 or licenses[0].get("name") not in DATASET_LICENSES:
        raise ValueError(f"dataset-metadata.json licenses {licenses!r}: exactly one of {', '.join(DATASET_LICENSES)}")
    return dict(meta)


def write_dataset_metadata(folder: Path, meta: Mapping) -> Path:
    """Check and write ``folder/dataset-metadata.json``."""
    return atomic.write_json(Path(folder) / "dataset-metadata.json", check_dataset_metadata(meta))


# ----------------------------------------------------------------------------------------------------------------
# Offline wheels dataset
# ----------------------------------------------------------------------------------------------------------------
#: Pure-Python distributions Kaggle's image lacks (built or downloaded once with ``pip wheel --no-deps``):
#: detectron2's, and those cellkit's fusion (``ensemble-boxes``) and annotation audit (``cleanlab``) import; their own
#: dependencies (numpy, pandas, numba, scikit-learn, tqdm) are the image's.
#:
#: setuptools is not shipped: the image's (``>=70,<82``) still has ``pkg_resources``, which detectron2.model_zoo needs.
PURE_PYTHON_WHEELS = ("fvcore", "iopath", "yacs", "omegaconf", "hydra-core", "antlr4-python3-runtime",
                      "portalocker", "termcolor", "tabulate", "cloudpickle", "ensemble-boxes", "cleanlab")

#: Compiled distributions, downloaded per Python version for Kaggle's platform.
BINARY_WHEELS = ("pycocotools",)

#: Python versions the wheel set serves: Kaggle's image (3.12 since December 2025) and the next one (Colab's 3.13).
KAGGLE_PYTHONS = ("3.12", "3.13")

#: Kaggle's platform tag.
KAGGLE_PLATFORM = "manylinux2014_x86_64"


def pinned(dist: str) -> str:
    """``dist==<installed version>`` (the versions this checkout was tested with), or ``dist`` when not installed."""
    from importlib import metadata

    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist


def parse_python_versions(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"3.12,3.13"`` -> ``("3.12", "3.13")``.

    Raises:
        ValueError: naming ``--python-versions`` for anything but ``3.N`` versions.
    """
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if not items or not all(re.fullmatch(r"3\.\d{1,2}", v) for v in items):
        raise ValueError(f"--python-versions {value!r}: expected versions like 3.12,3.13")
    return tuple(dict.fromkeys(items))


def wheels_dataset_metadata(owner: str, python_versions: Sequence[str] = KAGGLE_PYTHONS) -> dict:
    """``dataset-metadata.json`` for ``kaggle datasets create -p wheels`` (checked)."""
    return check_dataset_metadata({
        "title": "cellkit wheels", "id": f"{owner}/{WHEELS_DATASET}",
        "subtitle": f"Offline wheels for the cellkit kernels, Python {' and '.join(python_versions)}",
        "licenses": [{"name": "other"}]})


def wheel_commands(out: Path, python_versions: Sequence[str] = KAGGLE_PYTHONS,
                   platform: str = KAGGLE_PLATFORM) -> list[list[str]]:
    """The pip commands that fill ``out`` with the third-party wheels: the pure-Python ones once, then the binary
    ones for each of ``python_versions`` on ``platform``.
    """
    pip = [sys.executable, "-m", "pip"]
    pure = [pip + ["wheel", "--no-deps", "--wheel-dir", str(out), *(pinned(d) for d in PURE_PYTHON_WHEELS)]]
    binary = [pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", version,
                     "--platform", platform, "--implementation", "cp", "--dest", str(out), pinned(d)]
              for version in python_versions for d in BINARY_WHEELS]
    return pure + binary


def build_wheels(out: Path, project_root: Path, owner: str, python_versions: Sequence[str] = KAGGLE_PYTHONS,
                 platform: str = KAGGLE_PLATFORM) -> list[Path]:
    """Build the offline wheel set into ``out``: cellkit, the pure-Python detectron2, third-party deps, metadata.

    The folder is flat (pip's ``--find-links`` picks each interpreter's binary wheel), so it uploads without
    ``--dir-mode``; the detectron2 download cache in ``out/.cache`` is one of the CLI's default ignore patterns.

    Returns:
        The wheel files in ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = wheels_dataset_metadata(owner, python_versions)   # checked before minutes of building
    d2 = [sys.executable, str(project_root / "scripts" / "build_detectron2_wheel.py"), "--out", str(out),
          "--cache", str(out / ".cache")]
    own = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out),
           str(project_root)]
    for cmd in [d2, own, *wheel_commands(out, python_versions, platform)]:
        if cmd is own:  # setuptools reuses build/lib: a module deleted since the last build would ship again
            shutil.rmtree(project_root / "build" / "lib", ignore_errors=True)
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    write_dataset_metadata(out, meta)
    return sorted(out.glob("*.whl"))


# ----------------------------------------------------------------------------------------------------------------
# Weights dataset
# ----------------------------------------------------------------------------------------------------------------
def weights_dataset_metadata(owner: str) -> dict:
    """``dataset-metadata.json`` for ``kaggle datasets create -p weights --dir-mode zip`` (checked)."""
    return check_dataset_metadata({
        "title": "cellkit weights", "id": f"{owner}/{WEIGHTS_DATASET}",
        "subtitle": "cellkit fold models, thresholds and CV score for the Sartorius kernel",
        "licenses": [{"name": "other"}]})


def _model_only(source: Path, target: Path) -> int | None:
    """Write ``source``'s model weights alone (no optimizer, scheduler or hook state) to ``target``; returns the
    checkpoint's iteration."""
    import torch

    state = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{source}: not a detectron2 checkpoint (no 'model' entry)")
    iteration = state.get("iteration")
    with atomic.atomic_path(target, suffix=".pth") as tmp:
        torch.save({"model": state["model"], "iteration": iteration}, tmp)
    return iteration


def cv_document(run: Path) -> dict:
    """``cv.json`` of a finished run: ``cellkit cv``'s document (:func:`cellkit.cv.cv_report`).

    The run's own ``cv.json`` (the threshold-search notebook's, or ``cellkit cv RUN``'s) when it has one, else scored
    here from ``RUN/oof``, ``RUN/thresholds.json``, ``RUN/folds.csv`` and the truth the search was run against
    (``thresholds.json``'s ``provenance.truth``).

    Raises:
        FileNotFoundError: naming ``RUN`` when there is no ``cv.json`` and the search names no truth file.
    """
    from cellkit import cv

    if (run / cv.CV_JSON).is_file():
        return atomic.read_json(run / cv.CV_JSON, "cv.json")
    truth = (atomic.read_json(run / "thresholds.json", "thresholds file").get("provenance") or {}).get("truth")
    if not truth:
        raise FileNotFoundError(f"RUN={str(run)!r}: no cv.json and thresholds.json names no truth file (run "
                                f"`cellkit cv {run} --data DIR` first)")
    return cv.cv_report(run / "oof", truth, run / "thresholds.json", run / "folds.csv", progress=False)


def folds_table(folds: Sequence[Mapping]) -> str:
    """The weights dataset's README table of the folds: checkpoint, iteration, best validation mAP."""
    rows = (f"| {f['fold']} | {f['checkpoint']} | {f['iteration']} | "
            f"{'-' if f['best'] is None else '{:.4f} (iteration {})'.format(*f['best'])} |" for f in folds)
    return "\n".join(["| fold | checkpoint | iteration | best validation mAP |", "|---:|---|---:|---:|", *rows])


def build_weights(run: Path, out: Path, owner: str) -> Path:
    """Build the weights dataset the submission kernel attaches from a finished run (``cellkit chain``).

    ``out`` gets, per fold, ``fold<K>/config.yaml`` and ``fold<K>/model_best.pth`` (the run's best checkpoint --
    ``model_best.pth``, else ``model_final.pth`` -- reduced to its model weights; no other checkpoint), then
    ``thresholds.json``, ``cv.json``, a ``README.md`` with the CV table and ``dataset-metadata.json``. The folds are
    folders: upload with ``kaggle datasets create -p OUT --dir-mode zip`` (Kaggle unpacks each into its folder).

    Raises:
        FileNotFoundError: naming ``RUN`` when the run has no fold with a checkpoint or no thresholds.json.
    """
    from cellkit.cv import format_tables

    run, out = Path(run), Path(out)
    meta = weights_dataset_metadata(owner)
    folds = rundir.fold_runs(run) if run.is_dir() else []
    if not folds:
        raise FileNotFoundError(f"RUN={str(run)!r}: no fold<K>/config.yaml (a run of `cellkit chain` or the "
                                f"finetune notebook)")
    if not (run / "thresholds.json").is_file():
        raise FileNotFoundError(f"RUN={str(run)!r}: no thresholds.json (run the threshold search first)")
    doc = cv_document(run)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for fold_dir in folds:
        checkpoint = rundir.run_weights(fold_dir)
        target = out / fold_dir.name
        target.mkdir(exist_ok=True)
        for stale in target.glob("*.pth"):
            stale.unlink()
        shutil.copy2(fold_dir / rundir.CONFIG, target / rundir.CONFIG)
        rows.append({"fold": int(fold_dir.name[4:]), "checkpoint": checkpoint.name,
                     "iteration": _model_only(checkpoint, target / rundir.BEST),
                     "best": rundir.best_metric(fold_dir / rundir.METRICS)})
    shutil.copy2(run / "thresholds.json", out / "thresholds.json")
    atomic.write_json(out / "cv.json", doc)
    n = f" on {len(doc['per_image'])} out-of-fold images" if doc.get("per_image") else ""
    atomic.write_text(out / "README.md",
                      f"# cellkit weights\n\nTrained by cellkit from the run `{run.name}`: one folder per fold "
                      f"(`config.yaml`, `model_best.pth`: model weights only), the class-wise post-processing "
                      f"(`thresholds.json`) and the CV score (`cv.json`).\n\n## CV score{n}\n\n"
                      f"{format_tables(doc)}\n\n{folds_table(rows)}\n")
    write_dataset_metadata(out, meta)
    return out

