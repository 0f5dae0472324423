"""cellkit.compat: the detectron2 it was checked against, and every private symbol it uses still there."""
import importlib
from importlib.metadata import version

import pytest

from cellkit import compat


def test_detectron2_is_the_checked_version():
    installed = version("detectron2")
    assert installed == compat.CHECKED_VERSION, (
        f"detectron2 {installed} is installed; cellkit.compat was checked against {compat.CHECKED_VERSION}: "
        f"re-check every symbol of compat.PRIVATE_SYMBOLS, then update CHECKED_VERSION")


@pytest.mark.parametrize("owner,name", [(o, n) for o, names in compat.PRIVATE_SYMBOLS.items() for n in names])
def test_private_symbol_exists(owner, name):
    module, cls_name = owner.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    if name in ("_hooks", "_trainer"):  # instance attributes: set by the constructors compat.init_trainer copies
        import inspect

        from detectron2.engine import DefaultTrainer
        from detectron2.engine.train_loop import TrainerBase

        source = inspect.getsource(TrainerBase.__init__ if name == "_hooks" else DefaultTrainer.__init__)
        assert f"self.{name}" in source, f"{owner}.{name}: no longer set by its __init__ (detectron2 changed)"
    else:
        assert callable(getattr(cls, name, None)), f"{owner}.{name}: gone from detectron2 (used by cellkit.compat)"


def test_default_trainer_init_steps_unchanged():
    """compat.init_trainer repeats DefaultTrainer.__init__'s steps: fail when detectron2 adds or reorders one."""
    import inspect

    from detectron2.engine import DefaultTrainer

    source = inspect.getsource(DefaultTrainer.__init__)
    steps = ["auto_scale_workers", "build_model", "build_optimizer", "build_train_loader", "create_ddp_model",
             "self._trainer", "build_lr_scheduler", "DetectionCheckpointer", "self.start_iter", "self.max_iter",
             "register_hooks"]
    positions = [source.find(s) for s in steps]
    assert -1 not in positions, f"DefaultTrainer.__init__ lacks {steps[positions.index(-1)]}"
    assert positions == sorted(positions), "DefaultTrainer.__init__ reordered its steps"


def test_resnet_deform_block_reads_the_swapped_globals():
    """compat.resnet_deform_ops swaps module globals that DeformBottleneckBlock.__init__ must still read by name."""
    from detectron2.modeling.backbone import resnet

    names = resnet.DeformBottleneckBlock.__init__.__code__.co_names
    for name in compat.RESNET_DEFORM_GLOBALS:
        assert name in names and hasattr(resnet, name), (
            f"detectron2.modeling.backbone.resnet.{name}: no longer read by DeformBottleneckBlock.__init__ "
            "(detectron2 changed; used by cellkit.compat.resnet_deform_ops)")
