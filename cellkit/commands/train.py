"""``python -m cellkit train --config PRESET_OR_YAML --data DIR --fold K --out DIR [--resume] [--weights PATH]
[KEY VALUE ...]``: train a detectron2 model (see :mod:`cellkit.train`).

Fine-tune mode (the presets ``paper``, ``r50``, ``demo``): ``--data`` is a competition-layout folder (``train.csv``,
``train/``); fold ``K`` of ``--folds`` (default: ``OUT/folds.csv``, written when absent) is held out for validation
(``--fold -1``: train on every image, no validation). Pretrain mode (``paper_pretrain``, ``r50_pretrain``, or any
preset with ``--livecell``): train on a LIVECell COCO json.

Everything is checked before any work starts (config keys, weights file, data folder, fold); the resolved config is
saved as ``OUT/config.yaml``. ``--resume`` continues the run in ``OUT`` from its last checkpoint with the saved
config (``KEY VALUE`` pairs still apply on top). ``--num-gpus N`` trains on N GPUs through detectron2's ``launch``
(on a machine without CUDA: N CPU processes with the gloo backend, as the distributed test does).

``--extra-data PL_DIR [--extra-weight W]`` adds a competition-layout folder (typically pseudo-labels from
``cellkit pseudo``) to the training set of the fold, never to its validation set; each extra image is drawn ``W``
times as often as a real one (detectron2's ``RepeatFactorTrainingSampler``; 1.0 = plain concatenation).

``--exclude FILE`` (``CELLKIT.DATA.EXCLUDE``) drops images from the training split only, e.g. the worst of a label
audit (``--exclude AUDIT/audit.csv --exclude-top N``); the validation fold keeps them, so that CV scores of runs with
different exclusions stay comparable. The excluded ids are logged with their count and written to
``OUT/excluded_ids.txt``.
"""
import json
import sys
from pathlib import Path

from cellkit import rundir


def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="PRESET_OR_YAML",
                        help="preset name (paper, paper_pretrain, r50, r50_pretrain, demo) or a YAML file; "
                             "optional with --resume (the run's config.yaml is used)")
    parser.add_argument("--data", metavar="DIR", help="competition-layout data dir (train.csv, train/)")
    parser.add_argument("--fold", type=int, default=None, metavar="K",
                        help="held-out validation fold (default: the config's CELLKIT.DATA.FOLD); -1 = no validation")
    parser.add_argument("--folds", metavar="CSV", help="folds.csv to use (default: OUT/folds.csv, written if absent)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, logs, config.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    parser.add_argument("--weights", metavar="PATH",
                        help="initial weights, a local .pth/.pkl file (model-zoo or a previous run's checkpoint)")
    parser.add_argument("--extra-data", metavar="DIR",
                        help="extra training images, a competition-layout dir (e.g. `cellkit pseudo` output): added to "
                             "the training set only, never to validation (CELLKIT.DATA.EXTRA_DATA)")
    parser.add_argument("--extra-weight", type=float, metavar="W",
                        help="repeat factor of each extra image relative to a real one (default 1.0: plain "
                             "concatenation; CELLKIT.DATA.EXTRA_WEIGHT)")
    parser.add_argument("--exclude", metavar="FILE",
                        help="drop these images from the training split (not from validation): a list of ids (one per "
                             "line, or a CSV with an id column), or an audit.csv with --exclude-top "
                             "(CELLKIT.DATA.EXCLUDE)")
    parser.add_argument("--exclude-top", type=int, default=None, metavar="N",
                        help="with an audit.csv as --exclude: its N highest-scoring images (CELLKIT.DATA.EXCLUDE_TOP)")
    parser.add_argument("--livecell", metavar="JSON", help="pretrain on this LIVECell COCO json")
    parser.add_argument("--livecell-images", metavar="DIR", help="folder of the LIVECell images")
    parser.add_argument("--livecell-val", metavar="JSON", help="LIVECell json to validate on during pretraining")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="GPUs to train on, one process each (detectron2 launch; IMS_PER_BATCH is the total over "
                             "them); without CUDA, that many CPU processes (gloo); default 1")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.MAX_ITER 100 SOLVER.BASE_LR 0.01")


def build_config(args):
    """The run's config from the arguments (not yet checked against data and weights)."""
    from cellkit.cli import CellkitError
    from cellkit.config import apply_overrides, get_preset_cfg, load_run_config

    out = Path(args.out)
    saved = out / rundir.CONFIG
    if args.resume and saved.is_file():
        cfg = load_run_config(out)
        if args.config:
            print(f"cellkit train: --resume uses {saved}; --config {args.config} ignored", file=sys.stderr)
    elif args.config:
        if rundir.last_checkpoint(out) is not None and not args.resume:
            failed = rundir.failure_reason(out)
            state = f"a failed training run ({failed})" if failed else "a training run (last_checkpoint)"
            raise CellkitError(f"{out} already holds {state}: pass --resume to continue it or choose another --out")
        cfg = get_preset_cfg(args.config)
    else:
        raise CellkitError("--config PRESET_OR_YAML is required (or --resume on a run dir with config.yaml)")
    cfg.OUTPUT_DIR = str(out)
    # the options setting a CELLKIT.DATA key: a path when given (non-empty), a number when given (0 included)
    for key, value in {"ROOT": args.data, "FOLDS_CSV": args.folds, "EXTRA_DATA": args.extra_data,
                       "EXCLUDE": args.exclude, "LIVECELL_JSON": args.livecell, "LIVECELL_IMAGES": args.livecell_images,
                       "LIVECELL_VAL_JSON": args.livecell_val}.items():
        if value:
            setattr(cfg.CELLKIT.DATA, key, str(value))
    for key, value in {"FOLD": args.fold, "EXTRA_WEIGHT": args.extra_weight, "EXCLUDE_TOP": args.exclude_top}.items():
        if value is not None:
            setattr(cfg.CELLKIT.DATA, key, value)
    if args.weights:
        cfg.MODEL.WEIGHTS = str(args.weights)
    if args.livecell:
        cfg.CELLKIT.MODE = "pretrain"
    apply_overrides(cfg, args.opts)
    if cfg.CELLKIT.MODE == "finetune" and not cfg.CELLKIT.DATA.ROOT:
        raise CellkitError("--data DIR is required (a competition-layout folder with train.csv and train/)")
    return cfg


def run(args) -> int:
    import torch
    from detectron2.engine import launch

    from cellkit.cli import CellkitError
    from cellkit.train import prepare_config, train_worker

    if args.num_gpus < 1:
        raise CellkitError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    cuda = torch.cuda.device_count()
    if args.num_gpus > 1 and 0 < cuda < args.num_gpus:
        raise CellkitError(f"--num-gpus {args.num_gpus}: only {cuda} CUDA device(s) here")
    if args.num_gpus > 1 and cuda == 0:
        print(f"cellkit train: no CUDA device: --num-gpus {args.num_gpus} runs {args.num_gpus} CPU processes (gloo)",
              file=sys.stderr)
    cfg, specs = prepare_config(build_config(args), resume=args.resume)
    if args.num_gpus > 1:
        launch(train_worker, args.num_gpus, dist_url="auto", args=(cfg, specs, args.resume))
    elif results := train_worker(cfg, specs, args.resume):
        print(json.dumps({"out": cfg.OUTPUT_DIR, **results.get("cellkit", results)}))
    return 0
