"""Benchmark: ``cellkit.rle`` decode/encode against pycocotools' C codec on the real Sartorius masks.

Both sides start from and end at the same things, conversions included:

* decode: competition string -> bool ``(H, W)`` row-major mask. pycocotools path: parse the tokens (numpy's C text
  parser), turn ``start length`` pairs into alternating COCO counts ``[start0, len, gap, len, ..., tail]`` of the
  ``(W, H)`` column-major image (a row-major ``(H, W)`` mask is the column-major layout of its transpose),
  ``frPyObjects`` (uncompressed -> compressed RLE), ``decode`` and transpose (a view). Every pycocotools mask is
  checked equal to ours.
* encode: bool ``(H, W)`` mask -> run-length form. Ours produces the competition string; pycocotools' ``encode`` of
  the transposed view produces its compressed COCO RLE (no conversion to the competition string, which
  pycocotools cannot do in C: this favours pycocotools).

Usage::

    .venv/bin/python benchmarks/bench_rle.py [--limit N] [--data DIR] [--repeat R]

Skips (exit 0, with a message) when the real data is absent.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
from pycocotools import mask as mask_util

from _common import add_data_argument, best_of, real_train_csv
from cellkit import rle


def coco_decode(s: str, shape: tuple[int, int]) -> np.ndarray:
    """Competition string -> bool ``(H, W)`` mask through pycocotools' C decoder (conversion included)."""
    h, w = shape
    values = np.fromstring(s, dtype=np.int64, sep=" ") if s else np.zeros(0, dtype=np.int64)
    counts = np.empty(values.size + 1, dtype=np.int64)
    starts0, lengths = values[0::2] - 1, values[1::2]
    ends = starts0 + lengths
    counts[0:-1:2] = starts0 - np.concatenate(([0], ends[:-1]))  # zeros before each run
    counts[1:-1:2] = lengths
    counts[-1] = h * w - (ends[-1] if values.size else 0)  # zeros after the last run
    coco = mask_util.frPyObjects({"counts": counts.tolist(), "size": [w, h]}, w, h)
    return mask_util.decode(coco).T.astype(bool, copy=False)


def coco_encode(mask: np.ndarray) -> dict:
    """bool ``(H, W)`` mask -> pycocotools compressed RLE of its ``(W, H)`` column-major transpose."""
    return mask_util.encode(np.asfortranarray(mask.T.view(np.uint8)))


def _rate(fn, items, repeat: int) -> tuple[float, object]:
    """Best-of-``repeat`` items per second of ``[fn(x) for x in items]`` and the last results."""
    best, out = best_of(lambda: [fn(x) for x in items], repeat)
    return len(items) / best, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="use only the first N masks (0 = all)")
    add_data_argument(parser)
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (best is reported)")
    parser.add_argument("--chunk", type=int, default=2000,
                        help="masks decoded per timed batch (bounds memory: a decoded mask is H*W bytes)")
    args = parser.parse_args(argv)

    csv_path = real_train_csv(args.data, "bench_rle")
    if csv_path is None:
        return 0
    frame = pd.read_csv(csv_path)
    if args.limit:
        frame = frame.iloc[:args.limit]
    shape = (int(frame["height"].iat[0]), int(frame["width"].iat[0]))
    if not ((frame["height"] == shape[0]) & (frame["width"] == shape[1])).all():
        raise SystemExit("bench_rle: masks of several image sizes; this benchmark expects one size")
    strings = frame["annotation"].tolist()
    print(f"{len(strings)} masks of {shape[0]}x{shape[1]} from {csv_path}")

    timings = {"ours decode": 0.0, "coco decode": 0.0, "ours encode": 0.0, "coco encode": 0.0}
    for i in range(0, len(strings), args.chunk):
        chunk = strings[i:i + args.chunk]
        rate, ours = _rate(lambda s: rle.decode(s, shape), chunk, args.repeat)
        timings["ours decode"] += len(chunk) / rate
        rate, theirs = _rate(lambda s: coco_decode(s, shape), chunk, args.repeat)
        timings["coco decode"] += len(chunk) / rate
        for k, (a, b) in enumerate(zip(ours, theirs)):
            if not np.array_equal(a, b):
                raise AssertionError(f"mask {i + k}: pycocotools and cellkit decode differ")
        rate, encoded = _rate(rle.encode, ours, args.repeat)
        timings["ours encode"] += len(chunk) / rate
        if encoded != chunk:
            raise AssertionError(f"chunk at {i}: encode(decode(s)) != s")
        rate, _ = _rate(coco_encode, ours, args.repeat)
        timings["coco encode"] += len(chunk) / rate
        del ours, theirs, encoded

    n = len(strings)
    print(f"\n{'operation':<10} {'cellkit masks/s':>16} {'pycocotools masks/s':>20} {'cellkit / pycocotools':>22}")
    for op in ("decode", "encode"):
        ours_rate, coco_rate = n / timings[f"ours {op}"], n / timings[f"coco {op}"]
        print(f"{op:<10} {ours_rate:>16,.0f} {coco_rate:>20,.0f} {ours_rate / coco_rate:>21.2f}x")
    print("\ndecode outputs identical on every mask; encode(decode(s)) == s on every mask")
    ratio = timings["coco decode"] / timings["ours decode"]
    if ratio < 0.5:
        print(f"WARNING: cellkit decode is {1 / ratio:.1f}x slower than pycocotools (target: within 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
