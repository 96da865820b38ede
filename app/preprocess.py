"""Turn an image as people send it into a 28×28 MNIST digit, the way MNIST was made.

MNIST's digits are white on black, cropped to the ink, scaled so the longer side is 20
pixels (antialiased), and placed in a 28×28 field by their centre of mass. Photos, scans,
browser-canvas PNGs and phone JPEGs are none of that, so each step is redone here:

1. decode safely: the pixel count is checked from the header before any decoding
   (decompression bombs), EXIF orientation is honoured, the first frame of an animation
   is used;
2. flatten alpha onto the background the ink stands out from (a transparent canvas with
   black strokes is black ink on white paper);
3. grayscale, then detect the background from the border and invert dark-on-light;
4. subtract the background, crop to the ink (ignoring specks that hold a tiny share of it);
5. scale the longer side to 20 px with a Lanczos filter, keep the aspect ratio;
6. place in 28×28 by centre of mass, scale to [0, 1].

Errors are raised as InvalidInput (unreadable) or UnprocessableInput (readable but not
usable); nothing here knows about HTTP.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidInput, UnprocessableInput

SIDE = 28
BOX = 20
CENTRE = 14
INK_SHARE_TRIMMED = 0.005  # share of ink mass ignored at each edge when cropping
MIN_CONTRAST = 24  # grey levels between background and ink below which an image is blank
WORKING_SIDE = 512  # larger images are reduced to about this before any float copy
REDUCE_MODES = {"P": "RGBA", "1": "L", "I;16": "I", "I;16B": "I", "I;16L": "I"}


def peek_size(data: bytes) -> tuple[int, int]:
    """Width and height from the header alone, or (0, 0) if it cannot be read (the full
    decode then reports why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # noqa: BLE001 - any unreadable header is judged by decode()
        return (0, 0)


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes → a loaded, upright PIL image. Raises InvalidInput or UnprocessableInput."""
    if not data:
        raise InvalidInput("empty image: the request carried no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image, max_pixels)
            image.load()
    except Image.DecompressionBombError:  # Pillow's own guard, hit before ours can be
        raise UnprocessableInput(f"image too large: over Pillow's decompression-bomb limit, "
                                 f"far above {max_pixels:,} pixels (MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise InvalidInput("not a readable image: the bytes are not PNG, JPEG, GIF, BMP, "
                           "WebP, TIFF or another format Pillow can decode") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidInput(f"corrupt or truncated image: {err}") from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
        return image


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise UnprocessableInput(
            f"image too large: {width}×{height} = {width * height:,} pixels, "
            f"the limit is {max_pixels:,} (MAX_IMAGE_PIXELS)")
    if width == 0 or height == 0:
        raise InvalidInput("image has no pixels")


def to_gray(image: Image.Image) -> np.ndarray:
    """Any mode → float32 grayscale in [0, 255], alpha flattened onto the right background."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = np.asarray(image, dtype=np.float32)
        top = 65535.0 if gray.max() > 255 else 255.0
        return np.clip(gray * (255.0 / top), 0, 255)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return np.asarray(image.convert("L"), dtype=np.float32)
    rgba = np.asarray(image.convert("LA"), dtype=np.float32)
    gray, alpha = rgba[..., 0], rgba[..., 1] / 255.0
    opaque = alpha > 0.5
    if not opaque.any():
        raise UnprocessableInput("no digit found: the image is fully transparent")
    # Paper behind the ink: white behind dark strokes, black behind light ones.
    background = 255.0 if gray[opaque].mean() < 128 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def white_on_black(gray: np.ndarray) -> np.ndarray:
    """Invert if the background (the border's median) is light; then subtract it."""
    ring = max(1, min(gray.shape) // 20)
    border = np.concatenate([gray[:ring].ravel(), gray[-ring:].ravel(),
                             gray[:, :ring].ravel(), gray[:, -ring:].ravel()])
    if np.median(border) > 127:
        gray, border = 255.0 - gray, 255.0 - border
    # The border's spread is paper texture, noise and shading: count it as background.
    floor = np.percentile(border, 90)
    ink = np.clip(gray - floor, 0, None)
    if ink.max() < MIN_CONTRAST:
        raise UnprocessableInput("no digit found: the image is blank or has no contrast")
    return ink * (255.0 / ink.max())


def _span(mass: np.ndarray) -> tuple[int, int]:
    """Indices holding the ink mass, trimming a tiny share at each end (specks)."""
    cumulative = np.cumsum(mass) / mass.sum()
    start = int(np.searchsorted(cumulative, INK_SHARE_TRIMMED))
    stop = int(np.searchsorted(cumulative, 1 - INK_SHARE_TRIMMED)) + 1
    return start, max(stop, start + 1)


def crop_to_ink(ink: np.ndarray) -> np.ndarray:
    top, bottom = _span(ink.sum(axis=1))
    left, right = _span(ink.sum(axis=0))
    return ink[top:bottom, left:right]


def fit_box(ink: np.ndarray) -> np.ndarray:
    """Longer side to 20 px, antialiased, aspect kept; strokes re-stretched to full white."""
    height, width = ink.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(ink.astype(np.float32)).resize(  # float32 → mode "F"
        size, Image.Resampling.LANCZOS)
    small = np.clip(np.asarray(resized, dtype=np.float32), 0, None)
    return small / small.max() if small.max() > 0 else small


def centre_by_mass(digit: np.ndarray) -> np.ndarray:
    """Place the digit in a 28×28 field with its centre of mass at the centre."""
    height, width = digit.shape
    rows, cols = np.indices(digit.shape)
    total = digit.sum()
    row_mass = (rows * digit).sum() / total
    col_mass = (cols * digit).sum() / total
    # MNIST's centre of mass sits at pixel (14, 14) of 0..27, measured on its test set.
    top = int(np.clip(round(CENTRE - row_mass), 0, SIDE - height))
    left = int(np.clip(round(CENTRE - col_mass), 0, SIDE - width))
    field = np.zeros((SIDE, SIDE), dtype=np.float32)
    field[top:top + height, left:left + width] = digit
    return field


def shrink(image: Image.Image) -> Image.Image:
    """Reduce a large photo by whole-block averaging first: the digit ends up 20 pixels
    high anyway, and float copies of a 40-megapixel image would cost gigabytes."""
    factor = max(image.size) // WORKING_SIDE
    if factor < 2:
        return image
    if image.mode in REDUCE_MODES:
        image = image.convert(REDUCE_MODES[image.mode])
    return image.reduce(factor)


def to_mnist(image: Image.Image) -> np.ndarray:
    """A decoded image → float32 (28, 28) in [0, 1], white digit on black."""
    ink = white_on_black(to_gray(shrink(image)))
    return np.clip(centre_by_mass(fit_box(crop_to_ink(ink))), 0.0, 1.0)


def as_is(image: Image.Image) -> np.ndarray:
    """``?preprocess=none``: a 28×28 image already in MNIST form, only scaled to [0, 1]."""
    if image.size != (SIDE, SIDE):
        width, height = image.size
        raise UnprocessableInput(f"preprocess=none needs a 28×28 image, got {width}×{height}")
    return to_gray(image) / 255.0


def prepare(data: bytes, max_pixels: int, preprocess: bool = True) -> np.ndarray:
    """Image bytes → float32 (28, 28) model input."""
    image = decode(data, max_pixels)
    return to_mnist(image) if preprocess else as_is(image).astype(np.float32)
