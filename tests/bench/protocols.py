"""`make bench-protocols`: what each protocol's wire format costs, against /predict.

One gunicorn (ours, defaults), driven by wrk with the same digits in every body format
the service reads: one photographed-style PNG per request at concurrency 8, and batches
of 64 MNIST-form digits at concurrency 2. Each format's req/s is divided by the
baseline's (/predict with a raw PNG; /predict with an .npy batch) measured in the same
rounds, interleaved, so the noise of a shared machine hits all alike. Writes a table to
BENCHMARKS.md between the protocols markers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tests.bench.__main__ import ROOT, Server, start, wrk
from tests.restyle import encode, ink_on_paper

START, END = "<!-- protocols:start -->", "<!-- protocols:end -->"
V2, V1 = "/v2/models/mnist_cnn/infer", "/v1/models/mnist_cnn:predict"


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    path: str
    content_type: str
    body: bytes
    images: int
    connections: int
    headers: dict | None = None


def v2_binary(tensor: np.ndarray | list[bytes], datatype: str) -> tuple[bytes, dict]:
    """A V2 request with its one input as binary tensor data, and its header length."""
    if datatype == "BYTES":
        raw = b"".join(struct.pack("<I", len(b)) + b for b in tensor)
        shape = [len(tensor)]
    else:
        raw, shape = np.ascontiguousarray(tensor).tobytes(), list(tensor.shape)
    header = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def cases() -> list[Case]:
    """Every format, carrying the same real test digits."""
    from training.data import load_mnist

    mnist = load_mnist(download=None)
    png = encode(ink_on_paper(mnist.x_test[0], np.random.default_rng(0)), "PNG")
    b64 = base64.b64encode(png).decode()
    pixels = mnist.x_test[:64]
    floats = (pixels / 255.0).astype(np.float32)
    npy = io.BytesIO()
    np.save(npy, pixels, allow_pickle=False)
    instances = json.dumps({"instances": floats.tolist()}).encode()
    v2_bytes = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [b64]}]}
    v2_floats = {"inputs": [{"name": "image", "shape": [64, 28, 28], "datatype": "FP32",
                             "data": floats.ravel().tolist()}]}
    one, many = "one PNG, c=8", "64 digits in MNIST form, c=2"
    as_json, binary = "application/json", "application/octet-stream"
    cases = [
        Case(one, "/predict, raw image/png (baseline)", "/predict", "image/png", png, 1, 8),
        Case(one, "TF Serving :predict, b64 instance", V1, as_json,
             json.dumps({"instances": [{"b64": b64}]}).encode(), 1, 8),
        Case(one, "V2 /infer, BYTES in JSON (base64)", V2, as_json,
             json.dumps(v2_bytes).encode(), 1, 8),
        Case(many, "/predict, .npy uint8 (baseline)", "/predict", "application/x-npy",
             npy.getvalue(), 64, 2),
        Case(many, "/predict, JSON instances", "/predict", as_json, instances, 64, 2),
        Case(many, "TF Serving :predict, JSON instances", V1, as_json, instances, 64, 2),
        Case(many, "V2 /infer, FP32 in JSON", V2, as_json, json.dumps(v2_floats).encode(),
             64, 2),
    ]
    for group, name, tensor, datatype, images, connections in (
            (one, "V2 /infer, BYTES binary", [png], "BYTES", 1, 8),
            (many, "V2 /infer, FP32 binary", floats, "FP32", 64, 2),
            (many, "V2 /infer, UINT8 binary", pixels, "UINT8", 64, 2)):
        body, headers = v2_binary(tensor, datatype)
        cases.append(Case(group, name, V2, binary, body, images, connections, headers))
    return sorted(cases, key=lambda case: case.group != one)  # stable: baselines stay first


def measure(url: str, plan: list[Case], scratch: Path, seconds: float, rounds: int
            ) -> dict[str, dict]:
    """Median stats per case over ``rounds`` passes, each pass in a rotated order."""
    runs: dict[str, list[dict]] = {case.name: [] for case in plan}
    for turn in range(rounds):
        for case in plan[turn % len(plan):] + plan[:turn % len(plan)]:
            body = scratch / "body"
            body.write_bytes(case.body)
            stats = wrk(url, body, case.content_type, case.connections, seconds, case.path,
                        case.headers)
            runs[case.name].append(stats)
            print(f"{case.name:40} {stats['rps']:8.1f} req/s  p50 {stats['p50_ms']:7.2f} ms"
                  f"  errors {stats['errors']}", flush=True)
    return {name: {**{key: float(np.median([r[key] for r in results]))
                      for key in ("rps", "p50_ms", "p99_ms")},
                   "errors": sum(r["errors"] for r in results)}
            for name, results in runs.items()}


def table(plan: list[Case], stats: dict[str, dict]) -> str:
    lines = ["| requests | format | body bytes | req/s | images/s | p50 ms | p99 ms | errors "
             "| ÷ baseline |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case in plan:
        baseline = next(c for c in plan if c.group == case.group)  # listed first
        row, base = stats[case.name], stats[baseline.name]
        ratio = row["rps"] / base["rps"] if base["rps"] else float("nan")
        lines.append(f"| {case.group} | {case.name} | {len(case.body):,} | {row['rps']:.0f} "
                     f"| {row['rps'] * case.images:.0f} | {row['p50_ms']:.2f} "
                     f"| {row['p99_ms']:.2f} | {row['errors']} | {ratio:.2f}× |")
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace the protocols section of BENCHMARKS.md (or append one)."""
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        path.write_text(old[:old.index(START)] + text + old[old.index(END) + len(END):])
    else:
        path.write_text(old + "\n## Protocols (`make bench-protocols`)\n\n" + text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.protocols",
                                     description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    server = Server("ours", [gunicorn, "-c", "app/gunicorn.conf.py", "app:create_app()"],
                    {"MODELS_DIR": str(args.models_dir.resolve()), "MODEL_NAME": "mnist_cnn",
                     "WORKERS": str(args.workers), "LOG_LEVEL": "WARNING"})
    plan = cases()
    with tempfile.TemporaryDirectory(prefix="bench-protocols-") as scratch:
        try:
            start(server, Path(scratch))
            stats = measure(server.url, plan, Path(scratch), args.seconds, args.rounds)
        finally:
            if server.process is not None:
                server.process.terminate()
                server.process.wait(30)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = ("make bench-protocols" if argv is None
               else "python -m tests.bench.protocols " + " ".join(argv))
    text = "\n".join([START, f"Measured {when} with `{command}`; medians of "
                      f"{args.rounds} interleaved rounds, ratios against the first row of "
                      "each group, same run.", "", table(plan, stats), END])
    write_section(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
