"""``python -m cellkit pseudo --pred STORE --thresholds thresholds.json --images DIR --out PL_DIR [--no-screen]
[--min-share S] [--min-mean-score V] [--min-mask-score V]``.

Turns predictions of unlabeled images into a competition-layout folder (``train.csv`` with a ``source`` column,
``train/`` of symlinked or copied images, ``pseudo.json`` with the settings and per-image decisions) usable as
``cellkit train --extra-data PL_DIR`` (or ``--data``); see :mod:`cellkit.pseudo`. The masks are post-processed
exactly as ``cellkit submit`` does; confidence screening is on by default (``--no-screen``: every image ``submit``
would give a mask is kept, images without a mask are dropped since a training image needs annotations).

As for ``submit``, the store's inference signature must equal the thresholds' ``"inference"`` (exit 2 naming what
differs; ``--allow-inference-mismatch`` goes on with a warning).
"""
import sys

HELP = "turn predictions of unlabeled images into pseudo-labels (competition layout) for cellkit train"

_CLASSWISE = "a number for every class or CLASS=VALUE for each class, e.g. shsy5y=0.5,astro=0.7,cort=0.6"


def add_arguments(parser) -> None:
    from cellkit.pseudo import ScreenSettings

    d = ScreenSettings()
    parser.add_argument("--pred", required=True, metavar="DIR", help="predictions store of the unlabeled images")
    parser.add_argument("--thresholds", required=True, metavar="JSON", help="thresholds.json from `cellkit search`")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of the unlabeled images (read only)")
    parser.add_argument("--out", required=True, metavar="DIR", help="pseudo-label folder to write (train.csv, train/)")
    parser.add_argument("--no-screen", action="store_true",
                        help="no confidence screening: keep every mask submit would write (images without a mask "
                             "are still dropped)")
    parser.add_argument("--min-share", type=float, default=d.min_share, metavar="S",
                        help=f"keep an image when its cell type's score-weighted vote share >= S (default {d.min_share})")
    parser.add_argument("--min-mean-score", default=str(d.min_mean_score[d.classes[0]]), metavar="V",
                        help=f"keep an image when its masks' mean score >= V: {_CLASSWISE} (default %(default)s)")
    parser.add_argument("--min-mask-score", default=str(d.min_mask_score[d.classes[0]]), metavar="V",
                        help=f"keep a mask when its score >= V (on top of thresholds.json): {_CLASSWISE} "
                             f"(default %(default)s)")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output in --out")
    parser.add_argument("--allow-inference-mismatch", action="store_true",
                        help="go on when the store was predicted with other passes or fusion than the thresholds "
                             "were fitted on (a warning instead of an error)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from cellkit import postprocess as pp
    from cellkit import pseudo
    from cellkit.commands.submit import check_inference
    from cellkit.schema import schema_of

    doc = pp.load_thresholds(args.thresholds)
    classes = schema_of(args.pred).classes
    settings = None if args.no_screen else pseudo.ScreenSettings(
        min_share=args.min_share,
        min_mean_score=pseudo.parse_class_values(args.min_mean_score, "--min-mean-score", classes),
        min_mask_score=pseudo.parse_class_values(args.min_mask_score, "--min-mask-score", classes), classes=classes)
    log = check_inference(args.pred, args.thresholds, doc, args.allow_inference_mismatch)
    log.append("screening: off (--no-screen)" if settings is None else f"screening: {settings.to_dict()}")
    print("\n".join(log), file=sys.stderr)
    summary = pseudo.write_pseudo_labels(args.pred, args.thresholds, args.images, args.out, settings, doc=doc,
                                         link=not args.copy, overwrite=args.overwrite, progress=not args.no_progress)
    c = summary["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in c["dropped_by_reason"].items() if v) or "none"
    print(f"wrote {args.out}: {c['kept']}/{c['images']} images, {c['masks']} masks "
          f"({', '.join(f'{k} {v}' for k, v in c['by_cell_type'].items())}); dropped: {dropped}")
    return 0

