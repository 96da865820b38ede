"""app/config.py: one settings object from the environment, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Config, ConfigError


def test_defaults_need_no_environment():
    config = Config.from_env({})
    assert config.models_dir == Path("models") and config.model_name == "mnist_cnn"
    assert config.port == 8000 and config.max_batch == 256
    assert config.max_content_length == 10 * 1024 * 1024
    assert config.max_image_pixels == 40_000_000
    assert (config.batch_max_size, config.batch_timeout_ms) == (64, 2)
    assert (config.workers, config.threads, config.tf_threads) == (2, 16, 1)
    assert config.model_version_policy == "latest"
    assert (config.model_poll_seconds, config.prefer_tflite_model) == (2.0, False)


def test_variables_are_read_by_their_upper_case_names():
    config = Config.from_env({"MODELS_DIR": "/srv/models", "MODEL_NAME": "other",
                              "PORT": "9000", "MAX_BATCH": "32", "MAX_IMAGE_PIXELS": "1_000"})
    assert config.models_dir == Path("/srv/models") and config.model_name == "other"
    assert (config.port, config.max_batch, config.max_image_pixels) == (9000, 32, 1000)


def test_empty_variables_keep_the_default():
    assert Config.from_env({"PORT": ""}).port == 8000


def test_grpc_port_defaults_to_tritons_and_zero_turns_it_off():
    assert Config.from_env({}).grpc_port == 8001
    assert Config.from_env({"GRPC_PORT": "0"}).grpc_port == 0


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("PORT", "eighty", "PORT must be an integer"),
    ("PORT", "70000", "PORT must be between"),
    ("MAX_BATCH", "0", "MAX_BATCH must be a positive"),
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be"),
    ("BATCH_MAX_SIZE", "0", "BATCH_MAX_SIZE must be a positive"),
    ("BATCH_TIMEOUT_MS", "-1", "BATCH_TIMEOUT_MS must be 0 or more"),
    ("WORKERS", "0", "WORKERS must be a positive"),
    ("MODEL_VERSION_POLICY", "newest", "MODEL_VERSION_POLICY: expected 'latest'"),
    ("MODEL_POLL_SECONDS", "soon", "MODEL_POLL_SECONDS must be a number"),
    ("MODEL_POLL_SECONDS", "-1", "MODEL_POLL_SECONDS must be between 0"),
    ("MODEL_POLL_SECONDS", "nan", "MODEL_POLL_SECONDS must be between 0"),
    ("PREFER_TFLITE_MODEL", "maybe", "PREFER_TFLITE_MODEL must be true or false"),
    ("MODEL_MAX_BYTES", "0", "MODEL_MAX_BYTES must be a positive"),
    ("MODEL_CHECK_SECONDS", "0", "MODEL_CHECK_SECONDS must be above 0"),
    ("MODEL_CHECK_SECONDS", "nan", "MODEL_CHECK_SECONDS must be above 0"),
    ("GRPC_PORT", "-1", "GRPC_PORT must be between 0"),
    ("GRPC_PORT", "65536", "GRPC_PORT must be between 0"),
    ("GRPC_PORT", "8000", "differ from PORT"),
])
def test_bad_values_name_the_variable(variable, value, words):
    with pytest.raises(ConfigError, match=words):
        Config.from_env({variable: value})


@pytest.mark.parametrize(("raw", "seconds"), [("0", 0.0), ("0.5", 0.5), ("10", 10.0)])
def test_the_poll_interval_takes_fractions_and_zero_turns_it_off(raw, seconds):
    assert Config.from_env({"MODEL_POLL_SECONDS": raw}).model_poll_seconds == seconds


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("ON", True),
                                            ("false", False), ("0", False), ("no", False)])
def test_prefer_tflite_model_reads_the_usual_spellings(raw, value):
    assert Config.from_env({"PREFER_TFLITE_MODEL": raw}).prefer_tflite_model is value


def test_the_bounds_on_checking_a_version_are_read_from_the_environment():
    config = Config.from_env({"MODEL_MAX_BYTES": "2_000_000_000", "MODEL_CHECK_SECONDS": "2.5"})
    assert (config.model_max_bytes, config.model_check_seconds) == (2_000_000_000, 2.5)
