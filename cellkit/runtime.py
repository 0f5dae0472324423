"""What the notebooks import to run anywhere: where they run (Kaggle, Colab, local), where their inputs are.

Environments (:func:`detect_environment`; variables first, then folders):

- **Kaggle** (``KAGGLE_KERNEL_RUN_TYPE``): inputs are mounted read-only under ``/kaggle/input`` and
  ``/kaggle/working`` is the writable output dir. The mount layout varies (``/kaggle/input/<slug>/``,
  ``/kaggle/input/competitions/<slug>/``, ``/kaggle/input/datasets/<owner>/<slug>/``, models several levels deep),
  so folders are found by their content (e.g. a folder holding ``train.csv`` and ``train/``), never by a fixed path;
  the mount is walked once per session (:func:`input_listing`).
- **Colab** (its variables, even where kagglehub mounted ``/kaggle/input``): ``/content`` is the writable working
  dir; inputs are wherever the user put them (Drive, ``/content``, kagglehub's mount).
- **local**: the project checkout; relative paths resolve against the current directory, then the project root
  (so a notebook opened from ``notebooks/`` finds ``data/demo`` like one run by papermill from the root).

Besides: notebook parameters to paths, preset and device checks, installing missing packages, the session clock and
resuming an earlier session's runs (the run-directory files themselves: :mod:`cellkit.rundir`). The kernels and
datasets cellkit publishes are :mod:`cellkit.publish`'s (never imported here).
"""
import fnmatch
import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from cellkit import rundir
from cellkit.rundir import prune_checkpoints  # noqa: F401  (the training notebooks call runtime.prune_checkpoints)

#: The competition's slug: its Kaggle mount folder name and the kernels' ``competition_sources``.
COMPETITION = "sartorius-cell-instance-segmentation"

#: Slug of the offline wheels dataset (``make wheels``).
WHEELS_DATASET = "cellkit-wheels"

#: Slug of the dataset with trained fold models (``make weights``: ``fold<K>/`` + ``thresholds.json`` + ``cv.json``).
WEIGHTS_DATASET = "cellkit-weights"

#: Slug of the dataset with starting weights: model-zoo COCO checkpoints and/or a LIVECell pretrain checkpoint.
PRETRAINED_DATASET = "cellkit-pretrained"


#: How many folder levels below an input root the globs look.
#:
#: Kaggle nests models up to 6 levels deep: ``models/<owner>/<model>/<framework>/<variation>/<version>``.
MAX_SEARCH_DEPTH = 6


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
        local = self.kind == "local" and self.project_root is not None
        return self.project_root / "runs" / "demo" if local else self.working_dir / "cellkit-run"


#: Environment variable naming the folder that stands for ``/kaggle`` (the offline rehearsal's fake filesystem,
#: ``tests/test_rehearsal.py``); unset on Kaggle itself.
KAGGLE_ROOT_VARIABLE = "CELLKIT_KAGGLE_ROOT"

#: Variables Colab's runtime sets (any one of them means Colab, even where kagglehub mounted ``/kaggle/input``).
COLAB_VARIABLES = ("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_BACKEND_VERSION", "COLAB_JUPYTER_IP")


def kaggle_root(environ: Mapping[str, str] | None = None) -> Path:
    """``/kaggle``, or the folder named by :data:`KAGGLE_ROOT_VARIABLE`."""
    return Path((os.environ if environ is None else environ).get(KAGGLE_ROOT_VARIABLE) or "/kaggle")


def kaggle_path(value: str) -> str:
    """``value`` itself, or a ``/kaggle/...`` path moved under :data:`KAGGLE_ROOT_VARIABLE` when that is set (the
    rehearsal runs the kernels' own ``OUT_DIR='/kaggle/working'`` in its fake filesystem)."""
    root = os.environ.get(KAGGLE_ROOT_VARIABLE)
    if root and (value == "/kaggle" or value.startswith("/kaggle/")):
        return str(Path(root) / value[len("/kaggle/"):]) if value != "/kaggle" else root
    return value


def find_project_root(start: Path) -> Path | None:
    """Return the first folder at or above ``start`` holding ``cellkit/__init__.py`` and ``notebooks/``, else None."""
    start = Path(start).resolve()
    return next((folder for folder in (start, *start.parents)
                 if (folder / "cellkit" / "__init__.py").is_file() and (folder / "notebooks").is_dir()), None)


