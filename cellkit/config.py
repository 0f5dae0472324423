"""cellkit's detectron2 configuration: the ``CELLKIT`` keys and the presets under ``cellkit/configs/``.

A preset is a YAML file whose ``_BASE_`` (one entry or a list, merged in order) names a detectron2 model-zoo config
(``Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml``, resolved with
:func:`detectron2.model_zoo.get_config_file`), a sibling YAML (``paper.yaml``, the shared recipes
``_finetune.yaml`` / ``_pretrain.yaml``) or a preset name. detectron2's own loader resolves a relative ``_BASE_``
against the YAML's folder only, so cellkit merges each base first and the file's own keys on top
(:func:`merge_yaml`).

Presets:

- ``paper``: the seed's Cascade Mask R-CNN X152-32x8d-FPN (deformable conv, GN heads) fine-tune recipe;
  ``paper_pretrain``: its LIVECell pretraining.
- ``r50``, ``r50_pretrain``: the same recipe on Cascade Mask R-CNN R50-FPN.
- ``demo``: a small GN Mask R-CNN (R18-FPN, one box stage) that trains on the synthetic data on a CPU in minutes.

Every key that does not exist in detectron2's defaults or in :func:`add_cellkit_config` is an error (raised before
any work starts), in the YAML files and in command-line ``KEY VALUE`` overrides alike.
"""
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from cellkit import atomic, rundir

logger = logging.getLogger(__name__)

#: Folder of the preset YAML files shipped with the package.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Name of the resolved config saved into every run / prediction directory.
CONFIG_FILE_NAME = rundir.CONFIG

#: Input std (BGR) used from random init in place of the Caffe2 checkpoints' unit std (ImageNet's, in 0-255).
SCRATCH_PIXEL_STD = (57.375, 57.120, 58.395)


