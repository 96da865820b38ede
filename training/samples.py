"""Write real MNIST test digits as ordinary image files, to try the API with.

``python -m training.samples`` writes ``digits/<index>-<label>.png`` (black ink on white
paper, 280×280, as a person would draw them), ``digits/mnist-28x28-<label>.png`` (one
digit exactly as MNIST publishes it, for ``?preprocess=none``) and ``digit.png`` (the
first test digit, a 7).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import load_mnist

SIDE = 280


def paper_digit(pixels: np.ndarray) -> Image.Image:
    """A 28×28 MNIST digit as black ink on a white 280×280 sheet, with a margin."""
    ink = Image.fromarray(255 - pixels).resize((200, 200), Image.Resampling.BICUBIC)
    sheet = Image.new("L", (SIDE, SIDE), 255)
    sheet.paste(ink, (40, 40))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.samples", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("digits"))
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--data", type=Path, help="as for training.fit")
    args = parser.parse_args(argv)
    mnist = load_mnist(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    for index in range(args.count):
        paper_digit(mnist.x_test[index]).save(args.out / f"{index}-{mnist.y_test[index]}.png")
    Image.fromarray(mnist.x_test[0]).save(args.out / f"mnist-28x28-{mnist.y_test[0]}.png")
    paper_digit(mnist.x_test[0]).save("digit.png")
    print(f"wrote {args.count} digits to {args.out}/ and digit.png (a {mnist.y_test[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
