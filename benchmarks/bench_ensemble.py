"""Ensemble cost: seconds per image and peak memory of a K-member ensemble against its members alone.

Each configuration runs in a fresh process (so peak RSS is its own): every member alone, then the ensemble of all,
at the same passes, on the same images, after one warm-up image. Prints s/img per member, their sum, the
ensemble's s/img and the ratio (the bar: <= 1.15), and peak RSS of the largest member alone vs the ensemble (the bar:
<= one member + 1 GiB).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ensemble.py --run RUN_A --run RUN_B ... --images DIR \\
        [--n-images 5] [--tta] [--fusion nms]

Without ``--run`` it builds tiny random-init runs (the tests' R18 model at 128 px) so the script runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    from cellkit import predict
    from cellkit.fusion import FusionSettings

    torch.set_num_threads(1)
    ens = predict.load_ensemble(args.run, tta=args.tta, fusion=FusionSettings(args.fusion))
    images = predict.list_images(args.images)[: args.n_images + 1]
    arrays = [(i, predict.read_image(p, ens.cfg.INPUT.FORMAT)) for i, p in images]
    ens.predict(arrays[0][1], arrays[0][0])  # warm-up
    start = time.perf_counter()
    n_det = 0
    for image_id, image in arrays[1:]:
        n_det += len(ens.predict(image, image_id))
    seconds = (time.perf_counter() - start) / max(1, len(arrays) - 1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"s_per_img": seconds, "peak_rss_mb": peak_mb, "detections_per_img": n_det / max(1, len(arrays) - 1)}))


def run_worker(runs, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--images", str(args.images), "--n-images", str(args.n_images),
           "--fusion", args.fusion, *(["--tta"] if args.tta else [])]
    for r in runs:
        cmd += ["--run", str(r)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_runs(base: Path, k: int) -> tuple[list[Path], Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from PIL import Image

    from test_tta import make_image, make_run

    runs = []
    for m in range(k):
        run = base / f"run{m}"
        run.mkdir()
        runs.append(make_run(run, 0, seed=m))
    images = base / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(make_image(i)[:, :, 0]).save(images / f"img{i}.png")
    return runs, images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], help="member run directory (repeat)")
    p.add_argument("--images", type=Path, help="folder of images")
    p.add_argument("--n-images", type=int, default=5)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--fusion", default="nms", choices=("nms", "wbf", "wmf"))
    p.add_argument("--tiny", type=int, default=5, help="members of the tiny random-init ensemble without --run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    tmp = None
    runs = [Path(r) for r in args.run]
    if not runs:
        tmp = tempfile.TemporaryDirectory()
        runs, args.images = tiny_runs(Path(tmp.name), args.tiny)
        print(f"no --run: {len(runs)} tiny random-init members (tests' R18 at 128 px), 5 synthetic images")
    singles = []
    for r in runs:
        res = run_worker([r], args)
        singles.append(res)
        print(f"member {r}: {res['s_per_img']:.2f} s/img, {res['detections_per_img']:.0f} detections/img, "
              f"peak RSS {res['peak_rss_mb']:.0f} MB")
    ens = run_worker(runs, args)
    total = sum(s["s_per_img"] for s in singles)
    peak_one = max(s["peak_rss_mb"] for s in singles)
    print(f"ensemble of {len(runs)} ({args.fusion}, {'TTA' if args.tta else 'one pass'}): {ens['s_per_img']:.2f} s/img "
          f"({ens['detections_per_img']:.0f} detections/img) vs members' sum {total:.2f} s/img: "
          f"ratio {ens['s_per_img'] / total:.3f} (bar 1.15)")
    print(f"peak RSS: ensemble {ens['peak_rss_mb']:.0f} MB vs largest member alone {peak_one:.0f} MB: "
          f"+{ens['peak_rss_mb'] - peak_one:.0f} MB (bar +1024 MB)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
