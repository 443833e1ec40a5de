"""A do-nothing OTLP/HTTP collector: accepts every export with 200 and an empty response.

For the "tracing on, collector up" variant: the worker's exporter succeeds at once, so what is
measured is the cost of making and exporting spans, not of retrying against a dead endpoint.
Usage: ``python otlp_sink.py PORT``; counts requests and bytes, prints them on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

stats = {"requests": 0, "bytes": 0}
lock = threading.Lock()


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real collector

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        with lock:
            stats["requests"] += 1
            stats["bytes"] += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
    server.daemon_threads = True

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        print(f"otlp sink: {stats['requests']} requests, {stats['bytes']} bytes", flush=True)


if __name__ == "__main__":
    main()
