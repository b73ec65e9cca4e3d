"""The file a runtime serves from an artifact: one choice, for a folder, a model file, a named file and a tower."""

from __future__ import annotations

from pathlib import Path

import pytest

from executor.tuning.artifact import served_file, tower_onnx_file


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'x')
    return path


def test_a_folder_serves_its_onnx_export_on_onnx_else_its_model_pt(tmp_path: Path):
    weights = touch(tmp_path / 'model.pt')
    assert served_file(tmp_path, 'onnx') == weights  # not exported
    onnx = touch(tmp_path / 'model.onnx')
    assert served_file(tmp_path, 'onnx') == onnx
    assert served_file(tmp_path, 'torch') == weights
    weights.unlink()
    assert served_file(tmp_path, 'torch') == onnx  # an exported folder without its weights
    onnx.unlink()
    with pytest.raises(FileNotFoundError, match='holds neither model.pt nor model.onnx: it is not a model artifact'):
        served_file(tmp_path, 'onnx')


def test_select_model_names_a_file_of_the_folder(tmp_path: Path):
    touch(tmp_path / 'model.pt')
    int8 = touch(tmp_path / 'model-int8.onnx')
    assert served_file(tmp_path, 'torch', 'model-int8.onnx') == int8
    with pytest.raises(FileNotFoundError, match=r"select_model='model-fp16.onnx' is not in .* it holds \['model-int8"):
        served_file(tmp_path, 'onnx', 'model-fp16.onnx')


def test_a_model_file_is_served_as_it_is_and_a_tower_from_its_export_on_onnx(tmp_path: Path):
    weights = touch(tmp_path / 'model.pt')
    assert served_file(weights, 'onnx') == weights
    assert served_file(weights, 'onnx', tower='clip-text') == weights  # no export: the tower comes from the model
    text = touch(tower_onnx_file(tmp_path, 'clip-text'))
    assert text == tmp_path / 'clip-text' / 'model.onnx'
    assert served_file(weights, 'onnx', tower='clip-text') == text
    assert served_file(tmp_path, 'onnx', tower='clip-text') == text
    assert served_file(weights, 'torch', tower='clip-text') == weights
    assert served_file(weights, 'onnx', tower='clip-vision') == weights
