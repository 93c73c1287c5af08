"""A private, password-protected `redis-server` on a free loopback port, which a test may stop.

The shared Redis must never be stopped (other tests use it); outage tests run against this one.
The password is written to a config file, not the command line, so it never shows in `ps`.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """`start()` / `stop()` a throwaway server in `directory`; restarts keep the port and password."""

    def __init__(self, directory: Path, password: str) -> None:
        self.port, self.password = free_port(), password
        self.config = directory / "redis.conf"
        self.config.write_text(
            f'bind 127.0.0.1\nport {self.port}\nrequirepass {password}\nsave ""\nappendonly no\ndir {directory}\n'
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self._process = subprocess.Popen(["redis-server", str(self.config)], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
