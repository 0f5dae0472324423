"""``scripts/uv_env.py``: pip's configuration handed to uv (``make install``)."""
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
try:
    import uv_env
finally:
    sys.path.pop(0)

LISTING = """\
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca.crt'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///a/simple file:///b/simple'
global.find-links='/elsewhere'
global.timeout='60'
install.index-url='https://mirror.example/simple'
"""


def test_pip_settings_take_variables_over_files_and_install_over_global():
    settings = uv_env.pip_settings(LISTING + "global.index-url='https://other.example/simple'\n")
    assert settings == {"cert": "/etc/ssl/certs/ca.crt", "constraint": "/etc/pip/constraints.txt",
                        "extra-index-url": "file:///a/simple file:///b/simple", "find-links": "/opt/wheels",
                        "index-url": "https://mirror.example/simple"}  # timeout: not an install location


def test_uv_environment_words_are_shell_words_env_accepts():
    words = uv_env.uv_environment(uv_env.pip_settings(LISTING + ":env:.find-links='/w1 /w2'\n"))
    parsed = dict(w.split("=", 1) for w in shlex.split(" ".join(words)))
    assert parsed == {"UV_INDEX_STRATEGY": "unsafe-best-match", "SSL_CERT_FILE": "/etc/ssl/certs/ca.crt",
                      "UV_CONSTRAINT": "/etc/pip/constraints.txt", "UV_INDEX": "file:///a/simple file:///b/simple",
                      "UV_FIND_LINKS": "/w1,/w2", "UV_DEFAULT_INDEX": "https://mirror.example/simple"}


def test_without_pip_configuration_only_the_strategy_is_set(tmp_path):
    fake_pip = tmp_path / "pip"
    fake_pip.write_text("#!/bin/sh\nexit 0\n")
    fake_pip.chmod(0o755)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "uv_env.py"), "--pip", str(fake_pip)],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["UV_INDEX_STRATEGY=unsafe-best-match"]
