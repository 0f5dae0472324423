"""cellkit.modeling: deformable convolution without detectron2's _C, the registered backbone, local-only weights."""
from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("detectron2")

import torch.nn.functional as F  # noqa: E402

from cellkit import compat, modeling  # noqa: E402
from cellkit.config import get_preset_cfg, resolve_runtime  # noqa: E402


@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (4, 2, 1), (2, 1, 2)])
def test_zero_offsets_equal_conv(groups, stride, dilation):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 13, 17)
    m = modeling.TorchvisionDeformConv(8, 16, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups)
    ref = F.conv2d(x, m.weight, None, stride, dilation, dilation, groups)
    offset = torch.zeros(2, 18, *ref.shape[2:])
    assert torch.allclose(m(x, offset), ref, atol=1e-5)


@pytest.mark.parametrize("deformable_groups", [1, 2])
def test_modulated_zero_offsets_unit_mask_equal_conv(deformable_groups):
    torch.manual_seed(1)
    x = torch.randn(1, 8, 11, 9)
    m = modeling.TorchvisionModulatedDeformConv(8, 6, 3, padding=1, groups=2, deformable_groups=deformable_groups)
    torch.nn.init.normal_(m.bias)
    ref = F.conv2d(x, m.weight, m.bias, 1, 1, 1, 2)
    g = deformable_groups
    out = m(x, torch.zeros(1, 18 * g, 11, 9), torch.ones(1, 9 * g, 11, 9))
    assert torch.allclose(out, ref, atol=1e-5)
    half = m(x, torch.zeros(1, 18 * g, 11, 9), torch.full((1, 9 * g, 11, 9), 0.5))
    assert torch.allclose(half - m.bias.view(1, -1, 1, 1), (ref - m.bias.view(1, -1, 1, 1)) * 0.5, atol=1e-5)


def test_integer_offset_shifts_sampling():
    """Offsets are (dy, dx) pairs per kernel tap: dy=+1 everywhere samples one row lower."""
    torch.manual_seed(2)
    x = torch.randn(1, 3, 10, 12)
    m = modeling.TorchvisionDeformConv(3, 4, 3, padding=1)
    offset = torch.zeros(1, 18, 10, 12)
    offset[:, 0::2] = 1.0  # dy
    out = m(x, offset)
    ref = F.conv2d(x, m.weight, None, 1, 1)
    assert torch.allclose(out[:, :, 1:-2], ref[:, :, 2:-1], atol=1e-5)


