"""Turn an image as people send it into a 28×28 MNIST digit, the way MNIST was made.

MNIST's digits are white on black, cropped to the ink, scaled so the longer side is 20
pixels (antialiased), and placed in a 28×28 field by their centre of mass. Photos, scans,
browser-canvas PNGs and phone JPEGs are none of that, so each step is redone here:

1. decode safely: only the six documented formats are opened; the pixel count is
   checked from the header before any decoding (decompression bombs); JPEGs are reduced
   while decoding; a per-worker budget bounds the decoded pixels in flight; EXIF
   orientation is honoured, the first frame of an animation is used;
2. flatten alpha onto the background the ink stands out from (a transparent canvas with
   black strokes is black ink on white paper);
3. grayscale, then find the background and invert dark-on-light: from the border where
   it is paper, from the whole image (Otsu's two classes) where the digit fills its
   frame and its strokes touch the edges;
4. subtract the background, crop to the ink (ignoring specks that hold a tiny share of it);
5. scale the longer side to 20 px with a Lanczos filter, keep the aspect ratio; give a
   soft (low-resolution, blurred) digit MNIST's stroke contrast;
6. place in 28×28 by centre of mass, scale to [0, 1].

A 28×28 digit that already is in MNIST's form (see ``mnist_form``) skips steps 3–6: it
is only scaled to [0, 1] — what the model was trained on, at a fraction of the cost.

Errors are raised as InvalidInput (unreadable) or UnprocessableInput (readable but not
usable); nothing here knows about HTTP.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.batching import Deadline
from app.errors import InvalidInput, UnprocessableInput

log = logging.getLogger(__name__)
# The formats the README documents; Pillow's other openers (ICO, FITS, PSD, …) are never
# tried, so their decoders' costs and bugs are not ours.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, GIF, BMP, WebP or TIFF"

SIDE = 28
BOX = 20
CENTRE = 14
BLACK = 8  # grey levels: no brighter than this is MNIST's black background
CENTRE_TOLERANCE = 2.0  # pixels between a digit's centre of mass and MNIST's (14, 14)
INK_SHARE_TRIMMED = 0.005  # share of ink mass ignored at each edge when cropping
BORDER_INK_SHARE = 0.08  # share of the border that may be ink (its 90th percentile stays paper)
MIN_CONTRAST = 24  # grey levels between background and ink below which an image is blank
INKED, SOLID = 0.1, 0.7  # levels (of 1) of a stroke's faint edge and of its solid core
SOFT_STROKES = 0.45  # share of inked pixels that are solid below which strokes are sharpened
WORKING_SIDE = 512  # larger images are reduced to about this before any float copy
STRIP_PIXELS = 2_000_000  # pixels of one strip shrink() copies at a time
REDUCE_MODES = {"P": "RGBA", "1": "L", "I;16": "I", "I;16B": "I", "I;16L": "I"}


def open_image(data: bytes, formats: tuple[str, ...] = FORMATS) -> Image.Image:
    """Parse the header only, with Pillow's openers limited to ``formats``: an ICO, FITS
    or any of Pillow's ~20 other formats is refused here, before any decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=formats)


def peek_size(data: bytes) -> tuple[int, int]:
    """Width and height from the header alone, or (0, 0) if it cannot be read (the full
    decode then reports why)."""
    try:
        with open_image(data) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any unreadable header is judged by decode()
        return (0, 0)


class DecodeBudget:
    """Decoded pixels one worker may hold at once (DECODE_BUDGET_PIXELS).

    Each image holds its pixel count, as its header declares it after any reduction
    while decoding, from the decode until it is 28×28; an image larger than the whole
    budget waits until it is alone. Sixteen concurrent 40-megapixel images thus decode in
    turn instead of all at once (3 GB), and a request that cannot get its turn
    before its deadline gets DeadlineExceeded.
    """

    def __init__(self, pixels: int):
        self.capacity = pixels
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, deadline: Deadline | None = None) -> Iterator[None]:
        """Wait for room for ``pixels`` (at most until ``deadline``), hold it inside."""
        cost = min(pixels, self.capacity)
        with self._cond:
            while self.in_use + cost > self.capacity:
                left = None if deadline is None else deadline.remaining()
                if left is not None and left <= 0:
                    raise deadline.error("while the image waited for decoding memory "
                                         "(DECODE_BUDGET_PIXELS)")
                self._cond.wait(left)
            self.in_use += cost
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= cost
                self._cond.notify_all()


