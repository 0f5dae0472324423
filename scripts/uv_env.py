#!/usr/bin/env python3
"""Print pip's configuration as uv's environment variables, for ``env $(python scripts/uv_env.py) uv pip install``.

``make install`` installs with uv (it unpacks the ~4 GB of torch and CUDA wheels in parallel: see the Makefile), but
uv reads no pip configuration. This hands on what ``pip config list`` shows (configuration files and ``PIP_*``
variables; a variable wins over a file, an ``install.`` key over a ``global.`` one), so both installers see the same
indexes, local wheel folders, constraints and CA bundle:

==================  ==========================
pip                 uv
==================  ==========================
``index-url``       ``UV_DEFAULT_INDEX``
``extra-index-url`` ``UV_INDEX`` (space-separated)
``find-links``      ``UV_FIND_LINKS`` (comma-separated)
``constraint``      ``UV_CONSTRAINT`` (space-separated)
``cert``            ``SSL_CERT_FILE``
==================  ==========================

plus ``UV_INDEX_STRATEGY=unsafe-best-match``: like pip, the best version found on any index (uv's default takes the
first index that has the package). Standard library only (it runs before anything is installed).

Usage:
    python scripts/uv_env.py [--pip "python3 -m pip"]
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

#: pip key -> (uv variable, separator of several values).
KEYS = {
    "index-url": ("UV_DEFAULT_INDEX", " "),
    "extra-index-url": ("UV_INDEX", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "constraint": ("UV_CONSTRAINT", " "),
    "cert": ("SSL_CERT_FILE", " "),
}

#: Sections of ``pip config list``, lowest precedence first.
SECTIONS = ("global", "install", ":env:")


def pip_settings(listing: str) -> dict[str, str]:
    """``{key: value}`` of the keys in :data:`KEYS` from ``pip config list`` output (``section.key='value'`` lines)."""
    found: dict[tuple[int, str], str] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if sep and section in SECTIONS and key in KEYS:
            found[(SECTIONS.index(section), key)] = " ".join(shlex.split(value))
    return {key: value for (_, key), value in sorted(found.items())}  # later sections overwrite earlier ones


def uv_environment(settings: dict[str, str]) -> list[str]:
    """``NAME=value`` words for ``env``, shell-quoted."""
    words = ["UV_INDEX_STRATEGY=unsafe-best-match"]
    for key, value in settings.items():
        name, sep = KEYS[key]
        words.append(f"{name}={shlex.quote(sep.join(value.split()))}")
    return words


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pip", default=f"{sys.executable} -m pip", help="the pip command whose configuration is read")
    args = parser.parse_args(argv)
    listing = subprocess.run([*shlex.split(args.pip), "config", "list"], capture_output=True, text=True).stdout
    print(" ".join(uv_environment(pip_settings(listing))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
