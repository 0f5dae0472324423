"""Atomic file writes: a temporary file in the same directory, renamed onto the target only once it is complete.

Every cellkit output goes through :func:`atomic_path` (or its helpers :func:`write_text` and :func:`write_bytes`),
so a reader sees either the previous file or the complete new one, never a half-written file, and an error while
writing leaves no file behind (and any previous file untouched).

Conventions:
    - The temporary file lives next to the target (``os.replace`` is atomic only within one file system) and has a
      hidden name ``.<name>.<random><suffix>``. Readers of output directories skip names starting with ``.`` as
      leftovers of an interrupted write (e.g. :mod:`cellkit.predictions`), so keep that prefix.
    - The target's directory must exist: creating it is the caller's decision.
    - The output gets the permissions a plain ``open(path, "w")`` gives (``0666 & ~umask``), not ``mkstemp``'s 0600.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_dir", "write_bytes", "write_text", "write_json", "read_json"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on any exception remove it.

    The temporary file already exists (empty) when yielded; the writer may overwrite or replace it. Use ``suffix``
    when the writer derives something from the name: ``np.savez`` appends ``.npz`` unless the name ends with it,
    matplotlib's ``savefig`` picks the format from the suffix.

    Args:
        path: the file to write.
        suffix: the temporary file's name ends with it (default ``".tmp"``).

    Yields:
        The temporary path ``<dir>/.<name>.<random><suffix>``.

    Raises:
        FileNotFoundError: the directory of ``path`` does not exist.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0o022)  # read by setting it (no call only reads it), then set back
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the output gets what open() would give it
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, tag: str) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; on success it takes the place of ``path``, on any exception it is
    removed (a folder's :func:`atomic_path`).

    The folder is ``<parent>/.<name>.<tag>-<pid>`` (made by ``mkdir``: the umask's permissions; the parent is created
    when missing). An existing ``path`` is renamed aside to ``.<name>.old-<pid>`` and deleted once the new folder is in
    place, so a reader finds the previous folder or the complete new one, never a half-written one. Whether an
    existing ``path`` may be replaced is the caller's decision.

    Args:
        path: the folder to write.
        tag: names the temporary folder after its writer (e.g. ``"synth"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{tag}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return ``path`` as a Path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded as-is (no newline translation); return ``path`` as a Path."""
    return write_bytes(path, text.encode(encoding))


def _json_default(obj):
    """``json.dumps`` fallback: numpy scalars and arrays become Python numbers and lists, paths strings."""
    import numpy as np

    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def write_json(path: str | os.PathLike, obj, *, sort_keys: bool = False) -> Path:
    """Write ``obj`` as indented JSON (numpy values and paths converted) plus a newline, atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str):
    """Read a JSON file written by :func:`write_json` (or by hand), with errors that name the file.

    Args:
        path: the file.
        what: what the file is, for the missing-file message (e.g. ``"thresholds file"``).

    Raises:
        FileNotFoundError: ``"<path>: no such <what>"``.
        ValueError: ``"<path>: invalid JSON (...)"`` for unparsable or non-UTF-8 content.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
