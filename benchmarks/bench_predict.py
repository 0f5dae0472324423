"""Inference cost of ``cellkit predict`` on CPU: single pass vs TTA, box-cropped vs full-image mask paste.

Usage (from the repo root)::

    .venv/bin/python benchmarks/bench_predict.py [--preset r50] [--images 2] [--detections 1000]
    .venv/bin/python benchmarks/bench_predict.py --preset paper --images 1 --modes tta --test-sizes 520,480  # CPU smoke

What it measures, on the first ``--images`` real images of ``../shared/data/sartorius/train`` (or
``$CELLKIT_REAL_DATA/sartorius/train``; the benchmark exits when they are absent):

- s/img of a single pass and of TTA (``TEST.AUG``: 2 scales x flip = 4 passes for r50/paper), each in its own
  child process so that its peak RSS (``ru_maxrss``) is its own; the model is randomly initialised (timing only)
  and ``ROI_HEADS.SCORE_THRESH_TEST`` is set to 0 so that every image yields ``TEST.DETECTIONS_PER_IMAGE`` (1000)
  detections, as a trained model does on crowded shsy5y images;
- on the TTA-averaged masks of one image: :func:`cellkit.tta.paste_crops` (box-cropped, what predict does) vs
  detectron2's full-image ``paste_masks_in_image`` (``threshold=-1``: probabilities as uint8) + cropping with
  ``InstancePredictions.from_full_masks`` (the same store, the baseline) and vs ``paste_masks_in_image`` at 0.5
  (what ``detector_postprocess`` does, binary), with the ratio;
- the prediction store's size per image (``.npz`` written by predict) and that of 392 images.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("CELLKIT_REAL_DATA", REPO.parent / "shared" / "data"))


def size_overrides(test_sizes: str) -> list[str]:
    """Config overrides for ``--test-sizes "S1,S2"``: TTA short edges S1, S2 (single pass at S1), long edge capped
    at 704 / 520 x the largest; empty string = the preset's own sizes."""
    if not test_sizes:
        return []
    sizes = [int(s) for s in test_sizes.split(",")]
    max_size = str(int(round(max(sizes) * 704 / 520)))
    return ["INPUT.MIN_SIZE_TEST", str(sizes[0]), "INPUT.MAX_SIZE_TEST", max_size,
            "TEST.AUG.MIN_SIZES", "(" + ",".join(map(str, sizes)) + ",)", "TEST.AUG.MAX_SIZE", max_size]


def build(preset: str, detections: int, tta: bool, test_sizes: str = ""):
    """A randomly initialised model of ``preset`` on CPU wrapped in CellTTA, forced to ``detections`` per image."""
    import torch

    from cellkit import modeling  # noqa: F401  (registers the cellkit backbone)
    from cellkit.config import get_preset_cfg, resolve_runtime
    from cellkit.tta import CellTTA

    cfg = get_preset_cfg(preset, ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                  "TEST.DETECTIONS_PER_IMAGE", str(detections)] + size_overrides(test_sizes))
    resolve_runtime(cfg, has_cuda=False)
    torch.manual_seed(0)
    model = modeling.build_model(cfg).eval()
    return cfg, CellTTA(cfg, model, tta=tta)


def child(args) -> dict:
    """Run one mode in this process and return its figures (printed as JSON by ``--child``)."""
    import numpy as np
    import torch

    from cellkit import predictions
    from cellkit.predict import list_images, read_image

    images = list_images(REAL / "sartorius" / "train")[: args.images]
    cfg, runner = build(args.preset, args.detections, tta=args.child == "tta", test_sizes=args.test_sizes)
    out = Path(args.workdir) / args.child
    fmt = cfg.INPUT.FORMAT
    # no warm-up pass: any image is resized to the test size, so it would cost a whole inference; first-call
    # overheads (~1 s) are small next to the minutes an image takes on CPU
    times, cpu_times, counts, sizes = [], [], [], []
    for image_id, path in images:
        image = read_image(path, fmt)
        t0, c0 = time.perf_counter(), time.process_time()
        pred = runner.predict(image, image_id)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        counts.append(len(pred))
        sizes.append(predictions.save(pred, out).stat().st_size)
    res = {"mode": args.child, "passes": runner.n_passes, "s_per_img": float(np.mean(times)),
           "cpu_s_per_img": float(np.mean(cpu_times)),
           "detections": float(np.mean(counts)), "npz_bytes": float(np.mean(sizes)),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads()}
    if args.child == "tta":
        # keep the averaged M x M masks + boxes of the last image for the paste comparison
        with torch.no_grad():
            inp = {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
                   "height": image.shape[0], "width": image.shape[1]}
            from cellkit.fusion import FusionSettings
            from cellkit.tta import fused_boxes_and_masks

            boxes, scores, classes, masks = fused_boxes_and_masks([runner], inp, FusionSettings().resolved(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST))
        torch.save({"boxes": boxes, "scores": scores, "classes": classes, "masks": masks,
                    "shape": image.shape[:2]}, Path(args.workdir) / "masks.pt")
    return res


