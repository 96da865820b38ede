"""The NumPy article's CNN from scratch, vectorised: ``python -m training.scratch``.

Conv3x3(8, no bias) → MaxPool2 → Softmax(10), each layer with ``forward`` and
``backward`` in NumPy alone. Where the article loops over every pixel and filter, one
image at a time, these layers work on whole mini-batches through sliding-window views
and ``einsum``, and the convolution also returns its input gradient (the article leaves
it "as an exercise"), so layers can stack. Layouts are Keras's (NHWC images, kernels
(3, 3, in, out), flatten in (h, w, c) order), so trained weights load straight into the
Keras ``tiny`` model and are exported and served like any other model.

Training needs no TensorFlow: options, data, the network and its training import
NumPy alone (``run``). Only ``export`` loads TensorFlow and Keras, because a served
version is a SavedModel (and its LiteRT file) of the Keras twin.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from training.data import Mnist, MnistError, load_mnist, split_validation, to_model_input
from training.evaluate import evaluate, format_per_class
from training.metadata import Origin, build_metadata
from training.options import DEFAULT_SEED, DEFAULT_VAL_SIZE, model_name, positive_int
from training.plots import plot_confusion, plot_history, plot_samples

DEFAULT_NAME = "mnist_scratch"


class Conv3x3:
    """Valid 3×3 cross-correlation, no bias (as Keras's Conv2D computes it)."""

    def __init__(self, in_channels: int, filters: int, rng: np.random.Generator):
        # The article's initialisation: standard normal divided by the 9 taps.
        self.kernel = rng.standard_normal((3, 3, in_channels, filters)) / 9
        self.grad_kernel = np.zeros_like(self.kernel)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, H, W, C) → (N, H-2, W-2, F)."""
        self.windows = sliding_window_view(x, (3, 3), axis=(1, 2))  # (N, H-2, W-2, C, 3, 3)
        # tensordot turns the window view into one matrix product (im2col).
        return np.tensordot(self.windows, self.kernel, axes=([3, 4, 5], [2, 0, 1]))

    def backward(self, grad: np.ndarray) -> np.ndarray:
        """Kernel gradient (kept) and input gradient (returned)."""
        by_channel = np.tensordot(self.windows, grad, axes=([0, 1, 2], [0, 1, 2]))  # C,3,3,F
        self.grad_kernel = by_channel.transpose(1, 2, 0, 3)
        # The input gradient is a full correlation of the output gradient with the
        # flipped kernel: pad by 2, slide the same 3×3 window.
        padded = np.pad(grad, ((0, 0), (2, 2), (2, 2), (0, 0)))
        windows = sliding_window_view(padded, (3, 3), axis=(1, 2))  # (N, H, W, F, 3, 3)
        flipped = self.kernel[::-1, ::-1]
        return np.tensordot(windows, flipped, axes=([3, 4, 5], [3, 0, 1]))

    def params(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.kernel, self.grad_kernel)]


class MaxPool2:
    """2×2 max pooling, stride 2; the gradient goes to the first maximum of each window
    (as TensorFlow routes it), so blank regions with ties still check exactly."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        blocks = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
        blocks = blocks.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)
        self.shape = x.shape
        self.first = blocks.argmax(axis=-1)
        return blocks.max(axis=-1)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        n, h, w, c = self.shape
        routed = np.zeros((*grad.shape, 4), grad.dtype)
        np.put_along_axis(routed, self.first[..., np.newaxis], grad[..., np.newaxis], axis=-1)
        routed = routed.reshape(n, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
        out = np.zeros(self.shape, grad.dtype)
        out[:, : h // 2 * 2, : w // 2 * 2] = routed.reshape(n, h // 2 * 2, w // 2 * 2, c)
        return out

    def params(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return []


class Softmax:
    """Flatten, dense layer, softmax; ``backward`` takes the cross-entropy's gradient
    with respect to the logits, ``(p - onehot) / N``, which is exact and stable."""

    def __init__(self, inputs: int, classes: int, rng: np.random.Generator):
        self.weights = rng.standard_normal((inputs, classes)) / inputs  # the article's
        self.bias = np.zeros(classes)
        self.grad_weights = np.zeros_like(self.weights)
        self.grad_bias = np.zeros_like(self.bias)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        self.flat = x.reshape(len(x), -1)
        logits = self.flat @ self.weights + self.bias
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def backward(self, grad_logits: np.ndarray) -> np.ndarray:
        self.grad_weights = self.flat.T @ grad_logits
        self.grad_bias = grad_logits.sum(axis=0)
        return (grad_logits @ self.weights.T).reshape(self.shape)

    def params(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.weights, self.grad_weights), (self.bias, self.grad_bias)]


class ScratchCNN:
    """The three layers in order, with loss and SGD."""

    def __init__(self, seed: int, dtype=np.float64):
        rng = np.random.default_rng(seed)
        conv, dense = Conv3x3(1, 8, rng), Softmax(13 * 13 * 8, 10, rng)
        conv.kernel = conv.kernel.astype(dtype)
        dense.weights, dense.bias = dense.weights.astype(dtype), dense.bias.astype(dtype)
        self.layers = [conv, MaxPool2(), dense]

    def forward(self, images: np.ndarray) -> np.ndarray:
        """(N, 28, 28, 1) in [0, 1] → (N, 10) probabilities."""
        out = images
        for layer in self.layers:
            out = layer.forward(out)
        return out

    def loss(self, probabilities: np.ndarray, labels: np.ndarray) -> float:
        picked = probabilities[np.arange(len(labels)), labels]
        return float(-np.log(np.clip(picked, 1e-12, None)).mean())

    def backward(self, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradients of the mean cross-entropy for every parameter; returns the input's."""
        grad = probabilities.copy()
        grad[np.arange(len(labels)), labels] -= 1.0
        grad /= len(labels)
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def step(self, learning_rate: float) -> None:
        for layer in self.layers:
            for value, gradient in layer.params():
                value -= learning_rate * gradient

    def keras_weights(self) -> list[np.ndarray]:
        """In the order of the Keras tiny model's get_weights()."""
        conv, _, dense = self.layers
        return [conv.kernel, dense.weights, dense.bias]


@dataclass(frozen=True)
class ScratchRecipe:
    """Plain SGD, as in the article; only the batch, rate and epochs differ."""

    preset: str
    epochs: int
    batch_size: int
    learning_rate: float
    train_images: int | None  # None: all of them
    decay: float = 1.0  # the rate is multiplied by this after every epoch

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # The article: the first 1,000 training images, one at a time, lr 0.005, 3 epochs,
    # tested on the first 1,000 test images (we report the full 10,000 as well).
    "seed": ScratchRecipe("seed", epochs=3, batch_size=1, learning_rate=0.005,
                          train_images=1000),
    # Ours: every training image, mini-batches of 64, a high rate that decays each epoch.
    "default": ScratchRecipe("default", epochs=5, batch_size=64, learning_rate=0.3,
                             train_images=None, decay=0.6),
}


def train(net: ScratchCNN, recipe: ScratchRecipe, x: np.ndarray, y: np.ndarray,
          x_val: np.ndarray, y_val: np.ndarray, seed: int) -> dict[str, list[float]]:
    """SGD over shuffled mini-batches with a tqdm bar; prints the article's epoch lines."""
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {k: [] for k in ("loss", "accuracy", "val_loss",
                                                        "val_accuracy", "seconds")}
    for epoch in range(1, recipe.epochs + 1):
        started = time.perf_counter()
        order = rng.permutation(len(x))
        losses, correct = [], 0
        batches = range(0, len(x), recipe.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch}/{recipe.epochs}", unit="batch",
                          leave=False, mininterval=0.5):
            index = order[start:start + recipe.batch_size]
            probabilities = net.forward(x[index])
            losses.append(net.loss(probabilities, y[index]) * len(index))
            correct += int((probabilities.argmax(axis=1) == y[index]).sum())
            net.backward(probabilities, y[index])
            net.step(recipe.learning_rate * recipe.decay ** (epoch - 1))
        val = net.forward(x_val)
        history["loss"].append(sum(losses) / len(x))
        history["accuracy"].append(correct / len(x))
        history["val_loss"].append(net.loss(val, y_val))
        history["val_accuracy"].append(float((val.argmax(axis=1) == y_val).mean()))
        history["seconds"].append(time.perf_counter() - started)
        print(f"--- Epoch {epoch} --- loss {history['loss'][-1]:.3f} | accuracy "
              f"{100 * history['accuracy'][-1]:.1f}% | validation loss "
              f"{history['val_loss'][-1]:.3f} | validation accuracy "
              f"{100 * history['val_accuracy'][-1]:.1f}% | {history['seconds'][-1]:.1f} s")
    return history


def to_keras(net: ScratchCNN):
    """The Keras tiny model holding the trained NumPy weights (same layout)."""
    from training.models import build_tiny

    model = build_tiny()
    model.set_weights([w.astype(np.float32) for w in net.keras_weights()])
    return model


def parse_args(argv: list[str] | None = None, environ: dict | None = None
               ) -> argparse.Namespace:
    environ = {} if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m training.scratch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--models-dir", type=Path,
                        default=Path(environ.get("MODELS_DIR") or "models"))
    parser.add_argument("--name", type=model_name, default=DEFAULT_NAME)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--limit", type=positive_int, help="the first N training images")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class ScratchRun:
    """A trained NumPy net and what its metadata needs to say how it was made."""

    net: ScratchCNN
    recipe: ScratchRecipe
    mnist: Mnist
    splits: dict[str, np.ndarray]
    history: dict[str, list[float]]  # per epoch, with the seconds each took
    seconds: float


