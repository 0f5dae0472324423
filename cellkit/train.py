"""Training: a ``DefaultTrainer`` subclass with the seed's augmentations, competition-metric validation, best
checkpoint, early stopping and resumable runs.

A run directory (``OUTPUT_DIR``) holds ``config.yaml`` (the resolved config), ``folds.csv`` (when it was written
here), ``log.txt``, ``metrics.json`` (losses, learning rate and ``cellkit/*`` validation metrics per iteration),
``model_XXXXXXX.pth`` / ``model_final.pth`` (full training state: model, optimizer, scheduler, iteration, hook
states), ``last_checkpoint`` and ``model_best.pth`` (best ``CELLKIT.EVAL.METRIC``). ``--resume`` reloads the last
checkpoint: same iteration count, same LR schedule, same best-metric and early-stopping state.

Fail safety: all of the data is checked before any work (:func:`check_data`, :mod:`cellkit.datacheck`); checkpoints
are written atomically and only the newest ``CELLKIT.KEEP_CHECKPOINTS`` periodic ones are kept
(:class:`CellkitPeriodicCheckpointer`); a run that raises gets a ``FAILED`` marker (:func:`train_worker`) and never a
``model_final.pth``, and skips detectron2's end-of-training evaluation and best checkpoint.

Hook order (after each step): LR scheduler, evaluation on the held-out fold, best checkpoint, early stopping, then the
periodic checkpoint (so a checkpoint holds the evaluation of its own iteration) and the log writers (progress and
ETA from detectron2's ``CommonMetricPrinter``).
"""
import logging
import os
import time
from pathlib import Path

import torch

from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from cellkit import compat, gtmasks, rundir, schema
from cellkit.config import resolve_runtime, save_config
from cellkit.evaluation import CellkitEvaluator
from cellkit.modeling import CellkitCheckpointer
from cellkit.predict import read_image
from cellkit.rundir import FAILED as FAILED_NAME, failure_reason, run_weights as best_weights
from cellkit.tta import CellTTA

logger = logging.getLogger(__name__)

__all__ = [
    "build_train_augmentations", "CellkitDatasetMapper", "CellkitTrainer", "CellkitBestCheckpointer",
    "EarlyStopping", "TimeBudget", "register_datasets", "prepare_config", "train_worker", "best_weights",
    "CellkitPeriodicCheckpointer", "FAILED_NAME", "failure_reason", "EXTRA_NAME", "extra_repeat_factors",
]

TRAIN_NAME = "cellkit_train"
VAL_NAME = "cellkit_val"
#: Dataset name of ``CELLKIT.DATA.EXTRA_DATA`` (e.g. pseudo-labels): a second entry of ``DATASETS.TRAIN`` only.
EXTRA_NAME = "cellkit_extra"


# ------------------------------------------------------------------------------------------------- augmentations
def build_train_augmentations(cfg) -> list:
    """The seed's training augmentations, in application order (cheap ones at native size, resize last).

    Horizontal flip, vertical flip, small rotation (no canvas expansion), brightness, then the multi-scale
    ``ResizeShortestEdge`` (``INPUT.MIN_SIZE_TRAIN`` x ``MAX_SIZE_TRAIN``, ``MIN_SIZE_TRAIN_SAMPLING``).
    """
    a = cfg.CELLKIT.AUG
    augs = [T.RandomFlip(prob=prob, horizontal=horizontal, vertical=not horizontal)
            for prob, horizontal in ((a.HFLIP_PROB, True), (a.VFLIP_PROB, False)) if prob > 0]
    if a.ROTATION > 0 and a.ROTATION_PROB > 0:
        augs.append(T.RandomApply(T.RandomRotation([-a.ROTATION, a.ROTATION], expand=False, sample_style="range"),
                                  prob=a.ROTATION_PROB))
    if a.BRIGHTNESS > 0 and a.BRIGHTNESS_PROB > 0:
        augs.append(T.RandomApply(T.RandomBrightness(1 - a.BRIGHTNESS, 1 + a.BRIGHTNESS), prob=a.BRIGHTNESS_PROB))
    augs.append(T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                     cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING))
    return augs


