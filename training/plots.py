"""The figures exported beside each model, drawn with matplotlib (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from training.data import NUM_CLASSES


def plot_history(history: dict[str, list[float]], path: Path) -> None:
    """Accuracy and loss per epoch, training against validation, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        ax.set_title(f"model {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, path: Path) -> None:
    """Counts of true digit (rows) against predicted digit (columns)."""
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax)
    threshold = confusion.max() / 2
    for (true, pred), count in np.ndenumerate(confusion):
        ax.text(pred, true, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_yticks(range(NUM_CLASSES))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test set)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                 path: Path, count: int = 20) -> None:
    """Test digits titled "pred (label)", green when right and red when wrong."""
    count = min(count, len(images))
    fig = plt.figure(figsize=(12, 3.2))
    for idx in range(count):
        ax = fig.add_subplot(2, (count + 1) // 2, idx + 1, xticks=[], yticks=[])
        ax.imshow(images[idx], cmap="gray")
        right = predictions[idx] == labels[idx]
        ax.set_title(f"{predictions[idx]} ({labels[idx]})", color="green" if right else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
