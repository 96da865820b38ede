"""A short smoke run of `make bench`'s harness: every server starts, wrk drives each,
and the table lands in the output file (the full benchmark is `make bench`); and the CPU
reading of a server the tracing bench takes."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.bench.__main__ import tree_cpu_s
from tests.conftest import ROOT


def run_bench(module: str, *args: str) -> str:
    """A harness as `make` runs it, in a fresh interpreter; returns what it printed."""
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_bench_harness_measures_every_server_and_writes_its_table(served_models,
                                                                       tmp_path):
    output = tmp_path / "BENCH.md"
    output.write_text("# Benchmarks\n\nkept as it is\n")
    run_bench("tests.bench", "--models-dir", str(served_models), "--seconds", "1",
              "--rounds", "1", "--concurrency", "2", "--limit-seconds", "1",
              "--output", str(output))
    text = output.read_text()
    assert text.startswith("# Benchmarks\n\nkept as it is\n")
    assert "<!-- bench:start -->" in text and "Compute limit" in text
    rows = [line for line in text.splitlines() if line.startswith("| one 28×28 PNG | 2 |")]
    assert {row.split(" | ")[2] for row in rows} == {
        "ours", "ours, LiteRT", "ours, batching off", "flask+SavedModel",
        "flask+model.predict", "flask hello world"}
    for row in rows:
        assert row.split(" | ")[7] == "0"  # errors
        assert float(row.split(" | ")[3]) > 0  # requests/s
    assert re.search(r"\| 256-image batch \(\.npy\) \| 2 \| ours \| \d+", text)
    assert re.search(r"Cold start .*ours \d+\.\d s.*ours, LiteRT \d+\.\d s", text)
    assert re.search(r"\| 256-image batch \(\.npy\) \| 2 \| ours, LiteRT \| \d+", text)


def test_the_protocol_bench_measures_every_format_against_its_baseline(served_models,
                                                                       tmp_path):
    output = tmp_path / "BENCH.md"
    output.write_text("# Benchmarks\n")
    run_bench("tests.bench.protocols", "--models-dir", str(served_models), "--seconds", "1",
              "--rounds", "1", "--output", str(output))
    rows = [line.split(" | ") for line in output.read_text().splitlines()
            if line.startswith("| one PNG") or line.startswith("| 64 digits")]
    assert len(rows) == 10
    for row in rows:
        assert row[7] == "0", row  # errors
        assert float(row[3]) > 0, row  # requests/s
    assert [row[8] for row in rows if "(baseline)" in row[1]] == ["1.00× |", "1.00× |"]


def test_the_swap_bench_reads_each_workers_memory_over_swaps(fit_run):
    printed = run_bench("tests.bench.swaps", "--cycles", "2", "--every", "1",
                        "--runtime", "litert", "--export", str(fit_run.version_dir))
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| ")]
    assert rows[0] == ["| cycle", "litert w1 MB", "litert w2 MB |"]
    assert [row[0] for row in rows[2:]] == ["| 0", "| 1", "| 2"]
    assert all("(+0)" in cell for cell in rows[2][1:])  # growth counts from cycle 0
    assert re.search(r"litert: \d+ collections after swaps, median [\d.]+ ms", printed)


SPENDS_AND_ENDS = r"""
import os, sys, time
print("ready", flush=True)
sys.stdin.readline()
child = os.fork()
if child == 0:  # a worker spending 0.3 s of CPU, then ending (as one gunicorn replaces)
    started = time.process_time()
    while time.process_time() - started < 0.3:
        pass
    os._exit(0)
os.waitpid(child, 0)
print("reaped", flush=True)
sys.stdin.readline()
"""


def test_a_servers_cpu_counts_the_workers_that_ended_during_the_load():
    master = subprocess.Popen([sys.executable, "-c", SPENDS_AND_ENDS], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert master.stdout.readline() == "ready\n"
        before = tree_cpu_s(master.pid)
        master.stdin.write("go\n")
        master.stdin.flush()
        assert master.stdout.readline() == "reaped\n"
        assert tree_cpu_s(master.pid) - before >= 0.25
    finally:
        master.stdin.close()
        master.wait(timeout=30)
        master.stdout.close()
