"""``python -m cellkit search --pred OOF --truth TRAIN.csv --out thresholds.json``: class-wise threshold search.

Maximises the competition metric on out-of-fold predictions over a grid of score thresholds, pixel thresholds and
minimum areas per class and the post-processing options (the vote and rescoring by the sweep, ``free_dropped`` by an
exact re-evaluation of the winner; see :mod:`cellkit.search`). Writes
``thresholds.json`` (chosen values, options, metric before/after per class, the grid, provenance) and, next to it,
a plot of the metric against each threshold per class (``--plot``, default ``<out stem>.png``).
"""
import logging

HELP = "search per-class score/mask/min-area thresholds on out-of-fold predictions -> thresholds.json"


def _floats(text: str) -> list[float]:
    """``"0.3,0.4,0.5"`` or ``"0.3:0.7:0.05"`` (start:stop:step, stop included) -> list of floats."""
    import argparse

    import numpy as np

    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            return [round(start + i * step, 10) for i in range(int(np.floor((stop - start) / step + 1e-9)) + 1)]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list 'a,b,c' or a range 'start:stop:step', got {text!r}")


def add_arguments(parser) -> None:
    parser.add_argument("--pred", required=True, metavar="DIR",
                        help="out-of-fold predictions store (cellkit.predictions)")
    parser.add_argument("--truth", required=True, metavar="CSV", help="competition train.csv with the true masks")
    parser.add_argument("--out", required=True, metavar="JSON", help="thresholds.json to write")
    parser.add_argument("--plot", metavar="PNG", help="plot of the metric vs each threshold (default: OUT with .png)")
    for flag, text in (("--score-grid", "score thresholds (default 0.1:0.9:0.05)"),
                       ("--mask-grid", "pixel thresholds (default 0.3:0.7:0.05)"),
                       ("--min-area-grid", "minimum areas (default 0,10,20,...,300)")):
        parser.add_argument(flag, type=_floats, metavar="LIST", help=text)
    parser.add_argument("--options", choices=("all", "seed"), default="all",
                        help="options to try: all (the four vote x rescore sets, then free_dropped off/on at the "
                             "winner) or only the seed's (default all)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="coordinate-ascent rounds at most (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from cellkit import postprocess as pp, search as S

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    grid = {"score": args.score_grid, "mask": args.mask_grid, "min_area": args.min_area_grid}
    doc = S.search(args.pred, args.truth, grid=grid,
                   option_sets=S.OPTION_SETS if args.options == "all" else S.OPTION_SETS[:1], workers=args.workers,
                   max_rounds=args.rounds, try_free_dropped=args.options == "all", progress=not args.no_progress)
    out = pp.save_thresholds(args.out, doc)
    plot = S.plot_search(doc, args.plot or out.with_suffix(".png"))
    before, after = doc["metric"]["before"], doc["metric"]["after"]
    fmt = lambda v: f"{v:7.4f}" if v is not None else "      -"
    print(f"{'class':8} {'score':>6} {'mask':>6} {'min_area':>8}   {'before':>7} {'after':>7}")
    for name, t in doc["thresholds"].items():
        print(f"{name:8} {t['score']:6.2f} {t['mask']:6.2f} {t['min_area']:8d}   "
              f"{fmt(before['per_class'][name])} {fmt(after['per_class'][name])}")
    print(f"{'mAP':8} {'':6} {'':6} {'':8}   {before['mAP']:7.4f} {after['mAP']:7.4f}")
    opts = doc["options"]
    print(f"options: image_class_vote={opts['image_class_vote']} rescore={opts['rescore']} "
          f"free_dropped={opts['free_dropped']}; {doc['search']['n_images']} images, {doc['search']['seconds']} s")
    print("exact mAP of the chosen thresholds: " + ", ".join(f"free_dropped={r['free_dropped']} {r['mAP']:.4f}"
                                                             for r in doc["search"]["free_dropped"]["results"]))
    print(f"wrote {out} and {plot}")
    return 0