class CellkitDatasetMapper(DatasetMapper):
    """``DatasetMapper`` with :func:`build_train_augmentations` and ground-truth masks kept at their boxes.

    Output per image: ``image`` uint8 tensor ``(3, H', W')`` (grayscale read as BGR) and ``instances`` with
    ``gt_boxes`` recomputed from the augmented masks (a rotated box would be loose), ``gt_classes`` and
    ``gt_masks``; instances emptied by the rotation are dropped. ``gt_masks`` is a :class:`cellkit.gtmasks.CropMasks`
    (each cell a bool crop of its box, never a full image per cell) for RLE annotations, and detectron2's
    ``PolygonMasks`` when every annotation of the image is a polygon (LIVECell), whose mask targets are rasterised
    per proposal. Both give the mask head its ``crop_and_resize`` targets.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = build_train_augmentations(cfg)
            ret["recompute_boxes"] = bool(cfg.MODEL.MASK_ON)
        return ret

    def __call__(self, dataset_dict):
        """detectron2's mapping; an image that cannot be read (corrupt, truncated) raises one ValueError naming it."""
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, EOFError) as exc:  # PIL's errors for broken files (UnidentifiedImageError too)
            raise ValueError(f"{dataset_dict.get('file_name')}: cannot read image ({exc})") from None

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        if not self.use_instance_mask or self.use_keypoint:
            return super()._transform_annotations(dataset_dict, transforms, image_shape)
        from detectron2.structures import Instances

        annos = [a for a in dataset_dict["annotations"] if a.get("iscrowd", 0) == 0]
        if annos and all(isinstance(a["segmentation"], list) for a in annos):
            return self._transform_polygons(dataset_dict, transforms, image_shape)
        dataset_dict.pop("annotations")
        masks = gtmasks.transform_annotation_masks([a["segmentation"] for a in annos], dataset_dict["height"],
                                                   dataset_dict["width"], transforms)
        if masks.image_size != tuple(image_shape):
            raise ValueError(f"{dataset_dict.get('file_name')}: transformed masks {masks.image_size} do not match "
                             f"the transformed image {tuple(image_shape)}")
        instances = Instances(image_shape, gt_boxes=masks.get_bounding_boxes(),
                              gt_classes=torch.tensor([int(a["category_id"]) for a in annos], dtype=torch.int64),
                              gt_masks=masks)
        dataset_dict["instances"] = instances[masks.nonempty()]  # tight boxes: empty mask <=> empty box

    def _transform_polygons(self, dataset_dict, transforms, image_shape):
        """detectron2's own polygon path (``PolygonMasks``), boxes from the transformed polygons clipped to the image."""
        fmt = self.instance_mask_format
        self.instance_mask_format = "polygon"
        try:
            super()._transform_annotations(dataset_dict, transforms, image_shape)
        finally:
            self.instance_mask_format = fmt
        instances = dataset_dict["instances"]
        instances.gt_boxes.clip(tuple(image_shape))
        dataset_dict["instances"] = instances[instances.gt_boxes.nonempty()]


# ----------------------------------------------------------------------------------------------------- hooks
class _AfterCompletedTraining:
    """Mixin of a hook whose ``after_train`` runs only when the run did not raise (``trainer.completed``)."""

    def after_train(self):
        if self.trainer.completed:
            super().after_train()


class CellkitEvalHook(_AfterCompletedTraining, hooks.EvalHook):
    """detectron2's ``EvalHook`` without the final evaluation of a run that raised (``trainer.completed``)."""


class CellkitBestCheckpointer(_AfterCompletedTraining, hooks.BestCheckpointer):
    """detectron2's ``BestCheckpointer`` whose best value survives ``--resume`` (saved in the training state), and
    without the final best check of a run that raised (``trainer.completed``)."""

    def state_dict(self):
        return {"best_metric": self.best_metric, "best_iter": self.best_iter}

    def load_state_dict(self, state):
        self.best_metric = state.get("best_metric")
        self.best_iter = state.get("best_iter")


class EarlyStopping(HookBase):
    """Stop training when ``metric`` has not improved by more than ``min_delta`` for ``patience`` evaluations.

    Reads the metric the ``EvalHook`` put into the event storage at the same iteration; the decision is taken on
    the main process and shared with every process. State (best, bad evaluations, stopped) is checkpointed.
    """

    def __init__(self, eval_period: int, metric: str, patience: int, min_delta: float = 0.0):
        self._period, self._metric, self._patience, self._min_delta = eval_period, metric, patience, min_delta
        self.load_state_dict({})  # no best yet, no bad evaluation, not stopped

    def state_dict(self):
        return {"best": self.best, "bad_evals": self.bad_evals, "stopped_at": self.stopped_at}

    def load_state_dict(self, state):
        self.best, self.bad_evals, self.stopped_at = state.get("best"), state.get("bad_evals", 0), state.get("stopped_at")

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period <= 0 or next_iter % self._period or next_iter >= self.trainer.max_iter:
            return
        stop = False
        if comm.is_main_process():
            value = self.trainer.storage.latest().get(self._metric)
            if value is not None and value[1] == self.trainer.iter:
                v = float(value[0])
                if self.best is None or v > self.best + self._min_delta:
                    self.best, self.bad_evals = v, 0
                else:
                    self.bad_evals += 1
                stop = self.bad_evals >= self._patience
        if comm.all_gather(stop)[0]:
            self.stopped_at = self.trainer.iter
            logger.info("cellkit: early stopping at iteration %d: %s did not improve on %.4f for %d evaluations",
                        next_iter, self._metric, self.best, self.bad_evals)
            self.trainer.request_stop()