def run(args: argparse.Namespace) -> ScratchRun:
    """Load MNIST and train with the chosen recipe: NumPy alone, no TensorFlow.

    Raises MnistError when no copy of MNIST can be read.
    """
    recipe = replace(PRESETS[args.preset], **{k: v for k, v in {
        "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate}.items() if v is not None})
    mnist = load_mnist(args.data)
    count = min(filter(None, [recipe.train_images, args.limit, len(mnist.x_train)]))
    x, y = mnist.x_train[:count], mnist.y_train[:count]
    val_size = min(DEFAULT_VAL_SIZE, max(1, count // 10))
    (x_train, y_train), (x_val, y_val) = split_validation(x, y, val_size, args.seed)
    print(f"NumPy CNN, {recipe}: {len(x_train)} train, {len(x_val)} validation images")
    net = ScratchCNN(args.seed, dtype=np.float32)
    started = time.perf_counter()
    history = train(net, recipe, to_model_input(x_train), y_train, to_model_input(x_val),
                    y_val, args.seed)
    seconds = time.perf_counter() - started
    return ScratchRun(net, recipe, mnist, {"x_train": x_train, "x_val": x_val}, history,
                      seconds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, dict(os.environ))
    try:
        trained = run(args)
    except MnistError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = export(trained, args)
    print(f"\nexported {folder}")
    return 0


def export(trained: ScratchRun, args: argparse.Namespace) -> Path:
    """Evaluate through Keras, print the article's test lines, export like training.fit.

    The one step that loads TensorFlow and Keras (``to_keras`` and ``export_version``
    import them): the served version is the Keras twin's SavedModel, and its test figures
    are the twin's.
    """
    from training.export import export_version

    mnist = trained.mnist
    model = to_keras(trained.net)
    evaluation = evaluate(model, mnist.x_test, mnist.y_test)
    first = evaluate(model, mnist.x_test[:1000], mnist.y_test[:1000])
    print(f"\nTest Loss: {first.loss:.3f}  Test Accuracy: {first.accuracy:.3f} "
          "(the article's 1,000 test images)")
    print(f"Test Loss: {evaluation.loss:.4f}  Test Accuracy: {evaluation.accuracy:.4f} "
          "(all 10,000)\n")
    print(format_per_class(evaluation))
    history = {k: v for k, v in trained.history.items() if k != "seconds"}
    origin = Origin(args.name, "tiny (NumPy from scratch)", args.seed, args.limit, args.data)
    metadata = build_metadata(origin, trained.recipe.to_dict(), mnist, trained.splits, model,
                              evaluation, history, trained.seconds)
    metadata["seconds_per_epoch"] = [round(s, 2) for s in trained.history["seconds"]]

    def write_plots(folder: Path) -> None:
        plot_history(history, folder / "history.png")
        plot_confusion(evaluation.confusion, folder / "confusion.png")
        plot_samples(mnist.x_test, mnist.y_test, evaluation.predictions,
                     folder / "samples.png")

    return export_version(model, args.models_dir / args.name, metadata, write_plots,
                          reference_images=to_model_input(trained.splits["x_val"]))


if __name__ == "__main__":
    sys.exit(main())
