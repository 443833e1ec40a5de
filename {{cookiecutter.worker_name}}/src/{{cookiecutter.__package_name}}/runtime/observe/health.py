"""A tiny HTTP server for probes: ``/livez`` (the process is not hung) and ``/readyz``.

Ready means connected to NATS, bound to the consumer and not draining; during a drain ``/readyz``
fails so Kubernetes stops counting the pod. Live means the event loop answers *and* the pull loop
heard from the server (a delivery or an idle heartbeat) within ``LIVENESS_STALL`` seconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from ..errors import ConfigError

Check = Callable[[], tuple[bool, dict[str, object]]]


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        live: Check,
        ready: Check,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.routes = {"/livez": live, "/readyz": ready}
        self.metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            raise ConfigError(
                f"HEALTH_PORT={self.port}: cannot listen ({exc.strerror}); pick a free port, or "
                "0 to turn the health server off"
            ) from None
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path == "/metrics" and self.metrics is not None:
                text = self.metrics()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    + f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n".encode()
                    + text
                )
                await writer.drain()
                return
            check = self.routes.get(path)
            body: dict[str, object]
            if check is None:
                status, body = "404 Not Found", {"error": "try /livez or /readyz"}
            else:
                ok, body = check()
                status = "200 OK" if ok else "503 Service Unavailable"
            payload = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def probe(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """GET a probe URL; healthy means HTTP 200."""
    import urllib.error  # only the probe command needs urllib (0.6 MB a worker need not carry)
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http only
            return resp.status == 200, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return False, f"unreachable: {getattr(exc, 'reason', exc)}"
