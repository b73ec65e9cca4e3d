"""The input seam: an ``Inputs`` object per modality travels with the model and says how to feed it.

``model.inputs`` loads an item, transforms it for training or evaluation, collates samples into a batch
(``dict[str, Tensor]``), gives example batches for export, and names the ONNX inputs; the dataset, trainer, encoders,
exporter and service go through it and never test for a modality themselves. A new modality is one new file here
that defines an ``Inputs`` subclass decorated with ``@register_inputs``, and one line below.
"""

from executor.tuning.inputs.base import (
    DOCUMENT,
    QUERY,
    Batch,
    Inputs,
    inputs_class,
    inputs_from_config,
    register_inputs,
)
from executor.tuning.inputs.image import ImageInputs, calibration_photos, sample_photos
from executor.tuning.inputs.text import TextInputs
from executor.tuning.inputs.two_tower import Captioned, Text, TwoTowerInputs

__all__ = [
    'DOCUMENT',
    'QUERY',
    'Batch',
    'Captioned',
    'ImageInputs',
    'Inputs',
    'Text',
    'TextInputs',
    'TwoTowerInputs',
    'calibration_photos',
    'inputs_class',
    'inputs_from_config',
    'register_inputs',
    'sample_photos',
]
