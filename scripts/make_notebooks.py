#!/usr/bin/env python3
"""Generate ``notebooks/01_eda.ipynb`` .. ``06_submission.ipynb`` (and the optional ``04b_pseudo_labels.ipynb``, not
part of :data:`cellkit.chain.NOTEBOOKS`) with nbformat, so they stay consistent.

Every notebook: a title cell, a ``parameters`` cell (one comment per parameter: ``papermill --help-notebook`` shows
them), the same setup cells (cellkit importable, missing packages installed, environment and paths resolved and
checked, so a wrong parameter fails in the first cells), then short cells that each call cellkit. Notebooks are
written without outputs and with stable cell ids, so regenerating them changes nothing unless this script changed.

Usage:
    python scripts/make_notebooks.py            # write notebooks/
    python scripts/make_notebooks.py --check    # exit 1 when notebooks/ differs from what this script writes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ shared pieces
P_DATA = ("DATA_DIR", "", "competition-layout folder (train.csv, train/, test/); empty for auto: the "
                          "competition's mount on Kaggle, data/demo locally")
P_OUT = ("OUT_DIR", "", "run directory every artifact goes to; empty for auto: /kaggle/working/cellkit-run on Kaggle, "
                        "runs/demo locally")
P_PRESET = ("PRESET", "demo", "model preset: demo (CPU minutes), r50, paper (the seed's X152), or a YAML path")
P_ITER = ("ITERATIONS", 0, "training iterations (0 keeps the preset's SOLVER.MAX_ITER)")
P_DEVICE = ("DEVICE", "auto", "auto (cuda when available), cpu, cuda or cuda:N")
P_SMOKE = ("SMOKE", False, "tiny run for CI: few images, few iterations, small sizes")
P_WHEELS = ("WHEELS_DIR", "", "folder of offline wheels (make wheels) to install missing packages from; empty for the "
                              "cellkit-wheels dataset on Kaggle")
P_SOURCE = ("CELLKIT_SOURCE", "", "pip arguments that install cellkit where it is missing (Colab), e.g. "
                                  "-e /content/cellkit after a git clone")
P_BUDGET = ("TIME_BUDGET_MINUTES", 0, "minutes this session may train (0 for no limit): training stops cleanly "
                                     "when they are spent and the next session resumes it")
P_GPUS = ("NUM_GPUS", 1, "GPUs to train on (cellkit train --num-gpus; 2 on Kaggle's GPU T4 x2)")
P_RESUME = ("RESUME_DIR", "", "an earlier session's output to continue (its runs with last_checkpoint); empty for "
                              "auto: searched under the Kaggle inputs; 'none' for a fresh start")
SETUP_PARAMS = [P_WHEELS, P_SOURCE]

BOOTSTRAP = '''\
# Setup 1/2: cellkit importable. Locally `make install` did it; on Kaggle it comes offline from the wheels dataset,
# on Colab from CELLKIT_SOURCE.
import glob, importlib.util, os, shlex, subprocess, sys
if importlib.util.find_spec("cellkit") is None:
    kaggle_input = os.path.join(os.environ.get("CELLKIT_KAGGLE_ROOT") or "/kaggle", "input")
    found = [WHEELS_DIR] if WHEELS_DIR else sorted(
        {os.path.dirname(p) for p in glob.glob(os.path.join(kaggle_input, "**", "cellkit-*.whl"), recursive=True)})
    if found:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", found[0], "cellkit"],
                       check=True)
    elif CELLKIT_SOURCE:
        subprocess.run([sys.executable, "-m", "pip", "install", *shlex.split(CELLKIT_SOURCE)], check=True)
    else:
        raise ModuleNotFoundError("cellkit is not installed: run `make install` (local), attach the cellkit-wheels "
                                  "dataset (Kaggle) or set CELLKIT_SOURCE (Colab)")'''


def setup_cell(lines: str) -> str:
    """Setup 2/2: environment, missing packages, then the notebook's own path checks (``lines``)."""
    return ("# Setup 2/2: where we run, what is missing, and every path parameter checked before any work.\n"
            "from cellkit import chain, runtime\n"
            "from cellkit.chain import command\n\n"
            "env = runtime.detect_environment()\n"
            "runtime.install_missing(env, WHEELS_DIR)\n" + lines)


