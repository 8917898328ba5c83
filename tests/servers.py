"""Real server processes on 127.0.0.1 for the tests: the vLLM-faithful test server
(tests/openai_server.py, with log-probabilities and fault injection) and
`transformers serve` (the server that ships with transformers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent


class Server:
    """A server process; `base_url` ends in /v1. Stopped by `stop()` (or at exit of a `with`)."""

    def __init__(self, process: subprocess.Popen, port: int, model: str):
        self.process = process
        self.port = port
        self.model = model
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def control(self, **body) -> dict:
        return requests.post(f"http://127.0.0.1:{self.port}/control", json=body, timeout=10).json()

    def stats(self) -> dict:
        return requests.get(f"http://127.0.0.1:{self.port}/stats", timeout=10).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_ready(process: subprocess.Popen, timeout: float) -> int:
    """The port from the server's `READY <port>` line."""
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not found or not found[0].startswith("READY "):
        process.kill()
        raise RuntimeError(f"the test server did not start: {found[0] if found else 'no READY line'}")
    return int(found[0].split()[1])


def start_test_server(model_dir: str | Path, name: str = "tiny", port: int = 0, *extra: str) -> Server:
    process = subprocess.Popen([sys.executable, str(HERE / "openai_server.py"), "--model", str(model_dir),
                                "--served-model-name", name, "--port", str(port), *extra],
                               stdout=subprocess.PIPE, text=True)
    return Server(process, _read_ready(process, timeout=60), name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_transformers_serve(model_dir: str | Path, cache: Path, *extra: str) -> Server:
    """`transformers serve MODEL_DIR` pinned to the folder, on CPU; waits for /health."""
    executable = Path(sys.executable).parent / "transformers"
    port = free_port()
    cache.mkdir(parents=True, exist_ok=True)  # /v1/models fails without a hub cache folder
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([str(executable), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                "--device", "cpu", *extra], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {process.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return Server(process, port, str(model_dir))
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("transformers serve did not answer /health within 90 s")