def detect_environment(root: Path | str | None = None, environ: Mapping[str, str] | None = None,
                       cwd: Path | str | None = None) -> Environment:
    """Detect Kaggle, Colab or a local run.

    Variables decide first: ``KAGGLE_KERNEL_RUN_TYPE`` (set in every Kaggle session, interactive or batch) means
    Kaggle, a Colab variable (:data:`COLAB_VARIABLES`) means Colab, even where ``kagglehub`` mounted
    ``/kaggle/input`` on Colab. Only without either is a folder tested: ``<kaggle root>/input`` means Kaggle (an
    image without the variable), ``<root>/content`` Colab.

    Args:
        root: filesystem root the Kaggle (``<root>/kaggle``) and Colab (``<root>/content``) folders are looked for
            under; None: ``/`` with the Kaggle folder from :func:`kaggle_root` (tests pass a temp dir).
        environ: environment variables (default ``os.environ``).
        cwd: current directory (default ``os.getcwd()``).
    """
    environ = os.environ if environ is None else environ
    kaggle_dir = kaggle_root(environ) if root is None else Path(root) / "kaggle"
    content = (Path("/") if root is None else Path(root)) / "content"
    cwd = Path(cwd or os.getcwd())
    project = find_project_root(cwd)
    kaggle = Environment("kaggle", (kaggle_dir / "input",), kaggle_dir / "working", project)
    if "KAGGLE_KERNEL_RUN_TYPE" in environ:
        return kaggle
    if any(name in environ for name in COLAB_VARIABLES) or (content.is_dir() and "google.colab" in sys.modules):
        return Environment("colab", tuple(p for p in (content / "drive" / "MyDrive", content, kaggle_dir / "input")
                                          if p.is_dir()), content, project)
    if (kaggle_dir / "input").is_dir():
        return kaggle
    return Environment("local", (project / "data",) if project is not None else (cwd,), cwd, project)


# ----------------------------------------------------------------------------------------------------------------
# Finding folders by content
# ----------------------------------------------------------------------------------------------------------------
#: Listings of Kaggle's read-only input mount, made once per session (see :func:`input_listing`).
_LISTINGS: dict[tuple[str, int], list[tuple[Path, frozenset]]] = {}


def _scan(root: Path, max_depth: int) -> list[tuple[Path, frozenset]]:
    """``(folder, names of its entries)`` for ``root`` and its sub-folders up to ``max_depth`` levels, breadth-first
    (shallowest first, sorted by name within a level; hidden entries skipped, unreadable folders left out)."""
    listing = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        depth = len(Path(folder).relative_to(root).parts)
        listing.append((Path(folder), frozenset(n for n in dirs + files if not n.startswith("."))))
        dirs[:] = [d for d in dirs if not d.startswith(".")] if depth < max_depth else []
    return sorted(listing, key=lambda item: (len(item[0].parts), item[0].parts))


def input_listing(root: Path, max_depth: int = MAX_SEARCH_DEPTH) -> list[tuple[Path, frozenset]]:
    """Every folder under ``root`` (``max_depth`` levels) with the names it holds.

    Kaggle's input mount (``<kaggle root>/input``) is read-only, so it is walked once per session and the listing
    reused by every search (a session with the competition, LIVECell and model datasets attached holds tens of
    thousands of files); any other root (local data, Colab) is walked at each call, since it may change.
    """
    root = Path(root)
    if root != kaggle_root() / "input":
        return _scan(root, max_depth)
    key = (str(root), max_depth)
    if key not in _LISTINGS:
        _LISTINGS[key] = _scan(root, max_depth)
    return _LISTINGS[key]


def find_dirs(roots: Sequence[Path], markers: Sequence[str], max_depth: int = MAX_SEARCH_DEPTH) -> list[Path]:
    """Return the folders under ``roots`` that contain a match for every glob in ``markers``.

    Args:
        roots: folders to search (breadth-first, ``max_depth`` levels; see :func:`input_listing`).
        markers: glob patterns relative to a candidate folder, e.g. ``("train.csv", "train")``, ``("*.whl",)`` or
            ``("fold*/config.yaml",)``.
        max_depth: levels below each root.

    Returns:
        Matching folders, shallowest first, without duplicates.
    """
    return list(dict.fromkeys(
        folder for root in roots for folder, names in input_listing(Path(root), max_depth)
        # a marker with a "/" is a path glob (looked up on disk), else a name glob matched against the listing
        if all(any(folder.glob(m)) if "/" in m else fnmatch.filter(names, m) for m in markers)))


