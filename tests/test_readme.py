"""The README's curl examples work, as written, against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    """Every shell command in a bash block of the README that talks to the server."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # line continuations
        joined = re.sub(r"\n\s*\|", " |", joined)  # pipelines split before '|'
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if "localhost:8000" in line and not line.startswith("#"):
                commands.append(line)
    return commands


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory):
    """What `make digits` writes, in a scratch folder the commands run in."""
    folder = tmp_path_factory.mktemp("readme")
    subprocess.run([sys.executable, "-m", "training.samples", "--count", "5"], cwd=folder,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   capture_output=True)
    return folder


def test_the_readme_has_examples_for_every_input_form():
    commands = " ".join(readme_commands())
    for form in ("-F image=@", "--data-binary", '\\"b64\\"', "instances", "preprocess=none",
                 "/summary", "/models", "/ready", "/metrics", "/v1/models/mnist_cnn:predict",
                 "/v1/models/mnist_cnn/metadata", "/v2/models/mnist_cnn/infer",
                 "/v2/health/ready"):
        assert form in commands, form


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_example_answers_without_error(command, server, sample_folder):
    host = server.url.removeprefix("http://")
    result = subprocess.run(["bash", "-o", "pipefail", "-c",
                             command.replace("localhost:8000", host).replace("curl ", "curl -sS ")],
                            cwd=sample_folder, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    if command.endswith("/metrics"):
        assert "http_requests_total" in result.stdout
        return
    body = json.loads(result.stdout)
    assert "error" not in body, body
    if "/v1/" in command and ":predict" in command:  # TF Serving: ten probabilities each
        rows = body.get("predictions", body.get("outputs"))
        assert rows and all(len(row) == 10 for row in rows), body
    elif "/infer" in command:
        assert body["outputs"][0]["shape"][1:] == [10], body
    elif "predict" in command:
        assert all(0 <= p["digit"] <= 9 for p in body["predictions"])


def readme_client_programs() -> list[str]:
    """The README's Python blocks that use a real protocol client against the server:
    tritonclient over HTTP (localhost:8000) and gRPC, TF Serving's gRPC stubs (8001)."""
    text = (ROOT / "README.md").read_text()
    return [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)
            if "tritonclient" in block or "tensorflow_serving" in block]


def test_the_readme_has_a_tritonclient_and_a_tf_serving_grpc_example():
    programs = readme_client_programs()
    assert len(programs) == 3
    assert sum("localhost:8001" in program for program in programs) == 2


@pytest.mark.parametrize("program", readme_client_programs())
def test_a_readme_client_program_runs(program, server, sample_folder):
    host = server.url.removeprefix("http://")
    program = program.replace("localhost:8000", host).replace("localhost:8001", server.grpc)
    result = subprocess.run([sys.executable, "-c", program],
                            cwd=sample_folder, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[7]" in result.stdout and "True" in result.stdout, result.stdout
