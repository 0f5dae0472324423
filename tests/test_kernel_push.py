"""``kaggle kernels push -p kernels/submission`` with the real kaggle 2.x CLI against a fake API server on 127.0.0.1.

kaggle 2.x has no endpoint variable: ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` sends requests to
``http://localhost/api/v1/<Service>/<Method>`` and ``HTTP_PROXY`` (with ``NO_PROXY`` empty) routes them to the
test server, whatever its port. The CLI exits 0 even when the server answers ``{"error": ...}``, so its output is
checked too.
"""
from __future__ import annotations

import ast
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cellkit import kaggle

ROOT = Path(__file__).resolve().parents[1]
KAGGLE_CLI = Path(sys.executable).parent / "kaggle"
SAVE_KERNEL = "/api/v1/kernels.KernelsApiService/SaveKernel"

pytestmark = pytest.mark.skipif(not KAGGLE_CLI.exists(), reason="kaggle CLI not installed in this environment")


class FakeKaggle(http.server.ThreadingHTTPServer):
    """Records every request; answers SaveKernel with ``self.reply``."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict, bytes]] = []
        self.reply = {"ref": "/code/tester/cellkit-submission", "versionNumber": 7,
                      "url": "http://localhost/code/tester/cellkit-submission"}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append((self.path, dict(self.headers), body))
        if self.path.endswith(SAVE_KERNEL):
            status, out = 200, json.dumps(self.server.reply).encode()
        else:
            status, out = 404, json.dumps({"code": 404, "message": f"unexpected {self.path}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = FakeKaggle()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def push(folder: Path, server: FakeKaggle, home: Path) -> subprocess.CompletedProcess:
    """Run the real CLI with every request routed to ``server``."""
    proxy = f"http://127.0.0.1:{server.server_port}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("KAGGLE_", "HTTP", "NO_PROXY"))}
    env.update(KAGGLE_API_ENVIRONMENT="LOCALHOST", HTTP_PROXY=proxy, http_proxy=proxy, NO_PROXY="", no_proxy="",
               KAGGLE_USERNAME="tester", KAGGLE_KEY="0123456789abcdef", HOME=str(home))
    home.mkdir(exist_ok=True)
    return subprocess.run([str(KAGGLE_CLI), "kernels", "push", "-p", str(folder)], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def kernel_copy(tmp_path) -> Path:
    """A temp copy of the committed kernels/submission folder."""
    folder = tmp_path / "submission"
    shutil.copytree(ROOT / "kernels" / "submission", folder)
    return folder


def saved_kernel(server: FakeKaggle) -> dict:
    calls = [json.loads(body) for path, _, body in server.requests if path.endswith(SAVE_KERNEL)]
    assert len(calls) == 1, [p for p, _, _ in server.requests]
    return calls[0]


def test_push_submission_kernel(kernel_copy, server, tmp_path):
    result = push(kernel_copy, server, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert "Kernel version 7 successfully pushed" in result.stdout, result.stdout + result.stderr

    request = saved_kernel(server)
    meta = json.loads((kernel_copy / "kernel-metadata.json").read_text())
    assert request["slug"] == meta["id"]
    assert request["enableInternet"] is False          # explicit: the CLI defaults it to true
    assert request["enableGpu"] is True
    assert request["competitionDataSources"] == ["sartorius-cell-instance-segmentation"]
    owner = meta["id"].split("/")[0]
    assert set(request["datasetDataSources"]) == {f"{owner}/{kaggle.WHEELS_DATASET}",
                                                  f"{owner}/{kaggle.WEIGHTS_DATASET}"}
    assert request["language"] == "python" and request["kernelType"] == "notebook"

    # The notebook text carries the Kaggle parameters injected by `make kernels` (papermill --prepare-only).
    notebook = json.loads(request["text"])
    injected = [c for c in notebook["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1
    source = injected[0]["source"]
    assert isinstance(source, str)                     # the CLI joins source lines: the server wants one string
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body}
    assert assigned == kaggle.KERNELS["submission"].parameters
    assert assigned["OUT_DIR"] == "/kaggle/working"
    assert all(c.get("outputs", []) == [] for c in notebook["cells"] if c["cell_type"] == "code")

    _, headers, _ = next(r for r in server.requests if r[0].endswith(SAVE_KERNEL))
    assert headers.get("Authorization", "").startswith("Basic ")   # KAGGLE_USERNAME/KAGGLE_KEY were used


def test_push_reports_server_error(kernel_copy, server, tmp_path):
    server.reply = {"error": "Notebook not found or internet access not allowed"}
    result = push(kernel_copy, server, tmp_path / "home")
    assert result.returncode == 0          # the CLI's exit code does not tell: the output does
    assert "Kernel push error: Notebook not found" in result.stdout
    assert "successfully pushed" not in result.stdout


def test_metadata_without_internet_key_would_enable_it(kernel_copy, server, tmp_path):
    """Why the key is explicit: drop it and the CLI asks for internet."""
    meta_path = kernel_copy / "kernel-metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["enable_internet"]
    meta_path.write_text(json.dumps(meta))
    assert push(kernel_copy, server, tmp_path / "home").returncode == 0
    assert saved_kernel(server)["enableInternet"] is True