def paste_child(args) -> dict:
    """Box-cropped paste vs full-image paste on the saved TTA masks, peak RSS after each."""
    import numpy as np
    import torch
    from detectron2.layers.mask_ops import paste_masks_in_image

    from cellkit.predictions import InstancePredictions
    from cellkit.tta import paste_crops

    d = torch.load(Path(args.workdir) / "masks.pt")
    boxes, masks, (h, w) = d["boxes"], d["masks"][:, 0].float(), d["shape"]
    res = {"n": len(boxes)}

    def best_of(fn, repeat):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return best, out

    t_crop, (mask_boxes, crops) = best_of(lambda: paste_crops(masks, boxes, h, w), 3)
    res["crop_s"] = t_crop
    res["rss_after_crop_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def full_then_crop():
        full = paste_masks_in_image(masks, boxes, (h, w), threshold=-1)  # uint8 probability * 255 (truncated)
        return InstancePredictions.from_full_masks("x", d["classes"].numpy(), d["scores"].numpy(),
                                                   boxes.numpy(), full.numpy().astype(np.float32) / 255.0)

    t_full, ref = best_of(full_then_crop, 1)
    res["full_s"] = t_full
    res["rss_after_full_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_bin, _ = best_of(lambda: paste_masks_in_image(masks, boxes, (h, w), threshold=0.5), 1)
    res["full_binary_s"] = t_bin
    # the two stores agree (the baseline truncates instead of rounding: at most 1/255 apart)
    worst = 0
    for i in range(0, len(crops), max(1, len(crops) // 50)):
        full_i = np.zeros((h, w), np.int16)
        x0, y0, x1, y1 = mask_boxes[i]
        full_i[y0:y1, x0:x1] = crops[i]
        worst = max(worst, int(np.abs(full_i - np.rint(ref.full_prob(i) * 255).astype(np.int16)).max()))
    res["max_abs_diff_of_255"] = worst
    return res


def run_child(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--workdir", args.workdir, "--preset", args.preset,
           "--images", str(args.images), "--detections", str(args.detections), "--test-sizes", args.test_sizes]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {mode} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="r50")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--detections", type=int, default=1000)
    parser.add_argument("--modes", default="single,tta", help="comma-separated: single, tta")
    parser.add_argument("--test-sizes", default="", help='TTA short edges, e.g. "520,480" for a CPU smoke of '
                        "the paper preset at native size (default: the preset's TEST.AUG sizes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        res = paste_child(args) if args.child == "paste" else child(args)
        print(json.dumps(res))
        return 0
    if not (REAL / "sartorius" / "train").is_dir():
        print(f"skipped: no real images under {REAL / 'sartorius' / 'train'}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        args.workdir = tmp
        results = {m: run_child(m, args) for m in args.modes.split(",")}
        if "tta" in results:
            results["paste"] = run_child("paste", args)
    sizes = f"test sizes {args.test_sizes}" if args.test_sizes else "the preset's test sizes"
    print(f"preset {args.preset} ({sizes}), random init, SCORE_THRESH_TEST 0 (forced detections), CPU, "
          f"{args.images} real image(s) 704x520, torch threads {next(iter(results.values())).get('threads')}")
    print(f"{'mode':8s} {'passes':>6s} {'dets/img':>8s} {'s/img':>8s} {'CPU s/img':>9s} {'peak RSS MB':>11s} "
          f"{'store KB/img':>12s}")
    for m in ("single", "tta"):
        if m in results:
            r = results[m]
            print(f"{m:8s} {r['passes']:6d} {r['detections']:8.0f} {r['s_per_img']:8.2f} {r['cpu_s_per_img']:9.1f} "
                  f"{r['peak_rss_mb']:11.0f} "
                  f"{r['npz_bytes'] / 1024:12.1f}")
    if "single" in results and "tta" in results:
        print(f"TTA / single pass: {results['tta']['s_per_img'] / results['single']['s_per_img']:.2f}x wall, "
              f"{results['tta']['cpu_s_per_img'] / results['single']['cpu_s_per_img']:.2f}x CPU time "
              f"(CPU time = process time over both cores; wall time depends on the machine's other load)")
    if "paste" in results:
        p = results["paste"]
        print(f"paste of {p['n']} TTA-averaged masks (one image): box-cropped {p['crop_s'] * 1000:.0f} ms | "
              f"full-image probabilities + crop (baseline) {p['full_s'] * 1000:.0f} ms "
              f"({p['full_s'] / p['crop_s']:.1f}x slower) | full-image binary (detector_postprocess) "
              f"{p['full_binary_s'] * 1000:.0f} ms ({p['full_binary_s'] / p['crop_s']:.1f}x)")
        print(f"  peak RSS after box-cropped paste {p['rss_after_crop_mb']:.0f} MB, after full-image paste "
              f"{p['rss_after_full_mb']:.0f} MB; stores agree within {p['max_abs_diff_of_255']}/255")
    for m in ("tta", "single"):
        if m in results:
            kb = results[m]["npz_bytes"] / 1024
            print(f"store ({m}): {kb:.0f} KB/img -> {kb * 392 / 1024:.0f} MB for the 392 dev images")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
