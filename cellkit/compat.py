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
- :func:`default_trainer_parts`: the DDP wrapper and checkpointer class that ``DefaultTrainer.__init__`` reads from
  its module (``detectron2.engine.defaults.create_ddp_model`` / ``DetectionCheckpointer``), swapped while it runs:
  detectron2's own ``__init__`` builds the trainer, with a DDP wrapper that also runs CPU processes and cellkit's
  checkpointer.
"""
import contextlib
import logging

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import defaults
from detectron2.modeling.backbone import resnet
from detectron2.modeling.test_time_augmentation import GeneralizedRCNNWithTTA

__all__ = ["CHECKED_VERSION", "PRIVATE_SYMBOLS", "MODULE_GLOBALS", "CheckpointerCompat", "TTACompat",
           "resnet_deform_ops", "default_trainer_parts"]

logger = logging.getLogger("cellkit.modeling")

#: The detectron2 distribution version (``importlib.metadata.version("detectron2")``) these wrappers were checked
#: against.
CHECKED_VERSION = "0.6+sal072"

#: Private methods used here, by owner.
PRIVATE_SYMBOLS = {
    "detectron2.checkpoint.DetectionCheckpointer": ("_load_file", "_load_model"),
    "detectron2.modeling.test_time_augmentation.GeneralizedRCNNWithTTA": (
        "_turn_off_roi_heads", "_get_augmented_inputs", "_rescale_detected_boxes"),
}

#: Module globals that a detectron2 function reads by name, swapped by :func:`resnet_deform_ops` and
#: :func:`default_trainer_parts` for the duration of a call (``tests/test_compat.py`` checks they are still read).
MODULE_GLOBALS = {
    "detectron2.modeling.backbone.resnet.DeformBottleneckBlock.__init__": ("DeformConv", "ModulatedDeformConv"),
    "detectron2.engine.defaults.DefaultTrainer.__init__": ("create_ddp_model", "DetectionCheckpointer"),
}


@contextlib.contextmanager
def _swapped(module, **values):
    """Context: ``module``'s globals ``values`` set; the previous ones restored on exit."""
    saved = {name: getattr(module, name) for name in values}
    vars(module).update(values)
    try:
        yield
    finally:
        vars(module).update(saved)


def resnet_deform_ops(deform_conv, modulated_deform_conv):
    """Context: detectron2's ``DeformBottleneckBlock`` (and so ``build_resnet_backbone``) builds its deformable conv
    from ``deform_conv`` / ``modulated_deform_conv`` (same constructor as detectron2's classes); restored on exit."""
    return _swapped(resnet, DeformConv=deform_conv, ModulatedDeformConv=modulated_deform_conv)


def default_trainer_parts(ddp, checkpointer_class):
    """Context: ``DefaultTrainer.__init__`` wraps the model with ``ddp(model, broadcast_buffers=False)`` and saves
    with ``checkpointer_class(model, OUTPUT_DIR, trainer=...)`` (same signatures as detectron2's
    ``create_ddp_model`` / ``DetectionCheckpointer``); restored on exit."""
    return _swapped(defaults, create_ddp_model=ddp, DetectionCheckpointer=checkpointer_class)


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
