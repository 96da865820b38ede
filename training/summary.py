"""The article's "parameters and memory" table, computed from a built model.

Nothing here is typed in: every count comes from the layers themselves. The article's
table counts activations per image over every layer's output *including the input*
(87,194 for the served CNN) and its forward memory as those values in float32, doubled
for training. It also has two slips that ours corrects: the second convolution has
3·3·32·64 = 18,432 weights (not 18,342), so the weights without biases total 1,199,648
(not 1,199,558); with the 234 biases that is Keras's 1,199,882.

``memory_estimate`` needs no Keras, so the serving side can rescale the figures stored
in a model's metadata for any batch size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

FLOAT32_BYTES = 4


def _shape(tensor: Any) -> list[int | None]:
    return [None if dim is None else int(dim) for dim in tensor.shape]


def _values_per_image(shape: list[int | None]) -> int:
    return math.prod(dim for dim in shape[1:] if dim is not None)


def _is_bias(variable: Any) -> bool:
    return variable.name.split("/")[-1].startswith("bias")


def layer_rows(model: keras.Model) -> list[dict[str, Any]]:
    """One row per layer, the input first, as in the article's table.

    Functional models list their InputLayer and Sequential ones do not; the input row
    is built here once so that both APIs give the same table.
    """
    from keras.layers import InputLayer

    input_shape = _shape(model.inputs[0])
    rows = [{
        "name": model.inputs[0].name or "input", "type": "InputLayer",
        "input_shape": input_shape, "output_shape": input_shape,
        "weights": 0, "biases": 0, "params": 0, "trainable_params": 0,
        "activations": _values_per_image(input_shape),
    }]
    for layer in model.layers:
        if isinstance(layer, InputLayer):
            continue
        output_shape = _shape(layer.output)
        weights = sum(math.prod(v.shape) for v in layer.weights if not _is_bias(v))
        biases = sum(math.prod(v.shape) for v in layer.weights if _is_bias(v))
        rows.append({
            "name": layer.name,
            "type": type(layer).__name__,
            "input_shape": _shape(layer.input),
            "output_shape": output_shape,
            "weights": int(weights),
            "biases": int(biases),
            "params": int(weights + biases),
            "trainable_params": int(sum(math.prod(v.shape) for v in layer.trainable_weights)),
            "activations": _values_per_image(output_shape),
        })
    return rows


def summarize_model(model: keras.Model) -> dict[str, Any]:
    """Layer table, parameter totals and per-image memory figures, JSON-ready."""
    rows = layer_rows(model)
    params = sum(row["params"] for row in rows)
    trainable = sum(row["trainable_params"] for row in rows)
    param_bytes = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in model.weights)
    totals = {
        "params": params,
        "trainable_params": trainable,
        "non_trainable_params": params - trainable,
        "weights": sum(row["weights"] for row in rows),
        "biases": sum(row["biases"] for row in rows),
        "param_bytes": int(param_bytes),
        "activations_per_image": sum(row["activations"] for row in rows),
    }
    return {"layers": rows, "totals": totals, "memory": memory_estimate(totals, batch_size=1)}


def _itemsize(dtype: Any) -> int:
    import numpy as np

    return np.dtype(str(dtype)).itemsize


def memory_estimate(totals: dict[str, int], batch_size: int = 1) -> dict[str, int]:
    """Memory in bytes for a batch, from a summary's totals.

    Forward memory is every activation value (input included) in float32; training
    keeps them for the backward pass and adds their gradients, hence ×2 as in the
    article. Parameters are counted once; optimizer state is not included.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    per_image = totals["activations_per_image"] * FLOAT32_BYTES
    forward = per_image * batch_size
    return {
        "batch_size": batch_size,
        "param_bytes": totals["param_bytes"],
        "activations_per_image": totals["activations_per_image"],
        "forward_bytes_per_image": per_image,
        "forward_bytes": forward,
        "training_bytes": 2 * forward,
        "inference_total_bytes": totals["param_bytes"] + forward,
        "training_total_bytes": totals["param_bytes"] + 2 * forward,
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table like the article's, for the terminal and the README."""
    def dims(shape: list[int | None]) -> str:
        return "×".join(str(d) for d in shape[1:])

    header = f"{'layer':<18}{'type':<14}{'input':>11}{'output':>11}" \
             f"{'weights':>10}{'biases':>8}{'params':>10}{'activations':>12}"
    lines = [header, "-" * len(header)]
    for row in summary["layers"]:
        lines.append(
            f"{row['name']:<18}{row['type']:<14}{dims(row['input_shape']):>11}"
            f"{dims(row['output_shape']):>11}{row['weights']:>10,}{row['biases']:>8,}"
            f"{row['params']:>10,}{row['activations']:>12,}")
    t, m = summary["totals"], summary["memory"]
    lines += [
        "-" * len(header),
        f"{'total':<54}{t['weights']:>10,}{t['biases']:>8,}{t['params']:>10,}"
        f"{t['activations_per_image']:>12,}",
        f"params: {t['params']:,} total, {t['trainable_params']:,} trainable, "
        f"{t['non_trainable_params']:,} non-trainable ({_human(t['param_bytes'])})",
        f"memory per image: forward {_human(m['forward_bytes_per_image'])}, "
        f"training {_human(2 * m['forward_bytes_per_image'])}",
    ]
    return "\n".join(lines)
