"""The GPU check: the ``paper`` preset's training and TTA at full size, and a short ``r50`` run, in one table.

Run by ``benchmarks/gpu_check.sh`` (which installs what a bare GPU machine lacks); ``--smoke`` runs the same three
steps tiny on the CPU (CI runs it, so the script cannot rot):

1. ``paper`` (Cascade Mask R-CNN X152-32x8d dconv) at full size (short side 1100, long 1490) with AMP as the preset
   sets it: ``--iters`` training iterations through ``cellkit.train`` (the real trainer), s/iter (median of
   detectron2's per-iteration times in ``metrics.json``, which start at the 3rd iteration, after the first 5) and peak GPU memory (``torch.cuda.max_memory_allocated``).
2. 4-pass TTA (2 scales x h-flip) of that model at ``TEST.DETECTIONS_PER_IMAGE`` 1000 (score threshold 0, so every
   image carries 1000 detections), s/img, through ``cellkit.tta`` (the real predictor and store).
3. ``r50`` from random init on the real-image subset for ``--r50-minutes``, validated on fold 0: its val mAP
   next to the same config untrained (random init: 0).

Prints ``| step | figure | value |`` rows, one table; ``--json PATH`` also writes the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER_SIZE = ("(1100,)", "1490")
SMOKE = {
    "size": ("(64,)", "96"),
    "test": ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "TEST.AUG.MIN_SIZES", "(64, 56)",
             "TEST.AUG.MAX_SIZE", "96"],
    "small": ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "60",
              "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "DATALOADER.NUM_WORKERS", "0"],
    "detections": 50,
}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.json").read_text().splitlines() if line.strip()]


def _train(preset: str, data: Path, out: Path, opts: list[str], fold: int):
    """Train through cellkit's own path (checks, config, trainer); returns the frozen config."""
    from cellkit.config import apply_overrides, get_preset_cfg
    from cellkit.train import prepare_config, train_worker

    cfg = get_preset_cfg(preset)
    cfg.OUTPUT_DIR = str(out)
    cfg.CELLKIT.DATA.ROOT = str(data)
    cfg.CELLKIT.DATA.FOLD = fold
    cfg.CELLKIT.DATA.NUM_FOLDS = 3  # the carried subset and the smoke data are small
    apply_overrides(cfg, opts)
    cfg, specs = prepare_config(cfg)
    train_worker(cfg, specs)
    return cfg


def step_paper_train(data: Path, work: Path, iters: int, smoke: bool) -> tuple[dict, Path]:
    import torch

    size = SMOKE["size"] if smoke else PAPER_SIZE
    opts = ["INPUT.MIN_SIZE_TRAIN", size[0], "INPUT.MAX_SIZE_TRAIN", size[1], "SOLVER.MAX_ITER", str(iters),
            "SOLVER.WARMUP_ITERS", "5", "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "CELLKIT.LOG_PERIOD", "1",
            "TEST.EVAL_PERIOD", "0"] + (SMOKE["small"] + ["SOLVER.IMS_PER_BATCH", "1"] if smoke else [])
    run = work / "paper"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    cfg = _train("paper", data, run, opts, fold=-1)
    wall = time.perf_counter() - t
    times = [m["time"] for m in _metrics(run) if "time" in m]
    steady = times[5:] or times
    res = {"device": cfg.MODEL.DEVICE, "amp": bool(cfg.SOLVER.AMP.ENABLED), "iters": iters,
           "batch": cfg.SOLVER.IMS_PER_BATCH, "size": f"{size[0]} / {size[1]}",
           "s_per_iter": statistics.median(steady) if steady else float("nan"), "wall_s": wall}
    if torch.cuda.is_available():
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res, run


def step_tta(run: Path, images: Path, smoke: bool, n_images: int) -> dict:
    import torch

    from cellkit import predict
    from cellkit.config import load_run_config, save_config

    cfg = load_run_config(run)  # the trained model at 1000 forced detections per image
    detections = SMOKE["detections"] if smoke else 1000
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    if smoke:
        from cellkit.config import apply_overrides

        apply_overrides(cfg, SMOKE["test"])
    save_config(cfg, run)
    predictor = predict.load_ensemble([run], tta=True)
    listed = predict.list_images(images)[:n_images]
    out = run.parent / "tta_store"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        predictor.predict(predict.read_image(listed[0][1], cfg.INPUT.FORMAT), listed[0][0])  # warm-up: cudnn, allocator
    res = predict.predict_images(predictor, listed, out, {"fold": None, "images": str(images)}, progress=False)
    from cellkit import predictions

    counts = [len(p) for p in predictions.iter_dir(out)]
    out_res = {"passes": predictor.n_passes, "images": res["written"], "s_per_img": res["seconds"] / res["written"],
               "detections_per_img": statistics.mean(counts)}
    if torch.cuda.is_available():
        out_res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out_res


