"""A fake Kaggle API on 127.0.0.1 for the real kaggle 2.x CLI (``tests/test_kernel_push.py``,
``tests/test_rehearsal.py``).

kaggle 2.x has no endpoint variable: ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` sends requests to
``http://localhost/api/v1/<Service>/<Method>`` and ``HTTP_PROXY`` (with ``NO_PROXY`` empty) routes them, and the
file uploads to the ``createUrl`` the server hands out, to this server whatever its port. The CLI exits 0 even when
the server answers ``{"error": ...}``, so callers check its output too.
"""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

KAGGLE_CLI = Path(sys.executable).parent / "kaggle"
SAVE_KERNEL = "/api/v1/kernels.KernelsApiService/SaveKernel"
DATASET_STATUS = "/api/v1/datasets.DatasetApiService/GetDatasetStatus"
START_UPLOAD = "/api/v1/blobs.BlobApiService/StartBlobUpload"
CREATE_DATASET = "/api/v1/datasets.DatasetApiService/CreateDataset"
CODE_SUBMISSION = "/api/v1/competitions.CompetitionApiService/CreateCodeSubmission"


class FakeKaggle(http.server.ThreadingHTTPServer):
    """Records every request (method, path, headers, body; uploads by size); answers like Kaggle.

    ``reply`` answers SaveKernel; a dataset is always new (GetDatasetStatus: 404); uploads succeed.
    """

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.uploads: dict[str, int] = {}
        self.reply = {"ref": "/code/tester/cellkit-submission", "versionNumber": 7,
                      "url": "http://localhost/code/tester/cellkit-submission"}

    def calls(self, endpoint: str) -> list[dict]:
        """The JSON bodies of the POSTs to ``endpoint``."""
        return [json.loads(body) for method, path, _, body in self.requests
                if method == "POST" and path.endswith(endpoint)]


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self, status: int, doc: dict) -> None:
        out = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append(("POST", self.path, dict(self.headers), body))
        if self.path.endswith(SAVE_KERNEL):
            return self._answer(200, self.server.reply)
        if self.path.endswith(START_UPLOAD):
            name = json.loads(body)["name"]
            return self._answer(200, {"token": f"token-{name}", "createUrl": f"http://localhost/upload/{name}"})
        if self.path.endswith(CREATE_DATASET):
            request = json.loads(body)
            return self._answer(200, {"status": "ok", "error": "",
                                      "url": f"http://localhost/datasets/{request['ownerSlug']}/{request['slug']}",
                                      "ref": f"{request['ownerSlug']}/{request['slug']}"})
        if self.path.endswith(CODE_SUBMISSION):
            return self._answer(200, {"message": "Submission successful", "ref": 1})
        return self._answer(404, {"code": 404, "message": f"not found: {self.path}"})

    def do_PUT(self):  # noqa: N802
        size = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(size) if size else b""
        name = self.path.rsplit("/upload/", 1)[-1]
        self.server.uploads[name] = len(data)
        self.server.requests.append(("PUT", self.path, dict(self.headers), b""))
        self._answer(200, {})

    def log_message(self, *args):
        pass


def serve() -> FakeKaggle:
    """Start a :class:`FakeKaggle` in a daemon thread (stop it with ``shutdown()`` and ``server_close()``)."""
    server = FakeKaggle()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def kaggle_cli(args: list, server: FakeKaggle, home: Path) -> subprocess.CompletedProcess:
    """Run the real CLI with every request routed to ``server`` (user ``tester``)."""
    proxy = f"http://127.0.0.1:{server.server_port}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("KAGGLE_", "HTTP", "NO_PROXY"))}
    env.update(KAGGLE_API_ENVIRONMENT="LOCALHOST", HTTP_PROXY=proxy, http_proxy=proxy, NO_PROXY="", no_proxy="",
               KAGGLE_USERNAME="tester", KAGGLE_KEY="0123456789abcdef", HOME=str(home))
    home.mkdir(exist_ok=True)
    return subprocess.run([str(KAGGLE_CLI), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
