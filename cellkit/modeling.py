"""What detectron2 lacks without its compiled ``_C``, added through its registries, plus local-only weight loading.

- :class:`DeformConv` / :class:`ModulatedDeformConv`: deformable convolution on :func:`torchvision.ops.deform_conv2d`
  (autograd on CPU and CUDA) with the same constructor, attributes and parameters (``weight``, ``bias``, ``norm``)
  as detectron2's classes, so model-zoo checkpoints load. Where ``detectron2._C`` imports, detectron2's own
  classes are used instead (:data:`HAS_D2_C`).
- ``build_cellkit_resnet_fpn_backbone`` (in ``BACKBONE_REGISTRY``): detectron2's ResNet-FPN builders with the
  deformable blocks' 3x3 conv built from the layers above (:func:`cellkit.compat.resnet_deform_ops`); identical to
  ``build_resnet_fpn_backbone`` otherwise, except that ``CELLKIT.BACKBONE_CHECKPOINT`` recomputes each block's
  activations in the backward pass (:class:`CheckpointedStage`) to fit X152 at the paper's size.
- :class:`CellkitCheckpointer`: loads only local files (a URL or ``detectron2://`` path is an error, nothing is
  downloaded) and logs every head re-initialised because its class count differs from the checkpoint's.

Offsets follow detectron2 / torchvision's layout: ``(N, 2 * deformable_groups * kh * kw, H_out, W_out)`` with
(dy, dx) pairs per kernel position; the modulation mask is ``(N, deformable_groups * kh * kw, H_out, W_out)``.
"""
import importlib.util
import logging
import os

import torch
from torch import nn
from torchvision.ops import deform_conv2d

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model as d2_build_model
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone

from cellkit import atomic, rundir
from cellkit.compat import CheckpointerCompat, resnet_deform_ops
from cellkit.rundir import check_local_weights

logger = logging.getLogger(__name__)

#: Whether detectron2 was compiled with its C++/CUDA ops (a source build on Kaggle/Colab).
HAS_D2_C = importlib.util.find_spec("detectron2._C") is not None


def _norm_activation(x: torch.Tensor, norm, activation) -> torch.Tensor:  # after the conv, as detectron2's layers
    if norm is not None:
        x = norm(x)
    if activation is not None:
        x = activation(x)
    return x


class _DeformConvBase(nn.Module):
    """Shared constructor of the torchvision-backed deformable convolutions (detectron2's argument names)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = True,
        norm: nn.Module | None = None,
        activation=None,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must divide by groups {groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = (  # (v, v) for an int v
            (v, v) if isinstance(v, int) else tuple(v) for v in (kernel_size, stride, padding, dilation))
        self.deformable_groups, self.with_bias, self.norm, self.activation = deformable_groups, bias, norm, activation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        shape = [
            (i + 2 * p - (d * (k - 1) + 1)) // s + 1
            for i, p, d, k, s in zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride)
        ]
        # keeps the autograd graph connected, like detectron2's _NewEmptyTensorOp
        return x.new_zeros([x.shape[0], self.out_channels] + shape) + 0 * x.sum()

    def _deform(self, x, offset, mask=None):
        if x.numel() == 0:
            return _norm_activation(self._empty_output(x), self.norm, self.activation)
        if offset.device.type == "cpu" and not bool(torch.isfinite(offset).all()):
            # torchvision's CPU kernel reads out of bounds (segfault) on NaN offsets: fail like a diverged loss does.
            # Only there: on CUDA this check would synchronise with the host in every deformable layer.
            raise FloatingPointError("deformable conv: non-finite offsets (training diverged or NaN weights/input)")
        # float32 (or float64) inside autocast too: the kernel has no half/bfloat16 path
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.weight.dtype), torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = deform_conv2d(
                x.to(dtype),
                offset.to(dtype),
                self.weight.to(dtype),
                None if self.bias is None else self.bias.to(dtype),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                mask=None if mask is None else mask.to(dtype),
            )
        return _norm_activation(out, self.norm, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deformable_groups={self.deformable_groups}, bias={self.with_bias}"
        )


class TorchvisionDeformConv(_DeformConvBase):
    """Deformable convolution (DCNv1) with detectron2's ``DeformConv`` interface; no bias (as detectron2's).

    ``forward(x (N,C,H,W), offset (N, 2*G*kh*kw, Ho, Wo)) -> (N, out_channels, Ho, Wo)``.
    """

    def __init__(self, *args, bias: bool = False, **kwargs):
        if bias:
            raise ValueError("DeformConv has no bias (as detectron2's); use ModulatedDeformConv")
        super().__init__(*args, bias=False, **kwargs)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self._deform(x, offset)


class TorchvisionModulatedDeformConv(_DeformConvBase):
    """Modulated deformable convolution (DCNv2) with detectron2's ``ModulatedDeformConv`` interface (bias default on).

    ``forward(x, offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo) in [0,1]) -> (N, out_channels, Ho, Wo)``.
    """

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._deform(x, offset, mask)


def _float32_forward(cls):
    """A subclass of detectron2's compiled deformable conv whose op runs in float32 under autocast (its CUDA kernel
    has no half-precision path); norm and activation follow in the autocast dtype like any other layer."""

    class Float32(cls):
        def forward(self, x, *args):
            norm, activation = self.norm, self.activation
            self.norm = self.activation = None  # applied below, outside the float32 region
            try:
                with torch.autocast(device_type=x.device.type, enabled=False):
                    out = super().forward(x.float(), *(a.float() for a in args))
            finally:
                self.norm, self.activation = norm, activation
            return _norm_activation(out, norm, activation)

    Float32.__name__ = Float32.__qualname__ = cls.__name__
    Float32.__doc__ = f"detectron2's compiled ``{cls.__name__}`` computed in float32 under autocast."
    return Float32


if HAS_D2_C:
    from detectron2.layers import DeformConv as _D2DeformConv, ModulatedDeformConv as _D2ModulatedDeformConv

    DeformConv, ModulatedDeformConv = map(_float32_forward, (_D2DeformConv, _D2ModulatedDeformConv))  # compiled ops
else:
    DeformConv, ModulatedDeformConv = TorchvisionDeformConv, TorchvisionModulatedDeformConv


def build_cellkit_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ``build_resnet_backbone``, its deformable stages built on this module's :data:`DeformConv` /
    :data:`ModulatedDeformConv` (:func:`cellkit.compat.resnet_deform_ops`).

    Reads the same ``MODEL.RESNETS`` keys; returns a :class:`detectron2.modeling.backbone.ResNet` with detectron2's
    ``DeformBottleneckBlock`` (same parameter names, so model-zoo dconv checkpoints load).
    """
    r = cfg.MODEL.RESNETS  # clear errors for the values detectron2's builder only asserts
    for bad, message in (
        (r.DEPTH not in (18, 34, 50, 101, 152), f"MODEL.RESNETS.DEPTH={r.DEPTH} is not one of [18, 34, 50, 101, 152]"),
        (r.RES5_DILATION not in (1, 2), f"MODEL.RESNETS.RES5_DILATION={r.RES5_DILATION} must be 1 or 2"),
        (r.DEPTH in (18, 34) and (r.RES2_OUT_CHANNELS != 64 or any(r.DEFORM_ON_PER_STAGE) or r.RES5_DILATION != 1
                                  or r.NUM_GROUPS != 1),
         "R18/R34 need MODEL.RESNETS.RES2_OUT_CHANNELS=64, NUM_GROUPS=1, RES5_DILATION=1 and no deformable stage"),
    ):
        if bad:
            raise ValueError(message)
    with resnet_deform_ops(DeformConv, ModulatedDeformConv):
        resnet = build_resnet_backbone(cfg, input_shape)
    if "CELLKIT" in cfg and cfg.CELLKIT.BACKBONE_CHECKPOINT:
        # every stage a CheckpointedStage (same blocks, so the same state dict)
        for i, name in enumerate(resnet.stage_names):
            resnet.stages[i] = CheckpointedStage(*getattr(resnet, name))
            setattr(resnet, name, resnet.stages[i])
    return resnet