@contextmanager
def decode(data: bytes, max_pixels: int, budget: DecodeBudget | None = None,
           deadline: Deadline | None = None, reduce_to: int | None = None
           ) -> Iterator[Image.Image]:
    """Bytes → a loaded, upright PIL image, yielded while the decode budget holds it.

    ``reduce_to``: a JPEG is decoded at the smallest DCT scale (1/2 … 1/8) that keeps
    both sides at least this long (libjpeg's draft mode), so a 40-megapixel photo costs
    a fraction of its pixels. Raises InvalidInput or UnprocessableInput.
    """
    if not data:
        raise InvalidInput("empty image: the request carried no image bytes")
    try:
        image = open_image(data)
        _check_size(image, max_pixels)
        if reduce_to is not None and image.format == "JPEG":
            image.draft(image.mode, (reduce_to, reduce_to))
    except Image.DecompressionBombError:  # Pillow's own guard, hit before ours can be
        raise UnprocessableInput(f"image too large: over Pillow's decompression-bomb limit, "
                                 f"far above {max_pixels:,} pixels (MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"not a readable image: the bytes are not {FORMAT_NAMES}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidInput(f"corrupt or truncated image: {err}") from None
    width, height = image.size
    with budget.hold(width * height, deadline) if budget else nullcontext():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        # Pillow's decoders raise many types on malformed bytes (struct.error, IndexError,
        # …); its own fuzzers catch Exception for that reason.
        except Exception as err:  # noqa: BLE001
            raise InvalidInput(f"corrupt or truncated image: {err}") from None
        try:  # in place: without an Orientation tag a copy (160 MB at 40 MP) is returned
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
            log.debug("EXIF orientation unreadable; image used as stored")
        yield image


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
    if image.mode == "LAB":  # CIELab TIFF: its L band is the lightness itself
        return np.asarray(image.getchannel("L"), dtype=np.float32)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = np.nan_to_num(np.asarray(image, dtype=np.float32), posinf=0.0, neginf=0.0)
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


def otsu_threshold(gray: np.ndarray) -> float | None:
    """The grey level that best splits the image into two classes (Otsu's method): here
    ink and background, whichever covers more of the image. None for a single level."""
    counts, edges = np.histogram(gray, bins=256, range=(0.0, 256.0))
    weight = np.cumsum(counts)[:-1]
    mass = np.cumsum(counts * edges[:-1])[:-1]
    total, total_mass = gray.size, float((counts * edges[:-1]).sum())
    split = (weight > 0) & (weight < total)
    if not split.any():
        return None
    between = np.zeros(weight.shape)
    between[split] = ((mass[split] * total - total_mass * weight[split]) ** 2
                      / (weight[split] * (total - weight[split])))
    return float(edges[int(between.argmax()) + 1])


def border_pixels(gray: np.ndarray) -> np.ndarray:
    ring = max(1, min(gray.shape) // 20)
    return np.concatenate([gray[:ring].ravel(), gray[-ring:].ravel(),
                           gray[:, :ring].ravel(), gray[:, -ring:].ravel()])


def _from_border(gray: np.ndarray, border: np.ndarray) -> np.ndarray:
    """Paper around the digit: the border's median gives the polarity, its spread
    (texture, noise, shading) the level counted as background."""
    if np.median(border) > 127:
        gray, border = 255.0 - gray, 255.0 - border
    return np.clip(gray - np.percentile(border, 90), 0, None)


def _from_classes(gray: np.ndarray, light: np.ndarray, border_light: float) -> np.ndarray:
    """A digit that fills its frame: of Otsu's two classes the background is the one that
    holds most of the border; its spread is counted as background."""
    if border_light > 0.5:
        gray, light = 255.0 - gray, ~light
    return np.clip(gray - np.percentile(gray[~light], 90), 0, None)


def white_on_black(gray: np.ndarray) -> np.ndarray:
    """Light ink on black, the background subtracted and the ink stretched to 255.

    The border gives the background where it is paper: at most BORDER_INK_SHARE of it on
    the ink's side of the Otsu threshold. Where the digit's strokes run into the edges
    (a tight crop, a frame-filling scan), or where the border reading leaves no contrast,
    the whole image's two classes decide; so an image with clear contrast is never
    called blank.
    """
    threshold = otsu_threshold(gray)
    if threshold is None:
        raise UnprocessableInput("no digit found: the image is blank or has no contrast")
    light = gray >= threshold
    border = border_pixels(gray)
    border_light = float((border >= threshold).mean())
    ink = None
    if min(border_light, 1 - border_light) <= BORDER_INK_SHARE:
        ink = _from_border(gray, border)
    if ink is None or ink.max() < MIN_CONTRAST:
        ink = _from_classes(gray, light, border_light)
    if ink.max() < MIN_CONTRAST:
        raise UnprocessableInput("no digit found: the image is blank or has no contrast")
    return ink * (255.0 / ink.max())


def _span(mass: np.ndarray) -> tuple[int, int]:
    """Indices holding the ink mass: a tiny share is trimmed at each end (specks), then
    one inked row or column next to what is left is taken back: the faint antialiased
    edge of the strokes themselves. Without it the crop cut into 42% of MNIST's own test
    digits (2 of 10,000 then read as another digit by the default model); with it a
    digit already in MNIST form keeps its box, and the full path reads it as the fast
    path does."""
    cumulative = np.cumsum(mass) / mass.sum()
    start = int(np.searchsorted(cumulative, INK_SHARE_TRIMMED))
    stop = max(int(np.searchsorted(cumulative, 1 - INK_SHARE_TRIMMED)) + 1, start + 1)
    if start > 0 and mass[start - 1] > 0:
        start -= 1
    if stop < mass.size and mass[stop] > 0:
        stop += 1
    return start, stop


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


def sharpen_strokes(digit: np.ndarray) -> np.ndarray:
    """Give a soft digit MNIST's stroke contrast: a low-resolution or blurred scan, once
    fitted to 20 px, has few saturated pixels where MNIST's strokes have a solid core.

    Measured as the share of inked pixels (> 0.1) that exceed 0.7: at least 0.47 for 95%
    of MNIST's test digits, 0.19 for a typical 8×8 scan. Below SOFT_STROKES the levels are
    scaled up until that share is SOFT_STROKES (clipped at 1); sharper digits (all but
    the softest ~3% of MNIST's) are left as they are. On the 10,000 8×8 scans this reads
    96.4% → 97.2% right, on the 12×12 ones 98.75% → 98.9%; no other set changed.
    """
    inked = digit[digit > INKED]
    if inked.size == 0 or (inked > SOLID).mean() >= SOFT_STROKES:
        return digit
    return np.clip(digit * (SOLID / np.quantile(inked, 1 - SOFT_STROKES)), 0.0, 1.0)


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
    high anyway, and float copies of a 40-megapixel image would cost gigabytes.

    Strip by strip: Pillow's ``reduce`` of an RGBA image, and converting a palette image
    to RGBA, each make a full-size copy (another 160 MB at 40 MP); a strip's copy is a
    few MB. Strips are whole blocks high, so the result is the one-piece reduction's.
    """
    factor = max(image.size) // WORKING_SIDE
    if factor < 2:
        return image
    width, height = image.size
    mode = REDUCE_MODES.get(image.mode, image.mode)
    reduced = Image.new(mode, (-(-width // factor), -(-height // factor)))
    if mode == image.mode:
        reduced.info = dict(image.info)  # e.g. the transparent colour of an RGB PNG
    step = factor * max(1, STRIP_PIXELS // (width * factor))
    for top in range(0, height, step):
        strip = image.crop((0, top, width, min(top + step, height)))
        reduced.paste(strip.convert(mode).reduce(factor), (0, top // factor))
    return reduced


def mnist_form(gray: np.ndarray) -> bool:
    """True for a 28×28 grayscale digit that already is in MNIST's form: white ink on
    black, the ink within a 20×20 box (MNIST's size; centring by mass may shift the box
    off the middle), its centre of mass within 2 px of MNIST's. Cropping, scaling and
    re-centring such a digit can only blur it, so it is taken as it is."""
    if gray.shape != (SIDE, SIDE) or gray.max() < MIN_CONTRAST:
        return False
    rows, cols = np.nonzero(gray > BLACK)
    if rows.size > gray.size // 2 or np.ptp(rows) >= BOX or np.ptp(cols) >= BOX:
        return False  # more "ink" than background (not white on black), or too large
    weights = np.indices(gray.shape)
    total = gray.sum()
    offset = max(abs((weights[0] * gray).sum() / total - CENTRE),
                 abs((weights[1] * gray).sum() / total - CENTRE))
    return bool(offset <= CENTRE_TOLERANCE)


def reshape_to_mnist(gray: np.ndarray) -> np.ndarray:
    """Grayscale in [0, 255] → MNIST form: polarity, crop, 20-pixel box, centre of mass."""
    ink = white_on_black(gray)
    return np.clip(centre_by_mass(sharpen_strokes(fit_box(crop_to_ink(ink)))), 0.0, 1.0)


def to_mnist(image: Image.Image) -> np.ndarray:
    """A decoded image → float32 (28, 28) in [0, 1], white digit on black."""
    gray = to_gray(shrink(image))
    if mnist_form(gray):  # the fast path: digits already as MNIST made them
        return (gray / 255.0).astype(np.float32)
    return reshape_to_mnist(gray)


def as_is(image: Image.Image) -> np.ndarray:
    """``?preprocess=none``: a 28×28 image already in MNIST form, only scaled to [0, 1]."""
    if image.size != (SIDE, SIDE):
        width, height = image.size
        raise UnprocessableInput(f"preprocess=none needs a 28×28 image, got {width}×{height}")
    return to_gray(image) / 255.0


def prepare(data: bytes, max_pixels: int, preprocess: bool = True,
            budget: DecodeBudget | None = None, deadline: Deadline | None = None
            ) -> np.ndarray:
    """Image bytes → float32 (28, 28) model input; any image Pillow decodes but cannot
    convert (an unusual mode) is an UnprocessableInput, never a server error."""
    with decode(data, max_pixels, budget, deadline,
                reduce_to=WORKING_SIDE if preprocess else None) as image:
        mode = image.mode
        try:
            return to_mnist(image) if preprocess else as_is(image).astype(np.float32)
        except (InvalidInput, UnprocessableInput):
            raise
        except (ValueError, OSError, TypeError, KeyError) as err:
            raise UnprocessableInput(f"image mode {mode} cannot be read as grayscale: "
                                     f"{err}") from None