def test_gradients_reach_weight_and_offsets():
    torch.manual_seed(3)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    m = modeling.TorchvisionModulatedDeformConv(4, 4, 3, padding=1)
    offset = (0.3 * torch.randn(1, 18, 8, 8)).requires_grad_()
    mask = torch.rand(1, 9, 8, 8).requires_grad_()
    m(x, offset, mask).square().sum().backward()
    for t in (x.grad, offset.grad, mask.grad, m.weight.grad, m.bias.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0


def test_empty_input_and_no_bias_rule():
    m = modeling.TorchvisionDeformConv(4, 6, 3, stride=2, padding=1)
    assert m(torch.zeros(0, 4, 9, 9), torch.zeros(0, 18, 5, 5)).shape == (0, 6, 5, 5)
    with pytest.raises(ValueError, match="no bias"):
        modeling.TorchvisionDeformConv(4, 6, 3, bias=True)


def test_nan_offsets_raise_instead_of_crashing():
    m = modeling.TorchvisionDeformConv(4, 4, 3, padding=1)
    with pytest.raises(FloatingPointError, match="non-finite offsets"):
        m(torch.randn(1, 4, 6, 6), torch.full((1, 18, 6, 6), float("nan")))


def test_uses_torchvision_without_compiled_detectron2():
    if not modeling.HAS_D2_C:
        assert modeling.DeformConv is modeling.TorchvisionDeformConv
        assert modeling.ModulatedDeformConv is modeling.TorchvisionModulatedDeformConv


def _small_resnet_cfg(deform=(False, True, True, True), modulated=False):
    cfg = get_preset_cfg("r50", [
        "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.STEM_OUT_CHANNELS", "32", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.RESNETS.NUM_GROUPS", "2", "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE", str(list(deform)), "MODEL.RESNETS.DEFORM_MODULATED", str(modulated),
    ])
    return cfg


@pytest.mark.parametrize("modulated", [False, True])
def test_backbone_names_match_detectron2(modulated):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

    ours = modeling.build_cellkit_resnet_fpn_backbone(_small_resnet_cfg(modulated=modulated), ShapeSpec(channels=3))
    plain = build_resnet_fpn_backbone(_small_resnet_cfg(deform=(False,) * 4), ShapeSpec(channels=3))
    ours_sd, plain_sd = ours.state_dict(), plain.state_dict()
    extra = set(ours_sd) - set(plain_sd)
    assert not set(plain_sd) - set(ours_sd)
    for key in plain_sd:
        assert ours_sd[key].shape == plain_sd[key].shape, key
    n_deform_blocks = 4 + 6 + 3  # res3, res4, res5 of R50
    assert len([k for k in extra if "conv2_offset" in k]) == 2 * n_deform_blocks
    assert all("conv2_offset" in k for k in extra)  # detectron2 builds conv2 without bias in both modes
    assert ours_sd["bottom_up.res3.0.conv2_offset.weight"].shape[0] == (27 if modulated else 18)
    x = torch.randn(1, 3, 64, 64)
    assert set(ours(x)) == {"p2", "p3", "p4", "p5", "p6"}


def _deform_block(*args, **kwargs):
    """detectron2's own DeformBottleneckBlock, its 3x3 conv built from cellkit's op (as the backbone builder does)."""
    from detectron2.modeling.backbone.resnet import DeformBottleneckBlock

    with compat.resnet_deform_ops(modeling.DeformConv, modeling.ModulatedDeformConv):
        return DeformBottleneckBlock(*args, **kwargs)


def test_detectron2_deform_block_state_dict_loads():
    """detectron2's DeformBottleneckBlock built on cellkit's op has the model-zoo dconv parameter names (a state dict
    of them loads strictly and runs), and the op swap is undone after the build."""
    from detectron2.modeling.backbone import resnet

    before = resnet.DeformConv, resnet.ModulatedDeformConv
    block = _deform_block(32, 64, bottleneck_channels=16, stride=2, num_groups=2, norm="FrozenBN",
                          deform_num_groups=1)
    assert (resnet.DeformConv, resnet.ModulatedDeformConv) == before
    assert isinstance(block.conv2, modeling.DeformConv)
    sd = {k: (torch.rand_like(v) + 0.5) if k.endswith("running_var") else 0.1 * torch.randn_like(v)
          for k, v in block.state_dict().items()}
    norm = ("weight", "bias", "running_mean", "running_var")
    zoo = {f"{c}.{p}" for c in ("conv1", "conv2", "conv3", "shortcut") for p in ["weight"] + [f"norm.{n}" for n in norm]}
    assert set(sd) == zoo | {"conv2_offset.weight", "conv2_offset.bias"}
    block.load_state_dict(sd, strict=True)
    assert block(torch.randn(1, 32, 16, 16)).shape == (1, 64, 8, 8)


def test_check_local_weights(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        modeling.check_local_weights("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    with pytest.raises(ValueError, match="never downloads"):
        modeling.check_local_weights("https://example.invalid/model.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth.*expected: from a run"):
        modeling.check_local_weights(tmp_path / "missing.pth", hint="from a run")
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert modeling.check_local_weights(f) == f


def _tiny_model_cfg(num_classes):
    # the demo's small backbone with the cascade's three box stages (as in `paper` / `r50`)
    cfg = get_preset_cfg("demo", ["MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes),
                                  "MODEL.ROI_HEADS.NAME", "CascadeROIHeads"])
    resolve_runtime(cfg, has_cuda=False)
    return cfg


def test_checkpointer_reinitialises_heads_with_other_class_count(tmp_path, caplog):
    torch.manual_seed(0)
    src = modeling.build_model(_tiny_model_cfg(8))
    torch.save({"model": src.state_dict()}, tmp_path / "pre.pth")
    dst = modeling.build_model(_tiny_model_cfg(3))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="cellkit.modeling"):
        modeling.CellkitCheckpointer(dst).load(str(tmp_path / "pre.pth"))
    messages = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    reinit = {m.split()[2].rstrip(":") for m in messages}
    assert reinit == {f"roi_heads.box_predictor.{s}.cls_score.{p}" for s in range(3) for p in ("weight", "bias")} | {
        "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}
    sd, src_sd = dst.state_dict(), src.state_dict()
    for k in sd:
        if k in reinit:
            assert torch.equal(sd[k], before[k])  # fresh init kept
        else:
            assert torch.equal(sd[k], src_sd[k]), k
    with pytest.raises(ValueError, match="never downloads"):
        modeling.CellkitCheckpointer(dst).load("detectron2://x.pkl")


def test_load_model_eval_mode(tmp_path):
    cfg = _tiny_model_cfg(3)
    model = modeling.build_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "m.pth")
    loaded = modeling.load_model(cfg, tmp_path / "m.pth")
    assert not loaded.training
    with pytest.raises(FileNotFoundError):
        modeling.load_model(cfg, tmp_path / "nope.pth")


@pytest.mark.parametrize("modulated", [False, True])
def test_deform_conv_under_cpu_autocast_matches_float32(modulated):
    """A deformable block under bfloat16 autocast: the deformable op itself runs in float32 (output dtype), and the
    block's output matches the float32 block within bfloat16's tolerance."""
    torch.manual_seed(0)
    block = _deform_block(16, 32, bottleneck_channels=8, stride=1, norm="", deform_modulated=modulated).eval()
    torch.nn.init.normal_(block.conv2_offset.weight, std=0.05)  # non-zero offsets
    x = torch.randn(2, 16, 12, 14)
    with torch.no_grad():
        ref = block(x)
        seen = []
        hook = block.conv2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        hook.remove()
    assert seen == [torch.float32]
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    assert (out.float() - ref).abs().mean() < 2e-2 * ref.abs().mean() + 1e-3


def test_compiled_deform_conv_wrapper_runs_float32_under_autocast():
    """The float32 wrapper put around detectron2's compiled classes (when _C exists), exercised on a class with the
    same forward contract (norm and activation applied inside forward)."""
    torch.manual_seed(0)
    wrapped = modeling._float32_forward(modeling.TorchvisionDeformConv)
    conv = wrapped(4, 6, 3, padding=1, norm=torch.nn.GroupNorm(2, 6), activation=torch.nn.ReLU())
    plain = modeling.TorchvisionDeformConv(4, 6, 3, padding=1, norm=conv.norm, activation=conv.activation)
    plain.weight = conv.weight
    x, off = torch.randn(1, 4, 9, 9), 0.3 * torch.randn(1, 18, 9, 9)
    with torch.no_grad():
        ref = plain(x, off)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x.bfloat16(), off.bfloat16())
    assert conv.norm is not None and conv.activation is not None  # restored
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_backbone_activation_checkpointing_same_outputs_gradients_and_names():
    cfg = get_preset_cfg("r50", ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, False]"])
    resolve_runtime(cfg, has_cuda=False)
    torch.manual_seed(0)
    plain = modeling.build_cellkit_resnet_fpn_backbone(cfg, modeling.ShapeSpec(channels=3))
    cfg.CELLKIT.BACKBONE_CHECKPOINT = True
    ckpt = modeling.build_cellkit_resnet_fpn_backbone(cfg, modeling.ShapeSpec(channels=3))
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    assert all(isinstance(s, modeling.CheckpointedStage) for s in ckpt.bottom_up.stages)
    ckpt.load_state_dict(plain.state_dict())
    torch.nn.init.normal_(plain.bottom_up.res3[0].conv2_offset.weight, std=0.01)
    ckpt.bottom_up.res3[0].conv2_offset.weight.data.copy_(plain.bottom_up.res3[0].conv2_offset.weight.data)
    x = torch.randn(1, 3, 64, 96)
    outs = []
    for net in (plain, ckpt):
        net.train()
        net.zero_grad()
        feats = net(x)
        sum(f.square().mean() for f in feats.values()).backward()
        outs.append((feats, {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}))
    for k in outs[0][0]:
        torch.testing.assert_close(outs[1][0][k], outs[0][0][k])
    assert outs[0][1].keys() == outs[1][1].keys()
    for k in outs[0][1]:
        torch.testing.assert_close(outs[1][1][k], outs[0][1][k], rtol=1e-4, atol=1e-6)
