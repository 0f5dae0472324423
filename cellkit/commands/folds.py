"""``python -m cellkit folds TRAIN.csv --k 5 --out folds.csv [--seed S]``."""
HELP = "write folds.csv (StratifiedGroupKFold by cell type, grouped by sample_id)"


def add_arguments(parser) -> None:
    parser.add_argument("train_csv", metavar="TRAIN.csv", help="competition-format train CSV")
    parser.add_argument("--k", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--out", default="folds.csv", help="output CSV: id, cell_type, fold[, sample_id]")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the shuffled splitter (default 0)")


def run(args) -> int:
    import pandas as pd

    from pathlib import Path

    from cellkit import data
    from cellkit.folds import make_folds, write_folds
    from cellkit.schema import schema_of

    schema = schema_of(Path(args.train_csv).parent)
    folds = make_folds(data.read_train_csv(args.train_csv), k=args.k, seed=args.seed, source=str(args.train_csv),
                       schema=schema)
    path = write_folds(folds, args.out)
    groups = [schema.image_group(i, c) for i, c in zip(folds["id"].astype(str), folds["cell_type"])]
    table = pd.crosstab(folds["fold"], pd.Series(groups, name="cell_type", index=folds.index)).reindex(
        columns=list(schema.groups), fill_value=0)
    table["images"] = table.sum(axis=1)
    print(f"wrote {path}: {len(folds)} images in {args.k} folds (seed {args.seed})")
    print(table.to_string())
    return 0
