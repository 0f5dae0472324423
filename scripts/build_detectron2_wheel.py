#!/usr/bin/env python3
"""Build a pure-Python ``detectron2`` wheel from the ``sal-detectron2==0.7.2`` re-packaging.

No package registry ships a buildable current detectron2 release. ``sal-detectron2==0.7.2`` re-packages upstream
detectron2 (commit a59f0563, three trivial diffs) as a cp310 wheel. Its compiled ``_C`` extension cannot load on
Python 3.11, but its pure-Python ``detectron2/`` package runs Cascade Mask R-CNN on CPU (cellkit supplies the
deformable convolution that ``_C`` would provide, see ``cellkit.modeling``).

This script (standard library only, so it runs before anything is installed):

1. downloads the wheel with ``pip download`` (skipped when it is already in ``--cache``),
2. checks its sha256,
3. writes ``detectron2-0.6+sal072-py3-none-any.whl`` holding only ``detectron2/`` (no ``_C*.so``, no top-level
   ``tools/`` package) and declaring the dependencies the original omits or pins wrongly (no ``numpy<2``).

The same wheel goes into the offline Kaggle wheels dataset (``make wheels``).

Usage:
    python scripts/build_detectron2_wheel.py --out wheels/
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE_NAME = "sal-detectron2==0.7.2"
SOURCE_FILE = "sal_detectron2-0.7.2-cp310-none-any.whl"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
VERSION = "0.6+sal072"
WHEEL_NAME = f"detectron2-{VERSION}-py3-none-any.whl"
DIST_INFO = f"detectron2-{VERSION}.dist-info"

# What detectron2 imports at run time; the re-packaging omits several and pins numpy<2, which we drop.
REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "packaging",
    "setuptools<82",  # detectron2.model_zoo imports pkg_resources (left setuptools in 82)
]


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_source(cache: Path) -> Path:
    """Return the verified source wheel, downloading it into ``cache`` with pip if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / SOURCE_FILE
    if not src.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.10", SOURCE_NAME, "-d", str(cache)]
        subprocess.run(cmd, check=True)
    actual = sha256_of(src)
    if actual != SOURCE_SHA256:
        src.unlink()
        raise SystemExit(f"{src}: sha256 {actual} != expected {SOURCE_SHA256}; file removed")
    return src


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(src: Path, out_dir: Path) -> Path:
    """Write the pure-Python wheel into ``out_dir`` atomically and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / WHEEL_NAME
    metadata = "\n".join(
        ["Metadata-Version: 2.1", "Name: detectron2", f"Version: {VERSION}",
         "Summary: detectron2 (upstream a59f0563 via sal-detectron2 0.7.2), pure-Python, without _C",
         "Home-page: https://github.com/facebookresearch/detectron2", "License: Apache-2.0",
         "Requires-Python: >=3.8"] + [f"Requires-Dist: {r}" for r in REQUIRES]) + "\n"
    wheel_meta = "Wheel-Version: 1.0\nGenerator: cellkit\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    records = []
    fd, tmp = tempfile.mkstemp(suffix=".whl", dir=out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in sorted(zin.infolist(), key=lambda i: i.filename):
                name = info.filename
                if not name.startswith("detectron2/") or name.endswith("/"):
                    continue
                if name.endswith(".so") or "/_C." in name:
                    continue
                data = zin.read(name)
                zout.writestr(name, data)
                records.append(_record_line(name, data))
            license_data = next((zin.read(n) for n in zin.namelist() if n.endswith(".dist-info/LICENSE")), b"")
            for name, text in [(f"{DIST_INFO}/METADATA", metadata.encode()),
                               (f"{DIST_INFO}/WHEEL", wheel_meta.encode()),
                               (f"{DIST_INFO}/top_level.txt", b"detectron2\n"),
                               (f"{DIST_INFO}/LICENSE", license_data)]:
                zout.writestr(name, text)
                records.append(_record_line(name, text))
            records.append(f"{DIST_INFO}/RECORD,,")
            zout.writestr(f"{DIST_INFO}/RECORD", "\n".join(records) + "\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("wheels"), help="folder for the pure-Python wheel")
    parser.add_argument("--cache", type=Path, default=Path("wheels/.cache"), help="folder for the downloaded source")
    args = parser.parse_args(argv)
    if (args.out / WHEEL_NAME).exists():
        print(args.out / WHEEL_NAME)
        return 0
    print(repack(fetch_source(args.cache), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
