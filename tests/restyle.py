"""Real MNIST test digits re-drawn the way people send digits, and digits in fonts.

Used by the preprocessing tests and the accuracy-over-HTTP tests: the images are made
from the real test set (or real fonts on this machine), never drawn by hand.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
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


def tight_crop(digit: np.ndarray) -> np.ndarray:
    """The digit cut to its ink's bounding box: strokes touch every edge, as a form
    scanner's or a segmentation step's crops do."""
    rows, cols = np.nonzero(digit)
    return digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def low_resolution(crop: np.ndarray, side: int, shown: int = 32) -> np.ndarray:
    """A small scan of the crop: its longer side fills ``side`` pixels (the aspect kept,
    the shorter side centred, as NIST's own normalisation does), area-averaged,
    quantised to 17 grey levels (the UCI/scikit-learn 8×8 digits' depth), then scaled
    back up to ``shown``×``shown`` bilinear, as such scans are viewed and sent."""
    height, width = crop.shape
    square = np.zeros((max(height, width),) * 2, dtype=np.uint8)
    top, left = (square.shape[0] - height) // 2, (square.shape[1] - width) // 2
    square[top:top + height, left:left + width] = crop
    small = np.asarray(Image.fromarray(square).resize((side, side), Image.Resampling.BOX),
                       dtype=np.float32)
    levels = np.round(small * (16 / 255)) * (255 / 16)
    shown_image = Image.fromarray(levels.astype(np.uint8)).resize(
        (shown, shown), Image.Resampling.BILINEAR)
    return np.asarray(shown_image)


def polarity(image: np.ndarray, index: int) -> np.ndarray:
    """Both polarities in one set: even items white on black, odd ones black on white."""
    return image if index % 2 == 0 else 255 - image


def png(image: np.ndarray) -> bytes:
    return encode(Image.fromarray(image), "PNG")


def jpeg50(image: np.ndarray) -> bytes:
    return encode(Image.fromarray(image), "JPEG", quality=50)


def restyled_sets(images: np.ndarray, labels: np.ndarray, seed: int = 0
                  ) -> dict[str, list[tuple[bytes, int]]]:
    """The test sets the README reports: (encoded image, true digit) pairs."""
    rng = np.random.default_rng(seed)
    pairs = list(zip(images, (int(v) for v in labels), strict=True))
    return {
        MNIST_SET: [(encode(Image.fromarray(d), "PNG"), y) for d, y in pairs],
        "black ink on white 280×280, off-centre, JPEG": [
            (encode(ink_on_paper(d, rng).convert("RGB"), "JPEG", quality=85), y)
            for d, y in pairs],
        "transparent RGBA PNG, black strokes (browser canvas)": [
            (encode(transparent_strokes(d, rng), "PNG"), y) for d, y in pairs],
        PRINTED_SET: [
            (encode(printed_digit(digit, font), "PNG"), digit)
            for font in fonts() for digit in range(10)],
    }


def frame_filling_sets(images: np.ndarray, labels: np.ndarray
                       ) -> dict[str, list[tuple[bytes, int]]]:
    """Digits that fill their frame and low-resolution scans of them (issue 15's sets):
    tight crops in both polarities, 8×8, 12×12 and 16×16 scans shown at 32×32, and
    each of those again as JPEG quality 50."""
    crops = [(tight_crop(d), int(y)) for d, y in zip(images, labels, strict=True)]
    sets = {
        "tight crop to the ink, white on black, PNG": [(png(c), y) for c, y in crops],
        "tight crop to the ink, black on white, PNG": [(png(255 - c), y) for c, y in crops],
        "tight crop, JPEG quality 50, both polarities": [
            (jpeg50(polarity(c, i)), y) for i, (c, y) in enumerate(crops)],
    }
    for side in LOW_RESOLUTIONS:
        scans = [(polarity(low_resolution(c, side), i), y)
                 for i, (c, y) in enumerate(crops)]
        sets[scan_set(side)] = [(png(s), y) for s, y in scans]
        sets[scan_set(side, "JPEG quality 50")] = [(jpeg50(s), y) for s, y in scans]
    return sets


LOW_RESOLUTIONS = (8, 12, 16)
MNIST_SET = "MNIST 28×28 PNG (as published)"
PRINTED_SET = "printed digits, every font on the machine"


def scan_set(side: int, encoding: str = "PNG") -> str:
    """The name of a low-resolution set, as the README's table and the tests use it."""
    return (f"{side}×{side} scan, 17 grey levels, shown at 32×32, {encoding}, "
            "both polarities")


@dataclass(frozen=True)
class Score:
    """One set's result over HTTP: the share read right, and how many were refused."""

    accuracy: float
    refused: int


def _post(url: str, chunk: list[tuple[bytes, int]]):
    import requests

    files = [("image", (f"{i}.img", blob, "application/octet-stream"))
             for i, (blob, _) in enumerate(chunk)]
    return requests.post(f"{url}/predict", files=files, timeout=120)


def http_score(url: str, items: list[tuple[bytes, int]], batch: int = 100) -> Score:
    """Post the images in multipart batches to /predict. A batch with a refused image is
    answered 422 as a whole, so it is re-sent one image at a time to count refusals
    (each counts as a miss)."""
    correct = refused = 0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        response = _post(url, chunk)
        if response.status_code == 422 and len(chunk) > 1:
            for item in chunk:
                single = http_score(url, [item])
                correct += single.accuracy == 1.0
                refused += single.refused
            continue
        if response.status_code == 422:
            refused += 1
            continue
        response.raise_for_status()
        digits = [p["digit"] for p in response.json()["predictions"]]
        correct += sum(d == y for d, (_, y) in zip(digits, chunk, strict=True))
    return Score(correct / len(items), refused)


def main() -> None:
    """Print the README's table for a running server: python -m tests.restyle URL [N]."""
    import sys

    from training.data import load_mnist

    url = sys.argv[1].rstrip("/")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    mnist = load_mnist(download=None)
    digits, labels = mnist.x_test[:count], mnist.y_test[:count]
    sets = restyled_sets(digits, labels) | frame_filling_sets(digits, labels)
    print("| test set | images | accuracy over HTTP | refused |\n| --- | ---: | ---: | ---: |")
    for name, items in sets.items():
        score = http_score(url, items)
        print(f"| {name} | {len(items):,} | {100 * score.accuracy:.2f}% | {score.refused} |")


if __name__ == "__main__":
    main()


def canvas_seven(side: int) -> Image.Image:
    """A browser-canvas-like RGBA image of side×side: a black 7 on transparent white."""
    image = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    ImageDraw.Draw(image).line([(side // 4, side // 8), (3 * side // 4, side // 8),
                                (side // 3, 7 * side // 8)], fill=(0, 0, 0, 255),
                               width=side // 20)
    return image
