"""MODEL_CONFIG_FILE: which models to serve, how, and under which labels — in TensorFlow
Serving's own ``--model_config_file`` format, so one file configures both servers.

The file is a ``ModelServerConfig`` in protobuf text format, read with the messages of
``tensorflow-serving-api`` (``model_server_config_pb2``, which imports no TensorFlow)::

    model_config_list {
      config {
        name: "mnist_cnn"
        base_path: "/models/mnist_cnn"
        model_platform: "tensorflow"
        model_version_policy { specific { versions: 1 versions: 2 } }
        version_labels { key: "stable" value: 1 }
        version_labels { key: "canary" value: 2 }
      }
    }
    # rollout: mnist_cnn canary weight 10
    # rollout: mnist_cnn candidate shadow 20

TF Serving has no traffic split or shadow, and refuses a field it does not know; so
those live in ``# rollout:`` comment lines, which TF Serving skips as comments:

- ``# rollout: <model> <label> weight <percent>``: that share of the requests that name
  no version go to the label's version (app/rollout.py; the rest go to ``stable``, or the
  highest loaded version when there is no ``stable``);
- ``# rollout: <model> <label> shadow <percent>``: that share of the requests answered by
  any other version of the model is also run, after its answer has been sent, on the
  label's version, and the two answers are compared (app/shadow.py).

A file that does not parse, or says something this server cannot do, is refused whole
with the line (``ModelConfigError``); the store keeps the last good one (app/model_store.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from app.version_policy import VersionPolicy
from training.export_format import read_regular, valid_model_name

CONFIG_LIMIT_BYTES = 1 << 20  # a config of thousands of models is a few hundred KB
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # URL-safe, as a path segment
DIRECTIVE = re.compile(r"\s*#\s*rollout\s*:(.*)")
RULE = re.compile(r"\s*(\S+)\s+(\S+)\s+(weight|shadow)\s+([0-9]+(?:\.[0-9]+)?)\s*")
EMPTY: Mapping = MappingProxyType({})


class ModelConfigError(ValueError):
    """MODEL_CONFIG_FILE cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class ModelEntry:
    """One ``config { ... }`` with its ``# rollout:`` lines."""

    name: str
    base_path: Path
    policy: VersionPolicy
    # label → version as the file says; → percent of the requests naming no version
    # sent to it (weights), or copied to it (shadows)
    labels: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    weights: Mapping[str, float] = field(default_factory=lambda: EMPTY)
    shadows: Mapping[str, float] = field(default_factory=lambda: EMPTY)


@dataclass(frozen=True)
class ModelConfig:
    """The models of one good file, in the file's order."""

    models: Mapping[str, ModelEntry] = field(default_factory=lambda: EMPTY)


def _policy(config) -> VersionPolicy:
    """TF Serving's ``model_version_policy`` as ours; unset means ``latest`` 1, as there."""
    kind = config.model_version_policy.WhichOneof("policy_choice")
    if kind == "all":
        return VersionPolicy.parse("all")
    if kind == "specific":
        versions = config.model_version_policy.specific.versions
        if not versions:
            raise ValueError("model_version_policy specific lists no version")
        return VersionPolicy.parse(",".join(map(str, versions)))
    if kind == "latest":
        count = config.model_version_policy.latest.num_versions
        return VersionPolicy.parse(f"latest:{count}" if count > 1 else "latest")
    return VersionPolicy.parse("latest")


def _base_path(raw: str, models_dir: Path) -> Path:
    """The model folder: inside MODELS_DIR, where the scanner's symlink policy holds."""
    if not raw:
        raise ValueError("base_path is empty")
    path = Path(raw) if os.path.isabs(raw) else models_dir / raw
    root = models_dir.resolve()
    if root not in path.resolve().parents:
        raise ValueError(f"base_path {raw!r} is not inside MODELS_DIR {models_dir}")
    return path


def _entry(config, models_dir: Path) -> ModelEntry:
    if not valid_model_name(config.name):
        raise ValueError(f"name {config.name!r} is not a model name (letters, digits, "
                         "'_', '-', '.'; not only digits)")
    if config.model_platform not in ("", "tensorflow"):
        raise ValueError(f"model_platform {config.model_platform!r}: only 'tensorflow' "
                         "SavedModels are served")
    labels = dict(sorted(config.version_labels.items()))
    for label in labels:
        if not LABEL.fullmatch(label):
            raise ValueError(f"version label {label!r} is not a label (letters, digits, "
                             "'_', '-'; at most 64)")
    return ModelEntry(config.name, _base_path(config.base_path, models_dir),
                      _policy(config), MappingProxyType(labels))


