"""Data sources, decoding errors, transforms and the class-balanced sampler."""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from executor.tuning.data import (
    BatchSampler,
    DataError,
    ItemDataset,
    adjust_items_per_class,
    check_under_roots,
    load_items,
)
from executor.tuning.data.digits import write_digits_folder
from executor.tuning.inputs import ImageInputs
from executor.tuning.inputs.image import eval_transform, load_image, train_transform

CONFIG = {
    'input_size': (3, 32, 32),
    'mean': (0.5,) * 3,
    'std': (0.5,) * 3,
    'interpolation': 'bilinear',
    'crop_pct': 1.0,
}


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


def test_a_nul_byte_in_a_uri_and_a_tensor_of_strings_are_named(tmp_path):
    """Issue 21: both failed with errors that named no document."""
    with pytest.raises(DataError, match=r"document 'a\\x00b.png': the path holds a NUL byte"):
        load_items([{'id': 'n', 'uri': 'a\x00b.png'}], roots=[tmp_path])
    (item,) = load_items([{'id': 's', 'tensor': np.array([['a', 'b'], ['c', 'd']])}])
    with pytest.raises(DataError, match=r"document 's': tensor holds <U1 values, not numbers"):
        load_image(item.content, item.name)


def test_an_image_of_too_many_pixels_is_refused_from_its_header(tmp_path):
    """Issue 21: a 17 KB PNG of 12000 x 12000 took 2 s and 700 MB to decode, and a larger one's error named no one."""
    from executor.tuning.inputs import image as images

    big = tmp_path / 'big.png'
    Image.new('L', (2000, 1500)).save(big)  # 3 Mpx, a few KB
    saved = images.MAX_PIXELS, Image.MAX_IMAGE_PIXELS
    try:
        images.limit_pixels(1_000_000)
        with pytest.raises(
            DataError, match=r"document 'big.png': the image is 2000 x 1500 = 3 Mpx, more than the 1 Mpx"
        ):
            load_image(big, "document 'big.png'")
        Image.MAX_IMAGE_PIXELS = 1_000  # PIL's own bomb check (it trips at open, at twice its limit) names it too
        with pytest.raises(DataError, match=r"document 'big.png': the image is too large to decode \(Image size"):
            load_image(big.read_bytes(), "document 'big.png'")
    finally:
        images.MAX_PIXELS, Image.MAX_IMAGE_PIXELS = saved
    assert load_image(big).size == (2000, 1500)


def test_a_folder_data_set_is_checked_file_by_file_against_the_data_roots(tmp_path):
    """Issue 21: a class folder linked to a folder outside the data roots trained on its images, and an image linked
    to /etc/passwd was opened."""
    root, outside = tmp_path / 'root', tmp_path / 'outside'
    folder = write_digits_folder(root / 'imgs', per_class=2, size=8)
    write_digits_folder(outside, per_class=2, size=8)
    (folder / 'linked').symlink_to(outside / '3', target_is_directory=True)
    with pytest.raises(DataError, match=r'imgs/linked/\d+\.png: .* resolves to .*outside.*, outside the data roots'):
        load_items(str(folder), roots=[root])
    (folder / 'linked').unlink()
    (folder / '3' / 'passwd.png').symlink_to('/etc/passwd')
    with pytest.raises(DataError, match=r"imgs/3/passwd\.png: .* resolves to '/etc/passwd', outside the data roots"):
        load_items(str(folder), roots=[root])
    (folder / '3' / 'passwd.png').unlink()
    (folder / '3' / 'inside.png').symlink_to(folder / '4' / sorted(os.listdir(folder / '4'))[0])  # inside: fine
    items = load_items(str(folder), roots=[root])
    assert len(items) == 21 and all(Path(it.uri).resolve().is_relative_to(root.resolve()) for it in items)


def test_folder_and_csv_sources(tmp_path):
    root = write_digits_folder(tmp_path / 'digits', per_class=3)
    items = load_items(root)
    assert len(items) == 30 and Counter(it.label for it in items)['7'] == 3
    csv = tmp_path / 'train.csv'
    csv.write_text('uri,label\n' + '\n'.join(f'digits/{it.label}/{it.uri.split("/")[-1]},{it.label}' for it in items))
    from_csv = load_items(csv)
    assert [it.uri for it in from_csv] == [it.uri for it in items]
    text = tmp_path / 'text.csv'
    text.write_text('text,label\nhello,a\nworld,b\n')
    assert [it.text for it in load_items(text)] == ['hello', 'world']


def test_csv_errors_name_the_line(tmp_path):
    bad = tmp_path / 'bad.csv'
    bad.write_text('uri,label\n,cat\n')
    with pytest.raises(DataError, match='bad.csv line 2: empty uri'):
        load_items(bad)
    header = tmp_path / 'header.csv'
    header.write_text('path,label\nx.jpg,a\n')
    with pytest.raises(DataError, match='the header must name the columns of one of uri,label | text,label'):
        load_items(header)


def test_paths_outside_the_data_roots_are_refused(tmp_path):
    inside, outside = tmp_path / 'data', tmp_path / 'secret'
    inside.mkdir(), outside.mkdir()
    (outside / 'x.png').write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    (inside / 'link.png').symlink_to(outside / 'x.png')
    with pytest.raises(DataError, match='outside the data roots'):
        check_under_roots(inside / 'link.png', [inside], 'document 1')
    with pytest.raises(DataError, match='outside the data roots'):
        load_items([{'id': 'd1', 'uri': str(inside / '..' / 'secret' / 'x.png')}], roots=[inside])
    assert check_under_roots(inside / 'link.png', None, 'x') == (outside / 'x.png').resolve()