def _pick(candidates: list[Path], what: str, roots: Sequence[Path], prefer: str | None) -> Path:
    """Choose one folder: the only candidate, else the one named ``prefer``; otherwise a clear error."""
    if not candidates:
        raise FileNotFoundError(f"no {what} found under {', '.join(map(str, roots)) or '(no input roots)'}")
    named = [c for c in candidates if c.name == prefer]
    if len(candidates) == 1 or named:
        return (named or candidates)[0]
    raise FileNotFoundError(f"several {what} found ({', '.join(map(str, candidates))}): pass the one to use explicitly")


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


def find_dataset_dir(roots: Sequence[Path], pattern: str, prefer: str | None = None,
                     exclude: str | None = None) -> Path:
    """Find the folder under ``roots`` holding files matching ``pattern`` (e.g. ``"detectron2-*.whl"``).

    Args:
        roots: input roots.
        pattern: glob for a file the dataset must contain.
        prefer: folder name to pick when several folders match (a dataset slug).
        exclude: glob of folder names never to pick (e.g. ``"fold*"``: an earlier session's fold runs are no
            starting weights).
    """
    found = [d for d in find_dirs(roots, (pattern,)) if not (exclude and fnmatch.fnmatch(d.name, exclude))]
    return _pick(found, f"folder with {pattern}", roots, prefer)


def resolve_input(value: str, env: Environment, parameter: str) -> Path:
    """Resolve a notebook path parameter that must exist.

    Absolute paths are used as given; relative ones are tried against the current directory, then the project root
    and the input roots.

    Raises:
        FileNotFoundError: naming the parameter and every place tried.
    """
    path = Path(kaggle_path(os.path.expanduser(value)))
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
    path = Path(kaggle_path(os.path.expanduser(value))) if value else env.default_out_dir
    if not path.is_absolute():
        path = (env.project_root if (env.kind == "local" and env.project_root) else Path.cwd()) / path
    if env.inputs_read_only and any(path.resolve().is_relative_to(r.resolve()) for r in env.input_roots):
        raise PermissionError(f"{parameter}={value!r}: {path} is on Kaggle's read-only input mount; "
                              f"write under {env.working_dir}")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def resolve_artifact(value: str, env: Environment, parameter: str, default: Path | None = None,
                     pattern: str | None = None, prefer: str | None = None, optional: bool = False,
                     folder: bool = False, exclude: str | None = None) -> Path | None:
    """Resolve a notebook parameter naming an artifact (a run folder, thresholds.json, a checkpoint).

    Order: ``"none"`` -> None (only when ``optional``); a given value -> that path (:func:`resolve_input`);
    ``""`` -> ``default`` when it exists (an artifact of an earlier notebook in the same run directory), else the
    input folder holding ``pattern`` (a Kaggle dataset): that folder when ``folder`` (e.g. a run dir found by its
    ``config.yaml``) or ``pattern`` has wildcards, else the file ``pattern`` in it; folders whose name matches the
    glob ``exclude`` are never picked.

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
            found = find_dataset_dir(env.input_roots, pattern, prefer, exclude)
            return found if folder or glob.has_magic(pattern) else found / pattern
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
    return list(dict.fromkeys(folder / n for root in roots for folder, names in input_listing(Path(root), max_depth)
                              for n in sorted(fnmatch.filter(names, pattern)) if (folder / n).is_file()))


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
        folders = find_dirs((roots[0] if explicit else _livecell_root(json_path, roots),), ("*.tif",))
        if not folders:
            raise FileNotFoundError(f"LIVECELL_IMAGES='' (auto): no folder with *.tif images near {json_path}")
        # LIVECell ships livecell_train_val_images/ (train and val) and livecell_test_images/: the json's split
        split = "test" if "test" in json_path.name.lower() else "train"
        images = ([f for f in folders if split in f.name.lower()] or folders)[0]
    return LiveCell(json_path.resolve(), images.resolve(), vals[0].resolve() if vals else None)


def _livecell_root(json_path: Path, roots: Sequence[Path]) -> Path:
    """The LIVECell dataset folder of ``json_path``: the nearest folder above it holding ``images/`` (the release's
    ``LIVECell_dataset_2021/`` keeps the json in ``annotations/LIVECell/`` and the images in
    ``images/livecell_train_val_images/``), else the json's own folder; never above an input root."""
    tops = [Path(r).resolve() for r in roots]
    for folder in (json_path.parent, *json_path.parent.parents):
        if (folder / "images").is_dir():
            return folder
        if folder.resolve() in tops:
            break
    return json_path.parent


