"""`make bench`: our service against two naive Flask servers and the model's compute limit.

One run, on this machine: it starts our gunicorn and the two peers of tests/bench/peers.py
with the same number of worker processes, drives each with wrk (same Lua script, same
body) at each concurrency in turn, interleaved so that noise hits all alike, then measures
the SavedModel on batches of 256 in process (no HTTP), and writes a Markdown table to
BENCHMARKS.md between the bench markers (or to --output).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
LUA = Path(__file__).with_name("report.lua")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int = 0
    process: subprocess.Popen | None = None
    log: Path | None = None
    cold_start_s: float = 0.0
    rss_mb: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(server: Server, scratch: Path) -> None:
    """Start a server and time process start to its first 200 on /ready."""
    server.port = free_port()
    server.log = scratch / f"{server.name}.log"
    # gRPC on a port of its own: servers of ours running at once must not share one.
    env = {**os.environ, "GRPC_PORT": str(free_port()), **server.env, "PORT": str(server.port)}
    started = time.perf_counter()
    server.process = subprocess.Popen(
        [a.replace("{port}", str(server.port)) for a in server.argv], cwd=ROOT, env=env,
        stdout=server.log.open("wb"), stderr=subprocess.STDOUT)
    deadline = started + 180
    while time.perf_counter() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log.read_text()[-3000:]}")
        try:
            if requests.get(server.url + "/ready", timeout=1).status_code == 200:
                server.cold_start_s = time.perf_counter() - started
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} not ready in 180 s")


def worker_rss_mb(master: int) -> list[float]:
    """Resident memory of each child process of a gunicorn master, from /proc."""
    sizes = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if int(fields.get("PPid", "0").strip()) == master:
            sizes.append(int(fields["VmRSS"].split()[0]) / 1024)
    return sizes


def tree_cpu_s(master: int) -> float:
    """CPU seconds (user and system) a gunicorn master and its children have used, the
    live ones and those it has reaped, from /proc: taken before and after a load, the
    CPU the server spent on it."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, parent = int(stat.parent.name), int(fields[1])  # fields from the state on
        if master in (pid, parent):
            total += (int(fields[11]) + int(fields[12])) / tick  # its own
        if pid == master:  # and its children's that have ended (a replaced worker)
            total += (int(fields[13]) + int(fields[14])) / tick
    return total


def wrk(url: str, body: Path, content_type: str, connections: int, seconds: float,
        path: str = "/predict", headers: dict[str, str] | None = None) -> dict:
    """One wrk run; returns requests/s, the requests answered, p50/p99 in ms and the
    error count."""
    extra = "\n".join(f"{name}: {value}" for name, value in (headers or {}).items())
    result = subprocess.run(
        ["wrk", "-t", str(min(2, connections)), "-c", str(connections),
         "-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(LUA),
         url + path],
        capture_output=True, text=True, check=True,
        env={**os.environ, "BENCH_BODY": str(body), "BENCH_TYPE": content_type,
             "BENCH_HEADERS": extra})
    line = next(x for x in result.stdout.splitlines() if x.startswith("BENCH "))
    stats = json.loads(line[len("BENCH "):])
    return {"rps": stats["requests"] / (stats["duration_us"] / 1e6),
            "requests": stats["requests"], "p50_ms": stats["p50_us"] / 1000,
            "p99_ms": stats["p99_us"] / 1000, "errors": stats["errors"]}