def test_records_need_content():
    with pytest.raises(DataError, match="document 'd2': has no content"):
        load_items([{'id': 'd1', 'text': 'ok'}, {'id': 'd2'}])
    with pytest.raises(DataError, match="document 'd3': text is empty"):
        load_items([{'id': 'd3', 'text': '  '}])


def test_decoding_errors_name_the_item(tmp_path):
    good = png_bytes(skdata.chelsea())
    with pytest.raises(DataError, match="item 'x': cannot decode"):
        load_image(b'not an image', name="item 'x'")
    with pytest.raises(DataError, match='cannot decode'):
        load_image(good[: len(good) // 2], name='truncated')
    with pytest.raises(DataError, match='blob is empty'):
        load_image(b'', name='empty')
    with pytest.raises(DataError, match='does not exist'):
        load_image(tmp_path / 'missing.jpg', name='missing')
    with pytest.raises(DataError, match='not an image'):
        load_image(np.zeros((2, 3, 4, 5)), name='4d')
    with pytest.raises(DataError, match='NaN'):
        load_image(np.full((4, 4), np.nan), name='nan')


def test_grayscale_and_exif_orientation(tmp_path):
    gray = load_image(np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert gray.mode == 'RGB' and gray.size == (8, 8)
    image = Image.fromarray(np.zeros((10, 20, 3), np.uint8))  # 20 wide, 10 high
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": width and height swap once applied
    path = tmp_path / 'rotated.jpg'
    image.save(path, exif=exif)
    assert load_image(path).size == (10, 20)


def test_transforms_give_normalised_tensors():
    image = Image.fromarray(skdata.astronaut())
    x = eval_transform(CONFIG)(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert train_transform(CONFIG)(image).shape == (3, 32, 32)


def test_dataset_refuses_text_for_image_models():
    items = load_items([{'id': 't', 'text': 'a caption', 'label': 'a'}])
    with pytest.raises(DataError, match='text'):
        ItemDataset(items, ImageInputs(CONFIG), eval_transform(CONFIG))


def test_class_balanced_batches():
    labels = [i % 10 for i in range(200)]
    sampler = BatchSampler(labels, batch_size=32, num_items_per_class=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == 32 and len(counts) == 8 and set(counts.values()) == {4}
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_items_per_class_is_adjusted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        # divisors of 30 nearest 4 are 3 and 5; the larger wins (more positives per class)
        assert adjust_items_per_class(batch_size=30, num_items_per_class=4, num_classes=10) == 5
    assert 'num_items_per_class=4 does not fit' in caplog.text
    assert adjust_items_per_class(batch_size=64, num_items_per_class=4, num_classes=5) == 16
    sampler = BatchSampler([i % 3 for i in range(60)], batch_size=20, num_items_per_class=4)
    assert all(len(set(Counter(b).values())) == 1 for b in [[i % 3 for i in batch] for batch in sampler])


def test_ranks_share_one_global_batch():
    labels = [i % 8 for i in range(128)]
    whole = BatchSampler(labels, batch_size=32, num_items_per_class=4, seed=3)
    ranks = [BatchSampler(labels, batch_size=16, num_items_per_class=4, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for full, first, second in zip(whole, *ranks):
        assert full == first + second
        assert set(Counter(labels[i] for i in first).values()) == {4}


@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
def test_eval_transform_matches_torchvision_resize_crop_normalize(interpolation):
    """The fused eval transform (one boxed PIL resize, one multiply-subtract) gives torchvision's Resize + CenterCrop
    + ToDtype + Normalize to within Pillow's rounding, on real photos of both orientations and on a tiny image."""
    import math

    from torchvision.transforms import v2

    from executor.tuning.inputs import sample_photos
    from executor.tuning.inputs.image import INTERPOLATION

    config = {
        'input_size': (3, 224, 224),
        'interpolation': interpolation,
        'mean': (0.485, 0.456, 0.406),
        'std': (0.229, 0.224, 0.225),
        'crop_pct': 0.875,
    }
    mode = INTERPOLATION[interpolation]
    reference = v2.Compose(
        [
            v2.Resize(int(math.floor(224 / 0.875)), interpolation=mode, antialias=True),
            v2.CenterCrop(224),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(config['mean']), list(config['std'])),
        ]
    )
    fused = eval_transform(config)
    grey_level = 1 / (255 * 0.224)  # one grey level in normalised units (mid std)
    for photo in sample_photos():
        for image in (
            Image.fromarray(photo),
            Image.fromarray(photo).transpose(Image.ROTATE_90),
            Image.fromarray(photo).resize((100, 30)),
        ):
            expected, got = reference(image), fused(image)
            assert got.shape == expected.shape == (3, 224, 224) and got.dtype == torch.float32
            diff = (got - expected).abs()
            assert diff.mean() < 0.02, (image.size, diff.mean())  # under a tenth of a grey level on average
            assert diff.max() < 8 * grey_level, (image.size, diff.max())
    assert torch.nn.functional.cosine_similarity(fused(image).flatten(), reference(image).flatten(), dim=0) > 0.9999
