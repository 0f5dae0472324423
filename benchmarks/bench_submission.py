"""Benchmark: checking a submission (:func:`cellkit.submission.validate_submission`) of every real train image.

The submission is the real ``train.csv``'s own masks written as ``id,predicted`` (392 images, 32k masks; the truth's
overlapping masks are reported, as a check would report them), checked against the real train image folder. Prints
the check's seconds and the number of problem lines (equal counts on two trees = same findings; compare trees with
``PYTHONPATH=<old tree> python benchmarks/bench_submission.py``).

Usage::

    .venv/bin/python benchmarks/bench_submission.py [--repeat 3] [--data DIR]

Skips (exit 0, with a message) when the real data is absent.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import pandas as pd

from _common import add_data_argument, best_of, real_train_csv
from cellkit.submission import validate_submission


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    add_data_argument(ap)
    args = ap.parse_args()
    csv_path = real_train_csv(args.data, "bench_submission")
    if csv_path is None:
        return 0
    table = pd.read_csv(csv_path, dtype={"id": str})
    with tempfile.TemporaryDirectory() as tmp:
        sub = Path(tmp) / "submission.csv"
        table[["id", "annotation"]].rename(columns={"annotation": "predicted"}).to_csv(sub, index=False)
        seconds, problems = best_of(lambda: validate_submission(sub, csv_path.parent / "train"), args.repeat)
    digest = hashlib.sha256("\n".join(problems).encode()).hexdigest()[:16]
    print(f"{table['id'].nunique()} images, {len(table)} masks; best of {args.repeat}")
    print(f"validate_submission: {seconds:.3f} s; {len(problems)} problem lines, digest {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
