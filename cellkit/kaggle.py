"""Where a notebook runs (Kaggle, Colab, local), where its inputs are, and the Kaggle kernels and wheels dataset.

Environments:

- **Kaggle**: inputs are mounted read-only under ``/kaggle/input`` and ``/kaggle/working`` is the writable output dir.
  The mount layout varies (``/kaggle/input/<slug>/``, ``/kaggle/input/competitions/<slug>/``,
  ``/kaggle/input/datasets/<owner>/<slug>/``, models several levels deep), so folders are found by glob on their
  content (e.g. a folder holding ``train.csv`` and ``train/``), never by a fixed path.
- **Colab**: ``/content`` is the writable working dir; inputs are wherever the user put them (Drive, ``/content``).
- **local**: the project checkout; relative paths resolve against the current directory, then the project root
  (so a notebook opened from ``notebooks/`` finds ``data/demo`` like one run by papermill from the root).

Kernels (``kernels/<name>/``): :data:`KERNELS` holds each kernel's notebook, Kaggle parameters and metadata;
``python -m cellkit.kaggle kernels`` renders them (``make kernels``). ``python -m cellkit.kaggle wheels`` builds the
offline wheel set (``make wheels``) that the submission notebook installs with ``pip install --no-index``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from cellkit import atomic

COMPETITION = "sartorius-cell-instance-segmentation"
"""The competition's slug: its Kaggle mount folder name and the kernels' ``competition_sources``."""

DEFAULT_OWNER = "cellkit"
"""Kaggle user that owns the kernels and datasets in the committed metadata (``make kernels KAGGLE_USER=...``)."""

WHEELS_DATASET = "cellkit-wheels"
"""Slug of the offline wheels dataset (``make wheels``)."""

WEIGHTS_DATASET = "cellkit-weights"
"""Slug of the dataset with trained fold models (``model_best.pth`` / ``model_final.pth`` + ``config.yaml``)."""

PRETRAINED_DATASET = "cellkit-pretrained"
"""Slug of the dataset with starting weights: model-zoo COCO checkpoints and/or a LIVECell pretrain checkpoint."""

LIVECELL_DATASET = "livecell-dataset"
"""Slug of a LIVECell dataset (COCO json + images) for pretraining."""

MAX_SEARCH_DEPTH = 6
"""How many folder levels below an input root the globs look.

Kaggle nests models up to 6 levels deep: ``models/<owner>/<model>/<framework>/<variation>/<version>``.
"""


# ----------------------------------------------------------------------------------------------------------------
# Environment detection
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Environment:
    """Where the code runs.

    Attributes:
        kind: ``"kaggle"``, ``"colab"`` or ``"local"``.
        input_roots: folders searched for competition data, datasets and weights (read-only on Kaggle).
        working_dir: the writable folder outputs go under by default.
        project_root: the cellkit checkout (holds ``notebooks/`` and ``cellkit/``) when there is one, else None.
    """

    kind: str
    input_roots: tuple[Path, ...]
    working_dir: Path
    project_root: Path | None = None

    @property
    def inputs_read_only(self) -> bool:
        """True on Kaggle, where ``/kaggle/input`` cannot be written."""
        return self.kind == "kaggle"

    @property
    def default_out_dir(self) -> Path:
        """The run directory used when a notebook's ``OUT_DIR`` is empty."""
        if self.kind == "local" and self.project_root is not None:
            return self.project_root / "runs" / "demo"
        return self.working_dir / "cellkit-run"


