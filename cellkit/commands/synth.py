"""``python -m cellkit synth OUT --images N --seed S [--test-images M] [--force] [--classes ...] [--size HxW]
[--channels 1|3] [--bit-depth 8|16] [--mask-folder]``."""
from cellkit.commands.import_data import parse_size

HELP = "generate the synthetic competition-format demo dataset"


def add_arguments(parser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder (e.g. data/demo); must be absent or empty")
    parser.add_argument("--images", type=int, default=40,
                        help="number of train images (default 40: each of 5 folds holds all three cell types)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give identical files")
    parser.add_argument("--test-images", type=int, default=3, help="number of test images (default 3)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--classes", help="class names, comma-separated, or a count N (class0..classN-1); default "
                                          "the three Sartorius cell types")
    parser.add_argument("--size", type=parse_size, help="HEIGHTxWIDTH of every image (default 520x704)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 grayscale (default) or 3 (RGB)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8,
                        help="8 (default) or 16 (a source for `cellkit import csv`, which converts to 8-bit)")
    parser.add_argument("--mask-folder", action="store_true",
                        help="write a per-instance mask folder (<id>/images, <id>/masks) for `cellkit import masks`")


def run(args) -> int:
    import time

    import pandas as pd

    from cellkit.synth import synth_dataset

    from cellkit import SHAPE

    classes = args.classes and ([f"class{k}" for k in range(int(args.classes))] if args.classes.isdigit()
                                else [c.strip() for c in args.classes.split(",") if c.strip()])
    t0 = time.perf_counter()
    out = synth_dataset(args.out, args.images, seed=args.seed, n_test=args.test_images, force=args.force,
                        classes=classes or None, shape=args.size or SHAPE,
                        channels=args.channels, bit_depth=args.bit_depth, mask_folder=args.mask_folder)
    if args.mask_folder:
        print(f"wrote {out} in {time.perf_counter() - t0:.1f}s: a per-instance mask folder of {args.images} train "
              f"images, {args.test_images} test images")
        return 0
    train = pd.read_csv(out / "train.csv", usecols=["id", "cell_type"])
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s: {args.images} train images "
          f"({len(train)} cells), {args.test_images} test images")
    print(train.groupby("cell_type")["id"].agg(images="nunique", cells="size").to_string())
    return 0
