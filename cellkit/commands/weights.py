"""``python -m cellkit weights --run RUN [--owner USER] [--out weights]``.

Builds the weights dataset the submission kernel attaches from a finished run (``make weights``,
:func:`cellkit.publish.build_weights`).
"""
from pathlib import Path

from cellkit.commands.kernels import OWNER_HELP, ROOT


def add_arguments(parser) -> None:
    parser.add_argument("--owner", help=OWNER_HELP)
    parser.add_argument("--run", type=Path, required=True, help="the run directory (fold<K>/, thresholds.json)")
    parser.add_argument("--out", type=Path, default=ROOT / "weights")


def run(args) -> int:
    from cellkit.publish import build_weights, resolve_owner

    print(build_weights(args.run, args.out, resolve_owner(args.owner)))
    return 0
