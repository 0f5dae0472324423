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
    assert callable(getattr(cls, name, None)), f"{owner}.{name}: gone from detectron2 (used by cellkit.compat)"


@pytest.mark.parametrize("function,name", [(f, n) for f, names in compat.MODULE_GLOBALS.items() for n in names])
def test_swapped_globals_are_still_read_by_name(function, name):
    """compat swaps module globals (resnet_deform_ops, default_trainer_parts) that the detectron2 function must still
    read by name from its module."""
    module, cls_name, func_name = function.rsplit(".", 2)
    mod = importlib.import_module(module)
    code = getattr(getattr(mod, cls_name), func_name).__code__
    assert name in code.co_names and hasattr(mod, name), (
        f"{module}.{name}: no longer read by {cls_name}.{func_name} (detectron2 changed; swapped by cellkit.compat)")


def test_swapped_globals_are_restored():
    from detectron2.engine import defaults
    from detectron2.modeling.backbone import resnet

    before = (defaults.create_ddp_model, defaults.DetectionCheckpointer, resnet.DeformConv)
    with compat.default_trainer_parts(len, dict), compat.resnet_deform_ops(list, tuple):
        assert (defaults.create_ddp_model, defaults.DetectionCheckpointer, resnet.DeformConv) == (len, dict, list)
    assert (defaults.create_ddp_model, defaults.DetectionCheckpointer, resnet.DeformConv) == before