class CheckpointedStage(nn.Sequential):
    """A ResNet stage (``nn.Sequential`` of blocks, same parameter names) that, while training with gradients,
    keeps only each block's input and recomputes the block's activations in the backward pass
    (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant: the autocast state is replayed). Exact with GN or
    FrozenBN (no running statistics are updated twice); eval and ``no_grad`` run the plain blocks."""

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        from torch.utils.checkpoint import checkpoint

        for block in self:
            x = checkpoint(block, x, use_reentrant=False)
        return x


@BACKBONE_REGISTRY.register()
def build_cellkit_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-FPN (P2-P6) like ``build_resnet_fpn_backbone``, with deformable stages that need no ``_C``."""
    return FPN(
        bottom_up=build_cellkit_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


class CellkitCheckpointer(CheckpointerCompat):
    """``DetectionCheckpointer`` that loads local files only, saves atomically and logs re-initialised heads.

    Parameters whose shape differs from the checkpoint's (a head with another class count) keep their fresh
    initialisation; each is logged at INFO level with both shapes. :meth:`save` writes a temporary file and renames
    it (:mod:`cellkit.atomic`), then updates ``last_checkpoint`` the same way, so a kill mid-save leaves the
    previous checkpoint and tag intact. A file that cannot be loaded (truncated, not a checkpoint) raises one
    ValueError naming it.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: obj.state_dict() for k, obj in self.checkpointables.items()},
                **kwargs}
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", save_file)
        with atomic.atomic_path(save_file, suffix=".pth") as tmp:
            torch.save(data, tmp)
        atomic.write_text(os.path.join(self.save_dir, rundir.LAST), f"{name}.pth")  # then the last_checkpoint tag

    def load(self, path, *args, **kwargs):
        if path:
            check_local_weights(path)
        return super().load(path, *args, **kwargs)


def build_model(cfg):
    """detectron2's ``build_model`` with cellkit's registered parts available (moved to ``cfg.MODEL.DEVICE``)."""
    return d2_build_model(cfg)


def load_model(cfg, weights: str | os.PathLike):
    """Build the model of ``cfg`` and load a local checkpoint; returns it in eval mode.

    Raises:
        ValueError / FileNotFoundError: see :func:`check_local_weights`.
    """
    check_local_weights(weights, cfg.CELLKIT.WEIGHTS_SOURCE if "CELLKIT" in cfg else "")
    model = build_model(cfg)
    CellkitCheckpointer(model).load(str(weights))
    return model.eval()
