"""Build ``.gpu/``: what ``benchmarks/gpu_check.sh`` carries to a bare GPU machine (<= 64 MiB in all).

A bare GPU machine here has Python 3.12 and torch but none of detectron2, fvcore, iopath, yacs, omegaconf,
hydra-core (antlr4), pycocotools or termcolor, and no network. This script, run on the development machine:

1. ``.gpu/wheels/``: those packages as wheels for ``--python-version`` (binary ones for manylinux x86_64; the
   pure-Python sdists fvcore and antlr4 built into wheels here), plus cellkit's detectron2 wheel (``make install``
   builds it into ``wheels/``). cellkit itself travels as source with the working tree.
2. ``.gpu/data/sartorius/``: a real-data subset in the competition layout: ``--per-type`` images of each cell type
   (always including the densest image) with their ``train.csv`` rows.

``.gpu/`` is git-ignored; name it in the device tool's ``carry``. Prints the bundle's size and fails above the limit.

Usage: ``.venv/bin/python benchmarks/gpu_bundle.py [--data ../shared/data/sartorius] [--per-type 8]``
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIMIT = 64 * 2**20
"""What travels with one device call, working tree included."""

BINARY = ["pycocotools==2.0.11"]
"""Compiled packages: wheels for the target Python."""

PURE = ["fvcore==0.1.5.post20221221", "iopath==0.1.9", "yacs==0.1.8", "omegaconf==2.3.0", "hydra-core==1.3.2",
        "antlr4-python3-runtime==4.9.3", "termcolor==3.3.0"]
"""Pure-Python packages: a wheel when the registry has one, else built from the sdist here (py3-none-any)."""

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def download_wheels(out: Path, python_version: str) -> list[Path]:
    """Fill ``out`` with the wheels a bare machine lacks; returns them."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                          "--implementation", "cp", *plat, "-d", str(out), *BINARY], check=True)
    for spec in PURE:
        name = spec.split("==")[0].replace("-", "_").lower()
        if any(p.name.lower().startswith(name) for p in out.glob("*.whl")):
            continue
        try:
            subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out), spec],
                           check=True, capture_output=True)
        except subprocess.CalledProcessError:  # sdist only: build the (pure-Python) wheel here
            subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(out), spec], check=True)
    d2 = sorted((REPO / "wheels").glob("detectron2-*.whl"))
    if not d2:
        raise SystemExit("gpu_bundle: no wheels/detectron2-*.whl: run `make install` first")
    shutil.copy2(d2[-1], out / d2[-1].name)
    return sorted(out.glob("*.whl"))


def write_data_subset(src: Path, dst: Path, per_type: int) -> list[str]:
    """Copy ``per_type`` images of each cell type (the densest image first) and their rows into ``dst``.

    Args:
        src: competition-layout folder (``train.csv``, ``train/``).
        dst: the subset folder (replaced).
        per_type: images per cell type.

    Returns:
        The image ids copied.
    """
    from cellkit import data
    from cellkit.atomic import atomic_path

    table = data.read_train_csv(src / "train.csv")
    counts = table.groupby("id", sort=False).size()
    densest = str(counts.idxmax())
    ids: list[str] = [densest]
    images = table.drop_duplicates("id")[["id", "cell_type"]]
    for cell_type in sorted(images["cell_type"].unique()):
        for image_id in images.loc[images["cell_type"] == cell_type, "id"]:
            if sum(1 for i in ids if images.set_index("id").loc[i, "cell_type"] == cell_type) >= per_type:
                break
            if image_id not in ids:
                ids.append(str(image_id))
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "train").mkdir(parents=True)
    for image_id in ids:
        path = data.find_image(src / "train", image_id)
        shutil.copy2(path, dst / "train" / path.name)
    subset = table[table["id"].isin(ids)]
    with atomic_path(dst / "train.csv") as tmp:
        subset.to_csv(tmp, index=False, lineterminator="\n")
    return ids


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / ".gpu"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sartorius"),
                   help="real competition-layout folder")
    p.add_argument("--per-type", type=int, default=8)
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    args = p.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download_wheels(Path(tmp) / "wheels", args.python_version)
        if (out / "wheels").exists():
            shutil.rmtree(out / "wheels")
        (out / "wheels").parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(Path(tmp) / "wheels", out / "wheels")
    ids = write_data_subset(Path(args.data), out / "data" / "sartorius", args.per_type)
    size = tree_size(out)
    print(f"gpu_bundle: {len(wheels)} wheels ({tree_size(out / 'wheels') / 2**20:.1f} MiB), {len(ids)} images "
          f"({tree_size(out / 'data') / 2**20:.1f} MiB) -> {out}: {size / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB")
    for w in sorted((out / "wheels").glob("*.whl")):
        print(f"  {w.name}")
    if size > LIMIT:
        print("gpu_bundle: over the limit: lower --per-type", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
