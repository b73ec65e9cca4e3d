"""The encoder cache: least recently used dropped first, one build per key however many ask at once."""

from __future__ import annotations

import threading

import pytest

from executor.service.encoder_cache import EncoderCache, file_encoder


def test_encoder_cache_is_lru_and_builds_once():
    cache = EncoderCache(size=2)
    builds = []

    def build(name):
        def make():
            builds.append(name)
            return f'encoder {name}'

        return make

    assert cache.get(('a',), build('a')) == 'encoder a'
    cache.get(('b',), build('b'))
    cache.get(('a',), build('a'))  # a is now the most recent
    cache.get(('c',), build('c'))  # evicts b
    assert cache.keys() == [('a',), ('c',)] and builds == ['a', 'b', 'c']
    cache.drop(lambda key: key == ('a',))
    assert cache.keys() == [('c',)]
    with pytest.raises(ValueError, match='at least 1'):
        EncoderCache(size=0)

    slow = threading.Event()
    counted = []

    def build_slow():
        counted.append(1)
        slow.wait(5)
        return 'slow'

    threads = [threading.Thread(target=cache.get, args=(('s',), build_slow)) for _ in range(4)]
    for t in threads:
        t.start()
    slow.set()
    for t in threads:
        t.join()
    assert counted == [1]


def test_a_tower_served_alone_comes_from_its_own_export_on_onnx_else_from_the_model(tmp_path, monkeypatch):
    from executor.tuning import inference
    from executor.tuning.two_tower_encoder import TwoTowerEncoder

    class Tower:
        embed_dim, runtime, device = 8, 'onnx', 'cpu'

    built = []

    def create_encoder(path, runtime, device):  # records the file each encoder is built from, and its runtime
        built.append((path.relative_to(tmp_path).as_posix(), runtime))
        if path.suffix == '.onnx' or path.parent.name == 'one':
            return Tower()
        return TwoTowerEncoder({'clip-vision': Tower(), 'clip-text': Tower()}, inputs=None)

    monkeypatch.setattr(inference, 'create_encoder', create_encoder)
    for name in ('one/model.pt', 'two/model.pt', 'two/clip-vision/model.onnx', 'two/clip-text/model.onnx'):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b'x')
    two = tmp_path / 'two' / 'model.pt'

    assert isinstance(file_encoder(two, 'onnx', 'cpu', 'clip-text'), Tower)
    assert isinstance(file_encoder(two, 'torch', 'cpu', 'clip-text'), Tower)
    assert isinstance(file_encoder(two, 'onnx', 'cpu'), TwoTowerEncoder)
    (tmp_path / 'two' / 'clip-vision' / 'model.onnx').unlink()
    file_encoder(two, 'onnx', 'cpu')  # one tower exported only: both from the model, on torch
    assert built == [
        ('two/clip-text/model.onnx', 'onnx'),
        ('two/model.pt', 'torch'),
        ('two/model.pt', 'onnx'),
        ('two/model.pt', 'torch'),
    ]
    with pytest.raises(ValueError, match="select_model='clip-text' names a tower of a two-tower model"):
        file_encoder(tmp_path / 'one' / 'model.pt', 'onnx', 'cpu', 'clip-text')