def find_project_root(start: Path) -> Path | None:
    """Return the first folder at or above ``start`` holding ``cellkit/__init__.py`` and ``notebooks/``, else None."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / "cellkit" / "__init__.py").is_file() and (folder / "notebooks").is_dir():
            return folder
    return None


def detect_environment(root: Path | str = "/", environ: Mapping[str, str] | None = None,
                       cwd: Path | str | None = None) -> Environment:
    """Detect Kaggle, Colab or a local run.

    Args:
        root: filesystem root to look under (tests pass a temp dir holding a fake ``kaggle/input`` tree).
        environ: environment variables (default ``os.environ``).
        cwd: current directory (default ``os.getcwd()``).

    Returns:
        Kaggle when ``<root>/kaggle/input`` exists (or ``KAGGLE_KERNEL_RUN_TYPE`` is set); Colab when ``<root>/content``
        exists and a Colab variable (``COLAB_RELEASE_TAG``, ``COLAB_GPU``) is set; local otherwise.
    """
    environ = os.environ if environ is None else environ
    root = Path(root)
    cwd = Path(cwd or os.getcwd())
    project = find_project_root(cwd)
    kaggle_input = root / "kaggle" / "input"
    if kaggle_input.is_dir() or "KAGGLE_KERNEL_RUN_TYPE" in environ:
        return Environment("kaggle", (kaggle_input,), root / "kaggle" / "working", project)
    content = root / "content"
    if content.is_dir() and ("COLAB_RELEASE_TAG" in environ or "COLAB_GPU" in environ):
        roots = tuple(p for p in (content / "drive" / "MyDrive", content) if p.is_dir())
        return Environment("colab", roots, content, project)
    roots = (project / "data",) if project is not None else (cwd,)
    return Environment("local", roots, cwd, project)


# ----------------------------------------------------------------------------------------------------------------
# Finding folders by content
# ----------------------------------------------------------------------------------------------------------------
def _walk_dirs(root: Path, max_depth: int) -> Iterable[Path]:
    """Yield ``root`` and its sub-folders up to ``max_depth`` levels, sorted, skipping hidden ones."""
    if not root.is_dir():
        return
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop(0)
        yield folder
        if depth >= max_depth:
            continue
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except PermissionError:
            continue
        stack.extend((child, depth + 1) for child in children)


def find_dirs(roots: Sequence[Path], markers: Sequence[str], max_depth: int = MAX_SEARCH_DEPTH) -> list[Path]:
    """Return the folders under ``roots`` that contain a match for every glob in ``markers``.

    Args:
        roots: folders to search (breadth-first, ``max_depth`` levels).
        markers: glob patterns relative to a candidate folder, e.g. ``("train.csv", "train")`` or ``("*.whl",)``.
        max_depth: levels below each root.

    Returns:
        Matching folders, shallowest first, without duplicates.
    """
    found: list[Path] = []
    for root in roots:
        for folder in _walk_dirs(Path(root), max_depth):
            if all(next(iter(folder.glob(m)), None) is not None for m in markers) and folder not in found:
                found.append(folder)
    return found


def _pick(candidates: list[Path], what: str, roots: Sequence[Path], prefer: str | None) -> Path:
    """Choose one folder: the only candidate, else the one named ``prefer``; otherwise a clear error."""
    if not candidates:
        where = ", ".join(str(r) for r in roots) or "(no input roots)"
        raise FileNotFoundError(f"no {what} found under {where}")
    if len(candidates) == 1:
        return candidates[0]
    if prefer is not None:
        named = [c for c in candidates if c.name == prefer]
        if len(named) >= 1:
            return named[0]
    listing = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"several {what} found ({listing}): pass the one to use explicitly")


def find_competition_dir(roots: Sequence[Path], need: str = "train") -> Path:
    """Find the competition-layout data folder under ``roots``.

    Args:
        roots: input roots (``Environment.input_roots``).
        need: ``"train"`` for a folder with ``train.csv`` and ``train/``, ``"test"`` for one with ``test/`` (the
            submission kernel only needs test images).

    Returns:
        The folder, preferring one named like the competition when several match.
    """
    markers = {"train": ("train.csv", "train"), "test": ("test",)}[need]
    candidates = find_dirs(roots, markers)
    if need == "test":
        # A folder holding test/ and the competition's other files, not any folder that happens to have test/.
        candidates = [c for c in candidates
                      if (c / "sample_submission.csv").exists() or (c / "train.csv").exists()] or candidates
    return _pick(candidates, f"competition data folder with {' and '.join(markers)}", roots, COMPETITION)


def find_dataset_dir(roots: Sequence[Path], pattern: str, prefer: str | None = None) -> Path:
    """Find the folder under ``roots`` holding files matching ``pattern`` (e.g. ``"detectron2-*.whl"``).

    Args:
        roots: input roots.
        pattern: glob for a file the dataset must contain.
        prefer: folder name to pick when several folders match (a dataset slug).
    """
    return _pick(find_dirs(roots, (pattern,)), f"folder with {pattern}", roots, prefer)


def resolve_input(value: str, env: Environment, parameter: str) -> Path:
    """Resolve a notebook path parameter that must exist.

    Absolute paths are used as given; relative ones are tried against the current directory, then the project root
    and the input roots.

    Raises:
        FileNotFoundError: naming the parameter and every place tried.
    """
    path = Path(os.path.expanduser(value))
    tried = [path] if path.is_absolute() else [
        Path.cwd() / path, *([env.project_root / path] if env.project_root else []),
        *(r / path for r in env.input_roots)]
    for candidate in tried:
        if candidate.exists():
            return candidate.resolve()
    raise FileNotFoundError(f"{parameter}={value!r}: not found (tried {', '.join(str(t) for t in tried)})")


def resolve_data_dir(value: str, env: Environment, need: str = "train", parameter: str = "DATA_DIR") -> Path:
    """Resolve a notebook's ``DATA_DIR``: a competition-layout folder (``train.csv`` + ``train/``, or ``test/``).

    ``""`` means auto: on Kaggle the competition mount, found by glob; locally ``data/demo`` of the project (made by
    ``python -m cellkit synth data/demo``) or the only competition-layout folder under ``data/``.

    Raises:
        FileNotFoundError: naming ``parameter`` when the folder or a file it must hold is missing.
    """
    if value:
        folder = resolve_input(value, env, parameter)
    elif env.kind == "local" and env.project_root and (env.project_root / "data" / "demo").is_dir():
        folder = env.project_root / "data" / "demo"
    else:
        try:
            folder = find_competition_dir(env.input_roots, need)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{parameter}='' (auto): {exc}") from None
    required = {"train": ("train.csv", "train"), "test": ("test",)}[need]
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{parameter}={str(folder)!r}: missing {', '.join(missing)} "
                                f"(expected the competition layout: train.csv, train/, test/)")
    return folder


def resolve_out_dir(value: str, env: Environment, parameter: str = "OUT_DIR") -> Path:
    """Resolve and create a notebook's ``OUT_DIR`` (``""``: the environment's default run directory).

    Raises:
        PermissionError: naming ``parameter`` when it lies under Kaggle's read-only ``/kaggle/input``.
    """
    path = Path(os.path.expanduser(value)) if value else env.default_out_dir
    if not path.is_absolute():
        base = env.project_root if (env.kind == "local" and env.project_root) else Path.cwd()
        path = base / path
    if env.inputs_read_only and any(_is_under(path, r) for r in env.input_roots):
        raise PermissionError(f"{parameter}={value!r}: {path} is on Kaggle's read-only input mount; "
                              f"write under {env.working_dir}")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def resolve_artifact(value: str, env: Environment, parameter: str, default: Path | None = None,
                     pattern: str | None = None, prefer: str | None = None, optional: bool = False,
                     folder: bool = False) -> Path | None:
    """Resolve a notebook parameter naming an artifact (a run folder, thresholds.json, a checkpoint).

    Order: ``"none"`` -> None (only when ``optional``); a given value -> that path (:func:`resolve_input`);
    ``""`` -> ``default`` when it exists (an artifact of an earlier notebook in the same run directory), else the
    input folder holding ``pattern`` (a Kaggle dataset): that folder when ``folder`` (e.g. a run dir found by its
    ``config.yaml``) or ``pattern`` has wildcards, else the file ``pattern`` in it.

    Raises:
        FileNotFoundError: naming ``parameter``, when nothing is found and the artifact is not ``optional``.
    """
    if value == "none":
        if optional:
            return None
        raise ValueError(f"{parameter}='none': this artifact is required")
    if value:
        return resolve_input(value, env, parameter)
    if default is not None and Path(default).exists():
        return Path(default).resolve()
    if pattern is not None:
        try:
            found = find_dataset_dir(env.input_roots, pattern, prefer)
            return found if folder or any(ch in pattern for ch in "*?[") else found / pattern
        except FileNotFoundError as exc:
            reason = str(exc)
    else:
        reason = "nothing to search for"
    if optional:
        return None
    local = f"{default} does not exist" if default is not None else "no earlier notebook made it here"
    raise FileNotFoundError(f"{parameter}='' (auto): {local} and {reason}; run the earlier notebook or pass "
                            f"{parameter}")


@dataclass(frozen=True)
class LiveCell:
    """A LIVECell COCO dataset: training json, image folder, optional validation json."""

    json: Path
    images: Path
    val_json: Path | None = None


def find_files(roots: Sequence[Path], pattern: str, max_depth: int = MAX_SEARCH_DEPTH) -> list[Path]:
    """Files matching ``pattern`` in the folders under ``roots`` (breadth-first, sorted per folder)."""
    found: list[Path] = []
    for root in roots:
        for folder in _walk_dirs(Path(root), max_depth):
            found += [p for p in sorted(folder.glob(pattern)) if p.is_file() and p not in found]
    return found


def resolve_livecell(dir_value: str, json_value: str, images_value: str, env: Environment) -> LiveCell | None:
    """Resolve the pretraining notebook's LIVECell parameters.

    Args:
        dir_value: ``LIVECELL_DIR``: a folder; ``""`` = search the input roots (None when nothing is found, so the
            demo skips pretraining); ``"none"`` = skip.
        json_value: ``LIVECELL_JSON``: the training json (relative to the folder); ``""`` = the first
            ``livecell*train*.json``, else the first ``livecell*.json`` that is not a ``*val*`` file.
        images_value: ``LIVECELL_IMAGES``: the image folder; ``""`` = the first folder holding ``*.tif`` files.
        env: the environment.

    Returns:
        The dataset, or None when pretraining is to be skipped.

    Raises:
        FileNotFoundError: naming the parameter, when a given folder or file is missing or holds no LIVECell json.
    """
    if dir_value == "none":
        return None
    explicit = bool(dir_value)
    roots = (resolve_input(dir_value, env, "LIVECELL_DIR"),) if explicit else env.input_roots
    if json_value:
        json_path = Path(json_value) if Path(json_value).is_absolute() else roots[0] / json_value
        if not json_path.is_file():
            raise FileNotFoundError(f"LIVECELL_JSON={json_value!r}: {json_path} not found")
    else:
        jsons = [p for p in find_files(roots, "*.json") if p.name.lower().startswith("livecell")]
        train = [p for p in jsons if "train" in p.name.lower()] or [p for p in jsons if "val" not in p.name.lower()]
        if not train:
            if explicit:
                raise FileNotFoundError(f"LIVECELL_DIR={dir_value!r}: no livecell*.json in {roots[0]}")
            return None
        json_path = train[0]
    vals = [p for p in find_files((json_path.parent,), "*.json", 0) if "val" in p.name.lower() and p != json_path]
    if images_value:
        images = resolve_input(images_value, env, "LIVECELL_IMAGES")
    else:
        folders = find_dirs((roots[0] if explicit else json_path.parent,), ("*.tif",))
        if not folders:
            raise FileNotFoundError(f"LIVECELL_IMAGES='' (auto): no folder with *.tif images near {json_path}")
        images = folders[0]
    return LiveCell(json_path.resolve(), images.resolve(), vals[0].resolve() if vals else None)


def pretrain_preset(preset: str) -> str:
    """The pretraining preset of a fine-tuning preset: ``<preset>_pretrain`` when it exists, else ``preset`` itself
    (``cellkit train --livecell`` switches any preset to pretraining).

    Raises:
        ValueError: ``preset`` is neither a known preset nor a YAML file (naming ``PRESET``).
    """
    from cellkit.config import preset_names, preset_path

    try:
        preset_path(preset)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"PRESET={preset!r}: {exc}") from None
    return f"{preset}_pretrain" if f"{preset}_pretrain" in preset_names() else preset


def check_preset(preset: str) -> Path:
    """The YAML of ``PRESET`` (a preset name or a .yaml path).

    Raises:
        ValueError: naming ``PRESET`` and listing the known presets.
    """
    from cellkit.config import preset_path

    try:
        return preset_path(preset)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"PRESET={preset!r}: {exc}") from None


def resolve_device(value: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; ``"cpu"``/``"cuda"``/``"cuda:N"`` checked.

    Raises:
        ValueError: an unknown device, or cuda asked for where there is none (naming ``DEVICE``).
    """
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return value
    if re.fullmatch(r"cuda(:\d+)?", value):
        if not torch.cuda.is_available():
            raise ValueError(f"DEVICE={value!r}: torch sees no CUDA device here; use 'cpu' or 'auto'")
        return value
    raise ValueError(f"DEVICE={value!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Installing what is missing (Kaggle offline wheels, Colab)
# ----------------------------------------------------------------------------------------------------------------
RUNTIME_MODULES = {
    # import name -> distribution to install
    "detectron2": "detectron2",
    "fvcore": "fvcore",
    "iopath": "iopath",
    "yacs": "yacs",
    "omegaconf": "omegaconf",
    "hydra": "hydra-core",
    "pycocotools": "pycocotools",
    "termcolor": "termcolor",
    "tabulate": "tabulate",
    "cloudpickle": "cloudpickle",
    "portalocker": "portalocker",
}
"""What the model stages import that Kaggle's or Colab's image may lack (import name -> distribution)."""


def missing_modules(modules: Mapping[str, str] = RUNTIME_MODULES) -> list[str]:
    """Return the distributions whose import name cannot be found in this interpreter."""
    import importlib.util
    return [dist for mod, dist in modules.items() if importlib.util.find_spec(mod) is None]


def pip_install_command(packages: Sequence[str], wheels_dir: Path | None = None, offline: bool = True) -> list[str]:
    """The pip command installing ``packages``, from ``wheels_dir`` when given.

    Args:
        packages: distributions to install.
        wheels_dir: a folder of wheels (``--find-links``).
        offline: with ``wheels_dir``, use nothing else (``--no-index``: Kaggle's offline kernels); False lets pip
            fetch what the folder lacks from the index (Colab).
    """
    cmd = [sys.executable, "-m", "pip", "install", "--quiet"]
    if wheels_dir is not None:
        cmd += (["--no-index"] if offline else []) + ["--find-links", str(wheels_dir)]
    return cmd + list(packages)


DETECTRON2_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_detectron2_wheel.py"
"""The checkout's detectron2 wheel builder (present when cellkit runs from a checkout or an editable install)."""


def install_missing(env: Environment, wheels_dir: str = "", run: bool = True) -> list[str]:
    """Install the runtime packages this interpreter lacks.

    - Kaggle (a submission kernel has no internet): from the wheels dataset with ``pip install --no-index
      --find-links``: ``wheels_dir`` or, when empty, the input folder holding ``detectron2-*.whl``.
    - Colab / local: from the package index; detectron2, which no index ships usable, from ``wheels_dir`` or, when
      cellkit runs from a checkout, from a wheel built by ``scripts/build_detectron2_wheel.py`` into
      ``<working dir>/wheels``.
    Nothing is installed when nothing is missing (a local ``make install``).

    Args:
        env: the detected environment.
        wheels_dir: a folder of wheels (``make wheels``); ``""`` = find it (Kaggle) or build detectron2's (Colab).
        run: False returns the command without running anything (for display and tests).

    Returns:
        The pip command (empty when nothing was missing).

    Raises:
        ModuleNotFoundError: detectron2 is missing and there is no wheels folder nor a checkout to build it from.
    """
    missing = missing_modules()
    if not missing:
        return []
    folder = Path(wheels_dir) if wheels_dir else None
    if folder is None and env.kind == "kaggle":
        folder = find_dataset_dir(env.input_roots, "detectron2-*.whl", prefer=WHEELS_DATASET)
    if folder is None and "detectron2" in missing:
        if not DETECTRON2_SCRIPT.is_file():
            raise ModuleNotFoundError("detectron2 is not installed and no wheels folder was given: build it with "
                                      "`make wheels` (or scripts/build_detectron2_wheel.py) and pass WHEELS_DIR")
        folder = env.working_dir / "wheels"
        build = [sys.executable, str(DETECTRON2_SCRIPT), "--out", str(folder), "--cache", str(folder / ".cache")]
        if run:
            subprocess.run(build, check=True)
    cmd = pip_install_command(missing, folder, offline=env.kind == "kaggle")
    if run:
        print("installing:", " ".join(missing))
        subprocess.run(cmd, check=True)
    return cmd


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSpec:
    """One Kaggle kernel: which notebook it runs, with which parameters, on which inputs.

    Attributes:
        notebook: file name in ``notebooks/``.
        title: kernel title (its slug is derived from it and must match the metadata id).
        parameters: papermill parameters injected for Kaggle (empty strings mean "find it by glob").
        datasets: dataset slugs (owner added at rendering) attached as inputs.
        competition: attach the competition's data.
        gpu: run on a GPU.
        internet: internet access (a submission kernel must have none).
    """

    notebook: str
    title: str
    parameters: dict = field(default_factory=dict)
    datasets: tuple[str, ...] = ()
    competition: bool = True
    gpu: bool = True
    internet: bool = False


KERNELS: dict[str, KernelSpec] = {
    "submission": KernelSpec(
        notebook="06_submission.ipynb",
        title="cellkit submission",
        parameters={"DATA_DIR": "", "OUT_DIR": "/kaggle/working", "RUN_DIR": "", "THRESHOLDS": "",
                    "WHEELS_DIR": "", "DEVICE": "cuda", "TTA": True, "SMOKE": False},
        datasets=(WHEELS_DATASET, WEIGHTS_DATASET),
    ),
    "finetune": KernelSpec(
        notebook="04_finetune.ipynb",
        title="cellkit finetune",
        parameters={"DATA_DIR": "", "OUT_DIR": "/kaggle/working", "PRESET": "paper", "FOLDS": "0,1,2,3,4",
                    "WEIGHTS": "", "WHEELS_DIR": "", "DEVICE": "cuda", "SMOKE": False},
        datasets=(WHEELS_DATASET, PRETRAINED_DATASET),
    ),
    "pretrain": KernelSpec(
        notebook="03_pretrain.ipynb",
        title="cellkit pretrain",
        parameters={"LIVECELL_DIR": "", "OUT_DIR": "/kaggle/working", "PRESET": "paper", "WEIGHTS": "",
                    "WHEELS_DIR": "", "DEVICE": "cuda", "SMOKE": False},
        datasets=(WHEELS_DATASET, PRETRAINED_DATASET, LIVECELL_DATASET),
        competition=False,
    ),
}
"""The committed kernels (``kernels/<name>/``)."""


def slugify(title: str) -> str:
    """Kaggle's slug of a title: lower case, runs of non-alphanumerics become one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def kernel_metadata(name: str, owner: str = DEFAULT_OWNER) -> dict:
    """Return ``kernel-metadata.json`` for kernel ``name`` (every key explicit, ``enable_internet`` included).

    The kaggle CLI defaults ``enable_internet`` to true when the key is absent, which a code competition rejects,
    so it is always written.
    """
    spec = KERNELS[name]
    return {
        "id": f"{owner}/{slugify(spec.title)}",
        "title": spec.title,
        "code_file": f"{name}.ipynb",
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": spec.gpu,
        "enable_tpu": False,
        "enable_internet": spec.internet,
        "dataset_sources": [f"{owner}/{slug}" for slug in spec.datasets],
        "competition_sources": [COMPETITION] if spec.competition else [],
        "kernel_sources": [],
        "model_sources": [],
    }


def render_kernel(name: str, notebooks_dir: Path, kernels_dir: Path, owner: str = DEFAULT_OWNER) -> Path:
    """Write ``kernels/<name>/kernel-metadata.json`` and ``<name>.ipynb`` (the notebook with Kaggle parameters).

    The notebook is rendered with ``papermill`` ``prepare_only`` (parameters injected, nothing executed).

    Returns:
        The kernel folder.
    """
    import papermill as pm

    spec = KERNELS[name]
    folder = Path(kernels_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    meta = kernel_metadata(name, owner)
    source = Path(notebooks_dir) / spec.notebook
    if not source.is_file():
        raise FileNotFoundError(f"kernel {name}: notebook {source} not found")
    with atomic.atomic_path(folder / meta["code_file"], suffix=".ipynb") as tmp:
        pm.execute_notebook(str(source), str(tmp), parameters=dict(spec.parameters), prepare_only=True,
                            kernel_name="python3", progress_bar=False, log_output=False)
        _make_reproducible(tmp, f"notebooks/{spec.notebook}", f"kernels/{name}/{meta['code_file']}")
    atomic.write_json(folder / "kernel-metadata.json", meta)
    return folder


def _make_reproducible(path: Path, input_path: str, output_path: str) -> None:
    """Make a papermill-rendered notebook byte-identical across renderings (it is committed).

    papermill gives the injected cell a random id and records absolute (temporary) paths; the id becomes
    ``injected-parameters`` and the paths repository-relative.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"
    nb.metadata.setdefault("papermill", {}).update(input_path=input_path, output_path=output_path)
    nbformat.write(nb, path)


# ----------------------------------------------------------------------------------------------------------------
# Offline wheels dataset
# ----------------------------------------------------------------------------------------------------------------
PURE_PYTHON_WHEELS = ("fvcore", "iopath", "yacs", "omegaconf", "hydra-core", "antlr4-python3-runtime",
                      "portalocker", "termcolor", "tabulate", "cloudpickle", "setuptools")
"""Pure-Python distributions Kaggle's image lacks (built or downloaded with ``pip wheel --no-deps``).

``setuptools`` is pinned to the tested version: detectron2.model_zoo needs ``pkg_resources`` (``setuptools<81``).
"""

BINARY_WHEELS = ("pycocotools",)
"""Compiled distributions, downloaded for Kaggle's interpreter and platform."""


def installed_version(dist: str) -> str | None:
    """The version of ``dist`` in this interpreter, or None."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pinned(dist: str) -> str:
    """``dist==<installed version>`` (the versions this checkout was tested with), or ``dist`` when not installed."""
    version = installed_version(dist)
    return f"{dist}=={version}" if version else dist


def wheels_dataset_metadata(owner: str = DEFAULT_OWNER) -> dict:
    """``dataset-metadata.json`` for ``kaggle datasets create -p wheels``."""
    return {"title": "cellkit wheels", "id": f"{owner}/{WHEELS_DATASET}",
            "subtitle": "Offline wheels for cellkit's Kaggle kernels: cellkit, detectron2 (pure Python) and deps",
            "licenses": [{"name": "other"}]}


def wheel_commands(out: Path, python_version: str, platform: str) -> list[list[str]]:
    """The pip commands that fill ``out`` with the third-party wheels (pure-Python, then binary for Kaggle).

    Args:
        out: the wheels folder.
        python_version: Kaggle's interpreter version, e.g. ``"3.11"``.
        platform: Kaggle's platform tag, e.g. ``"manylinux2014_x86_64"``.
    """
    pip = [sys.executable, "-m", "pip"]
    pure = [pip + ["wheel", "--no-deps", "--wheel-dir", str(out), *(pinned(d) for d in PURE_PYTHON_WHEELS)]]
    binary = [pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                     "--platform", platform, "--implementation", "cp", "--dest", str(out), pinned(d)]
              for d in BINARY_WHEELS]
    return pure + binary


def build_wheels(out: Path, project_root: Path, owner: str = DEFAULT_OWNER, python_version: str = "3.11",
                 platform: str = "manylinux2014_x86_64") -> list[Path]:
    """Build the offline wheel set into ``out``: cellkit, the pure-Python detectron2, third-party deps, metadata.

    Returns:
        The wheel files in ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d2 = [sys.executable, str(project_root / "scripts" / "build_detectron2_wheel.py"), "--out", str(out),
          "--cache", str(out / ".cache")]
    own = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out),
           str(project_root)]
    for cmd in [d2, own, *wheel_commands(out, python_version, platform)]:
        if cmd is own:  # setuptools reuses build/lib: a module deleted since the last build would ship again
            shutil.rmtree(project_root / "build", ignore_errors=True)
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    atomic.write_json(out / "dataset-metadata.json", wheels_dataset_metadata(owner))
    return sorted(out.glob("*.whl"))