def _rules(text: str) -> list[tuple[int, str, str, str, float]]:
    """(line, model, label, kind, percent) of each ``# rollout:`` line."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        directive = DIRECTIVE.fullmatch(line)
        if directive is None:
            continue
        rule = RULE.fullmatch(directive.group(1))
        if rule is None:
            raise ModelConfigError(f"line {number}: expected '# rollout: <model> <label> "
                                   f"weight|shadow <percent>', got {line.strip()[:80]!r}")
        model, label, kind, percent = rule.groups()
        rules.append((number, model, label, kind, float(percent)))
    return rules


def parse_model_config(text: str, models_dir: Path) -> ModelConfig:
    """The file's models; raises ModelConfigError naming the line (or the model).

    tensorflow-serving-api is imported here, not at the top: a server without
    MODEL_CONFIG_FILE needs none of it (the wheel does not declare it: its own
    requirement is a second TensorFlow, so the Makefile and image install it --no-deps)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    message = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise ModelConfigError(f"line {err.GetLine()}: {_bare(err)}") from None
    if message.WhichOneof("config") != "model_config_list":
        raise ModelConfigError("expected a model_config_list { config { ... } }")
    entries: dict[str, ModelEntry] = {}
    for config in message.model_config_list.config:
        try:
            entry = _entry(config, models_dir)
        except ValueError as err:
            raise ModelConfigError(f"config {config.name!r}: {err}") from None
        if entry.name in entries:
            raise ModelConfigError(f"config {entry.name!r}: the model is listed twice")
        entries[entry.name] = entry
    traffic: dict[str, dict[str, dict[str, float]]] = {}
    for number, model, label, kind, percent in _rules(text):
        entry = entries.get(model)
        if entry is None:
            raise ModelConfigError(f"line {number}: no config for model {model!r}")
        if label not in entry.labels:
            raise ModelConfigError(f"line {number}: {model!r} has no version label "
                                   f"{label!r} (labels: {', '.join(entry.labels) or 'none'})")
        if not 0 <= percent <= 100:
            raise ModelConfigError(f"line {number}: a percentage is 0 to 100, got {percent:g}")
        rules = traffic.setdefault(model, {"weight": {}, "shadow": {}})
        if label in rules["weight"] or label in rules["shadow"]:
            raise ModelConfigError(f"line {number}: label {label!r} of {model!r} already "
                                   "has a weight or shadow rule")
        rules[kind][label] = percent
        if sum(rules["weight"].values()) > 100:
            raise ModelConfigError(f"line {number}: the weights of {model!r} add up to "
                                   "more than 100")
    for model, rules in traffic.items():
        entries[model] = ModelEntry(
            model, entries[model].base_path, entries[model].policy, entries[model].labels,
            MappingProxyType(rules["weight"]), MappingProxyType(rules["shadow"]))
    return ModelConfig(MappingProxyType(entries))


def _bare(err: Exception) -> str:
    """The parser's message without its ``line:column :`` prefix (given apart)."""
    return re.sub(r"^\d+:\d+ : ", "", str(err))[:200]


class ConfigWatcher:
    """MODEL_CONFIG_FILE as last read well: read again whenever the file changes.

    A file that is missing, unreadable or refused is logged once (by the caller, from
    ``error``) and the last good config stays in force; there is none before the first
    good read, and ``read`` then raises, so a server never starts on a bad file.
    """

    def __init__(self, path: Path, models_dir: Path):
        self.path = Path(path)
        self.models_dir = Path(models_dir)
        self.config: ModelConfig | None = None
        self.error: str | None = None
        self._key: tuple[int, ...] | None = None

    def read(self) -> ModelConfig:
        """The config in force; raises ModelConfigError when no good one was ever read."""
        try:
            info = self.path.stat()
            key = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            if key != self._key:  # a refused file is read again each time: it is small
                text = read_regular(self.path, CONFIG_LIMIT_BYTES).decode("utf-8")
                self.config = parse_model_config(text, self.models_dir)
                self._key, self.error = key, None
        except (OSError, UnicodeDecodeError, ModelConfigError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            self.error = f"MODEL_CONFIG_FILE {self.path}: {reason}"
        if self.config is None:
            raise ModelConfigError(self.error or f"MODEL_CONFIG_FILE {self.path} is unread")
        return self.config
