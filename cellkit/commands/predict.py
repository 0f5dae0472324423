"""``python -m cellkit predict --run DIR --out PRED (--images DIR | --fold K --data DIR) [--tta] [--weights PATH]``.

Predicts every image of ``--images`` (png/tif/jpg), or with ``--fold K --data DIR`` the held-out images of fold K
(out-of-fold predictions: the run must be the one that held fold K out; the folds file is the run's ``CELLKIT.DATA.FOLDS_CSV``, else ``RUN/folds.csv``, else
``DATA/folds.csv``), with the run's ``config.yaml`` and checkpoint (``--weights``, else ``model_best.pth``, else
``model_final.pth``). Writes one ``<id>.npz`` per image (see :mod:`cellkit.predictions`) plus ``meta.json`` into
``--out``; images already there are skipped, so an interrupted run resumes. Looping over folds with the same
``--out`` collects the out-of-fold predictions of every fold in one directory.
"""
from __future__ import annotations

HELP = "predict instance probabilities (optionally with TTA) for a folder of images or a held-out fold"


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True, help="run directory of `cellkit train` (config.yaml + checkpoint)")
    parser.add_argument("--out", required=True, help="predictions directory (one .npz per image + meta.json)")
    parser.add_argument("--images", help="folder of images to predict (png/tif/jpg)")
    parser.add_argument("--fold", type=int, help="predict the held-out images of this fold (needs --data)")
    parser.add_argument("--data", help="competition-layout data dir (train/, folds.csv) for --fold")
    parser.add_argument("--folds-csv", help="folds file for --fold (default: the run's, else DATA/folds.csv)")
    parser.add_argument("--tta", action="store_true",
                        help="every TEST.AUG scale x flip pass, mask probabilities averaged (default: one pass)")
    parser.add_argument("--weights", help="checkpoint (default: RUN/model_best.pth, else RUN/model_final.pth)")
    parser.add_argument("--device", help="cpu or cuda (default: the config's MODEL.DEVICE, cpu without CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from pathlib import Path

    from cellkit.cli import CellkitError
    from cellkit.config import load_run_config
    from cellkit import tta

    if (args.images is None) == (args.fold is None):
        raise CellkitError("give either --images DIR or --fold K --data DIR")
    if args.fold is not None and not args.data:
        raise CellkitError("--fold needs --data DIR (the data directory holding train/ and folds.csv)")
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory does not exist")
    # every input is checked before the model is built
    cfg = load_run_config(run_dir)
    tta.check_num_classes(cfg)
    tta.run_weights(run_dir, args.weights)
    if args.images is not None:
        images = tta.list_images(args.images)
        source_images = str(Path(args.images).resolve())
    else:
        tta.check_held_out(cfg, args.fold, run_dir)
        folds_csv = args.folds_csv or tta.run_folds_csv(run_dir, cfg, args.data)
        images = tta.fold_images(args.data, args.fold, folds_csv)
        source_images = str((Path(args.data) / "train").resolve())
    predictor, info = tta.load_predictor(run_dir, args.weights, tta=args.tta, device=args.device)
    source = {**info, "fold": args.fold, "images": source_images}
    result = tta.predict_images(predictor, images, args.out, source, progress=not args.no_progress)
    per_img = result["seconds"] / result["written"] if result["written"] else 0.0
    print(f"predict: {result['written']} image(s) written, {result['skipped']} already there, "
          f"{predictor.n_passes} pass(es)/image, {per_img:.2f} s/img -> {args.out}")
    return 0
