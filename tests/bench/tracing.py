"""`make bench-tracing`: what OpenTelemetry tracing costs at c=32, at 100% sampling and
at a sampled share.

Three gunicorns of ours as `make serve` runs them (2 workers each), on the same models,
started side by side: tracing off; exporting every request's spans
(``OTEL_TRACES_SAMPLER=always_on``); and sampling ``--ratio`` of new traces
(``parentbased_traceidratio``), both over OTLP/HTTP to a sink in this process that
accepts and discards them, as a collector on another host would. wrk drives each in
turn with one real 28×28 PNG on /predict (the cheapest request, so the worst case for
a fixed cost per request) at c=32, the order rotating by round so that the host's drift
hits all alike. Each run also reads the CPU the server's processes spent per request
(/proc): the cost itself, which throughput follows on a host whose cores are the limit.
Prints each round, the medians and each one's ratio to off in the same round (of
throughput, and of CPU per request), how many export calls and bytes the sink received
(tracing did run), and the time a request spends in the tracing hooks when tracing is
off, timed in process. BENCHMARKS.md, "Tracing".
"""

from __future__ import annotations

import argparse
import http.server
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from tests.bench.__main__ import ROOT, Server, bodies, start, tree_cpu_s, wrk


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


def off_path_us(repeat: int = 200_000) -> float:
    """Microseconds a request spends in app/tracing.py's hooks with tracing off: the
    calls run_model and the batcher make, in a Flask request context, timed in process
    (best of 5) against a model call that does nothing."""
    import timeit
    from types import SimpleNamespace

    from flask import Flask

    from app import tracing

    model = SimpleNamespace(name="mnist_cnn", version=1)
    images = np.zeros((1, 28, 28, 1), np.float32)

    def identity(batch: np.ndarray) -> np.ndarray:
        return batch

    def hooks() -> None:
        trace = tracing.request_trace(model)
        with trace.stage("preprocess"):
            pass
        with trace.admission():
            tracing.model_call(identity, images, [tracing.admitted()])

    def bare() -> None:
        identity(images)

    with Flask(__name__).test_request_context("/predict", method="POST"):
        best = [min(timeit.repeat(call, number=repeat, repeat=5)) / repeat
                for call in (hooks, bare)]
    return (best[0] - best[1]) * 1e6


def load(server: Server, png: Path, concurrency: int, seconds: float) -> dict:
    """One wrk run against ``server``, with the CPU its processes spent per request
    (``cpu_us``): the cost itself, which its throughput follows once the host's cores
    are the limit."""
    before = tree_cpu_s(server.process.pid)
    stats = wrk(server.url, png, "image/png", concurrency, seconds)
    stats["cpu_us"] = (tree_cpu_s(server.process.pid) - before) / stats["requests"] * 1e6
    assert stats["errors"] == 0, stats
    return stats


def table(fleet: list[Server], measured: dict[str, list[dict]]) -> None:
    """Medians and same-round ratios to the first server (tracing off), of throughput
    and of CPU per request (off's CPU ÷ the server's: the share of off's throughput the
    CPU allows it)."""
    print("\n| server | req/s (median) | ÷ off (median of rounds) | per round "
          "| CPU µs/request (median) | off's CPU ÷ its CPU |\n"
          "| --- | ---: | ---: | --- | ---: | ---: |")
    off = measured[fleet[0].name]
    for server in fleet:
        runs = measured[server.name]
        ratios = [run["rps"] / base["rps"] for run, base in zip(runs, off, strict=True)]
        cpu = [base["cpu_us"] / run["cpu_us"] for run, base in zip(runs, off, strict=True)]
        print(f"| {server.name} | {np.median([run['rps'] for run in runs]):,.0f} | "
              f"{np.median(ratios):.3f} | {', '.join(f'{r:.2f}' for r in ratios)} | "
              f"{np.median([run['cpu_us'] for run in runs]):,.0f} | {np.median(cpu):.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.1,
                        help="the sampled server's OTEL_TRACES_SAMPLER_ARG")
    args = parser.parse_args(argv)
    sink = Sink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    gunicorn = [str(Path(sys.executable).parent / "gunicorn"), "-c", "app/gunicorn.conf.py",
                "app:create_app()"]
    common = {"MODELS_DIR": str(args.models_dir.resolve()), "LOG_LEVEL": "WARNING"}
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}"}
    fleet = [Server("tracing off", gunicorn, common),
             Server("on, 100%", gunicorn, {**common, **endpoint,
                                           "OTEL_TRACES_SAMPLER": "always_on"}),
             Server(f"on, {args.ratio:.0%}", gunicorn, {
                 **common, **endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                 "OTEL_TRACES_SAMPLER_ARG": str(args.ratio)})]
    measured: dict[str, list[dict]] = {server.name: [] for server in fleet}
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as scratch:
        version = max((args.models_dir / "mnist_cnn").iterdir(), key=lambda p: int(p.name))
        png = bodies(Path(scratch), version)["png"]
        try:
            for server in fleet:
                start(server, Path(scratch))
            for turn in range(args.rounds):
                for server in fleet[turn % 3:] + fleet[:turn % 3]:
                    stats = load(server, png, args.concurrency, args.seconds)
                    measured[server.name].append(stats)
                    print(f"round {turn} {server.name:18} {stats['rps']:7.1f} req/s  "
                          f"p50 {stats['p50_ms']:6.1f} ms  p99 {stats['p99_ms']:6.1f} ms  "
                          f"{stats['cpu_us']:6.0f} µs CPU/request", flush=True)
        finally:
            for server in fleet:
                if server.process is not None:
                    server.process.terminate()
                    server.process.wait(60)
    sink.shutdown()
    table(fleet, measured)
    print(f"\nThe sink received {sink.exports:,} exports, {sink.bytes / 1e6:,.1f} MB.")
    print(f"With tracing off, a request spends {off_path_us():.1f} µs in the tracing hooks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
