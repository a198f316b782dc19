"""A real Tollgate for tests: `tollgate serve` in a scratch directory, on
a Unix socket and free loopback ports (data plane, admin, metrics),
stopped (SIGTERM) on leaving.

    with Sidecar(CONFIG) as sidecar, Client(sidecar.target) as tg:
        ...
        assert sidecar.usage_records()[0]["account_id"] == "acme"

The binary is `binary=`, else $TOLLGATE_BIN, else `tollgate` on the PATH."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


class Sidecar:
    """`tollgate serve --config` on `config` (TOML; its `[server]` listeners
    are replaced by a Unix socket and free loopback ports)."""

    def __init__(self, config: str, *, binary: str | None = None, startup: float = 30.0) -> None:
        self.binary = binary or os.environ.get("TOLLGATE_BIN") or shutil.which("tollgate")
        if not self.binary:
            raise RuntimeError("no Tollgate binary: pass binary=, set TOLLGATE_BIN, or put tollgate on the PATH")
        self._scratch = tempfile.TemporaryDirectory(prefix="tollgate-")
        self.directory = Path(self._scratch.name)
        self.socket = self.directory / "quota.sock"
        listeners = f'listen_unix = "{self.socket}"\n'
        if "[server]\n" in config:
            config = config.replace("[server]\n", f"[server]\n{listeners}", 1)
        else:
            config = f"{config}\n[server]\n{listeners}"
        (self.directory / "tollgate.toml").write_text(config)
        self.log: list[str] = []
        self._process = subprocess.Popen(
            [self.binary, "serve", "--config", "tollgate.toml"]
            + ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
            cwd=self.directory,
            env={**os.environ, "TOLLGATE_LOG_FORMAT": "json", "RUST_LOG": "info"},
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_log, args=(lines,), daemon=True).start()
        listening = self._wait_for("tollgate listening", lines, startup)
        self.tcp_target = str(listening["quota"])
        self.admin_target = str(listening["admin"])
        self.http = str(listening["http"]).removeprefix("Some(").removesuffix(")")

    @property
    def target(self) -> str:
        """The data plane's Unix socket, as a client target."""
        return f"unix:{self.socket}"

    def _read_log(self, lines: queue.Queue[str | None]) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def _wait_for(self, message: str, lines: queue.Queue[str | None], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"tollgate exited before {message!r}:\n{''.join(self.log)}")
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            fields: dict[str, Any] = entry.get("fields", entry)
            if fields.get("message") == message:
                return fields
        self.stop()
        raise RuntimeError(f"no {message!r} from tollgate within {timeout} s:\n{''.join(self.log)}")

    def usage_records(self, path: str = "tollgate-usage.jsonl") -> list[dict[str, Any]]:
        """The usage records written so far to the file sink (`[usage]
        path`, relative to the sidecar's directory)."""
        file = self.directory / path
        if not file.exists():
            return []
        records: list[dict[str, Any]] = []
        for line in file.read_text().splitlines(keepends=True):
            if line.endswith("\n"):  # not one being written
                records.append(json.loads(line))
        return records

    def record(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The usage record of `request_id`, once written (an error if
        there is none by `timeout` seconds, or more than one)."""
        deadline = time.monotonic() + timeout
        while not (found := [r for r in self.usage_records() if r["request_id"] == request_id]):
            if time.monotonic() > deadline:
                raise AssertionError(f"no usage record for {request_id} within {timeout} s")
            time.sleep(0.02)
        if len(found) > 1:
            raise AssertionError(f"{len(found)} usage records for {request_id}: {found}")
        return found[0]

    def metrics(self) -> str:
        """The Prometheus page (`/metrics`)."""
        with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=10) as page:
            return str(page.read().decode())

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and the exit code (SIGKILL after `timeout` seconds)."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
        self._scratch.cleanup()