def parameters_source(params: list[tuple[str, object, str]]) -> str:
    """The ``parameters`` cell: one assignment per line with its help as a trailing comment."""
    width = max(len(f"{name}: {type(value).__name__} = {value!r}") for name, value, _ in params)
    lines = ["# Parameters (papermill -p NAME VALUE; `papermill --help-notebook` lists them)."]
    for name, value, comment in params:
        if "=" in comment:  # papermill's parameter inference skips a line holding a second "="
            raise ValueError(f"parameter {name}: its comment must not contain '='")
        value_text = f'"{value}"' if isinstance(value, str) else repr(value)
        lines.append(f"{f'{name}: {type(value).__name__} = {value_text}':<{width + 1}} # {comment}")
    return "\n".join(lines)


def notebook(stem: str, title: str, intro: str, params: list, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """Assemble one notebook: title, parameters, bootstrap, then ``cells`` (``("md"|"code", source)``)."""
    nb = new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    all_cells = [new_markdown_cell(f"# {title}\n\n{intro}")]
    all_cells.append(new_code_cell(parameters_source(params + SETUP_PARAMS), metadata={"tags": ["parameters"]}))
    all_cells.append(new_code_cell(BOOTSTRAP))
    for kind, source in cells:
        all_cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    for i, cell in enumerate(all_cells):
        cell.id = f"{stem.replace('_', '-')}-{i:02d}"
    nb.cells = all_cells
    return nb


RUN_HINT = ("Run headless from the repository root: `papermill notebooks/{stem}.ipynb out.ipynb -p DATA_DIR data/demo`"
            " (or the whole chain: `make demo`). Artifacts go to `OUT_DIR`.")

# ------------------------------------------------------------------------------------------------ 01 EDA
EDA = notebook(
    "01_eda", "01 · Exploratory data analysis",
    "Images and cells per cell type, cell-area distributions, masks over images, and a label audit (suspicious "
    "annotations, the worst images).\n\n" + RUN_HINT.format(stem="01_eda"),
    [P_DATA, P_OUT, ("N_OVERLAYS", 2, "images per cell type drawn with their masks"),
     ("N_AUDIT", 6, "most suspicious images of the label audit drawn with their flags"), P_SMOKE,
     ("SOURCE_FORMAT", "", "a dataset in its own format, imported into DATA_DIR first (cellkit import; once): csv, "
                           "coco or masks; empty when DATA_DIR is in the kit's layout already"),
     ("SOURCE", "", "that dataset: the CSV, the COCO json(s) comma-separated, or the mask folder"),
     ("SOURCE_IMAGES", "", "its image folder (csv, coco)"),
     ("SOURCE_TEST_IMAGES", "", "its test images (copied to DATA_DIR/test)"),
     ("CLASS_COLUMN", "cell_type", "csv: the class column"),
     ("RLE_ORDER", "", "row or column: the pixel order of its mask strings and submission; empty for the format's "
                       "(masks: column, else row)"),
     ("GROUP_PATTERN", "", "regex whose first group, found in the image id, is the image's group for thresholds and "
                           "CV (LIVECell: ^([A-Za-z0-9]+)_); empty: the group is the class")],
    [
        ("code", setup_cell('if SOURCE_FORMAT:\n'
                            '    chain.import_source(SOURCE_FORMAT, SOURCE, DATA_DIR, SOURCE_IMAGES,\n'
                            '                        SOURCE_TEST_IMAGES, CLASS_COLUMN, RLE_ORDER, GROUP_PATTERN)\n'
                            'data_dir = runtime.resolve_data_dir(DATA_DIR, env)\n'
                            'out_dir = runtime.resolve_out_dir(OUT_DIR, env)\n'
                            'print(f"{env.kind} run | data: {data_dir} | artifacts: {out_dir}")')),
        ("code", "from cellkit import data, viz\n"
                 "from cellkit.schema import schema_of\n\n"
                 "train = data.read_train_csv(data_dir / \"train.csv\")\n"
                 "by_group = schema_of(data_dir).group_frame(train)  # Sartorius: the cell types\n"
                 "viz.type_counts(by_group)"),
        ("md", "## Images and cells per type\nshsy5y images are crowded with small cells, astro cells are large "
               "and branched, cort cells few and round."),
        ("code", "viz.save_figure(viz.plot_type_counts(by_group), out_dir / \"eda\" / \"counts.png\")"),
        ("md", "## Cell areas per type"),
        ("code", "areas = viz.cell_areas(by_group)\n"
                 "viz.save_figure(viz.plot_area_distributions(areas), out_dir / \"eda\" / \"areas.png\")\n"
                 "areas.groupby(\"cell_type\")[\"area\"].describe()"),
        ("md", "## Masks over images"),
        ("code", "ids = viz.sample_images(by_group, per_type=1 if SMOKE else N_OVERLAYS, seed=0)\n"
                 "viz.save_figure(viz.plot_rle_overlays(train, data_dir / \"train\", ids), "
                 "out_dir / \"eda\" / \"overlays.png\")"),
        ("md", "## Label audit\nNear-duplicate annotations (mask IoU >= 0.9), heavy overlaps (>= half of the smaller "
               "mask), empty and tiny masks; once `OUT_DIR/oof` holds out-of-fold predictions (notebook 04; re-run "
               "this one), also cells without a label (missed) and labels without a cell (spurious, misplaced). "
               "Writes `OUT_DIR/audit/` (`audit.csv`: images by score, `instances.csv`: every flag); "
               "`cellkit train --exclude OUT_DIR/audit/audit.csv --exclude-top N` drops the N worst images from "
               "training (not from validation)."),
        ("code", "from cellkit import audit\n\n"
                 "oof_dir, thresholds = out_dir / \"oof\", out_dir / \"thresholds.json\"\n"
                 "result = audit.audit(train, pred_dir=oof_dir if audit.has_predictions(oof_dir) else None,\n"
                 "                     thresholds=thresholds if thresholds.is_file() else None)\n"
                 "audit.write_audit(result, out_dir / \"audit\")\n"
                 "print(f\"{result.summary['n_with_pred']} of {result.summary['n_images']} images with predictions; \"\n"
                 "      f\"flags: {result.summary['flags']}\")\n"
                 "result.images.head(10)[[\"id\", \"cell_type\", \"score\", \"n_labels\", \"flags\"]]"),
        ("md", "## The most suspicious images\nUnflagged annotations outlined in grey, flagged ones filled by kind; "
               "missed cells (no annotation) boxed."),
        ("code", "viz.save_figure(viz.plot_audit(train, data_dir / \"train\", result, n=3 if SMOKE else N_AUDIT),\n"
                 "                out_dir / \"eda\" / \"audit.png\")"),
    ])

# ------------------------------------------------------------------------------------------------ 02 folds
FOLDS = notebook(
    "02_folds", "02 · Cross-validation folds",
    "StratifiedGroupKFold: stratified by cell type, grouped by `sample_id` (by image when absent). Writes "
    "`OUT_DIR/folds.csv`, which the fine-tuning and threshold-search notebooks read.\n\n"
    + RUN_HINT.format(stem="02_folds"),
    [P_DATA, P_OUT, ("K", 5, "number of folds"), ("SEED", 0, "seed of the shuffled split")],
    [
        ("code", setup_cell('data_dir = runtime.resolve_data_dir(DATA_DIR, env)\n'
                            'out_dir = runtime.resolve_out_dir(OUT_DIR, env)\n'
                            'print(f"{env.kind} run | data: {data_dir} | artifacts: {out_dir}")')),
        ("code", "from cellkit import data, folds\n\n"
                 "train = data.read_train_csv(data_dir / \"train.csv\")\n"
                 "table = folds.make_folds(train, k=K, seed=SEED)\n"
                 "folds.write_folds(table, out_dir / \"folds.csv\")"),
        ("md", "## Images per fold and cell type"),
        ("code", "from cellkit import viz\n\nviz.fold_composition(table)"),
    ])

# ------------------------------------------------------------------------------------------------ 03 pretrain
PRETRAIN = notebook(
    "03_pretrain", "03 · Pretraining on LIVECell",
    "The seed pretrains its model on LIVECell (COCO json, its cell-line classes) before fine-tuning on the "
    "competition data. Writes `OUT_DIR/pretrain/` (checkpoints, `metrics.json`); the fine-tuning notebook starts "
    "from its `model_final.pth`. Without LIVECell (the synthetic demo) this notebook skips and says so.\n\n"
    + RUN_HINT.format(stem="03_pretrain"),
    [("LIVECELL_DIR", "", "LIVECell folder (COCO json + images); empty for auto: searched under the inputs, skipped "
                          "when absent; 'none' for skip"),
     ("LIVECELL_JSON", "", "training json inside LIVECELL_DIR; empty for the first livecell*train*.json, "
                           "else the first livecell*.json"),
     ("LIVECELL_IMAGES", "", "folder of the LIVECell images; empty for LIVECELL_DIR/images or LIVECELL_DIR"),
     P_OUT, P_PRESET, P_ITER, P_BUDGET, P_GPUS, P_RESUME,
     ("WEIGHTS", "", "starting checkpoint, a local file (e.g. a model-zoo COCO .pkl); empty for random init"),
     P_DEVICE, P_SMOKE],
    [
        ("code", setup_cell('out_dir = runtime.resolve_out_dir(OUT_DIR, env)\n'
                            'livecell = runtime.resolve_livecell(LIVECELL_DIR, LIVECELL_JSON, LIVECELL_IMAGES, env)\n'
                            'weights = runtime.resolve_artifact(WEIGHTS, env, "WEIGHTS", optional=True)\n'
                            'preset = runtime.pretrain_preset(PRESET)\n'
                            'device = runtime.resolve_device(DEVICE)\n'
                            'clock = runtime.SessionClock(TIME_BUDGET_MINUTES)\n'
                            'print(f"{env.kind} run | LIVECell: {livecell} | preset {preset} on {device} x {NUM_GPUS} | '
                            'artifacts: {out_dir}")')),
        ("md", "## Training\nIn chunks: an earlier session's `pretrain/` (its output attached) is continued with "
               "`--resume`, and training stops cleanly when `TIME_BUDGET_MINUTES` are spent."),
        ("code", "budget = clock.train_args()\n"
                 "if livecell is None:\n"
                 "    print(\"no LIVECell data: pretraining skipped (04_finetune starts from its WEIGHTS)\")\n"
                 "elif budget is None:\n"
                 "    print(\"TIME_BUDGET_MINUTES spent before training: nothing trained\")\n"
                 "else:\n"
                 "    runtime.restore_runs(out_dir, env, [\"pretrain\"], RESUME_DIR)\n"
                 "    command(\"train\", \"--config\", preset, \"--livecell\", livecell.json,\n"
                 "            \"--livecell-images\", livecell.images, \"--out\", out_dir / \"pretrain\",\n"
                 "            \"--resume\", \"--num-gpus\", NUM_GPUS,\n"
                 "            *([\"--livecell-val\", livecell.val_json] if livecell.val_json else []),\n"
                 "            *chain.train_args(device, ITERATIONS, SMOKE, weights), *budget)\n"
                 "    runtime.prune_checkpoints(out_dir / \"pretrain\")  # the last and the best stay\n"
                 "    if clock.spent():\n"
                 "        print(\"time budget spent: attach this output to the next session to continue\")"),
        ("md", "## Training curves"),
        ("code", "from cellkit import viz\n\n"
                 "if livecell is not None:\n"
                 "    viz.save_figure(viz.plot_training_curves(out_dir / \"pretrain\" / \"metrics.json\"),\n"
                 "                    out_dir / \"pretrain\" / \"curves.png\")"),
    ])

# ------------------------------------------------------------------------------------------------ 04 finetune
FINETUNE = notebook(
    "04_finetune", "04 · Fine-tuning per fold and out-of-fold predictions",
    "Trains one model per fold (the fold held out for validation with the competition metric; best checkpoint by "
    "it) into `OUT_DIR/fold<K>/`, plots its loss and validation-metric curves, and predicts the held-out images "
    "into `OUT_DIR/oof/` (mask probabilities kept) for the threshold search.\n\n"
    + RUN_HINT.format(stem="04_finetune"),
    [P_DATA, P_OUT, P_PRESET,
     ("FOLDS", "0", "folds to train, comma-separated (e.g. '0,1'), or 'all'"),
     ("K", 5, "number of folds if folds.csv has to be made here (else 02_folds made it)"),
     P_ITER, P_BUDGET, P_GPUS, P_RESUME,
     ("WEIGHTS", "", "starting checkpoint (local file); empty for OUT_DIR/pretrain/model_final.pth when 03 made one, "
                     "else the cellkit-pretrained dataset on Kaggle, else random init; 'none' for random init"),
     ("TTA", False, "out-of-fold predictions with test-time augmentation (scales x flips); 06_submission "
                    "predicts the test images the same way (thresholds.json carries this choice)"),
     P_DEVICE, P_SMOKE],
    [
        ("code", setup_cell('data_dir = runtime.resolve_data_dir(DATA_DIR, env)\n'
                            'out_dir = runtime.resolve_out_dir(OUT_DIR, env)\n'
                            'runtime.check_preset(PRESET)\n'
                            'device = runtime.resolve_device(DEVICE)\n'
                            'weights = runtime.resolve_artifact(WEIGHTS, env, "WEIGHTS", out_dir / "pretrain" / '
                            '"model_final.pth",\n'
                            '                                  pattern="model_final.pth", '
                            'prefer=runtime.PRETRAINED_DATASET, optional=True,\n'
                            '                                  exclude="fold*")  # no fold of an earlier session\n'
                            'clock = runtime.SessionClock(TIME_BUDGET_MINUTES)\n'
                            'print(f"{env.kind} run | data: {data_dir} | preset {PRESET} on {device} x {NUM_GPUS} | '
                            'weights: {weights or \'random init\'} | artifacts: {out_dir}")')),
        ("code", "from cellkit import folds\n\n"
                 "# an earlier session's runs (its output attached): continued below with --resume\n"
                 "runtime.restore_runs(out_dir, env, [f\"fold{k}\" for k in range(K)], RESUME_DIR)\n"
                 "folds_csv = out_dir / \"folds.csv\"\n"
                 "if not folds_csv.exists():\n"
                 "    command(\"folds\", data_dir / \"train.csv\", \"--k\", K, \"--out\", folds_csv)\n"
                 "fold_list = chain.parse_folds(FOLDS, folds.read_folds(folds_csv))\n"
                 "fold_list"),
        ("md", "## Training\nOne run per fold; `--resume` picks up an interrupted run from its last checkpoint. "
               "Training stops cleanly when `TIME_BUDGET_MINUTES` are spent: the folds left (and the one stopped) "
               "continue in the next session, with this output attached."),
        ("code", "trained = []  # folds trained to their end in this session\n"
                 "for k in fold_list:\n"
                 "    budget = clock.train_args()\n"
                 "    if budget is None:\n"
                 "        print(f\"time budget spent: folds from {k} on are left for the next session\")\n"
                 "        break\n"
                 "    command(\"train\", \"--config\", PRESET, \"--data\", data_dir, \"--folds\", folds_csv,\n"
                 "            \"--fold\", k, \"--out\", out_dir / f\"fold{k}\", \"--resume\", \"--num-gpus\", NUM_GPUS,\n"
                 "            *chain.train_args(device, ITERATIONS, SMOKE, weights), *budget)\n"
                 "    runtime.prune_checkpoints(out_dir / f\"fold{k}\")  # the last and the best stay\n"
                 "    if clock.spent():\n"
                 "        print(f\"time budget spent during fold {k}: it resumes in the next session\")\n"
                 "        break\n"
                 "    trained.append(k)\n"
                 "trained"),
        ("md", "## Loss and validation-metric curves"),
        ("code", "from cellkit import viz\n\n"
                 "for k in trained:\n"
                 "    viz.save_figure(viz.plot_training_curves(out_dir / f\"fold{k}\" / \"metrics.json\"),\n"
                 "                    out_dir / f\"fold{k}\" / \"curves.png\")"),
        ("md", "## Out-of-fold predictions\nEach fold trained to its end predicts its held-out images."),
        ("code", "for k in trained:\n"
                 "    command(\"predict\", \"--run\", out_dir / f\"fold{k}\", \"--fold\", k, \"--data\", data_dir,\n"
                 "            \"--folds-csv\", folds_csv, \"--out\", out_dir / \"oof\", \"--device\", device,\n"
                 "            *([\"--tta\"] if TTA else []))"),
    ])

# ------------------------------------------------------------------------------------------------ 05 search
SEARCH = notebook(
    "05_threshold_search", "05 · Class-wise threshold search",
    "Per cell type, the score threshold, pixel threshold and minimum area (and the three options) that maximise the "
    "competition metric on the out-of-fold predictions. Writes `OUT_DIR/thresholds.json` and the CV score, then its "
    "tables per fold and class, naive vs post-processed (`OUT_DIR/cv.json`, `OUT_DIR/cv.png`).\n\n"
    + RUN_HINT.format(stem="05_threshold_search"),
    [P_DATA, P_OUT, ("OOF_DIR", "", "out-of-fold predictions; empty for OUT_DIR/oof (from 04_finetune)"), P_SMOKE],
    [
        ("code", setup_cell('data_dir = runtime.resolve_data_dir(DATA_DIR, env)\n'
                            'out_dir = runtime.resolve_out_dir(OUT_DIR, env)\n'
                            'oof_dir = runtime.resolve_artifact(OOF_DIR, env, "OOF_DIR", out_dir / "oof")\n'
                            'print(f"{env.kind} run | OOF: {oof_dir} | artifacts: {out_dir}")')),
        ("code", "command(\"search\", \"--pred\", oof_dir, \"--truth\", data_dir / \"train.csv\",\n"
                 "        \"--out\", out_dir / \"thresholds.json\")"),
        ("md", "## Metric against each threshold, per class\nThe other thresholds at their chosen values; red: "
               "chosen, gray: the seed's defaults."),
        ("code", "from IPython.display import Image\n\n"
                 "Image(filename=str(out_dir / \"thresholds.png\"))  # written by `cellkit search` next to the json"),
        ("md", "## CV score\nThe competition metric on the out-of-fold images, after the searched post-processing."),
        ("code", "print(chain.format_cv(chain.cv_summary(out_dir)))"),
        ("md", "## CV per fold and class: naive vs post-processed\nThe seed paper's Tables 1 and 2: the out-of-fold "
               "images scored with the seed's naive post-processing (score 0.5, mask 0.5, min area 0) and with the "
               "searched one, per fold and overall. Writes `OUT_DIR/cv.json` and `OUT_DIR/cv.png`; the tables are "
               "markdown."),
        ("code", "command(\"cv\", out_dir, \"--pred\", oof_dir, \"--truth\", data_dir / \"train.csv\",\n"
                 "        \"--folds\", out_dir / \"folds.csv\", \"--thresholds\", out_dir / \"thresholds.json\")"),
        ("code", "Image(filename=str(out_dir / \"cv.png\"))  # written by `cellkit cv`"),
    ])

# ------------------------------------------------------------------------------------------------ 06 submission
SUBMISSION = notebook(
    "06_submission", "06 · Submission",
    "Predicts the test images with the ensemble of every fold model (box-first fusion: every model's boxes of every "
    "pass merged, mask probabilities averaged), made the way the out-of-fold predictions the thresholds were fitted "
    "on were made (the passes, fusion and detections per image in `thresholds.json`), applies the searched "
    "class-wise post-processing and writes `OUT_DIR/submission.csv`, validated. On Kaggle this is the offline "
    "submission kernel (`kernels/submission`): packages come from the wheels dataset, the models and thresholds "
    "from the weights dataset.\n\n"
    + RUN_HINT.format(stem="06_submission"),
    [("DATA_DIR", "", "folder with test/ (the competition layout); empty for auto: the competition's mount on Kaggle, "
                      "data/demo locally"),
     P_OUT,
     ("RUNS", "", "trained model runs (config.yaml + model_*.pth), comma-separated or globs; empty for every "
                  "OUT_DIR/fold<K>, else every fold of the cellkit-weights dataset (make weights) on Kaggle"),
     ("THRESHOLDS", "", "thresholds.json of the threshold search; empty for OUT_DIR/thresholds.json, else the one "
                        "in the weights dataset"),
     P_DEVICE, ("N_OVERLAYS", 3, "test images drawn with their predicted masks"), P_SMOKE],
    [
        ("code", setup_cell('data_dir = runtime.resolve_data_dir(DATA_DIR, env, need="test")\n'
                            'out_dir = runtime.resolve_out_dir(OUT_DIR, env)\n'
                            'runs = runtime.find_weights_runs(env, RUNS, chain.fold_runs(out_dir))  # 04\'s folds\n'
                            'thresholds = runtime.resolve_artifact(THRESHOLDS, env, "THRESHOLDS", out_dir / '
                            '"thresholds.json",\n'
                            '                                     pattern="thresholds.json", '
                            'prefer=runtime.WEIGHTS_DATASET)\n'
                            'device = runtime.resolve_device(DEVICE)\n'
                            'print(f"{env.kind} run | test images: {data_dir / \'test\'} | {len(runs)} model(s): '
                            '{[str(r) for r in runs]} | thresholds: {thresholds} | {device}")')),
        ("md", "## Test predictions\nThe passes, fusion and detections per image come from `thresholds.json` "
               "(`--like`): the test store is made as the out-of-fold store the thresholds were fitted on, and "
               "`submit` checks it."),
        ("code", "pred_dir = out_dir / \"test_pred\"\n"
                 "command(\"predict\", *[arg for run in runs for arg in (\"--run\", run)], \"--images\", "
                 "data_dir / \"test\",\n"
                 "        \"--out\", pred_dir, \"--like\", thresholds, \"--device\", device)"),
        ("code", "submission_csv = out_dir / \"submission.csv\"\n"
                 "command(\"submit\", \"--pred\", pred_dir, \"--thresholds\", thresholds,\n"
                 "        \"--images\", data_dir / \"test\", \"--out\", submission_csv)\n"
                 "command(\"validate\", submission_csv, \"--images\", data_dir / \"test\", \"--dataset\", pred_dir)"),
        ("md", "## Predicted masks over the test images"),
        ("code", "from cellkit import viz\n"
                 "from cellkit.schema import schema_of\n"
                 "from cellkit.submission import read_submission\n\n"
                 "schema = schema_of(pred_dir)  # the dataset's columns and RLE order\n"
                 "submission = read_submission(submission_csv, data_dir / \"test\", schema.submission_columns, "
                 "schema.rle_order)\n"
                 "ids = sorted(submission[\"id\"].unique())[: 1 if SMOKE else N_OVERLAYS]\n"
                 "viz.save_figure(viz.plot_rle_overlays(submission, data_dir / \"test\", ids, column=\"predicted\"),\n"
                 "                out_dir / \"submission.png\")\n"
                 "viz.masks_per_image(submission).to_frame()"),
    ])

# ------------------------------------------------------------------------------------------------ 04b pseudo-labels
PSEUDO = notebook(
    "04b_pseudo_labels", "04b · Pseudo-labels (optional, not part of `make demo`)",
    "After 04 and 05: per fold K, predicts the unlabeled pool with the fold-K model only (it held fold K out, so "
    "fold K's CV stays honest), made as the out-of-fold predictions `thresholds.json` was fitted on; turns them "
    "into pseudo-labels with `cellkit pseudo` (confidence screening) into `OUT_DIR/pl<K>/`; retrains fold K on "
    "train + pseudo-labels (`RECIPE` mixed) or additionally fine-tunes that on train alone (`RECIPE` staged) into "
    "`OUT_DIR/pl_fold<K>/`; predicts fold K's held-out images into `OUT_DIR/oof_pl/` and searches thresholds on "
    "them (`OUT_DIR/pl_thresholds.json`) to compare the CV score with 05's.\n\n"
    + RUN_HINT.format(stem="04b_pseudo_labels"),
    [P_DATA, P_OUT, P_PRESET,
     ("POOL_DIR", "", "folder of unlabeled images; empty for DATA_DIR/train_semi_supervised"),
     ("FOLDS", "0", "folds to retrain, comma-separated (e.g. '0,1'), or 'all'; each needs OUT_DIR/fold<K> from 04"),
     ("RECIPE", "mixed", "mixed (train + pseudo-labels in one run) or staged (then fine-tuned on train alone)"),
     ("EXTRA_WEIGHT", 1.0, "repeat factor of a pseudo-labelled image relative to a real one"),
     ("MIN_SHARE", 0.8, "screening: minimal vote share of an image's cell type"),
     ("MIN_MEAN_SCORE", "0.6", "screening: minimal mean mask score of an image, one number or per-class pairs "
                               "as cellkit pseudo --min-mean-score takes them"),
     ("MIN_MASK_SCORE", "0.5", "screening: minimal score of a kept mask (on top of thresholds.json)"),
     ("SCREEN", True, "confidence screening (False: every mask submit would write)"),
     P_ITER, P_DEVICE, P_SMOKE],
    [
        ("code", setup_cell('data_dir = runtime.resolve_data_dir(DATA_DIR, env)\n'
                            'out_dir = runtime.resolve_out_dir(OUT_DIR, env)\n'
                            'runtime.check_preset(PRESET)\n'
                            'device = runtime.resolve_device(DEVICE)\n'
                            'pool_dir = runtime.resolve_input(POOL_DIR, env, "POOL_DIR") if POOL_DIR else '
                            'data_dir / "train_semi_supervised"\n'
                            'if not pool_dir.is_dir():\n'
                            '    raise FileNotFoundError(f"POOL_DIR: {pool_dir} is not a folder of unlabeled images")\n'
                            'if RECIPE not in ("mixed", "staged"):\n'
                            '    raise ValueError(f"RECIPE={RECIPE!r}: expected mixed or staged")\n'
                            'thresholds = runtime.resolve_artifact("", env, "thresholds.json (05)", '
                            'out_dir / "thresholds.json")\n'
                            'print(f"{env.kind} run | data: {data_dir} | pool: {pool_dir} | recipe {RECIPE} | '
                            'preset {PRESET} on {device} | artifacts: {out_dir}")')),
        ("code", "from cellkit import folds\n\n"
                 "folds_csv = out_dir / \"folds.csv\"\n"
                 "fold_list = chain.parse_folds(FOLDS, folds.read_folds(folds_csv))\n"
                 "missing = [k for k in fold_list if not (out_dir / f\"fold{k}\" / \"config.yaml\").is_file()]\n"
                 "if missing:\n"
                 "    raise FileNotFoundError(f\"FOLDS: no run {out_dir}/fold<K> from 04_finetune for folds {missing}\")\n"
                 "fold_list"),
        ("md", "## Pseudo-labels per fold\nThe fold-K model alone labels the pool: an ensemble of every fold has seen "
               "fold K's validation images, and its labels would leak them into fold K's CV."),
        ("code", "screen = [\"--no-screen\"] if not SCREEN else [\"--min-share\", MIN_SHARE, \"--min-mean-score\", "
                 "MIN_MEAN_SCORE,\n"
                 "                                           \"--min-mask-score\", MIN_MASK_SCORE]\n"
                 "for k in fold_list:\n"
                 "    command(\"predict\", \"--run\", out_dir / f\"fold{k}\", \"--images\", pool_dir,\n"
                 "            \"--out\", out_dir / f\"pool_pred{k}\", \"--like\", thresholds, \"--device\", device)\n"
                 "    command(\"pseudo\", \"--pred\", out_dir / f\"pool_pred{k}\", \"--thresholds\", thresholds,\n"
                 "            \"--images\", pool_dir, \"--out\", out_dir / f\"pl{k}\", \"--overwrite\", *screen)"),
        ("md", "## Retraining per fold\n`mixed`: train + pseudo-labels in one run. `staged`: that run, then a "
               "fine-tune on train alone from its `model_final.pth`."),
        ("code", "for k in fold_list:\n"
                 "    common = [\"--config\", PRESET, \"--data\", data_dir, \"--folds\", folds_csv, \"--fold\", k,\n"
                 "              \"--resume\", *chain.train_args(device, ITERATIONS, SMOKE)]\n"
                 "    first = out_dir / (f\"pl_fold{k}\" if RECIPE == \"mixed\" else f\"pl_stage1_fold{k}\")\n"
                 "    command(\"train\", *common, \"--out\", first, \"--extra-data\", out_dir / f\"pl{k}\",\n"
                 "            \"--extra-weight\", EXTRA_WEIGHT)\n"
                 "    if RECIPE == \"staged\":\n"
                 "        command(\"train\", *common, \"--out\", out_dir / f\"pl_fold{k}\", \"--weights\", "
                 "first / \"model_final.pth\")"),
        ("md", "## CV with pseudo-labels\nOut-of-fold predictions of the retrained folds, made as 04's, and the "
               "threshold search on them: compare with 05's CV score over the same folds."),
        ("code", "from cellkit import postprocess\n\n"
                 "for k in fold_list:\n"
                 "    command(\"predict\", \"--run\", out_dir / f\"pl_fold{k}\", \"--fold\", k, \"--data\", data_dir,\n"
                 "            \"--folds-csv\", folds_csv, \"--out\", out_dir / \"oof_pl\", \"--like\", thresholds,\n"
                 "            \"--device\", device)\n"
                 "command(\"search\", \"--pred\", out_dir / \"oof_pl\", \"--truth\", data_dir / \"train.csv\",\n"
                 "        \"--out\", out_dir / \"pl_thresholds.json\")\n"
                 "print(\"with pseudo-labels:\", chain.format_cv(postprocess.load_thresholds(out_dir / "
                 "\"pl_thresholds.json\")))\n"
                 "print(\"without (05, every fold of oof/):\", chain.format_cv(chain.cv_summary(out_dir)))"),
    ])

NOTEBOOKS = {"01_eda": EDA, "02_folds": FOLDS, "03_pretrain": PRETRAIN, "04_finetune": FINETUNE,
             "04b_pseudo_labels": PSEUDO, "05_threshold_search": SEARCH, "06_submission": SUBMISSION}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "notebooks")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a notebook is stale")
    args = parser.parse_args(argv)
    stale = []
    for stem, nb in NOTEBOOKS.items():
        nbformat.validate(nb)
        path = args.out / f"{stem}.ipynb"
        text = nbformat.writes(nb) + "\n"
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)
    if stale:
        print("stale (run scripts/make_notebooks.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
