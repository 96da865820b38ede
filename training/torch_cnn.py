"""The article's PyTorch CNN, both ways it is written, and its conversion to Keras.

``sequential`` is the article's ``nn.Sequential``, quirk included: there is **no ReLU
after the first Linear layer** (Linear → Dropout → Linear → LogSoftmax), so its hidden
layer is linear. ``functional`` is the article's ``nn.Module`` whose ``forward`` calls
``F.relu`` after every layer but the last: the same network as our Keras CNN. Both have
1,199,882 parameters and end in ``log_softmax``, as ``NLLLoss`` wants.

We serve SavedModels only, so trained weights are carried into the equivalent Keras
network (``keras_twin``) and exported the usual way. Two layouts differ between the
frameworks and both are handled in ``keras_weights``: convolution kernels are
(out, in, kh, kw) in PyTorch and (kh, kw, in, out) in Keras, and PyTorch flattens a
(C, H, W) tensor channel-major while Keras flattens (H, W, C) channel-last, so the rows of
the first Dense kernel are permuted. The input needs nothing: like our Keras models, the
article feeds pixels scaled to [0, 1] (``ToTensor``) with no normalisation, so the
converted network takes exactly the served input, float32 (N, 28, 28, 1) in [0, 1].
"""

from __future__ import annotations

import keras
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.models import NUM_CLASSES, build_functional, build_sequential

TORCH_ARCHITECTURES = ("functional", "sequential")
POOLED_SHAPE = (64, 12, 12)  # (C, H, W) after conv 3×3, conv 3×3 and 2×2 pooling
HIDDEN_UNITS = 128
SEQUENTIAL_QUIRK = ("dense_1 has no activation: the article's nn.Sequential goes "
                    "Linear → Dropout → Linear → LogSoftmax, without a ReLU in between")


class FunctionalNet(nn.Module):
    """The article's functional style: layers as attributes, ReLUs in ``forward``."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.pool = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(int(np.prod(POOLED_SHAPE)), HIDDEN_UNITS)
        self.dropout2 = nn.Dropout(0.5)
        self.output = nn.Linear(HIDDEN_UNITS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) in [0, 1] → (N, 10) log-probabilities."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(self.pool(x))
        x = torch.flatten(x, 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.output(x), dim=1)


def build_sequential_net(num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """The article's nn.Sequential, exactly: no ReLU between the two Linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(int(np.prod(POOLED_SHAPE)), HIDDEN_UNITS),
        nn.Dropout(0.5),
        nn.Linear(HIDDEN_UNITS, num_classes),
        nn.LogSoftmax(dim=1),
    )


def build_net(arch: str) -> nn.Module:
    """The named PyTorch network, freshly initialised (PyTorch's default initialisers)."""
    if arch == "functional":
        return FunctionalNet()
    if arch == "sequential":
        return build_sequential_net()
    raise ValueError(f"no PyTorch network {arch!r}; choose one of: "
                     f"{', '.join(TORCH_ARCHITECTURES)}")


def keras_twin(arch: str) -> keras.Model:
    """The Keras network that computes what ``build_net(arch)`` computes.

    Same layer names as our Keras CNN, so the layer table reads the same; the sequential
    twin's ``dense_1`` is linear, as the article's nn.Sequential is.
    """
    if arch == "functional":
        return build_functional()
    if arch == "sequential":
        return build_sequential(hidden_activation=None)
    raise ValueError(f"no PyTorch network {arch!r}; choose one of: "
                     f"{', '.join(TORCH_ARCHITECTURES)}")


def _layers(net: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]:
    """The four layers with weights, in order, whichever way the net was written."""
    found = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if len(found) != 4:
        raise ValueError(f"expected 2 Conv2d and 2 Linear layers, found {len(found)}")
    return tuple(found)  # type: ignore[return-value]


def keras_weights(net: nn.Module) -> list[np.ndarray]:
    """The net's parameters in Keras's layouts, in the order of ``keras_twin().get_weights()``.

    The first Dense kernel's rows are reordered from PyTorch's flatten order (c, h, w) to
    Keras's (h, w, c); without it the network still loads but computes something else.
    """
    conv1, conv2, fc1, output = _layers(net)

    def array(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().cpu().numpy().astype(np.float32)

    channels, height, width = POOLED_SHAPE
    fc1_kernel = (array(fc1.weight)                       # (out, c·h·w)
                  .reshape(HIDDEN_UNITS, channels, height, width)
                  .transpose(2, 3, 1, 0)                   # (h, w, c, out)
                  .reshape(height * width * channels, HIDDEN_UNITS))
    return [
        array(conv1.weight).transpose(2, 3, 1, 0), array(conv1.bias),
        array(conv2.weight).transpose(2, 3, 1, 0), array(conv2.bias),
        fc1_kernel, array(fc1.bias),
        array(output.weight).T, array(output.bias),
    ]


def to_keras(net: nn.Module, arch: str) -> keras.Model:
    """The Keras twin holding the net's weights: what gets exported and served."""
    model = keras_twin(arch)
    model.set_weights(keras_weights(net))
    return model


def to_torch_input(images: np.ndarray) -> torch.Tensor:
    """The served input, (N, 28, 28, 1) or (N, 28, 28) floats, as PyTorch's (N, 1, 28, 28)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    tensor = tensor.permute(0, 3, 1, 2) if tensor.ndim == 4 else tensor.unsqueeze(1)
    return tensor.contiguous()


@torch.inference_mode()
def predict_probabilities(net: nn.Module, images: np.ndarray, batch_size: int = 1000
                          ) -> np.ndarray:
    """Softmax probabilities of the net in eval mode, for served-form images."""
    net.eval()
    batches = [torch.exp(net(to_torch_input(images[i:i + batch_size]))).numpy()
               for i in range(0, len(images), batch_size)]
    return np.concatenate(batches)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
