"""``python -m cellkit fakepred --truth TRAIN.csv --out DIR``: realistic predictions generated from truth.

Writes a :mod:`cellkit.predictions` store (one ``.npz`` per image + ``meta.json``) with jittered soft-edged masks,
missed cells, duplicate detections and false positives (see :mod:`cellkit.fakepred`), for developing the
post-processing and the threshold search before real out-of-fold predictions exist. Resumes by skipping written
images.
"""
HELP = "generate realistic instance predictions from a train.csv (for developing post-processing)"


def _knob(text: str):
    import argparse

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), (tuple(float(v) for v in value.split(",")) if "," in value else float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: expected a number or 'lo,hi', got {value!r}") from None


def add_arguments(parser) -> None:
    parser.add_argument("--truth", required=True, metavar="CSV", help="competition-format train.csv")
    parser.add_argument("--out", required=True, metavar="DIR", help="predictions store to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--preset", default="realistic", help="spec preset: realistic (default) or clean")
    parser.add_argument("--set", dest="knobs", type=_knob, action="append", default=[], metavar="KEY=VALUE",
                        help="override a FakeSpec knob for every class, e.g. --set fp_rate=0.5 "
                             "--set fp_score=0.05,0.3 (repeatable)")
    parser.add_argument("--images", type=int, metavar="N", help="only the first N image ids (sorted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from cellkit import fakepred
    from cellkit.data import read_train_csv

    specs = fakepred.spec_for(args.preset, **dict(args.knobs))
    truth = read_train_csv(args.truth)
    if args.images is not None and args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    ids = sorted(truth["id"].unique())[:args.images]  # all when None
    out = fakepred.generate(truth, args.out, specs, seed=args.seed, image_ids=ids, progress=not args.no_progress)
    print(f"wrote predictions of {len(ids)} image(s) to {out}")
    return 0
