"""``python -m cellkit predict --run DIR [--run DIR ...] --out PRED (--images DIR | --fold K --data DIR) [--tta]``.

Predicts every image of ``--images`` (png/tif/jpg), or with ``--fold K --data DIR`` the held-out images of fold K
(out-of-fold predictions: every run must be one that held fold K out; the folds file is the run's
``CELLKIT.DATA.FOLDS_CSV``, else ``RUN/folds.csv``, else ``DATA/folds.csv``), with each run's ``config.yaml`` and
checkpoint (``--weights`` for a single run, else ``model_best.pth``, else ``model_final.pth``).

Several ``--run`` (or a glob such as ``--run 'OUT/fold*'``) make an ensemble (:mod:`cellkit.fusion`): box-first
(``--fusion nms``, the default, or ``wbf``: every member's boxes of every pass pooled and merged, every member's mask
head on the merged boxes, probabilities averaged, fused scores) or weighted mask fusion (``--fusion wmf``).
``--like thresholds.json`` (or a store) predicts with that file's inference signature (passes, fusion, detections
per image), so test predictions are made as the out-of-fold predictions the thresholds were fitted on.

Writes one ``<id>.npz`` per image (see :mod:`cellkit.predictions`) plus ``meta.json`` (with the inference signature,
:mod:`cellkit.predict`) into ``--out``; images already there are skipped, so an interrupted run resumes. Looping over
folds with the same ``--out`` collects the out-of-fold predictions of every fold in one directory.
"""
HELP = "predict instance probabilities (one model or an ensemble, optionally with TTA) for images or a held-out fold"


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True, action="append", metavar="RUN",
                        help="run directory of `cellkit train` (config.yaml + checkpoint); repeat it, or give a glob "
                             "('OUT/fold*'), for an ensemble")
    parser.add_argument("--out", required=True, help="predictions directory (one .npz per image + meta.json)")
    parser.add_argument("--images", help="folder of images to predict (png/tif/jpg)")
    parser.add_argument("--fold", type=int, help="predict the held-out images of this fold (needs --data)")
    parser.add_argument("--data", help="competition-layout data dir (train/, folds.csv) for --fold")
    parser.add_argument("--folds-csv", help="folds file for --fold (default: the run's, else DATA/folds.csv)")
    parser.add_argument("--tta", action="store_true",
                        help="every TEST.AUG scale x flip pass, mask probabilities averaged (default: one pass)")
    parser.add_argument("--fusion", choices=("nms", "wbf", "wmf"),
                        help="how passes and members are fused (default nms; wbf: weighted box fusion; wmf: "
                             "weighted mask fusion)")
    parser.add_argument("--fusion-iou", type=float,
                        help="IoU of a match (default: ROI_HEADS.NMS_THRESH_TEST for nms, 0.55 wbf, 0.5 wmf)")
    parser.add_argument("--fusion-score", choices=("mean", "max"),
                        help="NMS score: fused over passes and members (mean, default) or the kept box's (max)")
    parser.add_argument("--like", metavar="JSON_OR_STORE",
                        help="predict with the inference signature of this thresholds.json or store (passes, "
                             "fusion, detections per image); excludes --tta and --fusion*")
    parser.add_argument("--weights", help="checkpoint of a single --run (default: RUN/model_best.pth, else "
                                          "RUN/model_final.pth)")
    parser.add_argument("--device", help="cpu or cuda (default: the config's MODEL.DEVICE, cpu without CUDA)")
    parser.add_argument("--low-memory", action="store_true",
                        help="recompute backbone features for the mask pass (one member's pass in memory at a "
                             "time; twice the backbone cost)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def inference_options(args):
    """``(settings, fusion, detections)`` for :func:`cellkit.predict.load_ensemble` from ``--like`` or the flags."""
    from cellkit.cli import CellkitError
    from cellkit.fusion import FusionSettings
    from cellkit.predict import read_signature
    from cellkit.tta import TTASettings

    if args.like:
        if args.tta or args.fusion or args.fusion_iou is not None or args.fusion_score:
            raise CellkitError("--like takes the passes and fusion from the file: give either --like or "
                               "--tta/--fusion/--fusion-iou/--fusion-score")
        signature, where = read_signature(args.like)
        if signature is None:
            raise CellkitError(f"--like {args.like}: the file holds no inference signature (made by an older "
                               f"cellkit?); give --tta/--fusion explicitly")
        return (TTASettings.from_dict(signature.get("passes") or {}, f"{where}: passes"),
                FusionSettings.from_dict(signature.get("fusion") or {}, f"{where}: fusion"),
                signature.get("detections_per_image"))
    return None, FusionSettings(args.fusion or "nms", args.fusion_iou, args.fusion_score or "mean"), None


def run(args) -> int:
    from pathlib import Path

    from cellkit.cli import CellkitError
    from cellkit import predict

    if (args.images is None) == (args.fold is None):
        raise CellkitError("give either --images DIR or --fold K --data DIR")
    if args.fold is not None and not args.data:
        raise CellkitError("--fold needs --data DIR (the data directory holding train/ and folds.csv)")
    runs = predict.expand_runs(args.run)
    if args.weights and len(runs) > 1:
        raise CellkitError(f"--weights names one checkpoint, but {len(runs)} runs were given")
    settings, fusion, detections = inference_options(args)
    # every input is checked before a model is built
    cfgs = [predict.check_run(run_dir, args.weights, args.fold)[0] for run_dir in runs]
    images = (predict.list_images(args.images) if args.images is not None else predict.fold_images(
        args.data, args.fold, args.folds_csv or predict.run_folds_csv(runs[0], cfgs[0], args.data)))
    source_images = str((Path(args.images) if args.images is not None else Path(args.data) / "train").resolve())
    ensemble = predict.load_ensemble(runs, [args.weights] if args.weights else None, tta=args.tta,
                                     device=args.device, fusion=fusion, settings=settings, detections=detections,
                                     cache_features=not args.low_memory)
    sig = ensemble.signature
    print(f"predict: {len(runs)} member(s) x {ensemble.n_passes} pass(es) {sig['passes']['min_sizes']} "
          f"flip={sig['passes']['flip']}, fusion {sig['fusion']['mode']} (iou {sig['fusion']['iou']}, score "
          f"{sig['fusion']['score']}), {sig['detections_per_image']} detections/image")
    result = predict.predict_images(ensemble, images, args.out, {"fold": args.fold, "images": source_images},
                                    progress=not args.no_progress)
    print(f"predict: {result['written']} image(s) written, {result['skipped']} already there, "
          f"{result['seconds'] / result['written'] if result['written'] else 0.0:.2f} s/img -> {args.out}")
    return 0
