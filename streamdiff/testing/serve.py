"""``streamdiff serve`` in a real child process, for tests and benchmarks: start, find the port, read the log, stop.

::

    with ServeProcess("--size", "256x256", "--max-streams", "8") as server:
        client = await StreamClient.connect(server.url)
        print(server.rss_bytes())
    # leaving sends SIGTERM and waits; server.returncode, server.log
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

__all__ = ["LoopbackUrls", "ServeProcess"]


class LoopbackUrls:
    """The stream socket's and the pages' URLs of a server listening on 127.0.0.1 at ``self.port``."""

    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def default_sigint() -> None:
    """A child process's SIGINT at its default, as in a terminal (a ``preexec_fn``): a process started in the
    background of a non-interactive shell has SIGINT ignored, its children inherit that, and a Python child then
    never raises KeyboardInterrupt, so a test's SIGINT would go unseen."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServeProcess(LoopbackUrls):
    """A ``streamdiff serve --port 0 ARGS…`` process (the same Python, the caller's environment)."""

    def __init__(self, *args: str, start_timeout: float = 120.0, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamdiff.cli", "serve", "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env,
            start_new_session=True,  # its own process group: whatever it starts (Ray's processes) ends with it
            preexec_fn=default_sigint,
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, name="serve-log", daemon=True).start()
        try:
            line = self.wait_for(r"open http://[^ ]+:(\d+)/", start_timeout)
        except BaseException:
            self.stop()
            raise
        self.port = int(re.search(r":(\d+)/", line).group(1))  # type: ignore[union-attr]
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The next log line matching ``pattern`` (AssertionError with the log after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if re.search(pattern, line):
                return line
        raise AssertionError(f"streamdiff serve logged no line matching {pattern!r}; its log:\n{''.join(self.log)}")

    def rss_bytes(self) -> int:
        """The process's resident memory (Linux ``/proc``)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.returncode = self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of its group left behind
        except (ProcessLookupError, PermissionError):
            pass
        return self.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self._lines.put(line)
