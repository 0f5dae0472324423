"""Training benchmarks: per-iteration time and peak memory of a preset, untrained vs trained val mAP, kill + resume.

Subcommands (each prints a small table; figures go to benchmarks/RESULTS.md with the exact command):

- ``iters --config PRESET [--iters N] [--data DIR]``: build the preset's model on this machine (random init, GN
  from scratch), run N training iterations on real-size images from DATA (default: synthetic data generated into a
  temp dir) and report build time, s/iter (first iteration separately), peak RSS.
- ``untrained --run DIR``: val mAP of the run's config with a freshly initialised (untrained) model, next to the
  run's best/last evaluation from its metrics.json (the "clearly learns" check).
- ``gt-memory --data DIR [--size 1100,1490]``: ground-truth mask memory of the densest image as one training
  sample, detectron2's full-plane BitMasks vs cellkit's CropMasks (held bytes, mask-target time, peak RSS).
- ``kill-resume --data DIR [--iters N]``: start ``cellkit train`` (demo) as a subprocess, SIGKILL it once a checkpoint
  exists, resume with ``--resume`` and check it finishes at the planned iteration.

On a shared CPU, run with ``OMP_NUM_THREADS=1``: oversubscribed OpenMP threads were 2.5x slower here.
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def _synth(n: int) -> Path:
    from cellkit.synth import synth_dataset

    out = Path(tempfile.mkdtemp(prefix="cellkit_bench_")) / "synth"
    return synth_dataset(out, n, seed=0, n_test=0)


def cmd_iters(args) -> int:
    import torch
    from detectron2.utils.events import EventStorage

    from cellkit.config import get_preset_cfg, resolve_runtime
    from cellkit.data import load_sartorius_dicts
    from cellkit.modeling import build_model
    from cellkit.train import CellkitDatasetMapper

    data = Path(args.data) if args.data else _synth(4)
    cfg = get_preset_cfg(args.config, args.opts)
    notes = resolve_runtime(cfg)
    dicts = load_sartorius_dicts(data / "train.csv", data / "train")
    if args.densest:
        dicts = [max(dicts, key=lambda d: len(d["annotations"]))]
        print(f"  densest image: {dicts[0]['image_id']} ({dicts[0]['cell_type']}, "
              f"{len(dicts[0]['annotations'])} cells)", flush=True)
    mapper = CellkitDatasetMapper(cfg, is_train=True)
    t0 = time.perf_counter()
    model = build_model(cfg)
    model.train()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    times, map_times, shapes = [], [], []
    with EventStorage(0):
        for i in range(args.iters):
            t = time.perf_counter()
            batch = [mapper(dicts[(i * cfg.SOLVER.IMS_PER_BATCH + j) % len(dicts)])
                     for j in range(cfg.SOLVER.IMS_PER_BATCH)]
            map_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            losses = model(batch)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {i}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
            shapes.append(tuple(batch[0]["image"].shape[1:]))
            print(f"  iter {i}: {times[-1]:.1f} s (mapper {map_times[-1]:.2f} s), loss {loss.item():.3f}, "
                  f"image {shapes[-1]}", flush=True)
    later = times[1:] or times
    print("| preset | params | build s | iter 1 s | later iters s/iter | mapper s/img | images (H, W) | "
          "batch | peak RSS MiB | threads |")
    print(f"| {args.config} | {n_params / 1e6:.1f} M | {build_s:.1f} | {times[0]:.1f} | "
          f"{sum(later) / len(later):.1f} | {sum(map_times) / len(map_times) / cfg.SOLVER.IMS_PER_BATCH:.2f} | "
          f"{sorted(set(shapes))} | {cfg.SOLVER.IMS_PER_BATCH} | {peak_rss_mib():.0f} | {torch.get_num_threads()} |")
    for note in notes:
        print(f"  config: {note}")
    return 0


def cmd_untrained(args) -> int:
    from cellkit.config import load_run_config
    from cellkit.modeling import build_model
    from cellkit.train import CellkitTrainer, check_data, register_datasets

    run = Path(args.run)
    cfg = load_run_config(run)
    register_datasets(cfg, check_data(cfg))
    if not cfg.DATASETS.TEST:
        raise SystemExit(f"{run}: the run has no validation fold")
    import torch

    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    t = time.perf_counter()
    res = CellkitTrainer.test(cfg, build_model(cfg))
    untrained = res.get("cellkit", res)
    records = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    evals = [m for m in records if "cellkit/mAP" in m]
    # iterations done: a periodic evaluation is logged at the last iteration it follows (99 after 100), the final one
    # after the loop (300 after 300), so cap at the last training iteration + 1
    trained = max((m["iteration"] for m in records if "total_loss" in m), default=-1) + 1
    best = max(evals, key=lambda m: m["cellkit/mAP"]) if evals else {}
    last = evals[-1] if evals else {}
    keys = [k for k in untrained if k.startswith("mAP")]
    print(f"untrained evaluation: {time.perf_counter() - t:.0f} s")
    print("| model | iteration | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    print("| untrained (random init) | 0 | " + " | ".join(f"{untrained[k]:.4f}" for k in keys) + " |")
    for name, m in (("best", best), ("last", last)):
        if m:
            print(f"| trained ({name}) | {min(m['iteration'] + 1, trained)} | "
                  + " | ".join(f"{m.get('cellkit/' + k, float('nan')):.4f}" for k in keys) + " |")
    return 0


def cmd_kill_resume(args) -> int:
    out = Path(tempfile.mkdtemp(prefix="cellkit_killresume_")) / "run"
    base = [sys.executable, "-m", "cellkit", "train", "--config", "demo", "--data", args.data, "--fold", "0",
            "--out", str(out)]
    opts = ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", str(args.period),
            "TEST.EVAL_PERIOD", str(args.period), "CELLKIT.LOG_PERIOD", "1"]
    log = open(out.parent / "first.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(base + opts, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    while not (out / "last_checkpoint").is_file():
        if proc.poll() is not None:
            raise SystemExit(f"training ended before its first checkpoint; see {out.parent / 'first.log'}")
        time.sleep(1)
    time.sleep(args.extra_wait)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = (out / "last_checkpoint").read_text().strip()
    print(f"killed (SIGKILL) after {time.perf_counter() - t0:.0f} s; last checkpoint {killed_at}")
    t1 = time.perf_counter()
    res = subprocess.run(base + ["--resume"] + opts, cwd=REPO, capture_output=True, text=True)
    (out.parent / "resume.log").write_text(res.stdout + res.stderr)
    import torch

    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    iters = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()
             if '"lr"' in line]
    resumed_from = next(line for line in res.stdout.splitlines() if "Starting training from iteration" in line)
    print(f"resume: exit {res.returncode} in {time.perf_counter() - t1:.0f} s; {resumed_from.split(']: ')[-1]}; "
          f"model_final iteration {final['iteration']} (planned {args.iters - 1}); "
          f"iterations logged: {iters}")
    print(f"run dir: {out}")
    return 0 if res.returncode == 0 and final["iteration"] == args.iters - 1 else 1


def cmd_gt_memory(args) -> int:
    """Ground-truth mask memory of one training sample: detectron2's BitMasks (a full plane per cell, the mapper
    before) vs cellkit's CropMasks, each in a fresh process: bytes held by ``gt_masks``, the mask targets of
    ``--proposals`` foreground proposals (``crop_and_resize`` at 28x28), peak RSS above the process's baseline."""
    if args.mode == "both":
        rows = []
        for mode in ("bitmasks", "crops"):
            out = subprocess.run([sys.executable, __file__, "gt-memory", "--data", args.data, "--size", args.size,
                                  "--proposals", str(args.proposals), "--mode", mode],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"densest image {rows[0]['image']} ({rows[0]['cells']} cells) at {rows[0]['shape']}, "
              f"{args.proposals} foreground proposals")
        print("| gt_masks | held MiB | mapper s | targets s | peak RSS above baseline MiB |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['held'] / 2**20:.1f} | {r['map_s']:.2f} | {r['targets_s']:.3f} | "
                  f"{r['peak_mib'] - r['base_mib']:.0f} |")
        print(f"held ratio bitmasks/crops: {rows[0]['held'] / rows[1]['held']:.0f}x; peak ratio: "
              f"{(rows[0]['peak_mib'] - rows[0]['base_mib']) / max(rows[1]['peak_mib'] - rows[1]['base_mib'], 1):.1f}x")
        return 0
    import numpy as np
    import torch
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    from cellkit.config import get_preset_cfg, resolve_runtime
    from cellkit.data import load_sartorius_dicts
    from cellkit.train import CellkitDatasetMapper

    short, long_ = (int(v) for v in args.size.split(","))
    data = Path(args.data)
    records = load_sartorius_dicts(data / "train.csv", data / "train")
    record = max(records, key=lambda d: len(d["annotations"]))
    del records
    cfg = get_preset_cfg("paper", ["INPUT.MIN_SIZE_TRAIN", f"({short},)", "INPUT.MAX_SIZE_TRAIN", str(long_)])
    resolve_runtime(cfg, has_cuda=False)
    resize = [T.ResizeShortestEdge(short, long_, "choice")]
    if args.mode == "bitmasks":
        mapper = DatasetMapper(cfg, is_train=True, augmentations=resize, image_format="BGR", use_instance_mask=True,
                               instance_mask_format="bitmask", recompute_boxes=True)
    else:
        mapper = CellkitDatasetMapper(cfg, is_train=True, augmentations=resize, image_format="BGR",
                                      use_instance_mask=True, instance_mask_format="bitmask", recompute_boxes=True)
    base = peak_rss_mib()
    t = time.perf_counter()
    out = mapper(record)
    map_s = time.perf_counter() - t
    inst = out["instances"]
    masks = inst.gt_masks
    held = masks.tensor.numel() * masks.tensor.element_size() if hasattr(masks, "tensor") else masks.nbytes
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(rng.integers(0, len(inst), args.proposals))
    boxes = inst.gt_boxes.tensor[idx] + torch.from_numpy(rng.normal(0, 2, (args.proposals, 4))).float()
    t = time.perf_counter()
    targets = masks[idx].crop_and_resize(boxes, 28)
    targets_s = time.perf_counter() - t
    print(json.dumps({"mode": args.mode, "image": record["image_id"], "cells": len(record["annotations"]),
                      "shape": list(inst.image_size), "held": held, "map_s": map_s, "targets_s": targets_s,
                      "targets": list(targets.shape), "base_mib": base, "peak_mib": peak_rss_mib()}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("iters")
    a.add_argument("--config", default="demo")
    a.add_argument("--iters", type=int, default=3)
    a.add_argument("--data", help="competition-layout dir (default: 4 synthetic images)")
    a.add_argument("--densest", action="store_true", help="train on the image with the most cells only")
    a.add_argument("opts", nargs="*")
    a.set_defaults(fn=cmd_iters)
    g = sub.add_parser("gt-memory")
    g.add_argument("--data", required=True, help="competition-layout dir (the densest image is used)")
    g.add_argument("--size", default="1100,1490", help="training short side, long side cap (default: the paper's)")
    g.add_argument("--proposals", type=int, default=128,
                   help="foreground proposals whose mask targets are made (detectron2: 512 x 0.25 per image)")
    g.add_argument("--mode", choices=["both", "bitmasks", "crops"], default="both")
    g.set_defaults(fn=cmd_gt_memory)
    b = sub.add_parser("untrained")
    b.add_argument("--run", required=True)
    b.set_defaults(fn=cmd_untrained)
    c = sub.add_parser("kill-resume")
    c.add_argument("--data", required=True)
    c.add_argument("--iters", type=int, default=12)
    c.add_argument("--period", type=int, default=4)
    c.add_argument("--extra-wait", type=float, default=5.0, help="seconds to keep training after the checkpoint")
    c.set_defaults(fn=cmd_kill_resume)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