def pretrain_preset(preset: str) -> str:
    """The pretraining preset of a fine-tuning preset: ``<preset>_pretrain`` when it exists, else ``preset`` itself
    (``cellkit train --livecell`` switches any preset to pretraining).

    Raises:
        ValueError: ``preset`` is neither a known preset nor a YAML file (naming ``PRESET``).
    """
    from cellkit.config import preset_names

    check_preset(preset)
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

    A GPU is also checked against the architectures this torch was built for (:func:`check_cuda_arch`): Kaggle's
    P100 (sm_60) is seen by today's torch (``torch.cuda.is_available()`` is True) but fails at the first CUDA op.

    Raises:
        ValueError: an unknown device, cuda asked for where there is none, or a GPU this torch cannot run on (naming
            ``DEVICE``, the GPU and what to choose instead).
    """
    import torch

    if value == "cpu" or (value == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not re.fullmatch(r"auto|cuda(:\d+)?", value):
        raise ValueError(f"DEVICE={value!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"DEVICE={value!r}: torch sees no CUDA device here; use 'cpu' or 'auto'")
    index = int(value.split(":")[1]) if ":" in value else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"DEVICE={value!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    check_cuda_arch(torch, index, f"DEVICE={value!r}")
    return "cuda" if value == "auto" else value


def arch_supported(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a GPU of compute ``capability`` runs code built for ``arch_list`` (``torch.cuda.get_arch_list()``).

    A ``sm_XY`` cubin runs on the same major version with an equal or higher minor one; ``compute_XY`` (PTX) is
    compiled at load time for any GPU of capability >= X.Y.
    """
    major, minor = capability
    matches = (re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch) for arch in arch_list)
    return any(m and (int(m[2]), int(m[3])) <= (major, minor) and (m[1] == "compute" or int(m[2]) == major)
               for m in matches)


def check_cuda_arch(torch, index: int = 0, parameter: str = "DEVICE") -> None:
    """Stop when torch was not built for the compute capability of CUDA device ``index``.

    Raises:
        ValueError: naming the GPU, its capability, what this torch supports and what to choose instead.
    """
    capability = tuple(torch.cuda.get_device_capability(index))
    archs = list(torch.cuda.get_arch_list())
    if archs and not arch_supported(capability, archs):
        raise ValueError(
            f"{parameter}: the GPU {torch.cuda.get_device_name(index)} (compute capability {capability[0]}."
            f"{capability[1]}) is not supported by this torch {torch.__version__} (built for {', '.join(archs)}): the "
            f"first CUDA operation would fail. Choose another accelerator: on Kaggle 'GPU T4 x2' (kernel-metadata "
            f"machine_shape {DEFAULT_MACHINE_SHAPE!r}, `make kernels MACHINE_SHAPE={DEFAULT_MACHINE_SHAPE}`), or "
            f"DEVICE='cpu'")


# ----------------------------------------------------------------------------------------------------------------
# Installing what is missing (Kaggle offline wheels, Colab)
# ----------------------------------------------------------------------------------------------------------------
#: What the model stages import that Kaggle's or Colab's image may lack (import name -> distribution).
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


#: The checkout's detectron2 wheel builder (present when cellkit runs from a checkout or an editable install).
DETECTRON2_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_detectron2_wheel.py"


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
        if run:
            subprocess.run([sys.executable, str(DETECTRON2_SCRIPT), "--out", str(folder), "--cache",
                            str(folder / ".cache")], check=True)
    cmd = pip_install_command(missing, folder, offline=env.kind == "kaggle")
    if run:
        print("installing:", " ".join(missing))
        subprocess.run(cmd, check=True)
    return cmd


#: Kaggle's "GPU T4 x2" (two 16 GB T4s, sm_75), the default GPU of today's image.
DEFAULT_MACHINE_SHAPE = "NvidiaTeslaT4"

