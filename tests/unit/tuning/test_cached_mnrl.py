"""CachedMultipleNegativesRankingLoss (GradCache) on the real all-MiniLM-L6-v2: the parameters' gradients equal the
uncached loss's to 1e-5 (dropout on, mini-batches not dividing the batch, symmetric, 3 and 7 columns, Matryoshka, CPU
autocast), through the pairs task and a whole run on 7-column n-tuples; bad options refused before a run exists."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from executor.tuning import TrainConfig, Trainer
from executor.tuning.data.sources import Item, from_csv
from executor.tuning.errors import DataError
from executor.tuning.matryoshka import MatryoshkaLoss
from executor.tuning.models import build_model
from executor.tuning.pair_losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
    build_pair_loss,
    cached_loss,
    check_pair_data,
    mini_batch_size,
)
from executor.tuning.plan import plan_run

# anchor, positive, then five negatives each: the n-tuple rows hard-negative mining writes (num_negatives=5)
ROWS = [
    ('A man is playing a guitar.', 'Someone plays the guitar on stage.', 'A woman slices an onion.',
     'The cat sleeps on the sofa.', 'Two dogs run across a field.', 'A child reads a book.',
     'The train leaves the station.'),
    ('A woman is slicing an onion.', 'An onion is being cut by a woman.', 'A man plays the piano.',
     'Birds fly over the lake.', 'The market opens at nine.', 'A boy kicks a ball.', 'Rain falls on the roof.'),
    ('Two dogs are running in the snow.', 'Dogs race through the snowy park.', 'A chef cooks pasta.',
     'The bus is late again.', 'A girl paints a picture.', 'The river floods the valley.', 'A man fixes a bike.'),
    ('A child is reading a book.', 'A kid reads a story at the library.', 'A horse jumps a fence.',
     'The phone rings twice.', 'Waves crash on the beach.', 'A man shaves his beard.', 'The lamp is switched off.'),
    ('The train leaves the station.', 'A train departs from the platform.', 'A woman sings on stage.',
     'Leaves fall in autumn.', 'A baby laughs at a toy.', 'The shop closes early.', 'Someone peels a potato.'),
    ('A man is riding a horse.', 'A rider gallops across the field.', 'A cat drinks milk.',
     'The plane lands at night.', 'Children build a sandcastle.', 'A woman types a letter.', 'The kettle boils.'),
    ('Someone is cooking pasta.', 'A cook boils spaghetti in a pot.', 'A man climbs a mountain.',
     'The clock strikes noon.', 'A dog chases its tail.', 'Snow covers the roofs.', 'A girl rides a scooter.'),
]  # fmt: skip
SIZE = 7  # rows per batch: no mini-batch size below divides 7, 14, 21 or 49 rows


@pytest.fixture(scope='module')
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model('all-MiniLM-L6-v2').train()  # train mode: dropout on


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[n] - b[n]).abs().max().item() for n in a)


def batch(model: nn.Module, columns: int) -> dict[str, torch.Tensor]:
    """Every first column, then every second... as the pairs task's collate orders them."""
    return model.inputs.batch([row[c] for c in range(columns) for row in ROWS[:SIZE]])


def plain_grads(model, loss, rows, columns, mini, seed, autocast=False) -> dict[str, torch.Tensor]:
    """The uncached loss, back-propagated through the embeddings of the same mini-batches (each forward consumes the
    RNG as the cached one's first pass, so dropout draws the same masks)."""
    torch.manual_seed(seed)
    parts = []
    for chunk in model.inputs.split(rows, mini):
        # an autocast block per mini-batch, as each replayed one has: autocast caches its bfloat16 copy of a weight
        # within a block, and a weight's gradient summed in bfloat16 over mini-batches differs at bfloat16's 0.4 %
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            parts.append(model(chunk).float())
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        value = loss(list(torch.cat(parts).chunk(columns)))
    value.backward()
    return grads(model)


def cached_grads(model, loss, rows, columns, mini, seed, autocast=False) -> tuple[dict[str, torch.Tensor], float]:
    torch.manual_seed(seed)
    chunks = list(model.inputs.split(rows, mini))
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        value = cached_loss(loss, lambda chunk: model(chunk).float(), chunks, columns)
    (value * 4.0).backward()  # what a GradScaler (a power of 2) passes down reaches the parameters
    return {n: g / 4.0 for n, g in grads(model).items()}, value.item()


@pytest.mark.parametrize(
    ('columns', 'symmetric', 'mini'),
    [(2, False, 3), (3, True, 4), (7, False, 5)],
    ids=['pairs-mini3', 'triplets-symmetric-mini4', '7-columns-mini5'],
)
def test_cached_gradients_equal_the_uncached_loss_with_dropout(model, columns, symmetric, mini):
    rows = batch(model, columns)
    cached = CachedMultipleNegativesRankingLoss(symmetric=symmetric, mini_batch_size=mini)
    plain = MultipleNegativesRankingLoss(symmetric=symmetric)
    expected = plain_grads(model, plain, rows, columns, mini, seed=1)
    got, _ = cached_grads(model, cached, rows, columns, mini, seed=1)
    assert max(g.abs().max().item() for g in expected.values()) > 1e-2  # real gradients, not zeros
    assert max_diff(got, expected) < 1e-5
    # dropout is on: another draw of masks moves the gradients by far more than the tolerance, so the equality
    # above needs the cached loss to replay each mini-batch's RNG state
    assert max_diff(plain_grads(model, plain, rows, columns, mini, seed=2), expected) > 1e-4


