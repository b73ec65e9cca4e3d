"""Decoding images: paths, bytes or arrays to RGB PIL images, each failure an error naming the item."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from executor.tuning.errors import DataError


def array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` arrays; uint8 as is, floats in [0, 1] scaled by 255."""
    arr = np.asarray(array)
    if arr.dtype.kind not in 'biuf':
        raise DataError(f'{name}: tensor holds {arr.dtype} values, not numbers; send pixel values (uint8 or floats)')
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise DataError(f'{name}: tensor of shape {arr.shape} is not an image; send (H, W), (H, W, 3) or (3, H, W)')
    if not np.isfinite(arr).all():
        raise DataError(f'{name}: tensor holds NaN or infinite values')
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if arr.max(initial=0.0) <= 1.0 and arr.min(initial=0.0) >= 0.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert('RGB')


# The most pixels an image may have to be decoded (its header is read first): a 17 KB PNG of 12000 x 12000 took 2 s
# and 700 MB to decode. 40 Mpx is a 7728 x 5152 photo, ~120 MB decoded. The service sets it from `max_image_pixels`.
MAX_PIXELS = 40_000_000


PIL_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own check, which refuses images of twice that at open


def limit_pixels(max_pixels: int) -> None:
    """Set the most pixels an image of this process may have; PIL's own check is raised with it when it is higher."""
    global MAX_PIXELS
    MAX_PIXELS = int(max_pixels)
    Image.MAX_IMAGE_PIXELS = max(MAX_PIXELS, PIL_MAX_PIXELS)


def load_image(source: str | Path | bytes | np.ndarray | Any, name: str = 'image') -> Image.Image:
    """An RGB PIL image from a file path, encoded bytes or an array, with its EXIF orientation applied; one of more
    than ``MAX_PIXELS`` pixels is refused from its header, before it is decoded."""
    if isinstance(source, np.ndarray) or hasattr(source, '__array__') and not isinstance(source, (str, bytes, Path)):
        return array_to_image(np.asarray(source), name)
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise DataError(f'{name}: blob is empty; send the encoded image bytes (JPEG, PNG, ...)')
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise DataError(f'{name}: file {str(path)!r} does not exist or is not a file')
            image = Image.open(path)
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise DataError(
                f'{name}: the image is {width} x {height} = {width * height / 1e6:.0f} Mpx, more than the '
                f'{MAX_PIXELS / 1e6:.0f} Mpx this service decodes (max_image_pixels); send a smaller image'
            )
        image.load()  # decode now: a truncated file fails here, not later inside a batch
        image = ImageOps.exif_transpose(image)
    except DataError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own check, at open, for images far above MAX_PIXELS
        raise DataError(f'{name}: the image is too large to decode ({err}); send a smaller image') from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f'{name}: cannot decode the image ({err}); send a valid JPEG/PNG/WebP/... file') from err
    return image.convert('RGB')
