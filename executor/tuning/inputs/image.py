"""Image inputs: decoding (paths, bytes or arrays to RGB PIL images, each failure an error naming the item, the pixels
bounded), the model's resize/crop/normalise preprocessing (timm's ``data_config``), augmentation (torchvision v2)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.functional import pil_modes_mapping

from executor.tuning.errors import DataError
from executor.tuning.inputs.base import Batch, Inputs, Transform, register_inputs

IMAGENET_CONFIG = {
    'input_size': (3, 224, 224),
    'interpolation': 'bilinear',
    'mean': (0.485, 0.456, 0.406),
    'std': (0.229, 0.224, 0.225),
    'crop_pct': 0.875,
}
PROBE_PIXELS = 224  # the largest side the output-size probe runs at: enough for any backbone's downsampling


# --- decoding ---------------------------------------------------------------------------------------------------------


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
                state = 'is not a regular file (a folder, a FIFO or a device)' if path.exists() else 'does not exist'
                raise DataError(f'{name}: file {str(path)!r} {state}')
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


# --- preprocessing and augmentation, built from a model's ``data_config`` ---------------------------------------------

INTERPOLATION = {
    'bilinear': InterpolationMode.BILINEAR,
    'bicubic': InterpolationMode.BICUBIC,
    'nearest': InterpolationMode.NEAREST,
}


def _size(data_config: dict[str, Any]) -> tuple[int, int]:
    _, h, w = data_config['input_size']
    return int(h), int(w)


class ScaleNormalize(torch.nn.Module):
    """uint8 ``(3, H, W)`` -> float32 ``(x / 255 - mean) / std`` in one multiply and one subtract: what
    ``ToDtype(scale=True)`` + ``Normalize`` compute (to within 1e-6), in a sixth of their time (0.1 vs 0.6 ms at
    224 px here), which counts when a server decodes every request's images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if (std_t <= 0).any():
            raise ValueError(f'std must be positive, got {list(std)}')
        self.register_buffer('scale', (1.0 / (255.0 * std_t)).view(-1, 1, 1), persistent=False)
        self.register_buffer('shift', (mean_t / std_t).view(-1, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f'ScaleNormalize takes uint8 images, got {image.dtype}')
        return image.float().mul_(self.scale).sub_(self.shift)


class ResizeCenterCrop(torch.nn.Module):
    """``Resize(short side)`` then ``CenterCrop(size)`` as one PIL resize of the source box the crop keeps.

    Same scale and filter, but only the ``size`` output is computed, not the whole resized image: 1.6 vs 3.1 ms for a
    451x300 photo to 224 px here. Pillow rounds its two passes in another order then, so about half the pixels differ
    by one grey level (at most 6 on skimage's photos; mean 0.5). Training evaluation and serving share this transform,
    so they agree exactly. Tensors, and images the resize would leave smaller than the crop, take torchvision's path.
    """

    def __init__(self, resize: int, size: tuple[int, int], interpolation: InterpolationMode) -> None:
        super().__init__()
        self.resize, self.size, self.interpolation = resize, size, interpolation
        self.fallback = v2.Compose(
            [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
        )

    def forward(self, image: Any) -> Any:
        if not isinstance(image, Image.Image):
            return self.fallback(image)
        w, h = image.size
        short = self.resize  # torchvision's Resize(int): the short side becomes `resize`, the long one is truncated
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        crop_h, crop_w = self.size
        if new_w < crop_w or new_h < crop_h:
            return self.fallback(image)
        left, top = int(round((new_w - crop_w) / 2.0)), int(round((new_h - crop_h) / 2.0))  # as CenterCrop rounds
        sx, sy = new_w / w, new_h / h
        box = (left / sx, top / sy, (left + crop_w) / sx, (top + crop_h) / sy)
        return image.resize((crop_w, crop_h), pil_modes_mapping[self.interpolation], box=box)  # torchvision's filter


def _finish(data_config: dict[str, Any]) -> list:
    return [v2.ToImage(), ScaleNormalize(data_config['mean'], data_config['std'])]


def eval_transform(data_config: dict[str, Any]) -> v2.Compose:
    """Resize the short side to ``size / crop_pct``, centre-crop to ``size``, scale to [0, 1] and normalise."""
    h, w = _size(data_config)
    interp = INTERPOLATION.get(data_config.get('interpolation', 'bilinear'), InterpolationMode.BILINEAR)
    resize = int(math.floor(min(h, w) / float(data_config.get('crop_pct', 1.0))))
    return v2.Compose([ResizeCenterCrop(resize, (h, w), interp), *_finish(data_config)])


Augmentation = Literal['none', 'light', 'strong']


def train_transform(data_config: dict[str, Any], augmentation: Augmentation = 'none') -> v2.Compose:
    """Training preprocessing: ``'none'`` is the eval transform; ``'light'`` a mild random crop (80-100 % of the
    area, near-square); ``'strong'`` adds a wider crop range and horizontal flips.

    Measured on digits (efficientnet_lite0, 64 px, TripletMarginLoss margin 0.2, 15 epochs): the training loss went
    0.184 -> 0.009 with 'none', 0.184 -> 0.143 with 'light', and stayed at 0.19 with 60 % crops and flips; hence
    'none' by default, as Finetuner did (resize and normalise only).
    """
    if augmentation == 'none':
        return eval_transform(data_config)
    h, w = _size(data_config)
    interp = INTERPOLATION.get(data_config.get('interpolation', 'bilinear'), InterpolationMode.BILINEAR)
    if augmentation == 'light':
        return v2.Compose(
            [
                v2.RandomResizedCrop((h, w), scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=interp, antialias=True),
                *_finish(data_config),
            ]
        )
    return v2.Compose(
        [
            v2.RandomResizedCrop((h, w), scale=(0.5, 1.0), interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
            *_finish(data_config),
        ]
    )


def simclr_transform(data_config: dict[str, Any]) -> v2.Compose:
    """SimCLR's view pipeline (Chen et al., 2020): crop, flip, colour jitter, grayscale, blur."""
    h, w = _size(data_config)
    kernel = max(3, (int(0.1 * min(h, w)) // 2) * 2 + 1)
    return v2.Compose(
        [
            v2.RandomResizedCrop((h, w), scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            *_finish(data_config),
        ]
    )


# --- the inputs -------------------------------------------------------------------------------------------------------


@register_inputs
class ImageInputs(Inputs):
    """``images`` ``(B, 3, H, W)`` float32, resized, centre-cropped and normalised as ``data_config`` says
    (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``: timm's keys)."""

    kind = 'image'
    name: ClassVar[str] = 'images'
    onnx_inputs = ('images',)
    refusal = 'is text only ({count} such), but this model embeds images; send each as uri, blob or tensor'

    def __init__(self, data_config: dict[str, Any] | None = None) -> None:
        config = dict(IMAGENET_CONFIG if data_config is None else data_config)
        config['input_size'] = tuple(int(v) for v in config['input_size'])
        self.data_config = config
        self._eval = eval_transform(config)

    def __repr__(self) -> str:
        return f'ImageInputs({self.data_config})'

    def config(self) -> dict[str, Any]:
        return {'kind': self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageInputs:
        return cls({k: v for k, v in config.items() if k != 'kind'})

    def with_options(self, image_size: int | None = None, **options: Any) -> ImageInputs:
        super().with_options(**options)
        if image_size is None:
            return self
        return ImageInputs(
            {**self.data_config, 'input_size': (self.data_config['input_size'][0], image_size, image_size)}
        )

    @classmethod
    def accepts(cls, item: Any) -> bool:
        return item.kind == 'image'

    @classmethod
    def check_content(cls, item: Any) -> None:
        load_image(item.content, item.name)

    def load(self, content: Any, name: str) -> Image.Image:
        return content.convert('RGB') if isinstance(content, Image.Image) else load_image(content, name)

    def eval_transform(self) -> Transform:
        return self._eval

    def train_transform(self, augmentation: str = 'none') -> Transform:
        return train_transform(self.data_config, augmentation)

    def contrastive_transform(self) -> Transform:
        return simclr_transform(self.data_config)

    def preprocess(self, content: Any, name: str) -> torch.Tensor:  # -> (3, H, W)
        image = self.load(content, name)
        try:
            return self._eval(image)
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f'{name}: cannot preprocess the image ({err}); send an RGB or grayscale image') from err

    def collate(self, samples: list[torch.Tensor]) -> Batch:
        return {self.name: torch.stack(samples)}

    def as_batch(self, data: Batch | torch.Tensor) -> Batch:
        tensor = data.get(self.name) if isinstance(data, dict) and set(data) == {self.name} else data
        size = self.data_config['input_size']
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4 or tuple(tensor.shape[1:]) != size:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(data).__name__
            raise ValueError(
                f"a preprocessed batch must have shape (N, {', '.join(map(str, size))}) as the model's data_config "
                f'says, got {shape}; send images instead to have them preprocessed'
            )
        return {self.name: tensor.float()}

    def example_contents(self) -> list[np.ndarray]:
        return sample_photos()

    def calibration_contents(self) -> list[np.ndarray]:
        return calibration_photos()

    def probe_batch(self) -> Batch:
        channels, height, width = self.data_config['input_size']
        return {self.name: torch.zeros(1, channels, min(height, PROBE_PIXELS), min(width, PROBE_PIXELS))}

    def random_batch(self, rows: int) -> Batch:
        return {self.name: torch.randn(rows, *self.data_config['input_size'])}

    def preview(self, content: Any, name: str) -> Image.Image:
        return self.load(content, name)


def sample_photos() -> list[np.ndarray]:
    """Parity images: skimage's colour photos and two crops, 6 in all (they ship with scikit-image)."""
    from skimage import data

    astronaut, coffee = data.astronaut(), data.coffee()
    return [data.chelsea(), coffee, astronaut, data.rocket(), astronaut[30:330, 120:420], coffee[40:360, 260:580]]


def calibration_photos() -> list[np.ndarray]:
    """int8 calibration images, apart from the parity ones: 8 skimage images, each whole, flipped and 2 crops."""
    from skimage import data

    gray = [np.stack([img] * 3, axis=-1) for img in (data.camera(), data.coins(), data.brick())]
    photos = [
        data.hubble_deep_field(),
        data.immunohistochemistry(),
        data.retina(),
        data.colorwheel(),
        np.ascontiguousarray(data.logo()[..., :3]),
        *gray,
    ]
    out = []
    for img in photos:
        h, w = img.shape[:2]
        out += [img, np.ascontiguousarray(img[:, ::-1]), img[: h // 2, : w // 2], img[h // 2 :, w // 2 :]]
    return out
