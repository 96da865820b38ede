"""The networks we train, each a function of its hyperparameters.

``sequential`` and ``functional`` build the same CNN as the Keras article, once per
Keras API, with the same layer names, so their layer tables and (given the same
weights) their outputs are identical. ``tiny`` is the NumPy article's net.
"""

from collections.abc import Callable

import keras
from keras import layers

NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)


def build_sequential(num_classes: int = NUM_CLASSES, hidden_activation: str | None = "relu"
                     ) -> keras.Model:
    """The article's CNN with the Sequential API (1,199,882 parameters).

    ``hidden_activation=None`` makes ``dense_1`` linear: the twin of the PyTorch
    article's nn.Sequential, which has no ReLU after its first Linear layer.
    """
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE, name="image"),
            layers.Conv2D(32, 3, activation="relu", name="conv2d_1"),
            layers.Conv2D(64, 3, activation="relu", name="conv2d_2"),
            layers.MaxPooling2D(2, name="max_pooling2d_1"),
            layers.Dropout(0.25, name="dropout_1"),
            layers.Flatten(name="flatten_1"),
            layers.Dense(128, activation=hidden_activation, name="dense_1"),
            layers.Dropout(0.5, name="dropout_2"),
            layers.Dense(num_classes, activation="softmax", name="dense_2"),
        ],
        name="mnist_cnn",
    )


def build_functional(num_classes: int = NUM_CLASSES) -> keras.Model:
    """The same CNN with the Functional API: what we serve by default."""
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = layers.Conv2D(32, 3, activation="relu", name="conv2d_1")(inputs)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2d_2")(x)
    x = layers.MaxPooling2D(2, name="max_pooling2d_1")(x)
    x = layers.Dropout(0.25, name="dropout_1")(x)
    x = layers.Flatten(name="flatten_1")(x)
    x = layers.Dense(128, activation="relu", name="dense_1")(x)
    x = layers.Dropout(0.5, name="dropout_2")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="dense_2")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def build_tiny(num_classes: int = NUM_CLASSES, dtype: str = "float32") -> keras.Model:
    """The NumPy article's Conv3x3(8) → MaxPool2 → Softmax net (13,602 parameters).

    ``dtype="float64"`` lets the NumPy implementation's gradients be checked against
    TensorFlow's to double precision.
    """
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE, name="image", dtype=dtype),
            layers.Conv2D(8, 3, use_bias=False, name="conv3x3", dtype=dtype),
            layers.MaxPooling2D(2, name="maxpool2", dtype=dtype),
            layers.Flatten(name="flatten", dtype=dtype),
            layers.Dense(num_classes, activation="softmax", name="softmax", dtype=dtype),
        ],
        name="mnist_tiny",
    )


ARCHITECTURES: dict[str, Callable[[], keras.Model]] = {
    "functional": build_functional,
    "sequential": build_sequential,
    "tiny": build_tiny,
}
DEFAULT_ARCH = "functional"


def build_model(arch: str) -> keras.Model:
    """Build the named architecture; raises ValueError naming the known ones."""
    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {known}") from None
    return builder()