def test_cached_equals_one_pass_over_the_whole_batch_without_dropout(model):
    """The plain loss with the whole batch embedded at once (what the pairs task does without caching)."""
    model.eval()
    try:
        rows = batch(model, 3)
        MultipleNegativesRankingLoss()(list(model(rows).chunk(3))).backward()
        expected = grads(model)
        got, value = cached_grads(model, CachedMultipleNegativesRankingLoss(mini_batch_size=2), rows, 3, 2, seed=0)
        with torch.no_grad():
            assert value == pytest.approx(MultipleNegativesRankingLoss()(list(model(rows).chunk(3))).item(), abs=1e-5)
    finally:
        model.train()
    assert max_diff(got, expected) < 1e-5


def test_cached_under_matryoshka_equals_matryoshka_over_the_plain_loss(model):
    rows = batch(model, 3)
    cached = MatryoshkaLoss(CachedMultipleNegativesRankingLoss(mini_batch_size=4), [384, 64])
    assert mini_batch_size(cached) == 4 and mini_batch_size(MatryoshkaLoss(MultipleNegativesRankingLoss(), [8])) is None
    expected = plain_grads(model, MatryoshkaLoss(MultipleNegativesRankingLoss(), [384, 64]), rows, 3, 4, seed=3)
    got, _ = cached_grads(model, cached, rows, 3, 4, seed=3)
    assert max_diff(got, expected) < 1e-5


def test_cached_replays_the_autocast_of_its_first_pass(model):
    """Under CPU autocast (bfloat16) the replay embeds in bfloat16 again, though backward runs outside the block."""
    rows = batch(model, 2)
    cached = CachedMultipleNegativesRankingLoss(mini_batch_size=3)
    expected = plain_grads(model, MultipleNegativesRankingLoss(), rows, 2, 3, seed=4, autocast=True)
    got, _ = cached_grads(model, cached, rows, 2, 3, seed=4, autocast=True)
    full_precision = plain_grads(model, MultipleNegativesRankingLoss(), rows, 2, 3, seed=4)
    scale = max(g.abs().max().item() for g in expected.values())
    assert max_diff(got, expected) < 1e-5 * max(1.0, scale)
    assert max_diff(full_precision, expected) > 1e-4  # bfloat16 differs: the replay must not run in float32


def test_without_gradient_mode_it_is_the_loss_on_the_embeddings(model):
    model.eval()
    try:
        rows = batch(model, 2)
        with torch.no_grad():
            value = cached_loss(CachedMultipleNegativesRankingLoss(), model, list(model.inputs.split(rows, 3)), 2)
            expected = MultipleNegativesRankingLoss()(list(model(rows).chunk(2)))
    finally:
        model.train()
    assert not value.requires_grad and value.item() == pytest.approx(expected.item(), abs=1e-5)


def items(columns: int) -> list[Item]:
    return [Item(id=str(i), name=f'row {i}', columns=row[:columns]) for i, row in enumerate(ROWS)]


def run_config(tmp_path, loss: str, columns: int, **options) -> TrainConfig:
    return TrainConfig(
        model='all-MiniLM-L6-v2',
        train_data=items(columns),
        loss=loss,
        batch_size=SIZE,
        epochs=1,
        output_dir=tmp_path / loss,
        tensorboard=False,
        loggers=[],
        device='cpu',
        **options,
    )


def test_the_pairs_task_gives_the_cached_loss_the_gradients_of_the_plain_one(tmp_path):
    """Through the trainer's own compute_loss (the pairs task cutting its batch into mini-batches), dropout off."""
    found = {}
    for loss, options in [
        ('MultipleNegativesRankingLoss', {}),
        ('CachedMultipleNegativesRankingLoss', {'mini_batch_size': 4}),
    ]:
        trainer = Trainer(run_config(tmp_path, loss, 7, loss_options=options))
        for module in trainer.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        rows, labels = next(iter(trainer.loader))
        assert trainer.task.views == 7 and trainer.model.inputs.rows(rows) == 7 * SIZE
        trainer.compute_loss(trainer.to_device(rows), labels).backward()
        found[loss] = grads(trainer.model)
    assert max_diff(found['CachedMultipleNegativesRankingLoss'], found['MultipleNegativesRankingLoss']) < 1e-5


