"""Test-only fault injection for subprocesses of ``tests/test_faults.py``: ``kill -9`` at a chosen rename.

Python imports ``sitecustomize`` at start-up from ``sys.path``; the fault tests put this folder first on the
subprocess's ``PYTHONPATH`` and describe the fault in ``CELLKIT_FAULT`` = ``WHEN:GLOB:N``:

- ``before``: SIGKILL the process at the ``N``-th ``os.replace``/``os.rename`` whose target's file name matches
  ``GLOB`` (fnmatch), before it renames: the temporary file is complete, the target still the previous one;
- ``partial``: as ``before``, after truncating the temporary file to half its size (a kill in the middle of a write);
- ``after``: SIGKILL right after that rename (the target is new, whatever the writer does next never happens).

Nothing is added to the library: the hooks wrap ``os.replace`` and ``os.rename`` only in processes started with the
variable set. Without it this file does nothing.
"""
import os

_SPEC = os.environ.get("CELLKIT_FAULT", "")

if _SPEC:
    import fnmatch
    import signal

    _when, _glob, _n = _SPEC.rsplit(":", 2)
    if _when not in ("before", "partial", "after"):
        raise SystemExit(f"CELLKIT_FAULT: unknown WHEN {_when!r} (before, partial, after)")
    _target, _seen = int(_n), [0]

    def _kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def _wrap(real):
        def wrapped(src, dst, *args, **kwargs):
            hit = False
            if fnmatch.fnmatch(os.path.basename(os.fspath(dst)), _glob):
                _seen[0] += 1
                hit = _seen[0] == _target
            if hit and _when == "partial" and os.path.isfile(src):
                with open(src, "r+b") as f:
                    f.truncate(os.path.getsize(src) // 2)
            if hit and _when in ("before", "partial"):
                _kill()
            result = real(src, dst, *args, **kwargs)
            if hit:
                _kill()
            return result

        return wrapped

    os.replace = _wrap(os.replace)
    os.rename = _wrap(os.rename)
