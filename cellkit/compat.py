"""Every use of detectron2's private API in cellkit, in one place, pinned to the detectron2 it was checked against.

detectron2 has no public hook for these; each is a small wrapper with a public name that the rest of cellkit calls.
``tests/test_compat.py`` checks :data:`CHECKED_VERSION` against the installed distribution and that every symbol of
:data:`PRIVATE_SYMBOLS` still exists, failing with the symbol's name when detectron2 changes.

- :class:`CheckpointerCompat`: ``Checkpointer._load_file`` / ``_load_model`` (a clear error for a corrupt file, a log
  line per re-initialised head);
- :class:`TTACompat`: ``GeneralizedRCNNWithTTA._turn_off_roi_heads`` / ``_get_augmented_inputs`` /
  ``_rescale_detected_boxes`` (cellkit's two-pass TTA reuses them);
- :func:`resnet_deform_ops`: the deformable conv classes that detectron2's ResNet builder reads from its module
  (``detectron2.modeling.backbone.resnet.DeformConv`` / ``ModulatedDeformConv``, placeholders that raise without
  ``_C``), swapped for the duration of a build;
- :func:`init_trainer`, :func:`trainer_hooks`: ``DefaultTrainer.__init__``'s steps with another DDP wrapper (one
  that also runs CPU processes) and checkpointer, and the registered hooks (``TrainerBase._hooks``).
"""
from __future__ import annotations

import contextlib
import logging
import weakref

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer
from detectron2.engine.train_loop import TrainerBase
from detectron2.modeling.backbone import resnet
from detectron2.modeling.test_time_augmentation import GeneralizedRCNNWithTTA
from detectron2.utils import comm

__all__ = ["CHECKED_VERSION", "PRIVATE_SYMBOLS", "CheckpointerCompat", "TTACompat", "init_trainer", "trainer_hooks",
           "resnet_deform_ops"]

logger = logging.getLogger("cellkit.modeling")

CHECKED_VERSION = "0.6+sal072"
"""The detectron2 distribution version (``importlib.metadata.version("detectron2")``) these wrappers were checked
against."""

PRIVATE_SYMBOLS = {
    "detectron2.checkpoint.DetectionCheckpointer": ("_load_file", "_load_model"),
    "detectron2.modeling.test_time_augmentation.GeneralizedRCNNWithTTA": (
        "_turn_off_roi_heads", "_get_augmented_inputs", "_rescale_detected_boxes"),
    "detectron2.engine.train_loop.TrainerBase": ("_hooks",),
    "detectron2.engine.DefaultTrainer": ("_trainer",),
}
"""Private attributes used here, by owner (``_hooks`` and ``_trainer`` are instance attributes set in
``__init__``)."""

RESNET_DEFORM_GLOBALS = ("DeformConv", "ModulatedDeformConv")
"""The module globals of ``detectron2.modeling.backbone.resnet`` that ``DeformBottleneckBlock.__init__`` builds its
3x3 conv from (:func:`resnet_deform_ops` swaps them)."""


@contextlib.contextmanager
def resnet_deform_ops(deform_conv, modulated_deform_conv):
    """Context: detectron2's ``DeformBottleneckBlock`` (and so ``build_resnet_backbone``) builds its deformable conv
    from ``deform_conv`` / ``modulated_deform_conv`` (same constructor as detectron2's classes); restored on exit."""
    saved = tuple(getattr(resnet, name) for name in RESNET_DEFORM_GLOBALS)
    resnet.DeformConv, resnet.ModulatedDeformConv = deform_conv, modulated_deform_conv
    try:
        yield
    finally:
        resnet.DeformConv, resnet.ModulatedDeformConv = saved


class CheckpointerCompat(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose private loaders give a clear error and log re-initialised parameters."""

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as exc:  # torch.load / pickle raise many types for a truncated or foreign file
            detail = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ValueError(f"{filename}: cannot load checkpoint, the file is corrupt or not a checkpoint "
                             f"({type(exc).__name__}: {detail})") from None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        for key, shape_ckpt, shape_model in incompatible.incorrect_shapes:
            logger.info(
                "cellkit: re-initialised %s: checkpoint shape %s, model shape %s (class count differs)",
                key, tuple(shape_ckpt), tuple(shape_model),
            )
        return incompatible


class TTACompat(GeneralizedRCNNWithTTA):
    """``GeneralizedRCNNWithTTA``'s private steps under public names."""

    def heads_off(self, attrs):
        """Context: the ROI heads' ``attrs`` (e.g. ``["mask_on"]``) switched off."""
        return self._turn_off_roi_heads(attrs)

    def augmented_inputs(self, inp):
        """``(augmented inputs, transforms)`` of one input dict (the TTA mapper's passes)."""
        return self._get_augmented_inputs(inp)

    def rescale_boxes(self, aug_inputs, merged, tfms):
        """``merged`` instances (input coordinates) mapped into each augmented input."""
        return self._rescale_detected_boxes(aug_inputs, merged, tfms)


def init_trainer(trainer, cfg, *, ddp, step_class, checkpointer_class) -> None:
    """``DefaultTrainer.__init__`` (same order: model, optimizer, loader, DDP, step trainer, scheduler,
    checkpointer, hooks) with the DDP wrapper ``ddp(model, broadcast_buffers=False)``, the step trainer class
    ``step_class(cfg)`` and ``checkpointer_class(model, OUTPUT_DIR, trainer=proxy)``."""
    from detectron2.utils.logger import setup_logger

    TrainerBase.__init__(trainer)
    if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
        setup_logger()
    cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
    model = trainer.build_model(cfg)
    optimizer = trainer.build_optimizer(cfg, model)
    data_loader = trainer.build_train_loader(cfg)
    model = ddp(model, broadcast_buffers=False)
    trainer._trainer = step_class(cfg)(model, data_loader, optimizer)
    trainer.scheduler = trainer.build_lr_scheduler(cfg, optimizer)
    trainer.checkpointer = checkpointer_class(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(trainer))
    trainer.start_iter = 0
    trainer.max_iter = cfg.SOLVER.MAX_ITER
    trainer.cfg = cfg
    trainer.register_hooks(trainer.build_hooks())


def trainer_hooks(trainer) -> list:
    """The hooks registered on a trainer, in order."""
    return list(trainer._hooks)
