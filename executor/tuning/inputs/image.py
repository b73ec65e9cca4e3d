"""Image inputs: decoding, the model's resize/crop/normalise preprocessing (timm's ``data_config``), augmentation."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from executor.tuning.data.images import DataError, load_image
from executor.tuning.data.transforms import eval_transform, simclr_transform, train_transform
from executor.tuning.inputs.base import Batch, Inputs, Transform, register_inputs

IMAGENET_CONFIG = {
    'input_size': (3, 224, 224),
    'interpolation': 'bilinear',
    'mean': (0.485, 0.456, 0.406),
    'std': (0.229, 0.224, 0.225),
    'crop_pct': 0.875,
}
PROBE_PIXELS = 224  # the largest side the output-size probe runs at: enough for any backbone's downsampling


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
