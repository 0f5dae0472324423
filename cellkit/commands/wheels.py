"""``python -m cellkit wheels [--owner USER] [--out wheels] [--python-versions 3.12,3.13] [--platform TAG]``.

Builds the offline wheels dataset the kernels install from with ``pip install --no-index`` (``make wheels``,
:func:`cellkit.publish.build_wheels`).
"""
from pathlib import Path

from cellkit.commands.kernels import OWNER_HELP, ROOT


def add_arguments(parser) -> None:
    from cellkit.publish import KAGGLE_PLATFORM, KAGGLE_PYTHONS

    parser.add_argument("--owner", help=OWNER_HELP)
    parser.add_argument("--out", type=Path, default=ROOT / "wheels")
    parser.add_argument("--python-versions", default=",".join(KAGGLE_PYTHONS),
                        help=f"Python versions of the binary wheels (default {','.join(KAGGLE_PYTHONS)})")
    parser.add_argument("--platform", default=KAGGLE_PLATFORM, help="Kaggle's platform tag")


def run(args) -> int:
    from cellkit.publish import build_wheels, parse_python_versions, resolve_owner

    for wheel in build_wheels(args.out, ROOT, resolve_owner(args.owner), parse_python_versions(args.python_versions),
                              args.platform):
        print(wheel.name)
    return 0