@pytest.mark.parametrize('loss', ['MultipleNegativesRankingLoss', 'CachedMultipleNegativesRankingLoss'])
def test_a_run_on_7_column_n_tuples_trains(tmp_path, loss):
    options = {'mini_batch_size': 8} if loss.startswith('Cached') else {}
    trainer = Trainer(run_config(tmp_path, loss, 7, loss_options=options))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.fit()
    assert result.history[0]['train_loss'] > 0
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in result.model.named_parameters())
    assert moved > 1e-6


def test_mnrl_takes_2_or_more_columns_and_others_say_what_fits():
    for columns in (2, 3, 7):
        check_pair_data(CachedMultipleNegativesRankingLoss(), columns, scored=False)
    with pytest.raises(
        ValueError, match=r'needs anchor,positive pairs, .* or n-tuples .*: 2 or more embedding columns'
    ):
        check_pair_data(MultipleNegativesRankingLoss(), 1, scored=False)
    with pytest.raises(
        ValueError, match=r'CoSENTLoss needs scored pairs.*For 7-column n-tuples .*negative_5\) use Mul'
    ):
        check_pair_data(build_pair_loss('CoSENTLoss', None), 7, scored=False)


@pytest.mark.parametrize(
    ('options', 'message'),
    [
        ({'mini_batch_size': 0}, r'mini_batch_size must be a whole number >= 1 .*got 0'),
        ({'mini_batch_size': 'x'}, r"mini_batch_size must be a whole number >= 1 .*got 'x'"),
        ({'mini_batch_size': 2.5}, r'mini_batch_size must be a whole number >= 1 .*got 2.5'),
        ({'minibatch_size': 8}, r'CachedMultipleNegativesRankingLoss has no option minibatch_size; it takes '),
        ({'gather_across_devices': 'yes'}, r"gather_across_devices must be true or false, got 'yes'"),
        ({'scale': 0}, r'scale must be a number > 0, got 0'),
    ],
)
def test_bad_options_are_refused_before_a_run_exists(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        build_pair_loss('CachedMultipleNegativesRankingLoss', options)
    with pytest.raises(ValueError, match=message):
        plan_run(run_config(tmp_path, 'CachedMultipleNegativesRankingLoss', 2, loss_options=options))
    assert not (tmp_path / 'CachedMultipleNegativesRankingLoss').exists()


def write_tuples(path, header: list[str], rows: list[tuple[str, ...]]):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_an_n_tuple_csv_gives_its_numbered_negatives_in_order(tmp_path):
    order = [0, 1, 3, 2, 4, 5, 6]  # the file holds negative_2 before negative_1
    header = ['anchor', 'positive', 'negative_2', 'negative_1', 'negative_3', 'negative_4', 'negative_5']
    path = write_tuples(tmp_path / 'tuples.csv', header, [tuple(row[i] for i in order) for row in ROWS])
    read = from_csv(path)
    assert [it.columns for it in read] == ROWS
    plan = plan_run(TrainConfig(model='all-MiniLM-L6-v2', train_data=str(path), output_dir=tmp_path / 'run'))
    assert plan.task.views == 7 and plan.config.loss == 'MultipleNegativesRankingLoss'


@pytest.mark.parametrize(
    'header', [['anchor', 'positive', 'negative_1', 'negative_3'], ['anchor', 'positive', 'negative', 'negative_1']]
)
def test_an_n_tuple_csv_with_a_gap_or_a_plain_negative_is_refused(tmp_path, header):
    path = write_tuples(tmp_path / 'bad.csv', header, [ROWS[0][: len(header)]])
    with pytest.raises(DataError, match=r"bad.csv': an n-tuple CSV has the columns anchor,positive,negative_1"):
        from_csv(path)


def test_a_run_mining_5_negatives_trains_on_7_column_n_tuples(tmp_path):
    """hard_negatives' default output_format 'n-tuple': query, positive and 5 mined negatives per row, into MNRL."""
    from tests.helpers import write_beir
    from tests.unit.tuning.test_hard_negatives import DISTRACTORS, SENTENCES

    corpus = [{'_id': f'p{i}', 'text': p} for i, (_, p) in enumerate(SENTENCES)]
    corpus += [{'_id': f'x{i}', 'text': t} for i, t in enumerate(DISTRACTORS)]
    queries = [{'_id': f'q{i}', 'text': q} for i, (q, _) in enumerate(SENTENCES)]
    qrels = [(f'q{i}', f'p{i}', '1') for i in range(len(SENTENCES))]
    folder = write_beir(tmp_path / 'beir', corpus, queries, qrels, split='train')
    config = TrainConfig(
        model='all-MiniLM-L6-v2',
        train_data=str(folder),
        hard_negatives={'num_negatives': 5},
        batch_size=len(SENTENCES),
        epochs=1,
        output_dir=tmp_path / 'run',
        tensorboard=False,
        loggers=[],
    )
    plan = plan_run(config)
    assert plan.task.views == 7
    trainer = Trainer(plan)
    assert {len(it.columns) for it in trainer.items} == {7}
    result = trainer.fit()
    assert result.history[0]['train_loss'] > 0