def restore_runs(out_dir: Path, env: Environment, names: Sequence[str], resume_dir: str = "") -> list[Path]:
    """Copy the runs an earlier Kaggle session left (its output attached with ``kernel_sources``) into ``out_dir``,
    so that ``cellkit train --resume`` continues them.

    A run ``out_dir/<name>`` that can already resume (:func:`cellkit.rundir.last_checkpoint`) is kept; an earlier
    run (a folder named ``<name>`` holding :data:`cellkit.rundir.LAST` and :data:`cellkit.rundir.CONFIG`) is copied
    by :func:`cellkit.rundir.copy_for_resume` (what resuming needs and the split, not the older checkpoints).

    Args:
        out_dir: this session's run directory.
        env: the environment (its input roots are searched when ``resume_dir`` is empty).
        names: run folder names, e.g. ``["fold0", "fold1"]`` or ``["pretrain"]``.
        resume_dir: ``RESUME_DIR``: the earlier output folder; ``""`` = search the inputs (nothing found: a fresh
            start); ``"none"`` = start fresh.

    Returns:
        The runs restored into ``out_dir``.
    """
    if resume_dir == "none" or not (resume_dir or env.kind == "kaggle"):
        return []  # a fresh start: asked for, or nowhere to look (the inputs are searched on Kaggle only)
    roots = (resolve_input(resume_dir, env, "RESUME_DIR"),) if resume_dir else env.input_roots
    restored = []
    for name in names:
        target = Path(out_dir) / name
        if rundir.last_checkpoint(target) is None:
            source = next((d for d in find_dirs(roots, (rundir.LAST, rundir.CONFIG)) if d.name == name), None)
            if source is not None:
                print(f"resuming {name} from {source} ({rundir.copy_for_resume(source, target)})")
                restored.append(target)
    return restored


class SessionClock:
    """The time left of a notebook's ``TIME_BUDGET_MINUTES`` (0 = unlimited), counted from its creation."""

    def __init__(self, budget_minutes: float, clock=None):
        import time

        self._clock = clock or time.monotonic
        self._start = self._clock()
        self.budget = float(budget_minutes)
        if self.budget < 0:
            raise ValueError(f"TIME_BUDGET_MINUTES={budget_minutes!r}: must be >= 0 (0 for no limit)")

    def left(self) -> float | None:
        """Minutes left (None when unlimited)."""
        return self.budget - (self._clock() - self._start) / 60.0 if self.budget else None

    def train_args(self, min_minutes: float = 1.0) -> list[str] | None:
        """``CELLKIT.TIME_BUDGET_MINUTES <left>`` for the next ``cellkit train``; ``[]`` when unlimited; None when
        less than ``min_minutes``, or a tenth of the budget when that is less, are left (the run is left for the
        next session; a budget under ten minutes is thus honoured too, where a fixed minute would train nothing)."""
        left = self.left()
        if left is None:
            return []
        if left < min(min_minutes, self.budget / 10):
            return None
        return ["CELLKIT.TIME_BUDGET_MINUTES", f"{left:.2f}"]

    def spent(self) -> bool:
        """True once the budget is used up (a run trained until then may have stopped before its end)."""
        left = self.left()
        return left is not None and left <= 0


def find_weights_runs(env: Environment, value: str = "", default: Sequence[Path] = ()) -> list[Path]:
    """Resolve the submission notebook's ``RUNS``: the fold models the test images are predicted with (an ensemble).

    ``value``: comma-separated run directories or globs (``'fold*'``), each resolved like any input path; ``""``:
    ``default`` (the fold runs an earlier notebook left in the run directory) when there are any, else every fold
    of the weights dataset (the folder holding ``thresholds.json`` and ``fold*/config.yaml``, preferring one named
    ``cellkit-weights``).

    Raises:
        FileNotFoundError: naming ``RUNS``.
    """
    if value:
        runs: list[Path] = []
        for item in [v.strip() for v in str(value).split(",") if v.strip()]:
            if glob.has_magic(item):
                pattern = kaggle_path(os.path.expanduser(item))
                bases = [""] if os.path.isabs(pattern) else [
                    str(Path.cwd()), *([str(env.project_root)] if env.project_root else []), *map(str, env.input_roots)]
                matches = (sorted(Path(p).resolve() for p in glob.glob(os.path.join(base, pattern)) if rundir.is_run(p))
                           for base in bases)
                found = next((m for m in matches if m), [])  # the first place where it matches, as resolve_input
                if not found:
                    raise FileNotFoundError(f"RUNS={value!r}: {item!r} matches no run directory ({rundir.CONFIG})")
                runs += [p for p in found if p not in runs]
            else:
                runs.append(resolve_input(item, env, "RUNS"))
        if not runs:
            raise FileNotFoundError(f"RUNS={value!r}: no run directory given")
        return runs
    default = [Path(d).resolve() for d in default if Path(d).exists()]
    if default:
        return default
    try:
        markers = ("thresholds.json", f"fold*/{rundir.CONFIG}")
        dataset = _pick(find_dirs(env.input_roots, markers), f"weights dataset ({' and '.join(markers)})",
                        env.input_roots, WEIGHTS_DATASET)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"RUNS='' (auto): no fold<K> in the run directory and {exc}; attach the "
                                f"{WEIGHTS_DATASET} dataset (make weights) or pass RUNS") from None
    return rundir.fold_runs(dataset)

