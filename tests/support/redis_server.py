"""A private, password-protected `redis-server` on a free loopback port, which a test may stop.

The shared Redis must never be stopped (other tests use it); outage tests run against this one.
The password is written to a config file, not the command line, so it never shows in `ps`.
With `tls=True` it serves TLS only, with a throwaway self-signed certificate made by `openssl`.
"""

from __future__ import annotations

import shutil
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

    def __init__(self, directory: Path, password: str, *, tls: bool = False, durable: bool = False) -> None:
        self.port, self.password, self.tls = free_port(), password, tls
        self.certificate = directory / "cert.pem"
        self.config = directory / "redis.conf"
        # durable: every write is in the append-only file before it is answered, so a restart (even
        # after SIGKILL) keeps every message, as a production broker configured for it does.
        append_only = "appendonly yes\nappendfsync always\n" if durable else "appendonly no\n"
        settings = f'bind 127.0.0.1\nrequirepass {password}\nsave ""\n{append_only}dir {directory}\n'
        if tls:
            _make_certificate(self.certificate, directory / "key.pem")
            settings += f"port 0\ntls-port {self.port}\ntls-auth-clients no\n"
            settings += f"tls-cert-file {self.certificate}\ntls-key-file {directory / 'key.pem'}\n"
        else:
            settings += f"port {self.port}\n"
        self.config.write_text(settings)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's URL (DB 0); with TLS, verifying the server against its own certificate."""
        if self.tls:
            query = f"ssl_cert_reqs=required&ssl_ca_certs={self.certificate}"
            return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?{query}"
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


def _make_certificate(certificate: Path, key: Path) -> None:
    """A one-day self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS test server needs the openssl command")
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(certificate)]
    subprocess.run(command, check=True, capture_output=True)
