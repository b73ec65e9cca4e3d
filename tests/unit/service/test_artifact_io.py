"""Artifact lookup for serving: a run id, an artifact folder, a zip of one, and the model a folder serves."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from executor.service.artifact_io import MAX_MEMBERS, open_artifact, pack_artifact
from executor.service.store import RunStore
from executor.tuning.artifact import served_file


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / 'runs')


def test_open_artifact_folder_zip_run_and_selection(store: RunStore, tmp_path: Path):
    folder = tmp_path / 'artifact'
    folder.mkdir()
    (folder / 'model.pt').write_bytes(b'pt')
    (folder / 'model.onnx').write_bytes(b'onnx')
    (folder / 'model-int8.onnx').write_bytes(b'int8')
    unpack = tmp_path / 'unpacked'
    assert open_artifact(folder, store, unpack, 'onnx') == folder / 'model.onnx'
    assert open_artifact(folder, store, unpack, 'torch') == folder / 'model.pt'
    assert open_artifact(folder, store, unpack, 'onnx', 'model-int8.onnx') == folder / 'model-int8.onnx'
    with pytest.raises(FileNotFoundError, match=r"select_model='model-fp16.onnx' is not in .* it holds \['model-int8"):
        open_artifact(folder, store, unpack, 'onnx', 'model-fp16.onnx')

    archive = tmp_path / 'artifact.zip'
    with zipfile.ZipFile(archive, 'w') as zf:
        for name in ('model.pt', 'model.onnx'):
            zf.write(folder / name, f'artifact/{name}')
    served = open_artifact(archive, store, unpack, 'onnx')
    assert served.name == 'model.onnx' and served.read_bytes() == b'onnx' and unpack in served.parents
    assert open_artifact(archive, store, unpack, 'onnx') == served  # unpacked once

    store.create({}, run_id='run1')
    with pytest.raises(ValueError, match='CREATED'):
        open_artifact('run1', store, unpack, 'torch')
    store.update('run1', status='FINISHED')
    (store.root / 'run1' / 'model.pt').write_bytes(b'pt')
    assert open_artifact('run1', store, unpack, 'onnx') == store.root / 'run1' / 'model.pt'
    with pytest.raises(FileNotFoundError, match='neither a run id of this workspace nor an existing path'):
        open_artifact('no-such-run', store, unpack, 'onnx')


def test_a_zip_bomb_is_refused_before_anything_is_written(store: RunStore, tmp_path: Path):
    """Issue 21: a 1 MB artifact zip unpacked to 1 GiB at start-up, and stayed there."""
    import zipfile

    archive = tmp_path / 'bomb.zip'
    with zipfile.ZipFile(archive, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr('model.pt', b'\0' * (64 * 2**20))  # 64 MiB of zeros: ~64 KB deflated
    assert archive.stat().st_size < 2**20
    unpack = tmp_path / 'unpacked'
    unpack.mkdir()
    with pytest.raises(ValueError, match=r"member 'model.pt' unpacks to 67108864 bytes from \d+ \(\d+x; .*not an"):
        open_artifact(archive, store, unpack, 'torch')
    assert list(unpack.iterdir()) == []
    with pytest.raises(
        ValueError, match=r'would unpack to 64 MiB, more than the 1 MiB allowed \(max_artifact_bytes=1048576\); serve'
    ):
        open_artifact(archive, store, unpack, 'torch', max_unpacked=2**20)  # the executor's max_artifact_bytes
    assert list(unpack.iterdir()) == []


def test_a_packed_artifact_holds_the_model_files_and_serves_from_its_zip(store: RunStore, tmp_path: Path):
    folder = tmp_path / 'run'
    (folder / 'reports').mkdir(parents=True)
    (folder / 'checkpoints').mkdir()
    files = {
        'model.pt': b'pt' * 1000,
        'model.onnx': b'onnx',
        'model-int8.onnx': b'int8',
        'preprocessing.json': b'{}',
        'config.json': b'{"a": 1}',
        'history.jsonl': b'{"epoch": 1}\n' * 50,
        'reports/curves.png': b'png',
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    left_out = {'checkpoints/last.pt': b'ckpt', 'train.log': b'log', 'status.json': b'{}', 'reports/.x.tmp': b''}
    for name, data in left_out.items():
        (folder / name).write_bytes(data)
    packed = pack_artifact(folder, "run 'r'")
    assert packed == pack_artifact(folder, "run 'r'")  # the same bytes for the same files
    archive = tmp_path / 'r.zip'
    archive.write_bytes(packed)
    with zipfile.ZipFile(archive) as zf:
        assert {i.filename: zf.read(i) for i in zf.infolist()} == files
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
    assert kinds['model.pt'] == zipfile.ZIP_STORED and kinds['history.jsonl'] == zipfile.ZIP_DEFLATED
    served = open_artifact(archive, store, tmp_path / 'unpacked', 'onnx')
    assert served.name == 'model.onnx' and served.parent.parent == tmp_path / 'unpacked'
    assert open_artifact(archive, store, tmp_path / 'unpacked', 'torch').read_bytes() == files['model.pt']

    with pytest.raises(ValueError, match=r"the artifact of run 'r' holds .* more than the 0 MiB /runs/artifact sends"):
        pack_artifact(folder, "run 'r'", limit=1000)
    with pytest.raises(FileNotFoundError, match=r"run 'e' has no model file"):
        pack_artifact(tmp_path / 'reports-only', "run 'e'")


def test_a_two_tower_artifact_packs_each_towers_export_and_serves_it_from_the_zip(store: RunStore, tmp_path: Path):
    """A two-tower run's clip-vision/ and clip-text/ exports were left out of /runs/artifact's zip, so a served copy
    fell back to torch."""
    folder = tmp_path / 'two-tower'
    files = {'model.pt': b'pt', 'preprocessing.json': b'{}'}
    for tower in ('clip-text', 'clip-vision'):
        files |= {f'{tower}/model.onnx': tower.encode(), f'{tower}/preprocessing.json': b'{}'}
    files['clip-text/model.onnx.data'] = b'weights'
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / 'tensorboard').mkdir()
    (folder / 'tensorboard' / 'events').write_bytes(b'tb')  # not the artifact's
    archive = tmp_path / 'tt.zip'
    archive.write_bytes(pack_artifact(folder, "run 'tt'"))
    with zipfile.ZipFile(archive) as zf:
        assert {i.filename: zf.read(i) for i in zf.infolist()} == files
    served = open_artifact(archive, store, tmp_path / 'unpacked', 'onnx')
    assert served_file(served.parent, 'onnx', tower='clip-text').read_bytes() == b'clip-text'


def test_the_ratio_is_checked_whatever_the_member_size_and_a_failed_unpack_leaves_nothing(
    store: RunStore, tmp_path: Path
):
    """Issue 32: 400 members of 1 MiB of zeros (413 KB zipped) unpacked to 400 MiB, under the 1 MiB the ratio was
    checked from; a failed unpack left artifacts/.<name>-<hash>.<pid>.tmp/ behind."""
    unpack = tmp_path / 'unpacked'
    unpack.mkdir()
    small = tmp_path / 'small.zip'
    with zipfile.ZipFile(small, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(40):
            zf.writestr(f'part-{i}.bin', b'\0' * 2**16)  # 64 KiB each: ~100 bytes deflated
    with pytest.raises(ValueError, match=r"member 'part-0.bin' unpacks to 65536 bytes from \d+ \(\d+x"):
        open_artifact(small, store, unpack, 'torch')
    many = tmp_path / 'many.zip'
    with zipfile.ZipFile(many, 'w') as zf:
        for i in range(MAX_MEMBERS + 1):
            zf.writestr(f'{i}', b'')
    with pytest.raises(ValueError, match=rf'holds {MAX_MEMBERS + 1} files, more than the {MAX_MEMBERS}'):
        open_artifact(many, store, unpack, 'torch')
    broken = tmp_path / 'broken.zip'
    with zipfile.ZipFile(broken, 'w') as zf:
        zf.writestr('model.pt', b'weights' * 100)
        zf.writestr('config.json', b'{}')
    data = broken.read_bytes()
    broken.write_bytes(data.replace(b'weights' * 100, b'WEIGHTS' * 100, 1))  # the member's CRC no longer matches
    with pytest.raises(zipfile.BadZipFile):
        open_artifact(broken, store, unpack, 'torch')
    assert list(unpack.iterdir()) == []  # no temporary folder left
