"""The "did you mean" hint of an unknown name, in its two forms, and none when nothing is close."""

from __future__ import annotations

from executor.tuning.errors import close_names, did_you_mean


def test_the_hint_names_the_closest_choices_or_nothing():
    choices = ['tensorboard', 'wandb', 'mlflow']
    assert did_you_mean('tensorbord', choices) == " (did you mean 'tensorboard'?)"
    assert did_you_mean('xyz', choices) == ''
    losses = ['TripletMarginLoss', 'TripletLoss', 'ContrastiveLoss']
    assert did_you_mean('TripletMargin', losses, n=3, cutoff=0.5, form='clause') == (
        "; did you mean 'TripletMarginLoss', 'TripletLoss'?"
    )
    assert did_you_mean('nothing like it', losses, form='clause') == ''
    assert close_names(3, ['3', '4']) == ['3']  # names that are not strings are compared as text