class TimeBudget(HookBase):
    """End training after ``minutes`` of training (counted from this process's start of training) as if ``MAX_ITER``
    had been reached: final evaluation, best check and ``model_final`` follow. ``--resume`` continues the schedule.
    """

    def __init__(self, minutes: float):
        self._seconds = 60.0 * minutes
        self._start = None

    def before_train(self):
        self._start = time.perf_counter()

    def after_step(self):
        over = comm.all_gather(time.perf_counter() - self._start >= self._seconds)[0]
        if over and self.trainer.iter + 1 < self.trainer.max_iter:
            logger.info("cellkit: time budget of %.1f min reached after iteration %d of %d: finishing here",
                        self._seconds / 60, self.trainer.iter + 1, self.trainer.max_iter)
            self.trainer.max_iter = self.trainer.iter + 1
            self.trainer.request_stop()


class CellkitPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's ``PeriodicCheckpointer`` that never marks a failed run finished and keeps few checkpoints.

    - ``model_final.pth`` is written only when the last iteration completed without an exception (detectron2 writes
      it from the step at ``MAX_ITER - 1``; a run that raises never reaches that step's end);
    - after each periodic save, only the newest ``keep`` ``model_XXXXXXX.pth`` files of the run directory are kept
      (found by glob, so files from before a ``--resume`` are pruned too); ``model_best.pth``, ``model_final.pth``
      and whatever ``last_checkpoint`` names are never deleted. ``keep`` <= 0 keeps every checkpoint.
    """

    def __init__(self, checkpointer, period: int, keep: int = 2):
        super().__init__(checkpointer, period)
        self.keep = int(keep)

    def before_train(self):
        super().before_train()
        rundir.remove_temporaries(self.checkpointer.save_dir)  # a killed save's temporary files: only litter

    def after_step(self):
        super().after_step()
        if (self.trainer.iter + 1) % self.period == 0:
            self.prune()

    def prune(self) -> list[Path]:
        """Delete periodic checkpoints beyond the newest ``keep``; returns the deleted paths."""
        if deleted := rundir.prune_periodic(self.checkpointer.save_dir, self.keep):
            logger.info("cellkit: removed %d old checkpoint(s) (CELLKIT.KEEP_CHECKPOINTS=%d): %s", len(deleted),
                        self.keep, ", ".join(p.name for p in deleted))
        return deleted


# --------------------------------------------------------------------------------------------------- trainer
def create_ddp_model(model, **kwargs):
    """``DistributedDataParallel`` over ``model`` when there are several processes, else ``model`` itself.

    detectron2's ``create_ddp_model`` always passes ``device_ids=[local rank]``, which DDP rejects for a CPU model;
    here ``device_ids`` is set only for a CUDA model, so ``cellkit train --num-gpus N`` also runs N CPU processes
    (gloo), as the distributed tests do.
    """
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and next(model.parameters()).device.type == "cuda":
        kwargs["device_ids"] = [comm.get_local_rank()]
    return torch.nn.parallel.DistributedDataParallel(model, **kwargs)


class ValidationPredictor(torch.nn.Module):
    """Validation inference on the path of ``cellkit predict``: each input's image read from its ``file_name`` as
    :func:`cellkit.predict.read_image` reads it, then one :class:`cellkit.tta.CellTTA` pass (no TTA), so the
    evaluator scores the very predictions a store of this model holds.

    Input/output: ``[{"file_name", "image_id", ...}]`` (a test loader's dicts) -> ``[{"predictions":
    InstancePredictions}]``; a model with other classes than CELL_TYPES (LIVECell pretraining) is scored
    class-agnostically, as the evaluator does. Train/eval mode is the wrapped model's (``inference_context`` restores it).
    """

    def __init__(self, cfg, model):
        super().__init__()
        self.predictor = CellTTA(cfg, model, tta=False)
        self.image_format = cfg.INPUT.FORMAT

    def forward(self, batched_inputs):
        return [{"predictions": self.predictor.predict(read_image(inp["file_name"], self.image_format),
                                                       str(inp["image_id"]))} for inp in batched_inputs]


def _record_as_is(record: dict) -> dict:  # a module-level function: loader workers may pickle the mapper
    return record


class StopTraining(BaseException):
    """Raised by :meth:`CellkitTrainer.before_step` after a hook called :meth:`CellkitTrainer.request_stop`: ends
    detectron2's train loop before the next iteration (a ``BaseException``: the loop logs no error for it, and its
    ``after_train`` hooks run as after the last iteration)."""


class CellkitTrainer(DefaultTrainer):
    """``DefaultTrainer`` with cellkit's mapper, evaluator, checkpointer and hooks (see module docstring).

    detectron2's own ``__init__`` and train loop; :func:`create_ddp_model` (which also runs CPU processes, gloo) and
    :class:`cellkit.modeling.CellkitCheckpointer` go in through :func:`cellkit.compat.default_trainer_parts`.
    """

    def __init__(self, cfg):
        self.stop_requested = self.stopped = False
        self.early_stopping = None
        with compat.default_trainer_parts(create_ddp_model, CellkitCheckpointer):
            super().__init__(cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Validation on the predictions ``cellkit predict`` would store (:class:`ValidationPredictor`)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        return super().test(cfg, ValidationPredictor(cfg, model), evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader with cellkit's mapper; with ``CELLKIT.DATA.EXTRA_DATA`` and an
        ``EXTRA_WEIGHT`` other than 1, a :class:`RepeatFactorTrainingSampler` (:func:`extra_repeat_factors`)."""
        mapper = CellkitDatasetMapper(cfg, is_train=True)
        d = cfg.CELLKIT.DATA
        if not (d.EXTRA_DATA and EXTRA_NAME in cfg.DATASETS.TRAIN and float(d.EXTRA_WEIGHT) != 1.0):
            return build_detection_train_loader(cfg, mapper=mapper)
        from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
        from detectron2.data.samplers import RepeatFactorTrainingSampler

        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        factors = extra_repeat_factors(dicts, MetadataCatalog.get(EXTRA_NAME).image_ids, float(d.EXTRA_WEIGHT))
        logger.info("cellkit: %d extra image(s) of %s at repeat factor %g among %d training image(s)",
                    int((factors != 1.0).sum()), d.EXTRA_DATA, d.EXTRA_WEIGHT, len(dicts))
        sampler = RepeatFactorTrainingSampler(factors, seed=None if cfg.SEED < 0 else cfg.SEED)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dicts, sampler=sampler)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader handing out the dataset dicts as they are: :class:`ValidationPredictor` reads each
        image from its ``file_name`` (the default mapper would decode and resize it for nothing)."""
        return build_detection_test_loader(cfg, dataset_name, mapper=_record_as_is)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return CellkitEvaluator(dataset_name, score_threshold=cfg.CELLKIT.EVAL.SCORE_THRESHOLD,
                                max_detections=cfg.TEST.DETECTIONS_PER_IMAGE)

    def build_writers(self):
        """Progress/ETA printer and ``metrics.json``; TensorBoard too when it is installed."""
        from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

        writers = [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, rundir.METRICS))]
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            return writers
        return writers + [TensorboardXWriter(self.cfg.OUTPUT_DIR)]

    def request_stop(self) -> None:
        """Stop after the current iteration (early stopping, time budget); a final checkpoint is written."""
        self.stop_requested = True

    def before_step(self):
        if self.stop_requested:
            self.stopped = True
            raise StopTraining
        super().before_step()

    @property
    def completed(self) -> bool:
        """In ``after_train``: the loop ran to ``max_iter`` or stopped on request, rather than raised (a run that
        raised at its last iteration is not finished: no final evaluation, best or final checkpoint)."""
        return self.iter >= self.max_iter or self.stopped

    def build_hooks(self):
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        period = cfg.TEST.EVAL_PERIOD
        if cfg.DATASETS.TEST and (period > 0 or cfg.CELLKIT.EVAL.AT_END):
            def test_and_save_results():
                self._last_eval_results = self.test(self.cfg, self.model)
                return self._last_eval_results

            ret.append(CellkitEvalHook(period, test_and_save_results))
            if comm.is_main_process():
                ret.append(CellkitBestCheckpointer(period, self.checkpointer, cfg.CELLKIT.EVAL.METRIC, "max"))
            if cfg.CELLKIT.EARLY_STOP_PATIENCE > 0:
                self.early_stopping = EarlyStopping(period, cfg.CELLKIT.EVAL.METRIC, cfg.CELLKIT.EARLY_STOP_PATIENCE,
                                                    cfg.CELLKIT.EARLY_STOP_MIN_DELTA)
                ret.append(self.early_stopping)
        if cfg.CELLKIT.TIME_BUDGET_MINUTES > 0:
            ret.insert(2, TimeBudget(cfg.CELLKIT.TIME_BUDGET_MINUTES))  # before evaluation: a last step ends cleanly
        if comm.is_main_process():
            ret += [CellkitPeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                                                cfg.CELLKIT.KEEP_CHECKPOINTS),
                    hooks.PeriodicWriter(self.build_writers(), period=cfg.CELLKIT.LOG_PERIOD)]
        return ret

    def finished(self) -> str | None:
        """Why there is nothing left to train (after ``resume_or_load``), or None."""
        if self.start_iter >= self.max_iter:
            return f"already finished (iteration {self.start_iter} of {self.max_iter})"
        if self.early_stopping is not None and self.early_stopping.stopped_at is not None:
            return f"stopped early at iteration {self.early_stopping.stopped_at + 1} of {self.max_iter}"
        return None

    def train(self):
        """Run training from ``self.start_iter`` (set by ``resume_or_load``); returns the last evaluation results
        (None when the run had already finished or stopped early)."""
        if done := self.finished():
            logger.info("cellkit: %s %s; nothing to do", self.cfg.OUTPUT_DIR, done)
            return None
        try:
            super().train()
        except StopTraining:
            # stopped before MAX_ITER (early stopping, time budget): save the full state after the after_train hooks
            # (final evaluation, best check) with the last completed iteration, so that --resume knows where it is
            self.iter -= 1
            if comm.is_main_process():
                self.checkpointer.save("model_final", iteration=self.iter)
        return getattr(self, "_last_eval_results", None)


# ------------------------------------------------------------------------------------------------ data + config
def check_data(cfg) -> dict:
    """Validate the data named by ``cfg`` (before any work) and write ``folds.csv`` when it is absent.

    All of the data is read the way training reads it (:mod:`cellkit.datacheck`: every annotation decodes, every
    image decodes completely with an 8-bit mode at the size its rows say; LIVECell's json and images likewise),
    in parallel and remembered by file size and mtime, and every problem is reported in one error.

    ``CELLKIT.DATA.EXCLUDE`` (with ``EXCLUDE_TOP``) names images to drop from the training split only: the
    validation fold keeps every image, so that CV scores of runs with and without an exclusion list stay comparable
    (dropping suspicious images from validation too would change what the score measures). Their count is logged and
    the list written to ``OUTPUT_DIR/excluded_ids.txt``.

    Returns:
        ``{"train": kwargs, "val": kwargs or None, "extra": kwargs or None}`` for :func:`register_datasets`
        (the train kwargs carry ``exclude``, a tuple of ids; ``"extra"``: ``CELLKIT.DATA.EXTRA_DATA``, finetune mode
        only; always absent in pretrain mode).

    Raises:
        FileNotFoundError: missing ``train.csv``, image folder or LIVECell json (also of the extra data).
        ValueError: a fold with no images, unknown mode, extra data in pretrain mode or sharing an image id with
            the training CSV (naming it), an exclusion file naming ids that are not in train.csv (naming the file)
            or leaving no training image; :class:`cellkit.datacheck.DataCheckError` listing every
            bad annotation and image (file and CSV line).
    """
    d = cfg.CELLKIT.DATA
    if cfg.CELLKIT.MODE == "pretrain" and d.EXTRA_DATA:
        raise ValueError("CELLKIT.DATA.EXTRA_DATA (--extra-data) is for finetune mode (competition data), not for "
                         "LIVECell pretraining")
    if cfg.CELLKIT.MODE == "pretrain":
        return _check_pretrain(d)
    if cfg.CELLKIT.MODE != "finetune":
        raise ValueError(f"CELLKIT.MODE must be 'finetune' or 'pretrain', got {cfg.CELLKIT.MODE!r}")
    from cellkit import data, datacheck

    root = Path(d.ROOT)
    csv_path, image_dir = root / "train.csv", root / "train"
    for missing, problem in ((not root.is_dir(), "does not exist"),
                             (not csv_path.is_file(), "has no train.csv (expected the competition layout: train.csv, "
                                                      "train/)"),
                             (not image_dir.is_dir(), "has no train/ image folder")):
        if missing:
            raise FileNotFoundError(f"data dir {root} {problem}")
    table = data.read_train_csv(csv_path)
    exclude = _exclusions(cfg, table)
    if comm.is_main_process():
        datacheck.check_sartorius(csv_path, image_dir)
    extra = _check_extra(cfg, table)
    if int(d.FOLD) < 0:
        if exclude and not set(table["id"]) - set(exclude):
            raise ValueError(f"{d.EXCLUDE}: excluding {len(exclude)} image(s) leaves no training image in {csv_path}")
        _log_exclusions(cfg, exclude, set(table["id"]), set())
        return {"train": dict(csv_path=str(csv_path), image_dir=str(image_dir), exclude=exclude), "val": None,
                "extra": extra}
    return _fold_specs(cfg, table, csv_path, image_dir, exclude, extra)


def _check_pretrain(d) -> dict:
    """:func:`check_data` in pretrain mode: the LIVECell json(s) and image folder of ``CELLKIT.DATA`` (``d``)."""
    if not d.LIVECELL_JSON:
        raise ValueError("pretrain mode needs a LIVECell json (--livecell JSON --livecell-images DIR)")
    for path in (d.LIVECELL_JSON, d.LIVECELL_VAL_JSON):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"LIVECell json {path} does not exist")
    if d.EXCLUDE:
        raise ValueError(f"CELLKIT.DATA.EXCLUDE ({d.EXCLUDE}) applies to fine-tuning on train.csv, not to "
                         f"pretraining on LIVECell")
    if not Path(d.LIVECELL_IMAGES).is_dir():
        raise FileNotFoundError(f"LIVECell image folder {d.LIVECELL_IMAGES or '(empty)'} does not exist")
    if comm.is_main_process():
        from cellkit import datacheck

        for path in filter(None, (d.LIVECELL_JSON, d.LIVECELL_VAL_JSON)):
            datacheck.check_livecell(path, d.LIVECELL_IMAGES, cell_line_classes=True)
    return {"train": dict(json_path=d.LIVECELL_JSON, image_root=d.LIVECELL_IMAGES),
            "val": dict(json_path=d.LIVECELL_VAL_JSON, image_root=d.LIVECELL_IMAGES) if d.LIVECELL_VAL_JSON
            else None}


def _fold_specs(cfg, table, csv_path: Path, image_dir: Path, exclude: tuple, extra) -> dict:
    """:func:`check_data`'s specs for one fold (``CELLKIT.DATA.FOLD`` >= 0): ``folds.csv`` read or written."""
    from cellkit import folds as folds_mod

    d = cfg.CELLKIT.DATA
    fold = int(d.FOLD)
    folds_csv = Path(d.FOLDS_CSV) if d.FOLDS_CSV else Path(cfg.OUTPUT_DIR) / "folds.csv"
    if not folds_csv.is_file():
        if d.FOLDS_CSV:
            raise FileNotFoundError(f"folds file {folds_csv} does not exist")
        if fold >= d.NUM_FOLDS:
            raise ValueError(f"fold {fold} has no images: folds.csv would hold folds 0..{d.NUM_FOLDS - 1} "
                             f"(CELLKIT.DATA.NUM_FOLDS={d.NUM_FOLDS})")
        if comm.is_main_process():
            folds_mod.write_folds(folds_mod.make_folds(table, k=d.NUM_FOLDS, seed=d.FOLD_SEED, source=str(csv_path)),
                                  folds_csv)
            logger.info("cellkit: wrote %s (%d folds, seed %d)", folds_csv, d.NUM_FOLDS, d.FOLD_SEED)
    try:
        assigned = folds_mod.read_folds(folds_csv)
        train_ids, val_ids = (folds_mod.fold_ids(assigned, fold, split) for split in ("train", "val"))
    except ValueError as exc:
        raise ValueError(f"{folds_csv}: {exc}") from None
    if not val_ids:
        raise ValueError(f"fold {fold} has no images in {folds_csv} (folds there: "
                         f"{sorted(set(assigned['fold'].tolist()))})")
    if not train_ids:
        raise ValueError(f"holding out fold {fold} of {folds_csv} leaves no training image")
    if exclude and not set(train_ids) - set(exclude):
        raise ValueError(f"{d.EXCLUDE}: excluding {len(exclude)} image(s) leaves no training image outside fold "
                         f"{fold} of {folds_csv}")
    _log_exclusions(cfg, exclude, set(train_ids), set(val_ids))
    common = dict(csv_path=str(csv_path), image_dir=str(image_dir), folds_csv=str(folds_csv), fold=fold)
    return {"train": dict(common, split="train", exclude=exclude), "val": dict(common, split="val"),
            "extra": extra}


def extra_repeat_factors(dicts: list[dict], extra_ids, weight: float) -> torch.Tensor:
    """Per-image repeat factors for :class:`detectron2.data.samplers.RepeatFactorTrainingSampler`.

    Args:
        dicts: the training dataset dicts (real and extra images, any order).
        extra_ids: image ids of the extra data (``CELLKIT.DATA.EXTRA_DATA``).
        weight: ``CELLKIT.DATA.EXTRA_WEIGHT``, > 0.

    Returns:
        float32 ``(len(dicts),)``: 1.0 for a real image, ``weight`` for an extra one.
    """
    extra = set(map(str, extra_ids))
    return torch.tensor([weight if str(r["image_id"]) in extra else 1.0 for r in dicts], dtype=torch.float32)


def _check_extra(cfg, table) -> dict | None:
    """Validate ``CELLKIT.DATA.EXTRA_DATA`` (competition layout, ids disjoint from the main ``table``); its spec."""
    from cellkit import data, datacheck

    d = cfg.CELLKIT.DATA
    if not d.EXTRA_DATA:
        return None
    root = Path(d.EXTRA_DATA)
    csv_path, image_dir = root / "train.csv", root / "train"
    if not csv_path.is_file() or not image_dir.is_dir():
        raise FileNotFoundError(f"extra data dir {root} (CELLKIT.DATA.EXTRA_DATA / --extra-data) needs train.csv and "
                                f"train/ (the competition layout, as `cellkit pseudo` writes it)")
    extra = data.read_train_csv(csv_path)
    if common := sorted(set(extra["id"]) & set(table["id"])):
        raise ValueError(f"{csv_path}: image id {common[0]!r} is also in {Path(d.ROOT) / 'train.csv'} "
                         f"({len(common)} id(s) in both); extra data must be other images")
    if comm.is_main_process():
        datacheck.check_sartorius(csv_path, image_dir)
    return dict(csv_path=str(csv_path), image_dir=str(image_dir))


def _exclusions(cfg, table) -> tuple:
    """The image ids ``CELLKIT.DATA.EXCLUDE`` / ``EXCLUDE_TOP`` name (checked against ``table``); () when unset."""
    d = cfg.CELLKIT.DATA
    if not d.EXCLUDE:
        if d.EXCLUDE_TOP:
            raise ValueError(f"CELLKIT.DATA.EXCLUDE_TOP={d.EXCLUDE_TOP} needs CELLKIT.DATA.EXCLUDE (--exclude "
                             f"AUDIT/audit.csv)")
        return ()
    from cellkit.data import exclusion_ids

    return tuple(exclusion_ids(d.EXCLUDE, table["id"].unique(), top=int(d.EXCLUDE_TOP)))


def _log_exclusions(cfg, exclude: tuple, train_ids: set, val_ids: set) -> None:
    """Write ``OUTPUT_DIR/excluded_ids.txt`` (main process, atomically): every excluded id, and how many of them were
    in the training split (dropped) and in the validation fold (kept there). :func:`register_datasets` logs it."""
    if not exclude or not comm.is_main_process():
        return
    from cellkit import atomic

    dropped = [i for i in exclude if i in train_ids]
    kept = [i for i in exclude if i in val_ids]
    header = (f"# images excluded from training by CELLKIT.DATA.EXCLUDE={cfg.CELLKIT.DATA.EXCLUDE}"
              + (f" (top {cfg.CELLKIT.DATA.EXCLUDE_TOP})" if cfg.CELLKIT.DATA.EXCLUDE_TOP else "")
              + f": {len(dropped)} dropped from training, {len(kept)} in the validation fold kept there\n")
    atomic.write_text(Path(cfg.OUTPUT_DIR) / "excluded_ids.txt", header + "".join(f"{i}\n" for i in exclude))


def register_datasets(cfg, specs: dict) -> None:
    """Register the train (and val, and extra) datasets of :func:`check_data`'s ``specs`` under the names in
    ``cfg.DATASETS`` (the extra data as :data:`EXTRA_NAME`, every image of its CSV)."""
    from cellkit import data

    for name, spec in ((TRAIN_NAME, specs["train"]), (VAL_NAME, specs["val"]), (EXTRA_NAME, specs.get("extra"))):
        if spec is None:
            continue
        if cfg.CELLKIT.MODE == "pretrain":
            data.register_livecell(name, spec["json_path"], spec["image_root"], cell_line_classes=True)
        else:
            data.register_sartorius(name, **spec)
    if exclude := specs["train"].get("exclude") or ():
        from detectron2.data import MetadataCatalog

        meta = MetadataCatalog.get(TRAIN_NAME)
        logger.info("cellkit: %d image(s) excluded from training (%s%s): %d of them were training images, now %d; "
                    "the validation fold keeps the other %d", len(exclude), cfg.CELLKIT.DATA.EXCLUDE,
                    f", top {cfg.CELLKIT.DATA.EXCLUDE_TOP}" if cfg.CELLKIT.DATA.EXCLUDE_TOP else "",
                    len(meta.excluded), len(meta.image_ids), len(exclude) - len(meta.excluded))


def prepare_config(cfg, *, resume: bool = False, has_cuda: bool | None = None):
    """Check and complete a training config before any work; returns ``(cfg frozen, data specs)``.

    Sets the dataset names, the machine-dependent keys (:func:`cellkit.config.resolve_runtime`) and, in pretrain
    mode, ``MODEL.ROI_HEADS.NUM_CLASSES`` from LIVECell's classes; checks the weights file (local only) unless a
    checkpoint to resume from exists; validates the data and writes ``folds.csv`` if needed.
    """
    cfg = cfg.clone()
    cfg.defrost()
    if not cfg.OUTPUT_DIR:
        raise ValueError("OUTPUT_DIR (--out) is empty")
    out = Path(cfg.OUTPUT_DIR)
    resuming = resume and rundir.last_checkpoint(out) is not None
    if cfg.MODEL.WEIGHTS and not resuming:
        rundir.check_local_weights(cfg.MODEL.WEIGHTS, cfg.CELLKIT.WEIGHTS_SOURCE)
    if cfg.CELLKIT.EVAL.SCORE_THRESHOLD < 0 or cfg.CELLKIT.EVAL.SCORE_THRESHOLD > 1:
        raise ValueError(f"CELLKIT.EVAL.SCORE_THRESHOLD must be in [0, 1], got {cfg.CELLKIT.EVAL.SCORE_THRESHOLD}")
    weight = float(cfg.CELLKIT.DATA.EXTRA_WEIGHT)
    if not weight > 0 or weight == float("inf"):
        raise ValueError(f"CELLKIT.DATA.EXTRA_WEIGHT (--extra-weight) must be a finite number > 0, got {weight}")
    if cfg.CELLKIT.DATA.EXTRA_DATA and weight != 1.0 and cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(f"CELLKIT.DATA.EXTRA_WEIGHT {weight} needs DATALOADER.SAMPLER_TRAIN 'TrainingSampler' (the "
                         f"weight sets per-image repeat factors itself), got {cfg.DATALOADER.SAMPLER_TRAIN!r}")
    out.mkdir(parents=True, exist_ok=True)
    specs = check_data(cfg)
    cfg.DATASETS.TRAIN = (TRAIN_NAME,) + ((EXTRA_NAME,) if specs.get("extra") else ())
    cfg.DATASETS.TEST = (VAL_NAME,) if specs["val"] is not None else ()
    if cfg.CELLKIT.MODE == "pretrain":
        from cellkit.data import LIVECELL_CELL_LINES

        if cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(LIVECELL_CELL_LINES):
            logger.info("cellkit: pretrain on LIVECell: MODEL.ROI_HEADS.NUM_CLASSES=%d", len(LIVECELL_CELL_LINES))
            cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(LIVECELL_CELL_LINES)
    else:
        _record_schema(cfg, out)
    resolve_runtime(cfg, has_cuda)
    cfg.freeze()
    return cfg, specs


def _record_schema(cfg, out: Path) -> None:
    """The data's classes decide ``MODEL.ROI_HEADS.NUM_CLASSES``; a dataset other than Sartorius is recorded in the
    run (``dataset.json``, read by every later stage)."""
    data_schema = schema.schema_of(cfg.CELLKIT.DATA.ROOT)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(data_schema.classes):
        logger.info("cellkit: %s's classes %s: MODEL.ROI_HEADS.NUM_CLASSES=%d", data_schema.name,
                    list(data_schema.classes), len(data_schema.classes))
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(data_schema.classes)
    if data_schema != schema.SARTORIUS and comm.is_main_process():
        schema.save_schema(data_schema, out)


def setup_logging(cfg) -> None:
    """detectron2's and cellkit's loggers to stdout and ``OUTPUT_DIR/log.txt`` (rank-aware)."""
    from detectron2.utils.logger import setup_logger

    for name in ("fvcore", "detectron2", "cellkit"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)  # abbreviated "d2", "cellkit"


def train_worker(cfg, specs: dict, resume: bool = False):
    """Train in this process (one per GPU under ``detectron2.engine.launch``); returns the last eval results.

    On any exception (KeyboardInterrupt included) the main process writes ``OUTPUT_DIR/FAILED`` (see
    :data:`FAILED_NAME`) and re-raises; ``model_final.pth`` is never written by a failed attempt. A start without a
    checkpoint to resume from (a fresh run, or a retry after a failure before the first checkpoint) removes a stale
    ``metrics.json`` of an earlier failed attempt, so the new run's metrics are not appended to it.
    """
    from detectron2.utils.env import seed_all_rng

    setup_logging(cfg)
    out = Path(cfg.OUTPUT_DIR)
    main = comm.is_main_process()
    if main:
        if previous := failure_reason(out):
            logger.info("cellkit: the previous attempt in %s failed (%s); starting again", out, previous)
        rundir.clear_failed(out)
        if not (resume and rundir.last_checkpoint(out) is not None):
            (out / rundir.METRICS).unlink(missing_ok=True)
    trainer, started = None, False
    try:
        seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
        register_datasets(cfg, specs)
        if main:
            save_config(cfg, cfg.OUTPUT_DIR)
            logger.info("cellkit: config saved to %s", out / rundir.CONFIG)
        trainer = CellkitTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        started = True
        return trainer.train()
    except BaseException as exc:
        if main:
            rundir.write_failed(out, exc, trainer.iter if started else None)
        raise