def add_cellkit_config(cfg) -> None:
    """Add the ``CELLKIT`` section to a detectron2 config (in place).

    Args:
        cfg: a detectron2 ``CfgNode`` (from :func:`detectron2.config.get_cfg`).
    """
    from detectron2.config import CfgNode

    cfg.CELLKIT = CfgNode({
        # Name of the preset the config was built from ("paper", "r50", "demo", ... or a YAML path); informational.
        "PRESET": "",
        # "finetune": train on the competition train.csv (--data) with one fold held out for validation;
        # "pretrain": train on a LIVECell COCO json (--livecell), keeping LIVECell's classes.
        "MODE": "finetune",
        # Norm put into the backbone (MODEL.RESNETS.NORM), the FPN and the ROI heads when training starts from
        # random init (MODEL.WEIGHTS empty): FrozenBN diverges to NaN within 2 iterations from scratch. "" keeps
        # the config's.
        "SCRATCH_NORM": "GN",
        # The checkpoint this preset is meant to start from, as a hint for error messages (e.g. the model-zoo file
        # name to attach as a Kaggle dataset). Never downloaded: MODEL.WEIGHTS / --weights must be a local file.
        "WEIGHTS_SOURCE": "",
        "DATA": {
            # Competition-layout data directory (train.csv, train/<id>.png) used in "finetune" mode.
            "ROOT": "",
            # folds.csv (columns id, fold); "" = <OUTPUT_DIR>/folds.csv, written with cellkit.folds when absent.
            "FOLDS_CSV": "",
            # Held-out validation fold; -1 trains on every image and skips validation.
            "FOLD": 0,
            # Number of folds used when folds.csv has to be written.
            "NUM_FOLDS": 5,
            # Seed of the fold split written when folds.csv is absent (cellkit.folds.DEFAULT_SEED, the same default
            # as `cellkit folds` and notebook 02, so every entry point splits alike).
            "FOLD_SEED": 0,
            # "finetune" mode: extra training data, a competition-layout folder (train.csv, train/), e.g.
            # pseudo-labels from `cellkit pseudo`; "" = none. Added to the training set of every fold, never to
            # validation; its image ids must not occur in ROOT's train.csv.
            "EXTRA_DATA": "",
            # Repeat factor of each EXTRA_DATA image relative to a real one (> 0): 1.0 = plain concatenation;
            # otherwise detectron2's RepeatFactorTrainingSampler with factor 1 for real images and EXTRA_WEIGHT for
            # extra ones (stochastic rounding per epoch: 0.5 = each extra image in about every other epoch, 2.0 =
            # twice per epoch).
            "EXTRA_WEIGHT": 1.0,
            # Images dropped from the training split (finetune mode), e.g. those a label audit (`cellkit audit`)
            # found suspicious: a text file with one image id per line (# comments allowed), a CSV with an `id`
            # column, or an audit.csv with EXCLUDE_TOP > 0 (its EXCLUDE_TOP highest-scoring images). "" excludes
            # nothing. The validation fold keeps every image, so that the CV score of runs with and without
            # exclusions stays comparable; ids that are not in train.csv are an error naming the file.
            "EXCLUDE": "",
            # With an audit.csv as EXCLUDE: how many of its highest-scoring images are excluded (0 for a plain id
            # list).
            "EXCLUDE_TOP": 0,
            # "pretrain" mode: LIVECell COCO json for training and the folder holding its images.
            "LIVECELL_JSON": "",
            "LIVECELL_IMAGES": "",
            # "pretrain" mode: optional LIVECell COCO json for validation (same image folder); "" = no validation.
            "LIVECELL_VAL_JSON": "",
        },
        # Training augmentations applied after the multi-scale resize (INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN).
        "AUG": {
            # Probability of a horizontal flip.
            "HFLIP_PROB": 0.5,
            # Probability of a vertical flip.
            "VFLIP_PROB": 0.5,
            # Largest rotation angle in degrees (uniform in [-ROTATION, ROTATION], no canvas expansion); 0 disables.
            "ROTATION": 0.0,
            # Probability of applying the rotation.
            "ROTATION_PROB": 0.5,
            # Brightness factor drawn uniformly from [1 - BRIGHTNESS, 1 + BRIGHTNESS]; 0 disables.
            "BRIGHTNESS": 0.0,
            # Probability of applying the brightness change.
            "BRIGHTNESS_PROB": 0.5,
        },
        "EVAL": {
            # Validation drops detections scoring under this (the seed's post-processing default, 0.5); masks are
            # binarised at 0.5 by detectron2 and overlaps removed by descending score (cellkit.postprocess).
            "SCORE_THRESHOLD": 0.5,
            # Name of the validation metric tracked for the best checkpoint and early stopping (max is better).
            "METRIC": "cellkit/mAP",
            # With TEST.EVAL_PERIOD 0: evaluate once after the last iteration (detectron2's default). False skips
            # it, e.g. for fold runs whose out-of-fold predictions `cellkit predict --fold` makes anyway (no
            # model_best.pth then).
            "AT_END": True,
        },
        # Evaluations (every TEST.EVAL_PERIOD iterations) without improvement of CELLKIT.EVAL.METRIC before
        # training stops early; 0 disables early stopping.
        "EARLY_STOP_PATIENCE": 0,
        # Smallest increase of the metric that counts as an improvement for early stopping.
        "EARLY_STOP_MIN_DELTA": 0.0,
        # Stop training after this many minutes as if SOLVER.MAX_ITER had been reached (final evaluation and
        # model_final follow; --resume continues the schedule), e.g. for Kaggle's session limit; 0 = no limit.
        "TIME_BUDGET_MINUTES": 0.0,
        # Activation checkpointing of the backbone: each residual block keeps only its input during training and
        # recomputes its activations in the backward pass (~30% more compute, a fraction of the backbone's
        # activation memory). On in `paper` (X152 at 1100x1490: over 23 GB in one CPU iteration without it; a T4
        # has 16 GB).
        "BACKBONE_CHECKPOINT": False,
        # Iterations between two log lines (losses, learning rate, s/iter, ETA) and metrics.json entries.
        "LOG_PERIOD": 20,
        # Periodic checkpoints (model_XXXXXXX.pth, every SOLVER.CHECKPOINT_PERIOD) kept in the run directory: older
        # ones are deleted after each save, including those from before a --resume; model_best.pth,
        # model_final.pth and the file last_checkpoint names are always kept. 0 keeps every checkpoint.
        "KEEP_CHECKPOINTS": 2,
    })


