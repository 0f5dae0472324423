"""cellkit.config: presets with the seed's values, CELLKIT keys, errors on unknown presets and keys."""
from __future__ import annotations

import inspect
import re

import pytest

pytest.importorskip("detectron2")

from cellkit import config as ck  # noqa: E402


@pytest.fixture(scope="module")
def presets():
    return {name: ck.get_preset_cfg(name) for name in ck.preset_names()}


def test_preset_names():
    assert ck.preset_names() == ["demo", "paper", "paper_pretrain", "r50", "r50_pretrain"]


def _finetune_recipe(cfg):
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[8], [16], [32], [64], [128]]
    assert cfg.MODEL.ROI_HEADS.NAME == "CascadeROIHeads"
    assert cfg.MODEL.MASK_ON
    assert cfg.MODEL.WEIGHTS == ""  # nothing from the model zoo's URLs
    assert cfg.MODEL.BACKBONE.NAME == "build_cellkit_resnet_fpn_backbone"
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert cfg.TEST.DETECTIONS_PER_IMAGE >= 1000
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TEST >= 2000 and cfg.MODEL.RPN.PRE_NMS_TOPK_TEST >= 2000
    assert cfg.INPUT.MASK_FORMAT == "bitmask"
    assert not cfg.INPUT.CROP.ENABLED
    a = cfg.CELLKIT.AUG
    assert a.HFLIP_PROB > 0 and a.VFLIP_PROB > 0
    assert 0 < a.ROTATION <= 15 and 0 < a.BRIGHTNESS <= 0.2
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and len(cfg.SOLVER.STEPS) >= 1
    assert cfg.SOLVER.WEIGHT_DECAY > 0
    assert cfg.CELLKIT.EARLY_STOP_PATIENCE > 0 and cfg.CELLKIT.MODE == "finetune"


@pytest.mark.parametrize("name", ["paper", "r50"])
def test_finetune_presets(presets, name):
    cfg = presets[name]
    _finetune_recipe(cfg)
    # (W, H) = (1408, 1040), (1490, 1100)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (1040, 1100) and cfg.INPUT.MAX_SIZE_TRAIN == 1490
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert cfg.SOLVER.MAX_ITER == 5000
    assert cfg.SOLVER.BASE_LR < presets[f"{name}_pretrain"].SOLVER.BASE_LR
    # TTA: (1490, 1100), (1408, 1040) x horizontal flip
    assert tuple(cfg.TEST.AUG.MIN_SIZES) == (1100, 1040) and cfg.TEST.AUG.MAX_SIZE == 1490 and cfg.TEST.AUG.FLIP
    assert cfg.CELLKIT.WEIGHTS_SOURCE


def test_paper_is_x152_dconv(presets):
    r = presets["paper"].MODEL.RESNETS
    assert (r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP) == (152, 32, 8)
    assert list(r.DEFORM_ON_PER_STAGE) == [False, True, True, True]
    assert presets["paper"].MODEL.ROI_BOX_HEAD.NORM == "GN" and presets["paper"].MODEL.ROI_MASK_HEAD.NORM == "GN"
    r50 = presets["r50"].MODEL.RESNETS
    assert r50.DEPTH == 50 and not any(r50.DEFORM_ON_PER_STAGE)


@pytest.mark.parametrize("name", ["paper_pretrain", "r50_pretrain"])
def test_pretrain_presets(presets, name):
    cfg = presets[name]
    assert cfg.CELLKIT.MODE == "pretrain"
    # (W, H) = (1056, 780), (1232, 910), (1408, 1040), flips only
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (780, 910, 1040) and cfg.INPUT.MAX_SIZE_TRAIN == 1408
    assert cfg.SOLVER.MAX_ITER == 200000
    assert cfg.CELLKIT.AUG.ROTATION == 0 and cfg.CELLKIT.AUG.BRIGHTNESS == 0
    assert cfg.CELLKIT.AUG.HFLIP_PROB > 0 and cfg.CELLKIT.AUG.VFLIP_PROB > 0
    base = presets[name.replace("_pretrain", "")]
    assert cfg.MODEL.RESNETS.DEPTH == base.MODEL.RESNETS.DEPTH


