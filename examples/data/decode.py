"""Image and mask decoding: PIL file probing, ``(C, S, S)`` float images in ``[0, 1]``, exactly binary masks.

Images are resized bilinearly with antialiasing (PIL widens the filter when downscaling); masks are resized
bilinearly as ``0/1`` floats and re-thresholded (``> 0.5``), so no value other than 0 or 1 ever appears.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadFileError",
    "decode_image",
    "decode_mask",
    "is_image_file",
    "probe_size",
    "resize_mask",
]

#: File extensions recognised as images or masks (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class BadFileError(Exception):
    """A file that PIL cannot identify or verify."""


def is_image_file(path: Path) -> bool:
    """A visible file with one of :data:`IMAGE_EXTENSIONS`."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def probe_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` of an image file after a cheap header read and ``verify()``.

    Raises:
        BadFileError: if PIL cannot identify or verify the file.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise BadFileError(f"cannot read '{path}': {type(exc).__name__}: {exc}") from exc
    return size


def _resize_float(channel: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased (PIL widens the filter support when downscaling) resize of a float32 ``(H, W)``."""
    resized = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def decode_image(path: Path, channels: int, size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file to ``float32`` ``(C, S, S)`` in ``[0, 1]`` (``C`` = 1 gray or 3 RGB).

    Resizing is done by PIL (bilinear with antialiasing), single-threaded, so it is cheap in DataLoader workers.

    Returns:
        The array and the native ``(H, W)`` of the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            native = (im.height, im.width)
            if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
                gray = np.asarray(im, dtype=np.float32)
                if im.mode != "F":
                    gray = gray / (255.0 if gray.max(initial=0) <= 255 else 65535.0)
                if size is not None:
                    gray = _resize_float(gray, size)
                arr = np.clip(gray, 0.0, 1.0)[None]
                return (np.repeat(arr, 3, axis=0) if channels == 3 else arr), native
            converted = im.convert("L" if channels == 1 else "RGB")
            if size is not None and converted.size != (size, size):
                converted = converted.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(converted, dtype=np.float32) / 255.0
    except Exception as exc:
        raise ValueError(f"failed to decode image '{path}': {type(exc).__name__}: {exc}") from exc
    arr = arr[None] if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))
    return arr, native


def decode_mask(path: Path, threshold: int = 127) -> np.ndarray:
    """Decode a mask file to a ``bool`` ``(H, W)`` array (True = lesion).

    Conventions: 1-bit PNG → pixel set; palette (``P``) → palette index > 0; 8-bit gray/RGB(A) →
    gray value ``> threshold`` (default 127, robust to JPEG noise); 16/32-bit integer → ``> 0`` when the mask
    only holds 0/1, otherwise ``> threshold`` rescaled to 16 bit; float → ``> 0.5``.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                return np.array(im, dtype=bool)
            if im.mode == "P":
                return np.asarray(im) > 0
            if im.mode in _SIXTEEN_BIT_MODES or im.mode == "I":
                arr = np.asarray(im, dtype=np.int64)
                if arr.max(initial=0) <= 1:
                    return arr > 0
                return arr > (threshold * 257 if im.mode in _SIXTEEN_BIT_MODES else threshold)
            if im.mode == "F":
                return np.asarray(im, dtype=np.float32) > 0.5
            return np.asarray(im.convert("L")) > threshold
    except Exception as exc:
        raise ValueError(f"failed to decode mask '{path}': {type(exc).__name__}: {exc}") from exc


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a ``bool`` mask: bilinear (antialiased) on 0/1 floats, then ``> 0.5``; stays exactly binary."""
    if mask.shape == (size, size):
        return mask
    return _resize_float(mask.astype(np.float32), size) > 0.5
