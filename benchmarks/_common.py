"""Helpers shared by the benchmark scripts (imported as a sibling module: ``benchmarks/`` is ``sys.path[0]`` when a
script runs as ``python benchmarks/bench_x.py``)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--data DIR``: the real data folder (see :func:`real_root`)."""
    parser.add_argument("--data", default=None, help="real data folder (default $CELLKIT_REAL_DATA or ../shared/data)")


def real_root(arg: str | None) -> Path:
    """The real data folder: ``arg`` when given, else ``$CELLKIT_REAL_DATA``, else ``<repo>/../shared/data``."""
    if arg:
        return Path(arg)
    env = os.environ.get("CELLKIT_REAL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def real_train_csv(arg: str | None, bench: str) -> Path | None:
    """The real ``sartorius/train.csv`` under :func:`real_root`, or None after printing that ``bench`` is skipped."""
    csv_path = real_root(arg) / "sartorius" / "train.csv"
    if not csv_path.is_file():
        print(f"{bench}: real data not found ({csv_path}); skipped")
        return None
    return csv_path


def best_of(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """Fastest wall time in seconds over ``repeat`` calls of ``fn()``, and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out