def preset_names() -> list[str]:
    """Names of the presets shipped in ``cellkit/configs`` (file stems, without the ``_recipe`` files), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name (``paper``) or a YAML path to an existing file.

    Raises:
        ValueError: neither a known preset nor an existing file (the message lists the presets).
    """
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.suffix in (".yaml", ".yml"):
        if candidate.is_file():
            return candidate.resolve()
        raise FileNotFoundError(f"config file {text} does not exist")
    if text in preset_names():
        return CONFIG_DIR / f"{text}.yaml"
    raise ValueError(f"unknown preset {text!r}: choose one of {', '.join(preset_names())} or give a .yaml path")


def _base_path(base: str, including_file: Path) -> tuple[Path, bool]:
    """Where a ``_BASE_`` entry points: ``(path, is_cellkit_yaml)``.

    A path relative to the including file or a preset name is a cellkit YAML (merged with :func:`merge_yaml`);
    anything else is looked up in detectron2's model zoo (merged with detectron2's own loader).
    """
    rel = (including_file.parent / base).expanduser()
    if rel.is_file():
        return rel.resolve(), True
    if (CONFIG_DIR / f"{base}.yaml").is_file():
        return CONFIG_DIR / f"{base}.yaml", True
    import warnings

    with warnings.catch_warnings():  # detectron2.model_zoo imports pkg_resources, deprecated: not our user's concern
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        from detectron2 import model_zoo

    try:
        return Path(model_zoo.get_config_file(base)), False
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"{including_file}: _BASE_ {base!r} is neither a file next to it, a cellkit preset, "
            f"nor a detectron2 model-zoo config ({exc})"
        ) from None


def merge_yaml(cfg, path: str | os.PathLike, _seen: tuple = ()) -> None:
    """Merge a cellkit YAML file into ``cfg`` in place, resolving its ``_BASE_`` chain first.

    Args:
        cfg: detectron2 ``CfgNode`` that already has the CELLKIT keys.
        path: YAML file.

    Raises:
        ValueError: a key that does not exist, a value of the wrong type, a ``_BASE_`` cycle.
        FileNotFoundError: the file or its base does not exist.
    """
    from detectron2.config import CfgNode

    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"{path}: _BASE_ cycle through {[str(p) for p in _seen]}")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    bases = data.pop("_BASE_", None) or []
    for base in [bases] if isinstance(bases, str) else bases:
        base_path, is_cellkit = _base_path(str(base), path)
        if is_cellkit:
            merge_yaml(cfg, base_path, _seen + (path,))
        else:
            cfg.merge_from_file(str(base_path))
    data.pop("VERSION", None)
    try:
        cfg.merge_from_other_cfg(CfgNode(data))
    except KeyError as exc:
        raise ValueError(f"{path}: {exc.args[0] if exc.args else exc} (not a detectron2 or CELLKIT key)") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def new_config():
    """detectron2's default config plus the CELLKIT keys (not frozen)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_cellkit_config(cfg)
    return cfg


def apply_overrides(cfg, overrides: Sequence[str]) -> None:
    """Apply ``KEY VALUE`` pairs (``SOLVER.MAX_ITER 100``) to ``cfg`` in place.

    Raises:
        ValueError: odd number of items, a key that does not exist, a value of the wrong type.
    """
    overrides = list(overrides or [])
    if len(overrides) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd number of items: {overrides}")
    for key, value in zip(overrides[0::2], overrides[1::2]):
        node, parts = cfg, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unknown config key {key!r} (no section {part!r})")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ValueError(f"unknown config key {key!r}")
        if isinstance(node[parts[-1]], float) and isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = str(float(value))  # "0" for a float key: yacs would reject the int
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError) as exc:
            raise ValueError(f"config override {key}={value!r}: {exc}") from None


def get_preset_cfg(name_or_path: str | os.PathLike, overrides: Iterable[str] = ()):
    """Build the config of a preset name or YAML file, plus ``KEY VALUE`` overrides (not frozen).

    Args:
        name_or_path: ``paper``, ``paper_pretrain``, ``r50``, ``r50_pretrain``, ``demo`` or a YAML path.
        overrides: flat ``[KEY, VALUE, KEY, VALUE, ...]`` list.

    Returns:
        detectron2 ``CfgNode`` with ``CELLKIT.PRESET`` set.
    """
    path = preset_path(name_or_path)
    cfg = new_config()
    merge_yaml(cfg, path)
    if not cfg.CELLKIT.PRESET:
        cfg.CELLKIT.PRESET = path.stem if path.parent == CONFIG_DIR else str(path)
    apply_overrides(cfg, list(overrides))
    return cfg


def load_run_config(run_dir_or_file: str | os.PathLike):
    """Load the resolved ``config.yaml`` saved in a run directory (or the file itself); not frozen.

    Raises:
        FileNotFoundError: no ``config.yaml`` there.
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / CONFIG_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE_NAME} in {run_dir_or_file} (is it a cellkit train output dir?)")
    cfg = new_config()
    merge_yaml(cfg, path)
    return cfg