def test_demo_preset_is_small_gn(presets):
    cfg = presets["demo"]
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.RESNETS.NORM == "GN" and cfg.MODEL.FPN.NORM == "GN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.SOLVER.MAX_ITER <= 500 and max(cfg.INPUT.MIN_SIZE_TRAIN) <= 520
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"  # one box stage: learns faster from scratch on CPU
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[8], [16], [32], [64], [128]]


def test_every_cellkit_key_is_commented():
    lines = inspect.getsource(ck.add_cellkit_config).splitlines()
    key = r'\s*"[A-Z_]+": '
    assigned = [i for i, line in enumerate(lines) if re.match(key, line)]
    leaves = [i for i in assigned if not lines[i].rstrip().endswith("{")]  # a section opens a nested dict
    cfg = ck.new_config()
    n_keys = sum(len(v) if isinstance(v, dict) else 1 for v in cfg.CELLKIT.values())
    assert len(leaves) == n_keys >= 15
    for i in leaves:
        j = i - 1
        while not lines[j].strip().startswith("#"):  # a comment right above (possibly above sibling keys)
            assert re.match(key, lines[j]), f"key without comment: {lines[i].strip()}"
            j -= 1


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*demo.*paper"):
        ck.get_preset_cfg("nope")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        ck.get_preset_cfg("/tmp/definitely/missing.yaml")


def test_unknown_override_key():
    with pytest.raises(ValueError, match="unknown config key 'SOLVER.NOT_A_KEY'"):
        ck.get_preset_cfg("demo", ["SOLVER.NOT_A_KEY", "1"])
    with pytest.raises(ValueError, match="unknown config key 'CELLKIT.NOPE.X'"):
        ck.get_preset_cfg("demo", ["CELLKIT.NOPE.X", "1"])
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        ck.get_preset_cfg("demo", ["SOLVER.MAX_ITER"])
    with pytest.raises(ValueError, match="SOLVER.MAX_ITER"):
        ck.get_preset_cfg("demo", ["SOLVER.MAX_ITER", "'many'"])
    cfg = ck.get_preset_cfg("demo", ["SOLVER.MAX_ITER", "7", "CELLKIT.AUG.ROTATION", "3.5"])
    assert cfg.SOLVER.MAX_ITER == 7 and cfg.CELLKIT.AUG.ROTATION == 3.5


