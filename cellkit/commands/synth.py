"""``python -m cellkit synth OUT --images N --seed S [--test-images M] [--force]``."""
HELP = "generate the synthetic competition-format demo dataset"


def add_arguments(parser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder (e.g. data/demo); must be absent or empty")
    parser.add_argument("--images", type=int, default=40,
                        help="number of train images (default 40: each of 5 folds holds all three cell types)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give identical files")
    parser.add_argument("--test-images", type=int, default=3, help="number of test images (default 3)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args) -> int:
    import time

    import pandas as pd

    from cellkit.synth import synth_dataset

    t0 = time.perf_counter()
    out = synth_dataset(args.out, args.images, seed=args.seed, n_test=args.test_images, force=args.force)
    train = pd.read_csv(out / "train.csv", usecols=["id", "cell_type"])
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s: {args.images} train images "
          f"({len(train)} cells), {args.test_images} test images")
    print(train.groupby("cell_type")["id"].agg(images="nunique", cells="size").to_string())
    return 0