# ----------------------------------------------------------------------------------------------------------------
# python -m cellkit.kaggle {kernels,wheels}
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cellkit.kaggle kernels|wheels``: render the kernels (``make kernels``) or build the wheels."""
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(prog="python -m cellkit.kaggle", description=main.__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels", help="render kernels/<name>/ (metadata + notebook with Kaggle parameters)")
    k.add_argument("--owner", default=DEFAULT_OWNER, help="Kaggle user owning the kernels and datasets")
    k.add_argument("--notebooks", type=Path, default=root / "notebooks")
    k.add_argument("--out", type=Path, default=root / "kernels")
    k.add_argument("names", nargs="*", default=list(KERNELS), help=f"kernels to render (default: {list(KERNELS)})")
    w = sub.add_parser("wheels", help="build the offline wheels dataset")
    w.add_argument("--owner", default=DEFAULT_OWNER)
    w.add_argument("--out", type=Path, default=root / "wheels")
    w.add_argument("--python-version", default="3.11", help="Kaggle's Python version")
    w.add_argument("--platform", default="manylinux2014_x86_64", help="Kaggle's platform tag")
    args = parser.parse_args(argv)
    if args.what == "kernels":
        unknown = [n for n in args.names if n not in KERNELS]
        if unknown:
            parser.error(f"unknown kernel(s) {unknown}; known: {list(KERNELS)}")
        for name in args.names:
            print(render_kernel(name, args.notebooks, args.out, args.owner))
    else:
        for wheel in build_wheels(args.out, root, args.owner, args.python_version, args.platform):
            print(wheel.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