def test_user_yaml_bases_and_unknown_key(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text('_BASE_: "demo"\nSOLVER:\n  MAX_ITER: 11\n')
    cfg = ck.get_preset_cfg(good)
    assert cfg.SOLVER.MAX_ITER == 11 and cfg.MODEL.RESNETS.DEPTH == 18 and cfg.CELLKIT.PRESET == str(good.resolve())
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "mine.yaml"\nCELLKIT:\n  EARLY_STOP_PATIENCE: 2\n')
    cfg = ck.get_preset_cfg(child)
    assert cfg.SOLVER.MAX_ITER == 11 and cfg.CELLKIT.EARLY_STOP_PATIENCE == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "demo"\nMODEL:\n  RESNET:\n    DEPTH: 50\n')
    with pytest.raises(ValueError, match=r"bad\.yaml.*MODEL\.RESNET"):
        ck.get_preset_cfg(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text('_BASE_: "loop.yaml"\n')
    with pytest.raises(ValueError, match="cycle"):
        ck.get_preset_cfg(loop)
    missing_base = tmp_path / "mb.yaml"
    missing_base.write_text('_BASE_: "Misc/no_such_config.yaml"\n')
    with pytest.raises(FileNotFoundError, match="no_such_config"):
        ck.get_preset_cfg(missing_base)


def test_resolve_runtime_cpu_and_scratch():
    cfg = ck.get_preset_cfg("r50")
    notes = ck.resolve_runtime(cfg, has_cuda=False)
    assert cfg.MODEL.DEVICE == "cpu" and not cfg.SOLVER.AMP.ENABLED
    assert cfg.MODEL.RESNETS.NORM == "GN" and cfg.MODEL.FPN.NORM == "GN" and cfg.MODEL.ROI_MASK_HEAD.NORM == "GN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert tuple(cfg.MODEL.PIXEL_STD) == ck.SCRATCH_PIXEL_STD
    assert any("FrozenBN" in n for n in notes)
    cfg = ck.get_preset_cfg("paper", ["MODEL.WEIGHTS", "/some/checkpoint.pkl"])
    ck.resolve_runtime(cfg, has_cuda=True)
    assert cfg.MODEL.DEVICE == "cuda" and cfg.SOLVER.AMP.ENABLED
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2  # a checkpoint: as in the zoo
    assert list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]


def test_save_and_load_run_config(tmp_path):
    cfg = ck.get_preset_cfg("paper", ["SOLVER.MAX_ITER", "123"])
    path = ck.save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml" and [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
    back = ck.load_run_config(tmp_path / "run")
    assert back.SOLVER.MAX_ITER == 123 and back.CELLKIT.PRESET == "paper"
    assert back.MODEL.ANCHOR_GENERATOR.SIZES == cfg.MODEL.ANCHOR_GENERATOR.SIZES
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        ck.load_run_config(tmp_path)


def _step_trainer_name(cfg) -> str:
    """The step trainer detectron2's ``DefaultTrainer.__init__`` (which CellkitTrainer runs) picks for ``cfg``."""
    import inspect

    from detectron2.engine import DefaultTrainer

    assert "(AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)" in inspect.getsource(DefaultTrainer.__init__)
    return "AMPTrainer" if cfg.SOLVER.AMP.ENABLED else "SimpleTrainer"


def test_amp_follows_the_config_on_cuda_and_is_off_on_cpu(tmp_path):
    cfg = ck.get_preset_cfg("paper", ["MODEL.WEIGHTS", "/some/checkpoint.pkl", "SOLVER.AMP.ENABLED", "False"])
    notes = ck.resolve_runtime(cfg, has_cuda=True)
    assert cfg.MODEL.DEVICE == "cuda" and cfg.SOLVER.AMP.ENABLED is False
    assert not any("AMP" in n for n in notes)
    # it survives into the saved config and picks the run's step trainer
    back = ck.load_run_config(ck.save_config(cfg, tmp_path / "run").parent)
    assert back.SOLVER.AMP.ENABLED is False and _step_trainer_name(back) == "SimpleTrainer"
    on = ck.get_preset_cfg("paper", ["MODEL.WEIGHTS", "/some/checkpoint.pkl"])
    ck.resolve_runtime(on, has_cuda=True)
    assert on.SOLVER.AMP.ENABLED is True and _step_trainer_name(on) == "AMPTrainer"
    cpu = ck.get_preset_cfg("paper")
    notes = ck.resolve_runtime(cpu, has_cuda=False)
    assert cpu.SOLVER.AMP.ENABLED is False and any("AMP training needs CUDA" in n for n in notes)
    # an explicit MODEL.DEVICE cpu on a CUDA machine: no AMP either
    cpu_dev = ck.get_preset_cfg("paper", ["MODEL.DEVICE", "cpu"])
    ck.resolve_runtime(cpu_dev, has_cuda=True)
    assert cpu_dev.SOLVER.AMP.ENABLED is False


def test_one_fold_seed_default_everywhere():
    """`cellkit train` (when it writes folds.csv), `cellkit folds` and notebook 02 split with the same seed."""
    import inspect

    from cellkit import chain, folds
    from cellkit.cli import build_parser
    from cellkit.config import new_config

    parser = build_parser("folds")
    folds_cmd = parser._subparsers._group_actions[0].choices["folds"]
    cli_seed = next(a.default for a in folds_cmd._actions if a.dest == "seed")
    notebook_seed = chain.notebook_parameters(chain.NOTEBOOK_DIR / "02_folds.ipynb")["SEED"]["default"]
    library_seed = inspect.signature(folds.make_folds).parameters["seed"].default
    assert new_config().CELLKIT.DATA.FOLD_SEED == cli_seed == int(notebook_seed) == library_seed == 0
