"""app/litert_runtime.py: PREFER_TFLITE_MODEL serves model.tflite with LiteRT, agrees
with the SavedModel on every test digit, and never imports TensorFlow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from app.litert_runtime import load_litert
from app.model_store import ModelStore
from app.saved_model import load_saved_model
from tests.conftest import ROOT
from training.data import to_model_input
from training.export_format import TFLITE_FILE, manifest, read_metadata


@pytest.fixture(scope="module")
def runtimes(fit_run):
    metadata = read_metadata(fit_run.version_dir)
    return (load_saved_model(fit_run.version_dir, metadata, 1),
            load_litert(fit_run.version_dir, metadata, 1))


def test_litert_agrees_with_the_saved_model_on_all_10000_test_digits(runtimes, mnist):
    saved, lite = runtimes
    images = to_model_input(mnist.x_test)
    expected = np.concatenate([saved.predict(images[i:i + 500]) for i in range(0, 10_000, 500)])
    served = np.concatenate([lite.predict(images[i:i + 500]) for i in range(0, 10_000, 500)])
    assert served.shape == (10_000, 10)
    assert np.abs(served - expected).max() <= 1e-5
    assert (served.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_litert_describes_the_same_signature(runtimes):
    saved, lite = runtimes
    assert (lite.input_name, lite.output_name) == (saved.input_name, saved.output_name)
    assert lite.signature_defs == saved.signature_defs
    assert (lite.kind, saved.kind) == ("litert", "savedmodel")


def test_every_batch_size_gets_its_own_answers(runtimes, mnist):
    _, lite = runtimes
    images = to_model_input(mnist.x_test[:37])
    whole = lite.predict(images)
    for size in (1, 5, 37, 2):
        np.testing.assert_allclose(lite.predict(images[:size]), whole[:size], atol=1e-6)


NO_TENSORFLOW = """
import json, sys
from pathlib import Path
import numpy as np
from app import create_app
from app.config import Config
app = create_app(Config(models_dir=Path(sys.argv[1]), prefer_tflite_model=True,
                        model_poll_seconds=0))
client = app.test_client()
digits = np.load(sys.argv[2])
answer = client.post("/predict", json={"instances": digits.tolist()}).get_json()
print(json.dumps({
    "runtime": client.get("/models/mnist_cnn").get_json()["runtime"],
    "probabilities": [p["probabilities"] for p in answer["predictions"]],
    "v1_metadata": client.get("/v1/models/mnist_cnn/metadata").status_code,
    "v2_inputs": client.get("/v2/models/mnist_cnn").get_json()["inputs"],
    "summary_params": client.get("/summary").get_json()["totals"]["params"],
    "tensorflow": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")),
}))
"""


def test_a_litert_worker_serves_every_endpoint_without_importing_tensorflow(
        fit_run, runtimes, mnist, tmp_path):
    digits = mnist.x_test[:16] / 255.0
    np.save(tmp_path / "digits.npy", digits)
    run = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, str(fit_run.models_dir),
                          str(tmp_path / "digits.npy")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tensorflow"] == []
    assert result["runtime"] == "litert"
    expected = runtimes[0].predict(digits[..., np.newaxis].astype(np.float32))
    np.testing.assert_allclose(result["probabilities"], expected, atol=1e-4)  # JSON rounds
    assert result["v1_metadata"] == 200
    assert result["v2_inputs"] == [{"name": "image", "datatype": "FP32",
                                    "shape": [-1, 28, 28, 1]}]
    assert result["summary_params"] == read_metadata(fit_run.version_dir)["summary"][
        "totals"]["params"]


def test_a_version_without_model_tflite_is_served_on_tensorflow(fit_run, tmp_path):
    folder = shutil.copytree(fit_run.version_dir, tmp_path / "mnist_cnn" / "1")
    (folder / TFLITE_FILE).unlink()
    metadata = json.loads((folder / "metadata.json").read_text())
    del metadata["files"][TFLITE_FILE]
    (folder / "metadata.json").write_text(json.dumps(metadata))
    store = ModelStore(tmp_path, "mnist_cnn", prefer_tflite=True)
    store.load()
    assert store.get().runtime.kind == "savedmodel"


WITHOUT_TENSORFLOW = """
import sys
from pathlib import Path
sys.modules["tensorflow"] = None  # as in the lite image: `import tensorflow` fails
from app.saved_model import load_saved_model
from app.servable import VersionRejected
try:
    load_saved_model(Path(sys.argv[1]), {}, warm_up_to=1)
except VersionRejected as rejected:
    print(rejected)
"""


def test_without_tensorflow_a_version_without_model_tflite_is_rejected_with_the_reason(
        fit_run):
    """The lite image has no TensorFlow: a SavedModel-only version is refused with why,
    not a worker crashing on an ImportError."""
    run = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, str(fit_run.version_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TensorFlow is not installed here: this server runs LiteRT exports only" in (
        run.stdout)


def test_a_model_tflite_that_does_not_load_is_rejected_with_a_reason(fit_run, tmp_path):
    folder = shutil.copytree(fit_run.version_dir, tmp_path / "mnist_cnn" / "1")
    (folder / TFLITE_FILE).write_bytes(b"not a flatbuffer")
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["files"] = manifest(folder)  # listed as it is: only loading can tell
    (folder / "metadata.json").write_text(json.dumps(metadata))
    store = ModelStore(tmp_path, "mnist_cnn", prefer_tflite=True)
    store.load()
    assert not store.ready
    assert "model.tflite does not load" in store.rejected_versions("mnist_cnn")["1"]


def test_a_signature_dim_without_a_size_is_refused_not_a_500(fit_run, tmp_path):
    """LiteRT takes the signature from metadata.json: a dim the metadata endpoints
    cannot describe rejects the version at load, and the one below is served."""
    from app import create_app
    from app.config import Config

    shutil.copytree(fit_run.version_dir, tmp_path / "mnist_cnn" / "1")
    folder = shutil.copytree(fit_run.version_dir, tmp_path / "mnist_cnn" / "2")
    metadata = json.loads((folder / "metadata.json").read_text())
    image = metadata["signature_defs"]["serving_default"]["inputs"]["image"]
    image["tensor_shape"]["dim"][0] = {"name": ""}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    client = create_app(Config(models_dir=tmp_path, prefer_tflite_model=True,
                               model_poll_seconds=0)).test_client()
    answer = client.get("/v2/models/mnist_cnn")
    assert answer.status_code == 200
    assert answer.get_json()["versions"] == ["1"]
    assert client.get("/v2/models/mnist_cnn/versions/2").status_code == 404
    assert client.get("/models/mnist_cnn").get_json()["rejected"]["2"].startswith(
        "metadata.json is invalid at signature_defs/serving_default/inputs/image/")
