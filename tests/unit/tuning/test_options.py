"""A constructor's options as JSON carries them, checked against its signature (``options.check_options``), and a
loss's weights bounded before they are allocated (``losses.check_weights``)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses

from executor.tuning.losses import MAX_LOSS_WEIGHTS, build_loss
from executor.tuning.optim import build_optimizer
from executor.tuning.options import check_options


@pytest.mark.parametrize(
    ('options', 'expected'),
    [
        ({'distance': 'os.system'}, r"option 'distance' takes a Python object .*not a string; got 'os.system'"),
        ({'distance': {'a': 1}}, r"option 'distance' takes a Python object .*not a JSON object"),
        ({'margin': 'nan'}, r"option 'margin' takes a value like its default 0.05, not a string; got 'nan'"),
        ({'margin': float('nan')}, r"option 'margin' takes a finite number; got nan"),
        ({'margin': True}, r"option 'margin' takes a value like its default 0.05, not a boolean"),
        ({'swap': 1}, r"option 'swap' takes true or false; got 1"),
        ({'margin': [1, 2]}, r"option 'margin' takes a value like its default 0.05, not this list"),
        ({'marginz': 1}, r"TripletMarginLoss has no option \['marginz'\]; it takes \["),
    ],
)
def test_options_that_do_not_fit_the_signature_are_refused_naming_them(options: dict, expected: str):
    with pytest.raises(ValueError, match=expected):
        check_options('loss', losses.TripletMarginLoss, options)


def test_whole_floats_become_ints_where_the_constructor_takes_an_int():
    checked = check_options('loss', losses.ArcFaceLoss, {'num_classes': 10.0, 'embedding_size': 8.0, 'scale': 32.0})
    assert checked == {'num_classes': 10, 'embedding_size': 8, 'scale': 32}
    assert all(type(v) is int for v in checked.values())
    assert type(check_options('loss', losses.ArcFaceLoss, {'margin': 30.0})['margin']) is float  # a float default
    assert check_options('loss', losses.TripletMarginLoss, {'triplets_per_anchor': 5.0}) == {'triplets_per_anchor': 5}
    built = build_loss('ArcFaceLoss', {'num_classes': 3.0, 'embedding_size': 4.0})  # as JSON brings them
    assert built.module.W.shape == (4, 3)


def test_optimizer_options_are_checked_too():
    params = [torch.nn.Parameter(torch.zeros(1))]
    assert build_optimizer('Adam', params, 1e-3, {'betas': [0.8, 0.9]}, 'optimizer').defaults['betas'] == (0.8, 0.9)
    with pytest.raises(ValueError, match=r"optimizer Adam option 'amsgrad' takes true or false; got 1.0"):
        build_optimizer('Adam', params, 1e-3, {'amsgrad': 1.0}, 'optimizer')
    with pytest.raises(ValueError, match=r"optimizer Adam option 'weight_decay' .*not a boolean"):
        build_optimizer('Adam', params, 1e-3, {'weight_decay': True}, 'optimizer')


def test_a_loss_whose_weights_pass_the_bound_is_refused_before_they_are_made():
    with pytest.raises(ValueError, match=r'ArcFaceLoss would hold 6553600000 weights \(num_classes=100000 x emb'):
        build_loss('ArcFaceLoss', num_classes=100_000, embedding_size=65536)  # 26 GB as float32
    with pytest.raises(ValueError, match=r'SoftTripleLoss would hold .*centers_per_class=10\)'):
        build_loss('SoftTripleLoss', num_classes=MAX_LOSS_WEIGHTS // 80, embedding_size=9)
    assert build_loss('ArcFaceLoss', num_classes=100, embedding_size=64).has_parameters
