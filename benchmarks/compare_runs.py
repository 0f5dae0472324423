#!/usr/bin/env python3
"""Compare the artifacts of two runs of ``benchmarks/redesign_chain.sh`` (issue 17's "same results" check).

Prints, per artifact, ``identical`` (byte for byte), ``equal`` (JSON equal once each run's own folder is written
``OUT`` and the fields holding wall time or memory are removed; a checkpoint's model tensors equal) or ``DIFFERENT``
(with the first differing key); exits 1 on a difference.

Usage:
    python benchmarks/compare_runs.py OUT_A OUT_B
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

VOLATILE = {"seconds", "peak_rss_mb"}
"""Keys dropped before comparing JSON documents: wall time and memory."""


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _first_difference(a, b, where="") -> str:
    if type(a) is not type(b):
        return f"{where or '/'}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: only in {'B' if k not in a else 'A'}"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{where}/{k}")
    if isinstance(a, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where or '/'}: {str(a)[:80]} vs {str(b)[:80]}"


def _same_model(a: Path, b: Path) -> bool:
    import torch

    ma, mb = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in (a, b))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def _files(root: Path) -> dict[str, Path]:
    names = ["submission.csv", "thresholds.json", "cv.json", "folds.csv", "fold0/model_final.pth"]
    found = {n: root / n for n in names if (root / n).is_file()}
    for store in ("oof", "test"):
        for p in sorted((root / store).glob("*")) if (root / store).is_dir() else []:
            if p.is_file() and not p.name.startswith("."):
                found[f"{store}/{p.name}"] = p
    return found


def compare(a: Path, b: Path) -> bool:
    fa, fb = _files(a), _files(b)
    same = True
    for name in sorted(set(fa) | set(fb)):
        if name not in fa or name not in fb:
            print(f"{name:32s} only in {'B' if name not in fa else 'A'}")
            same = False
            continue
        da, db = fa[name].read_bytes(), fb[name].read_bytes()
        if da == db:
            print(f"{name:32s} identical  sha256 {hashlib.sha256(da).hexdigest()[:16]}")
            continue
        if name.endswith(".pth"):
            if _same_model(fa[name], fb[name]):
                print(f"{name:32s} equal (model tensors; the pickle differs)")
                continue
            print(f"{name:32s} DIFFERENT  (model tensors)")
        elif name.endswith(".json"):
            ja = _clean(json.loads(da.decode().replace(str(a.resolve()), "OUT").replace(str(a), "OUT")))
            jb = _clean(json.loads(db.decode().replace(str(b.resolve()), "OUT").replace(str(b), "OUT")))
            if ja == jb:
                print(f"{name:32s} equal (timings and own paths removed)")
                continue
            print(f"{name:32s} DIFFERENT  {_first_difference(ja, jb)}")
        else:
            print(f"{name:32s} DIFFERENT  ({len(da)} vs {len(db)} bytes)")
        same = False
    return same


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(0 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
