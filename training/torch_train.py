"""Train the article's PyTorch CNN with one of our recipes: ``fit --framework torch``.

The article's loop, kept where it matters: ``NLLLoss`` on ``LogSoftmax``, Adam, a
training then a validation pass per epoch, and the weights of the epoch with the best
validation accuracy are the ones kept (a later epoch has to beat it strictly). What we
add is what ``training.fit`` gives the Keras path: seeded, deterministic runs, the
recipe's one-cycle schedule and augmentation, and Keras's progress bar.

Batches are drawn from tensors in memory (55,000 images are 172 MB as float32), not a
DataLoader: no worker processes, and the order is one seeded permutation per epoch.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import keras
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.recipes import Recipe
from training.torch_cnn import build_net, predict_probabilities

EVAL_BATCH = 1000


@dataclass
class TorchRun:
    """A trained net (best-validation weights loaded) and what happened on the way."""

    net: nn.Module
    history: dict[str, list[float]]
    best_epoch: int  # 1-based


def seed_torch(seed: int, threads: int | None = None) -> None:
    """Seed PyTorch and insist on deterministic kernels, so ``--seed`` repeats a run."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    if threads is not None:
        torch.set_num_threads(threads)


def learning_rate_at(step: int, recipe: Recipe, total_steps: int) -> float:
    """The recipe's rate at an optimizer step: Keras's schedules, step for step.

    "one-cycle" is what ``make_optimizer`` builds for Keras: linear warm-up from a tenth
    of the peak over ``warmup_fraction`` of the run, then cosine decay to 0.
    """
    if recipe.schedule == "constant":
        return recipe.learning_rate
    if recipe.schedule != "one-cycle":
        raise ValueError(f"unknown schedule {recipe.schedule!r}; use 'constant' or 'one-cycle'")
    warmup = int(total_steps * recipe.warmup_fraction)
    start = recipe.learning_rate / 10
    if step < warmup:
        return start + (recipe.learning_rate - start) * step / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(step - warmup, decay_steps) / decay_steps
    return recipe.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def augment(images: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, shift and zoom per image, filled with black, as the Keras pipeline.

    One affine grid per image: ``grid_sample`` maps each output pixel back to the input,
    so the matrix is the inverse transform (a zoom z samples 1/z of the field).
    """
    n = len(images)

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(recipe.rotation_degrees))
    scale = 1 / (1 + uniform(recipe.zoom_fraction))
    shift_x, shift_y = uniform(2 * recipe.shift_fraction), uniform(2 * recipe.shift_fraction)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1),
                         torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) → float32 (N, 1, 28, 28) in [0, 1]: the served scaling."""
    return torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)


def _validate(net: nn.Module, x_val: np.ndarray, y_val: np.ndarray) -> tuple[float, float]:
    probabilities = predict_probabilities(net, x_val.astype(np.float32) / 255.0, EVAL_BATCH)
    picked = np.clip(probabilities[np.arange(len(y_val)), y_val], 1e-7, 1.0)
    accuracy = float((probabilities.argmax(axis=1) == y_val).mean())
    return float(-np.log(picked).mean()), accuracy


def train(arch: str, recipe: Recipe, splits: dict[str, np.ndarray], seed: int) -> TorchRun:
    """Train a fresh net; the returned one holds the best validation epoch's weights."""
    net = build_net(arch)  # after seed_torch, so its initial weights follow the seed
    x_train, y_train = to_tensor(splits["x_train"]), torch.from_numpy(
        splits["y_train"].astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    steps = -(-len(x_train) // recipe.batch_size)
    total_steps = max(1, recipe.epochs * steps)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate_at(0, recipe, total_steps))
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [],
                                       "val_accuracy": [], "learning_rate": []}
    best_accuracy, best_epoch, best_state = -1.0, 0, None
    step = 0
    for epoch in range(1, recipe.epochs + 1):
        print(f"Epoch {epoch}/{recipe.epochs}")
        bar = keras.utils.Progbar(steps, verbose=1 if sys.stdout.isatty() else 2,
                                  stateful_metrics=["val_loss", "val_accuracy"])
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        loss_sum, correct = 0.0, 0
        for batch, start in enumerate(range(0, len(x_train), recipe.batch_size), 1):
            index = order[start:start + recipe.batch_size]
            images, labels = x_train[index], y_train[index]
            if recipe.augment:
                images = augment(images, recipe, generator)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, recipe, total_steps)
            optimizer.zero_grad()
            log_probabilities = net(images)
            loss = F.nll_loss(log_probabilities, labels)
            loss.backward()
            optimizer.step()
            step += 1
            hits = int((log_probabilities.argmax(dim=1) == labels).sum())
            loss_sum += loss.item() * len(index)
            correct += hits
            bar.update(batch, [("loss", loss.item()), ("accuracy", hits / len(index))],
                       finalize=False)
        val_loss, val_accuracy = _validate(net, splits["x_val"], splits["y_val"])
        history["loss"].append(loss_sum / len(x_train))
        history["accuracy"].append(correct / len(x_train))
        history["val_loss"].append(val_loss)
        history["val_accuracy"].append(val_accuracy)
        history["learning_rate"].append(optimizer.param_groups[0]["lr"])
        bar.update(steps, [("val_loss", val_loss), ("val_accuracy", val_accuracy)],
                   finalize=True)
        if val_accuracy > best_accuracy:  # strictly better, as the article keeps it
            best_accuracy, best_epoch = val_accuracy, epoch
            best_state = copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()
    print(f"best validation accuracy {best_accuracy:.4f} at epoch {best_epoch}: "
          "its weights are the ones kept")
    return TorchRun(net, history, best_epoch)
