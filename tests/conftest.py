"""Shared pytest fixtures (generic only).

Real data lives in ``../shared/data`` next to the checkout (override with the env var ``CELLKIT_REAL_DATA``); tests that
need it take the ``real_data`` (or ``real_train_csv``) fixture, are marked ``@pytest.mark.realdata`` and skip cleanly
when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _share_the_cores() -> None:
    """Under pytest-xdist (``make test``), each worker's torch, and every process it starts, gets its share of the
    cores (``OMP_NUM_THREADS``, unless set): two workers each running torch on all cores are slower than one. Runs
    at import, before any test module imports torch."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)


_share_the_cores()


def pytest_collection_modifyitems(config, items):
    """Files holding a ``slow`` test run first (stable: the order within a file is kept), so that pytest-xdist's
    ``--dist loadfile --no-loadscope-reorder`` starts the long files early and the many short ones fill the gaps."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def real_data_root() -> Path:
    """Where the real data should be: ``$CELLKIT_REAL_DATA`` or ``<repo>/../shared/data`` (may not exist)."""
    env = os.environ.get("CELLKIT_REAL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Path of the real data folder (``sartorius/``, ``livecell/``); skips the test when it is absent."""
    root = real_data_root()
    if not (root / "sartorius").is_dir():
        pytest.skip(f"real data not found at {root} (set CELLKIT_REAL_DATA)")
    return root


@pytest.fixture(scope="session")
def real_train_csv(real_data: Path) -> Path:
    """Path of the real ``sartorius/train.csv``; skips when absent."""
    path = real_data / "sartorius" / "train.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(autouse=True)
def _data_check_cache(tmp_path_factory, monkeypatch):
    """The data-check cache (``cellkit.datacheck``) of every test in the session's temp folder, never in
    ``~/.cache/cellkit`` (subprocesses inherit the variable)."""
    monkeypatch.setenv("CELLKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cellkit-cache"))
