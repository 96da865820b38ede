"""`make bench-tracing`: what OpenTelemetry tracing at 100% sampling costs at c=32.

Two gunicorns of ours as `make serve` runs them (2 workers each), on the same models,
started side by side: one with tracing off, one exporting every request's spans
(``OTEL_TRACES_SAMPLER=always_on``) over OTLP/HTTP to a sink in this process that
accepts and discards them, as a collector on another host would. wrk drives each in
turn with one real 28×28 PNG on /predict at c=32, the order alternating by round so that
the host's drift hits both alike; prints each round, the medians and the ratio
on ÷ off, and how many export calls and bytes the sink received (tracing did run).
BENCHMARKS.md, "Tracing".
"""

from __future__ import annotations

import argparse
import http.server
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from tests.bench.__main__ import ROOT, Server, bodies, start, wrk


class Sink(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP endpoint that answers 200 to every export and keeps only counts."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), SinkHandler)
        self.exports = self.bytes = 0
        self.lock = threading.Lock()


class SinkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the exporter keeps its connection

    def do_POST(self) -> None:
        size = len(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.exports += 1
            self.server.bytes += size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    sink = Sink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    gunicorn = [str(Path(sys.executable).parent / "gunicorn"), "-c", "app/gunicorn.conf.py",
                "app:create_app()"]
    common = {"MODELS_DIR": str(args.models_dir.resolve()), "LOG_LEVEL": "WARNING"}
    off = Server("tracing off", gunicorn, common)
    on = Server("tracing on, 100%", gunicorn, {
        **common, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
        "OTEL_TRACES_SAMPLER": "always_on"})
    rates: dict[str, list[float]] = {off.name: [], on.name: []}
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as scratch:
        version = max((args.models_dir / "mnist_cnn").iterdir(), key=lambda p: int(p.name))
        png = bodies(Path(scratch), version)["png"]
        try:
            for server in (off, on):
                start(server, Path(scratch))
            for turn in range(args.rounds):
                for server in (off, on) if turn % 2 == 0 else (on, off):
                    stats = wrk(server.url, png, "image/png", args.concurrency, args.seconds)
                    assert stats["errors"] == 0, stats
                    rates[server.name].append(stats["rps"])
                    print(f"round {turn} {server.name:18} {stats['rps']:7.1f} req/s  "
                          f"p50 {stats['p50_ms']:6.1f} ms  p99 {stats['p99_ms']:6.1f} ms",
                          flush=True)
        finally:
            for server in (off, on):
                if server.process is not None:
                    server.process.terminate()
                    server.process.wait(60)
    sink.shutdown()
    ratios = [b / a for a, b in zip(rates[off.name], rates[on.name], strict=True)]
    print(f"\n| c | off req/s | on req/s | on ÷ off | per round |\n| ---: | ---: | ---: | ---: "
          f"| --- |\n| {args.concurrency} | {np.median(rates[off.name]):,.0f} | "
          f"{np.median(rates[on.name]):,.0f} | {np.median(ratios):.3f} | "
          f"{', '.join(f'{r:.3f}' for r in ratios)} |")
    print(f"\nThe sink received {sink.exports:,} exports, {sink.bytes / 1e6:,.1f} MB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
