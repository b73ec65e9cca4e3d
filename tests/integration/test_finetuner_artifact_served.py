"""A Finetuner artifact zip served by a real Deployment (``uses_with={'artifact': <the zip>}``), as the Hub
executor served it: a text model (finetuner-stubs' ``TextTransformerBuilder`` layout: a Hugging Face model inside
Finetuner's pooling wrapper) whose embeddings over gRPC are those of its weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from docarray import DocList
from jina import Deployment

from executor.client import FinetunerClient
from executor.docs import FinetunerDoc
from executor.tuning.inference import TorchEncoder
from executor.tuning.models import build_model
from tests.finetuner_layout import text_metadata, write_finetuner_zip

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR = 'sentence-transformers/all-MiniLM-L6-v2'
SENTENCES = ['A man is playing a guitar.', 'Two dogs are running on the beach.']


@pytest.mark.slow  # about 80 s here: the Deployment rebuilds the artifact, the test builds the model twice
def test_a_finetuner_text_artifact_zip_is_served(tmp_path: Path, free_port: Callable[[], int], model_cache: str):
    reference = build_model(DESCRIPTOR).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # "fine-tuned" weights: the pre-trained ones moved, so serving them is no accident
        for tensor in reference.backbone.module.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.01)
    state = {f'model.{k}': v for k, v in reference.backbone.module.state_dict().items()}  # the wrapper's prefix
    state['model.pooler.dense.weight'] = torch.zeros(384, 384)  # AutoModel's pooler, unused by sentence embeddings
    archive = write_finetuner_zip(tmp_path / 'quora.zip', 'quora', {'model': (text_metadata(DESCRIPTOR, 384), state)})
    port = free_port()
    with Deployment(
        uses=str(ROOT / 'config.yml'),
        workspace=str(tmp_path / 'ws'),
        host='127.0.0.1',
        port=port,
        uses_with={'artifact': str(archive), 'runtime': 'torch', 'model_cache': model_cache},
    ):
        docs = FinetunerClient(f'grpc://127.0.0.1:{port}').encode(
            DocList[FinetunerDoc]([FinetunerDoc(text=s) for s in SENTENCES])
        )
    served = np.stack([d.embedding for d in docs])
    expected = TorchEncoder(reference, device='cpu').encode(SENTENCES)
    print('cosine to the weights served:', (served * expected).sum(axis=1))
    assert served.shape == (2, 384) and np.allclose(served, expected, atol=1e-5)
    pretrained = TorchEncoder(build_model(DESCRIPTOR).eval(), device='cpu').encode(SENTENCES)
    assert not np.allclose(served, pretrained, atol=1e-3)