def step_r50(data: Path, work: Path, minutes: float, smoke: bool) -> dict:
    import torch

    from cellkit.modeling import build_model
    from cellkit.train import CellkitTrainer

    run = work / "r50"
    opts = ["CELLKIT.TIME_BUDGET_MINUTES", str(minutes), "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD",
            "0", "CELLKIT.EVAL.SCORE_THRESHOLD", "0.2", "CELLKIT.LOG_PERIOD", "20"]
    if smoke:
        opts += ["INPUT.MIN_SIZE_TRAIN", SMOKE["size"][0], "INPUT.MAX_SIZE_TRAIN", SMOKE["size"][1],
                 "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "1", "SOLVER.WARMUP_ITERS", "1",
                 "TEST.DETECTIONS_PER_IMAGE", str(SMOKE["detections"])] + SMOKE["test"] + SMOKE["small"]
    else:
        # random init: the fine-tune LR of a pretrained start is too low, the pretraining one (0.01) learns
        opts += ["SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "100000", "SOLVER.STEPS", "(100000,)",
                 "TEST.DETECTIONS_PER_IMAGE", "500"]
    t = time.perf_counter()
    cfg = _train("r50", data, run, opts, fold=0)
    wall = time.perf_counter() - t
    records = _metrics(run)
    evals = [m for m in records if "cellkit/mAP" in m]
    trained = max((m["iteration"] for m in records if "total_loss" in m), default=-1) + 1
    torch.manual_seed(0)
    untrained = CellkitTrainer.test(cfg, build_model(cfg))["cellkit"]
    return {"iters": trained, "wall_s": wall, "val_mAP": evals[-1]["cellkit/mAP"] if evals else float("nan"),
            "untrained_mAP": untrained["mAP"], "val_images": untrained["n_images"]}


def smoke_data(work: Path) -> Path:
    from cellkit.synth import synth_dataset

    return Path(synth_dataset(work / "synth", 6, seed=0, n_test=2))


def table(res: dict) -> str:
    p, t, r = res["paper_train"], res["tta"], res["r50"]
    mem = lambda d: f"{d['peak_gpu_gib']:.1f} GiB" if "peak_gpu_gib" in d else "n/a (CPU)"  # noqa: E731
    rows = [
        ("paper train", f"s/iter ({p['iters']} iters, batch {p['batch']}, {p['size']}, AMP {p['amp']}, "
                        f"{p['device']})", f"{p['s_per_iter']:.2f}"),
        ("paper train", "peak GPU memory", mem(p)),
        ("paper TTA", f"s/img ({t['passes']} passes, {t['detections_per_img']:.0f} detections/img, "
                      f"{t['images']} images)", f"{t['s_per_img']:.2f}"),
        ("paper TTA", "peak GPU memory", mem(t)),
        ("r50 from scratch", f"val mAP after {r['iters']} iters ({r['wall_s'] / 60:.1f} min, "
                             f"{r['val_images']} val images)", f"{r['val_mAP']:.4f}"),
        ("r50 from scratch", "untrained val mAP (random init)", f"{r['untrained_mAP']:.4f}"),
    ]
    lines = ["| step | figure | value |", "|---|---|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the same steps, tiny, on the CPU")
    p.add_argument("--data", help="competition-layout folder (default: the carried .gpu/data/sartorius; "
                                  "--smoke: 6 synthetic images)")
    p.add_argument("--iters", type=int, default=30, help="paper training iterations (default 30; smoke 3)")
    p.add_argument("--tta-images", type=int, default=3)
    p.add_argument("--r50-minutes", type=float, default=3.0)
    p.add_argument("--work", help="working folder (default: a temp dir)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --smoke for the CPU smoke run)")
    work = Path(args.work or tempfile.mkdtemp(prefix="cellkit_gpu_check_"))
    data = Path(args.data) if args.data else (smoke_data(work) if args.smoke else REPO / ".gpu" / "data" / "sartorius")
    if not (data / "train.csv").is_file():
        raise SystemExit(f"gpu_check: {data} has no train.csv (build the bundle: python benchmarks/gpu_bundle.py)")
    iters = 3 if args.smoke and args.iters == 30 else args.iters  # detectron2 times iterations from the 3rd on
    t0 = time.perf_counter()
    res = {}
    res["paper_train"], run = step_paper_train(data, work, iters, args.smoke)
    print(f"gpu_check: paper training done ({time.perf_counter() - t0:.0f} s)", flush=True)
    res["tta"] = step_tta(run, data / "train", args.smoke, 1 if args.smoke else args.tta_images)
    print(f"gpu_check: TTA done ({time.perf_counter() - t0:.0f} s)", flush=True)
    res["r50"] = step_r50(data, work, 0.0 if args.smoke else args.r50_minutes, args.smoke)
    res["total_s"] = time.perf_counter() - t0
    res["torch"] = torch.__version__
    res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU smoke)"
    print(f"gpu_check: {res['gpu']}, torch {res['torch']}, {res['total_s']:.0f} s in all")
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
