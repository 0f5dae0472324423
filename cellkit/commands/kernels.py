"""``python -m cellkit kernels [--owner USER] [--machine-shape SHAPE] [--num-gpus N] [--resume] [NAME ...]``.

Renders ``kernels/<name>/`` (``kernel-metadata.json`` + the notebook with its Kaggle parameters) for the Kaggle user
of :func:`cellkit.publish.resolve_owner` (``make kernels``).
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: its notebooks/ are rendered, into its kernels/

OWNER_HELP = "Kaggle user owning the kernels and datasets (default: KAGGLE_USERNAME, else ~/.kaggle/kaggle.json)"


def add_arguments(parser) -> None:
    from cellkit.publish import DEFAULT_MACHINE_SHAPE, KERNELS

    parser.add_argument("--owner", help=OWNER_HELP)
    parser.add_argument("--machine-shape", default=DEFAULT_MACHINE_SHAPE,
                        help=f"Kaggle machine of the GPU kernels (default {DEFAULT_MACHINE_SHAPE}: GPU T4 x2)")
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="GPUs the training kernels train on (default: all of the machine's, 2 on T4 x2)")
    parser.add_argument("--resume", action="store_true",
                        help="the training kernels attach their own previous output (kernel_sources) and continue it")
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks")
    parser.add_argument("--out", type=Path, default=ROOT / "kernels")
    parser.add_argument("names", nargs="*", default=list(KERNELS), help=f"kernels to render (default: {list(KERNELS)})")


def run(args) -> int:
    from cellkit.cli import CellkitError
    from cellkit.publish import KERNELS, render_kernel, resolve_owner

    owner = resolve_owner(args.owner)
    unknown = [n for n in args.names if n not in KERNELS]
    if unknown:
        raise CellkitError(f"unknown kernel(s) {unknown}; known: {list(KERNELS)}")
    for name in args.names:
        print(render_kernel(name, args.notebooks, args.out, owner, args.machine_shape, args.num_gpus, args.resume))
    return 0
