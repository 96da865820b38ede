"""A short smoke run of `make bench`'s harness: every server starts, wrk drives each,
and the table lands in the output file. (The full benchmark is `make bench`.)"""

from __future__ import annotations

import re
import subprocess
import sys

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
