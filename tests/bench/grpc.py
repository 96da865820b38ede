"""`make bench-grpc`: gRPC against REST on one gunicorn of ours, same digits, same run.

wrk speaks no gRPC, so both sides are driven by the same Python load generator (client
processes of threads, one connection each, closed loop) in interleaved rounds: a single
photographed-style PNG at concurrency 1 and 32 (gRPC ModelInfer BYTES against /predict
image/png), and batches of 256 MNIST-form digits at concurrency 2 (gRPC FP32
``raw_input_contents`` against /predict .npy), beside the in-process limit of the
SavedModel on batches of 256 (tests/bench/__main__.py). Prints a Markdown table of
images/s and the ratios the issue sets targets for. The client shares the machine with
the server, so absolute figures are the machine's, and the ratios are what to read.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tests.bench.__main__ import ROOT, Server, compute_limit, start
from tests.restyle import encode, ink_on_paper

PROCESSES = 4  # client processes, so that the client's GIL is not the limit at c=32


def bodies() -> dict[str, bytes]:
    from training.data import load_mnist

    mnist = load_mnist(download=None)
    png = encode(ink_on_paper(mnist.x_test[0], np.random.default_rng(0)), "PNG")
    buffer = io.BytesIO()
    np.save(buffer, mnist.x_test[:256])
    return {"png": png, "npy": buffer.getvalue(),
            "fp32": (mnist.x_test[:256] / 255.0).astype("<f4").tobytes()}


def _client(kind: str, url: str, target: str, body: bytes, threads: int, seconds: float
            ) -> int:
    """Images answered by ``threads`` closed-loop clients of ``kind`` in ``seconds``."""
    import grpc
    import requests
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    done, stop = [0] * threads, time.perf_counter() + seconds

    def rest(index: int, content_type: str, images: int) -> None:
        with requests.Session() as session:
            while time.perf_counter() < stop:
                response = session.post(url + "/predict", data=body, timeout=60,
                                        headers={"Content-Type": content_type})
                assert response.status_code == 200, response.text
                done[index] += images

    def grpc_call(index: int, request, images: int) -> None:
        with grpc.insecure_channel(target) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while time.perf_counter() < stop:
                infer(request, timeout=60)
                done[index] += images

    tensor = service_pb2.ModelInferRequest.InferInputTensor
    if kind == "rest-png":
        work = (rest, "image/png", 1)
    elif kind == "rest-npy":
        work = (rest, "application/x-npy", 256)
    elif kind == "grpc-png":
        work = (grpc_call, service_pb2.ModelInferRequest(model_name="mnist_cnn", inputs=[
            tensor(name="image", datatype="BYTES", shape=[1],
                   contents=service_pb2.InferTensorContents(bytes_contents=[body]))]), 1)
    else:
        work = (grpc_call, service_pb2.ModelInferRequest(
            model_name="mnist_cnn", raw_input_contents=[body],
            inputs=[tensor(name="image", datatype="FP32", shape=[256, 28, 28])]), 256)
    function, argument, images = work
    workers = [threading.Thread(target=function, args=(i, argument, images))
               for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done)


def rate(pool: ProcessPoolExecutor, kind: str, server: Server, target: str, body: bytes,
         connections: int, seconds: float) -> float:
    processes = min(PROCESSES, connections)
    started = time.perf_counter()
    futures = [pool.submit(_client, kind, server.url, target, body,
                           connections // processes + (i < connections % processes), seconds)
               for i in range(processes)]
    images = sum(future.result() for future in futures)
    return images / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from tests.bench.__main__ import free_port

    grpc_port = free_port()
    server = Server("ours", [str(Path(sys.executable).parent / "gunicorn"), "-c",
                             "app/gunicorn.conf.py", "app:create_app()"],
                    {"MODELS_DIR": str(args.models_dir), "LOG_LEVEL": "WARNING",
                     "GRPC_PORT": str(grpc_port)})
    version = max((args.models_dir / "mnist_cnn").iterdir(), key=lambda p: int(p.name))
    files = bodies()
    plan = [("single PNG, c=1", "rest-png", "grpc-png", files["png"], files["png"], 1),
            ("single PNG, c=32", "rest-png", "grpc-png", files["png"], files["png"], 32),
            ("256-digit batch, c=2", "rest-npy", "grpc-fp32", files["npy"], files["fp32"], 2)]
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        start(server, Path(scratch))
        try:
            with ProcessPoolExecutor(PROCESSES) as pool:
                for _ in range(args.rounds):
                    for name, rest_kind, grpc_kind, rest_body, grpc_body, connections in plan:
                        for side, kind, body in (("REST", rest_kind, rest_body),
                                                 ("gRPC", grpc_kind, grpc_body)):
                            rates.setdefault((name, side), []).append(rate(
                                pool, kind, server, f"127.0.0.1:{grpc_port}", body,
                                connections, args.seconds))
        finally:
            server.process.terminate()
            server.process.wait(60)
    limit = compute_limit(version)["savedmodel"]
    print("| load | REST images/s | gRPC images/s | gRPC ÷ REST | gRPC ÷ in-process limit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, *_ in plan:
        rest, grpc_rate = (float(np.median(rates[name, side])) for side in ("REST", "gRPC"))
        print(f"| {name} | {rest:,.0f} | {grpc_rate:,.0f} | {grpc_rate / rest:.2f}× | "
              f"{grpc_rate / limit:.0%} |")
    print(f"\nIn-process SavedModel limit, batches of 256: {limit:,.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
