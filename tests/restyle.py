"""Real MNIST test digits re-drawn the way people send digits, and digits in fonts.

Used by the preprocessing tests and the accuracy-over-HTTP tests: the images are made
from the real test set (or real fonts on this machine), never drawn by hand.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CANVAS = 280
FONT_GLOBS = ("/usr/share/fonts/**/DejaVu*.ttf", "/usr/share/fonts/**/Liberation*.ttf")


def ink_on_paper(digit: np.ndarray, rng: np.random.Generator, canvas: int = CANVAS
                 ) -> Image.Image:
    """Black ink on white paper, the digit scaled up and placed off-centre."""
    size = int(rng.integers(canvas // 3, canvas * 2 // 3))
    big = Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BICUBIC)
    paper = Image.new("L", (canvas, canvas), 255)
    left, top = (int(v) for v in rng.integers(0, canvas - size, 2))
    paper.paste(big, (left, top))
    return paper


def transparent_strokes(digit: np.ndarray, rng: np.random.Generator,
                        canvas: int = CANVAS) -> Image.Image:
    """A browser canvas: black strokes whose alpha is the ink, transparent elsewhere."""
    paper = ink_on_paper(digit, rng, canvas)
    alpha = Image.fromarray(255 - np.asarray(paper))
    black = Image.new("RGBA", paper.size, (0, 0, 0, 0))
    black.putalpha(alpha)
    return black


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def font_paths() -> list[Path]:
    """The fonts on this machine, regular and bold/oblique variants alike."""
    found = {p for pattern in FONT_GLOBS for p in Path("/").glob(pattern.lstrip("/"))}
    return sorted(found)


def fonts(size: int = 120) -> list[ImageFont.FreeTypeFont]:
    """Every font on the machine plus Pillow's bundled one, so the list is never empty."""
    loaded = [ImageFont.truetype(str(path), size) for path in font_paths()]
    return [*loaded, ImageFont.load_default(size)]


def printed_digit(digit: int, font: ImageFont.FreeTypeFont, canvas: int = 200
                  ) -> Image.Image:
    """The digit typed in a font: black on white, centred roughly as a person would."""
    paper = Image.new("L", (canvas, canvas), 255)
    ImageDraw.Draw(paper).text((canvas / 2, canvas / 2), str(digit), fill=0, font=font,
                               anchor="mm")
    return paper


def restyled_sets(images: np.ndarray, labels: np.ndarray, seed: int = 0
                  ) -> dict[str, list[tuple[bytes, int]]]:
    """The test sets the README reports: (encoded image, true digit) pairs."""
    rng = np.random.default_rng(seed)
    pairs = list(zip(images, (int(v) for v in labels), strict=True))
    return {
        "MNIST 28×28 PNG (as published)": [
            (encode(Image.fromarray(d), "PNG"), y) for d, y in pairs],
        "black ink on white 280×280, off-centre, JPEG": [
            (encode(ink_on_paper(d, rng).convert("RGB"), "JPEG", quality=85), y)
            for d, y in pairs],
        "transparent RGBA PNG, black strokes (browser canvas)": [
            (encode(transparent_strokes(d, rng), "PNG"), y) for d, y in pairs],
        "printed digits, every font on the machine": [
            (encode(printed_digit(digit, font), "PNG"), digit)
            for font in fonts() for digit in range(10)],
    }


def http_accuracy(url: str, items: list[tuple[bytes, int]], batch: int = 100) -> float:
    """Post the images in multipart batches to /predict; the share classified right."""
    import requests

    correct = 0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        files = [("image", (f"{i}.img", blob, "application/octet-stream"))
                 for i, (blob, _) in enumerate(chunk)]
        response = requests.post(f"{url}/predict", files=files, timeout=120)
        response.raise_for_status()
        digits = [p["digit"] for p in response.json()["predictions"]]
        correct += sum(d == y for d, (_, y) in zip(digits, chunk, strict=True))
    return correct / len(items)


def main() -> None:
    """Print the README's table for a running server: python -m tests.restyle URL [N]."""
    import sys

    from training.data import load_mnist

    url = sys.argv[1].rstrip("/")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    mnist = load_mnist(download=None)
    sets = restyled_sets(mnist.x_test[:count], mnist.y_test[:count])
    print("| test set | images | accuracy over HTTP |\n| --- | ---: | ---: |")
    for name, items in sets.items():
        print(f"| {name} | {len(items):,} | {100 * http_accuracy(url, items):.2f}% |")


if __name__ == "__main__":
    main()


def canvas_seven(side: int) -> Image.Image:
    """A browser-canvas-like RGBA image of side×side: a black 7 on transparent white."""
    image = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    ImageDraw.Draw(image).line([(side // 4, side // 8), (3 * side // 4, side // 8),
                                (side // 3, 7 * side // 8)], fill=(0, 0, 0, 255),
                               width=side // 20)
    return image
