"""A real `bulkhead serve` process for tests: a throwaway data directory, a free loopback port.

The binary is `$BULKHEAD_BIN`, else `target/debug/bulkhead` at the repository's root (the test
command builds it). `mock-upstream` (crate `bulkhead-testkit`) sits beside it once the workspace's
binaries are built (`cargo build --bins`, or `cargo test --workspace`). Nothing here imports the
SDK, so the framework tests can use it from any venv.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
ADMIN_TOKEN = "test-admin-token-0123456789abcdefghijklmnop"


def binary(name: str = "bulkhead") -> Path:
    """The path of a project binary (`bulkhead`, or `mock-upstream` from `bulkhead-testkit`)."""
    env = os.environ.get("BULKHEAD_BIN")
    base = Path(env).parent if env else REPO / "target" / "debug"
    path = Path(env) if env and name == "bulkhead" else base / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: build it with `cargo build --bins` at {REPO}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@dataclass
class Server:
    """A running `bulkhead serve`; `stop()` (or leaving a `with` block) ends it."""

    url: str
    admin_token: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    config: str | None = None,
    env: dict[str, str] | None = None,
    admin_token: str = ADMIN_TOKEN,
    database_url: str | None = None,
) -> Server:
    """Starts `bulkhead serve` with `config` (TOML text) and extra environment `env`.

    Every inherited `BULKHEAD_*` variable is removed first, so the arguments decide.
    """
    tmp = tempfile.TemporaryDirectory(prefix="bulkhead-test-")
    root = Path(tmp.name)
    data = root / "data"
    log_path = root / "serve.log"
    args = [str(binary()), "serve", "--data", str(data)]
    if config is not None:
        (root / "bulkhead.toml").write_text(config)
        args += ["--config", str(root / "bulkhead.toml")]
    if database_url is not None:
        args += ["--database-url", database_url]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("BULKHEAD_")}
    child_env.update({"BULKHEAD_ADMIN_TOKEN": admin_token, "RUST_LOG": "info,sqlx=warn"})
    child_env.update(env or {})
    for _attempt in range(8):
        port = free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*args, "--listen", f"127.0.0.1:{port}"],
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if _get(f"{url}/healthz") == 200:
                    return Server(url, admin_token, data, proc, log_path, tmp)
            except OSError:
                pass
            time.sleep(0.05)
        text = log_path.read_text(errors="replace")
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if "cannot listen" in text:
            continue  # lost the race for the port: try another
        tmp.cleanup()
        raise RuntimeError(f"bulkhead serve did not become healthy:\n{text}")
    tmp.cleanup()
    raise RuntimeError("no free port for bulkhead serve")


def which(cmd: str) -> str | None:
    return shutil.which(cmd)
