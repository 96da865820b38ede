"""tf.data input pipelines: uint8 arrays in, augmented float batches out.

Augmentation runs on whole batches inside tf.data, not inside the model, so the
exported network is exactly the article's and serving never sees a random layer.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from training.recipes import Recipe


def _to_float(images: tf.Tensor) -> tf.Tensor:
    """uint8 (B, 28, 28) → float32 (B, 28, 28, 1) in [0, 1], the served contract."""
    return tf.cast(images, tf.float32)[..., tf.newaxis] / 255.0


def augmenter(recipe: Recipe, seed: int) -> keras.Sequential:
    """Small random rotations, shifts and zooms, filling with black (the background)."""
    return keras.Sequential([
        keras.layers.RandomRotation(recipe.rotation_degrees / 360.0, fill_mode="constant",
                                    seed=seed),
        keras.layers.RandomTranslation(recipe.shift_fraction, recipe.shift_fraction,
                                       fill_mode="constant", seed=seed + 1),
        keras.layers.RandomZoom(recipe.zoom_fraction, fill_mode="constant", seed=seed + 2),
    ], name="augment")


def training_dataset(
    images: np.ndarray, labels: np.ndarray, recipe: Recipe, seed: int
) -> tf.data.Dataset:
    """Shuffled each epoch, batched, augmented if the recipe says so, prefetched."""
    dataset = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        .batch(recipe.batch_size)
        .map(lambda x, y: (_to_float(x), y))
    )
    if recipe.augment:
        augment = augmenter(recipe, seed)
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y))
    return dataset.prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int = 512
                       ) -> tf.data.Dataset:
    """In order, no augmentation: for validation and test."""
    return (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(batch_size)
        .map(lambda x, y: (_to_float(x), y))
        .prefetch(tf.data.AUTOTUNE)
    )
