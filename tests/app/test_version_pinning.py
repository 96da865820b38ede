"""Version-pinned requests, with two real versions of one model loaded side by side.

Model ``digits`` has version 1 (the tiny net) and version 2 (the CNN), served with
MODEL_VERSION_POLICY=all; each protocol's ``/versions/<v>`` must reach that exact
version, recognisable by its own probabilities.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.http as triton


@pytest.fixture(scope="module")
def pinned_url(pinning_server) -> str:
    return pinning_server.url


@pytest.fixture(scope="module")
def images(mnist) -> np.ndarray:
    return (mnist.x_test[:8] / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def by_version(url, images) -> dict[int, np.ndarray]:
    """What each version answers, asked of the main server under the models' own names."""
    answers = {}
    for version, name in ((1, "mnist_tiny"), (2, "mnist_cnn")):
        response = requests.post(f"{url}/models/{name}/predict", timeout=30,
                                 json={"instances": images.tolist()})
        answers[version] = np.array([p["probabilities"]
                                     for p in response.json()["predictions"]])
    assert not np.allclose(answers[1], answers[2], atol=1e-3)  # they can be told apart
    return answers


def test_both_versions_are_listed(pinned_url):
    status = requests.get(pinned_url + "/v1/models/digits", timeout=5).json()
    assert [s["version"] for s in status["model_version_status"]] == ["1", "2"]
    metadata = requests.get(pinned_url + "/v2/models/digits", timeout=5).json()
    assert metadata["versions"] == ["1", "2"]


@pytest.mark.parametrize("version", [1, 2])
def test_tf_serving_predict_reaches_the_pinned_version(pinned_url, images, by_version,
                                                       version):
    response = requests.post(f"{pinned_url}/v1/models/digits/versions/{version}:predict",
                             json={"instances": images.tolist()}, timeout=30)
    np.testing.assert_allclose(response.json()["predictions"], by_version[version],
                               atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_v2_infer_reaches_the_pinned_version(pinned_url, images, by_version, version):
    infer_input = triton.InferInput("image", [8, 28, 28], "FP32")
    infer_input.set_data_from_numpy(images)
    with triton.InferenceServerClient(pinned_url.removeprefix("http://")) as client:
        result = client.infer("digits", [infer_input], model_version=str(version))
    assert result.get_response()["model_version"] == str(version)
    np.testing.assert_allclose(result.as_numpy("output_0"), by_version[version], atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_predict_reaches_the_pinned_version(pinned_url, images, by_version, version):
    response = requests.post(f"{pinned_url}/models/digits/versions/{version}/predict",
                             json={"instances": images.tolist()}, timeout=30)
    assert response.json()["model"] == {"name": "digits", "version": version}
    np.testing.assert_allclose([p["probabilities"] for p in response.json()["predictions"]],
                               by_version[version], atol=1e-5)


def test_an_unpinned_request_gets_the_latest_version(pinned_url, images, by_version):
    response = requests.post(pinned_url + "/v1/models/digits:predict",
                             json={"instances": images.tolist()}, timeout=30)
    np.testing.assert_allclose(response.json()["predictions"], by_version[2], atol=1e-5)
    described = requests.get(pinned_url + "/models/digits", timeout=5).json()
    assert (described["version"], described["loaded_versions"]) == (2, [1, 2])
