"""An HTTPS proxy in front of the tests' kube-apiserver that can answer every request with errors for
a while: the API server overloaded (429 Too Many Requests) or failing (500), as one client sees it.

The operator's kubeconfig points here; everyone else talks to the API server directly, so the
ReplicaSet controller, the process kubelet and the test's own reads go on. The proxy serves with the
API server's own certificate (issued for 127.0.0.1 by the cluster's CA, which the operator already
trusts) and forwards each request as it came (the ServiceAccount's bearer token included), streaming
the answer, so watches work through it. `fail()` also drops the open streams: the watches a client
holds end, and it has to come back and meet the errors.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import threading
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length", "te", "trailer"}
REASONS = {429: "TooManyRequests", 500: "InternalError"}


class ApiFaultProxy:
    """Relays https://127.0.0.1:<port> to `upstream`; `fail()` / `heal()` switch the errors on and off."""

    def __init__(self, upstream: str, ca_file: Path, cert_file: Path, key_file: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self._client_tls = ssl.create_default_context(cafile=str(ca_file))
        self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_tls.load_cert_chain(str(cert_file), str(key_file))
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        self.answered: Counter[int] = Counter()  # error answers given, by status
        self.forwarded = 0
        self._statuses: itertools.cycle[int] | None = None
        self._open: set[asyncio.BaseTransport] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="api-fault-proxy", daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> ApiFaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def fail(self, statuses: tuple[int, ...] = (429, 500)) -> None:
        """Answer every request with these statuses in turn (429 with Retry-After), and end open streams."""
        self._statuses = itertools.cycle(statuses)
        asyncio.run_coroutine_threadsafe(self._drop_open(), self._loop).result(timeout=10)

    def heal(self) -> None:
        self._statuses = None

    def close(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> ApiFaultProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    async def _serve(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self._client_tls)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket, ssl_context=self._server_tls).start()

    async def _shutdown(self) -> None:
        """Streams first (a watch waits for the API server's next event), then the server."""
        await self._drop_open()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _drop_open(self) -> None:
        for transport in list(self._open):
            transport.abort()
        self._open.clear()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        statuses = self._statuses
        if statuses is not None:
            return self._error(next(statuses))
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        transport = request.transport
        if transport is not None:
            self._open.add(transport)
        answer = web.StreamResponse(status=502)
        try:
            async with self._session.request(
                request.method,
                self.upstream + request.rel_url.raw_path_qs,
                headers=headers,
                data=body or None,
                skip_auto_headers=["Content-Type"],  # the kubernetes client sends none; the API server takes JSON
            ) as upstream:
                self.forwarded += 1
                answer.set_status(upstream.status)
                answer.headers.update({k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
                await answer.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await answer.write(chunk)
                await answer.write_eof()
        except (ConnectionError, aiohttp.ClientError):
            pass  # the client went away, fail() dropped the stream, or the proxy is closing: nobody to answer
        finally:
            if transport is not None:
                self._open.discard(transport)
        return answer

    def _error(self, status: int) -> web.Response:
        self.answered[status] += 1
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": f"injected by the test's API proxy ({status})",
            "reason": REASONS.get(status, "InternalError"),
            "code": status,
        }
        headers = {"Retry-After": "1"} if status == 429 else {}
        return web.json_response(body, status=status, headers=headers)