def resolve_runtime(cfg, has_cuda: bool | None = None) -> list[str]:
    """Adapt ``cfg`` (in place) to the machine and the init, and say what changed.

    - ``MODEL.DEVICE`` falls back to ``cpu`` without CUDA; ``SOLVER.AMP.ENABLED`` is switched off (with a note) on
      a CPU device and never changed on CUDA, so an explicit ``SOLVER.AMP.ENABLED False`` survives there.
    - From random init (``MODEL.WEIGHTS`` empty) the backbone, FPN and ROI heads get ``CELLKIT.SCRATCH_NORM`` and
      no backbone stage stays frozen (``MODEL.BACKBONE.FREEZE_AT`` 0); a unit ``MODEL.PIXEL_STD`` becomes
      :data:`SCRATCH_PIXEL_STD`.

    Returns:
        one human-readable line per change (also logged).
    """
    if has_cuda is None:
        import torch

        has_cuda = torch.cuda.is_available()
    notes = []
    if cfg.MODEL.DEVICE.startswith("cuda") and not has_cuda:
        cfg.MODEL.DEVICE = "cpu"
        notes.append("no CUDA device: MODEL.DEVICE=cpu")
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        # on CUDA the config's value stands (an explicit False is kept); detectron2's AMPTrainer needs CUDA
        cfg.SOLVER.AMP.ENABLED = False
        notes.append(f"SOLVER.AMP.ENABLED=False (MODEL.DEVICE={cfg.MODEL.DEVICE}: AMP training needs CUDA)")
    norm = cfg.CELLKIT.SCRATCH_NORM
    if not cfg.MODEL.WEIGHTS and norm:
        for section in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
            node = cfg.MODEL[section]
            if node.NORM in ("", "FrozenBN", "BN", "SyncBN") and node.NORM != norm:  # FrozenBN / none -> norm
                notes.append(f"random init: MODEL.{section}.NORM {node.NORM!r} -> {norm!r} (CELLKIT.SCRATCH_NORM)")
                node.NORM = norm
    if not cfg.MODEL.WEIGHTS and list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]:
        # unit std matches Caffe2 checkpoints only; from scratch, raw 0-255 inputs blow up the stem's gradients
        cfg.MODEL.PIXEL_STD = list(SCRATCH_PIXEL_STD)
        notes.append(f"random init: MODEL.PIXEL_STD [1, 1, 1] -> {list(SCRATCH_PIXEL_STD)}")
    if not cfg.MODEL.WEIGHTS and cfg.MODEL.BACKBONE.FREEZE_AT > 0:
        notes.append(f"random init: MODEL.BACKBONE.FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT} -> 0 "
                     f"(nothing to keep frozen)")
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
    for note in notes:
        logger.info("cellkit config: %s", note)
    return notes


def save_config(cfg, directory: str | os.PathLike) -> Path:
    """Write ``cfg`` as ``<directory>/config.yaml`` atomically (:mod:`cellkit.atomic`) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(directory / CONFIG_FILE_NAME, cfg.dump())