def compute_limit(version_dir: Path, seconds: float = 3.0) -> dict[str, float]:
    """Images/s of each runtime alone on batches of 256, in this process: the SavedModel
    (TensorFlow) and model.tflite (LiteRT, one thread)."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    batch = np.random.default_rng(0).random((256, 28, 28, 1), np.float32)
    loaded = tf.saved_model.load(str(version_dir))
    serve = loaded.signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    tensor = {name: tf.constant(batch)}
    runner = Interpreter(model_path=str(version_dir / "model.tflite"),
                         num_threads=1).get_signature_runner("serving_default")
    calls = {"savedmodel": lambda: serve(**tensor), "litert": lambda: runner(**{name: batch})}
    limits = {}
    for runtime, call in calls.items():
        for _ in range(3):
            call()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            call()
            count += 256
        limits[runtime] = count / (time.perf_counter() - started)
    return limits


def bodies(scratch: Path, version_dir: Path) -> dict[str, Path]:
    """A real 28×28 test digit as PNG, and 256 real test digits as .npy."""
    from training.data import load_mnist

    mnist = load_mnist(download=None)
    png = scratch / "digit.png"
    Image.fromarray(mnist.x_test[0]).save(png)
    npy = scratch / "batch.npy"
    buffer = io.BytesIO()
    np.save(buffer, mnist.x_test[:256], allow_pickle=False)
    npy.write_bytes(buffer.getvalue())
    return {"png": png, "npy": npy}


def servers(models_dir: Path, version_dir: Path, workers: int) -> list[Server]:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    peer_env = {"BENCH_MODEL": str(version_dir)}
    peer = [gunicorn, "-w", str(workers), "-b", "127.0.0.1:{port}", "--log-level", "warning"]
    ours = [gunicorn, "-c", "app/gunicorn.conf.py", "app:create_app()"]
    ours_env = {"MODELS_DIR": str(models_dir), "WORKERS": str(workers), "LOG_LEVEL": "WARNING"}
    return [
        Server("ours", ours, {**ours_env}),
        Server("ours, LiteRT", ours, {**ours_env, "PREFER_TFLITE_MODEL": "1"}),
        Server("ours, batching off", ours, {**ours_env, "BATCH_MAX_SIZE": "1"}),
        Server("flask+SavedModel", [*peer, "tests.bench.peers:savedmodel_app()"], peer_env),
        Server("flask+model.predict", [*peer, "tests.bench.peers:keras_app()"], peer_env),
        Server("flask hello world", [*peer, "tests.bench.peers:hello_app()"], {}),
    ]


def measure(fleet: list[Server], files: dict[str, Path], concurrencies: list[int],
            seconds: float, rounds: int) -> list[dict]:
    """Every scenario at every concurrency, the servers taking turns in a rotating order,
    ``rounds`` times over; each row is the median of its rounds (errors are summed)."""
    plan = [("one 28×28 PNG", files["png"], "image/png", 1, c, fleet) for c in concurrencies]
    plan.append(("256-image batch (.npy)", files["npy"], "application/x-npy", 256, 2, fleet[:3]))
    runs: dict[tuple, list[dict]] = {}
    turn = 0
    for _ in range(rounds):
        for scenario, body, content_type, images, connections, group in plan:
            turn += 1
            for server in group[turn % len(group):] + group[:turn % len(group)]:
                stats = wrk(server.url, body, content_type, connections, seconds)
                runs.setdefault((scenario, connections, server.name, images), []).append(stats)
                print(f"{scenario:24} c={connections:<3} {server.name:20} "
                      f"{stats['rps']:8.1f} req/s  p50 {stats['p50_ms']:7.2f} ms  "
                      f"p99 {stats['p99_ms']:7.2f} ms  errors {stats['errors']}", flush=True)
    return [{"scenario": scenario, "concurrency": connections, "server": name,
             "images_per_request": images,
             **{key: float(np.median([r[key] for r in results]))
                for key in ("rps", "p50_ms", "p99_ms")},
             "errors": sum(r["errors"] for r in results)}
            for (scenario, connections, name, images), results in runs.items()]


PEERS = ("ours, batching off", "flask+SavedModel", "flask+model.predict", "flask hello world")
RUNTIME = {"ours": "savedmodel", "ours, batching off": "savedmodel", "ours, LiteRT": "litert"}


def table(rows: list[dict], limits: dict[str, float]) -> str:
    """Markdown: one row per run; ours (each runtime) is compared with each peer at the
    same load, and with its own runtime's compute limit."""
    lines = ["| scenario | conc. | server | req/s | images/s | p50 ms | p99 ms | errors | "
             + " | ".join(f"÷ {peer}" for peer in PEERS) + " | ÷ compute limit |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | "
             + " | ".join("---:" for _ in PEERS) + " | ---: |"]
    for row in rows:
        peers = {r["server"]: r["rps"] for r in rows if r["scenario"] == row["scenario"]
                 and r["concurrency"] == row["concurrency"]}
        ours = row["server"] in ("ours", "ours, LiteRT")
        ratios = [f"{row['rps'] / peers[peer]:.2f}×" if ours and peers.get(peer) else ""
                  for peer in PEERS]
        images = row["rps"] * row["images_per_request"]
        runtime = RUNTIME.get(row["server"])
        limit = f"{100 * images / limits[runtime]:.0f}%" if runtime else ""
        lines.append(
            f"| {row['scenario']} | {row['concurrency']} | {row['server']} | {row['rps']:.0f} "
            f"| {images:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['errors']} "
            f"| {' | '.join(ratios)} | {limit} |")
    return "\n".join(lines)


def report(rows: list[dict], fleet: list[Server], limits: dict[str, float], command: str
           ) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    starts = ", ".join(f"{s.name} {s.cold_start_s:.1f} s" for s in fleet)
    memory = ", ".join(f"{s.name} {max(s.rss_mb):.0f} MB" for s in fleet if s.rss_mb)
    return "\n".join([
        START, f"Measured {when} with `{command}` ({os.cpu_count()} cores); each row is "
        "the median of the interleaved rounds.", "",
        f"Compute limit (each runtime alone, batches of 256, in process): SavedModel "
        f"**{limits['savedmodel']:,.0f} images/s**, LiteRT **{limits['litert']:,.0f} "
        "images/s**.", "",
        table(rows, limits), "",
        f"Cold start (process start to first 200 on /ready): {starts}.  ",
        f"Resident memory per worker (largest): {memory}.", END])


def write(path: Path, text: str) -> None:
    """Replace the bench section of BENCHMARKS.md (or write a new file)."""
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        new = old[:old.index(START)] + text + old[old.index(END) + len(END):]
    else:
        new = old + ("\n" if old else "") + "## Serving (`make bench`)\n\n" + text + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--name", default="mnist_cnn")
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved repetitions; the table shows medians")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-seconds", type=float, default=5.0,
                        help="how long to measure the in-process compute limit")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    from training.export_format import complete, list_versions

    versions = [v for v in list_versions(args.models_dir / args.name)
                if complete(args.models_dir / args.name / str(v))]
    if not versions:
        parser.error(f"no model in {args.models_dir / args.name}: run `make train` first")
    version_dir = (args.models_dir / args.name / str(versions[-1])).resolve()
    fleet = servers(args.models_dir.resolve(), version_dir, args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        files = bodies(Path(scratch), version_dir)
        try:
            for server in fleet:  # one at a time, so each cold start is measured alone
                start(server, Path(scratch))
                server.rss_mb = worker_rss_mb(server.process.pid)
            rows = measure(fleet, files, args.concurrency, args.seconds, args.rounds)
            for server in fleet:
                server.rss_mb = worker_rss_mb(server.process.pid)
        finally:
            for server in fleet:
                if server.process is not None:
                    server.process.terminate()
                    server.process.wait(30)
    limits = compute_limit(version_dir, args.limit_seconds)
    command = "make bench" if argv is None else "python -m tests.bench " + " ".join(argv)
    text = report(rows, fleet, limits, command)
    write(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
