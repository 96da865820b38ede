"""Test-set figures: loss, accuracy, the confusion matrix and per-class accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from training.data import NUM_CLASSES, to_model_input

if TYPE_CHECKING:  # Evaluation is shared with the NumPy trainer, which loads no Keras
    import keras


@dataclass(frozen=True)
class Evaluation:
    """What a trained model scores on a labelled set."""

    loss: float
    accuracy: float
    predictions: np.ndarray  # predicted digit per image
    confusion: np.ndarray  # confusion[true, predicted] counts

    def per_class(self) -> list[dict[str, float | int]]:
        """Per digit: how many there were, how many were right, and the ratio."""
        rows = []
        for digit in range(NUM_CLASSES):
            total = int(self.confusion[digit].sum())
            correct = int(self.confusion[digit, digit])
            rows.append({"digit": digit, "correct": correct, "total": total,
                         "accuracy": correct / total if total else float("nan")})
        return rows


def evaluate(model: keras.Model, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 512) -> Evaluation:
    """Score a model on uint8 images; one forward pass gives loss and predictions."""
    probabilities = model.predict(to_model_input(images), batch_size=batch_size, verbose=0)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    predictions = probabilities.argmax(axis=1)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    return Evaluation(
        loss=float(-np.log(picked).mean()),
        accuracy=float((predictions == labels).mean()),
        predictions=predictions,
        confusion=confusion,
    )


def format_per_class(evaluation: Evaluation) -> str:
    """The article's table: 'Test Accuracy of 7: 99.12% (1019/1028)'."""
    lines = [
        f"Test Accuracy of {row['digit']:>5}: {100 * row['accuracy']:6.2f}% "
        f"({row['correct']:>4}/{row['total']:>4})"
        for row in evaluation.per_class()
    ]
    correct = int(np.trace(evaluation.confusion))
    total = int(evaluation.confusion.sum())
    lines.append(f"\nTest Accuracy (Overall): {100 * evaluation.accuracy:.2f}% "
                 f"({correct}/{total})")
    return "\n".join(lines)
