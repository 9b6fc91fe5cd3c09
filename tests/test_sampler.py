"""ModalityLengthGroupedSampler: a permutation, deterministic, one modality per batch, less padding."""

from __future__ import annotations

import random

import pytest
import torch

from mllm.data.sampler import ModalityLengthGroupedSampler

BATCH = 8


@pytest.fixture(scope="module")
def data():
    rng = random.Random(0)
    n = 1003
    modality = [rng.random() < 0.7 for _ in range(n)]
    lengths = [rng.randint(600, 900) if m else rng.randint(20, 400) for m in modality]
    return lengths, modality


def _batches(order):
    return [order[i : i + BATCH] for i in range(0, len(order), BATCH)]


def _padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_permutation_and_deterministic(data):
    lengths, modality = data
    a = list(ModalityLengthGroupedSampler(lengths, modality, BATCH, seed=3))
    assert sorted(a) == list(range(len(lengths)))
    assert a == list(ModalityLengthGroupedSampler(lengths, modality, BATCH, seed=3))
    assert a != list(ModalityLengthGroupedSampler(lengths, modality, BATCH, seed=4))
    sampler = ModalityLengthGroupedSampler(lengths, modality, BATCH, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != a
    g = torch.Generator().manual_seed(7)
    assert sorted(ModalityLengthGroupedSampler(lengths, modality, BATCH, generator=g)) == sorted(a)


@pytest.mark.parametrize("world_size", [1, 2])
def test_batches_are_one_modality(data, world_size):
    lengths, modality = data
    order = list(ModalityLengthGroupedSampler(lengths, modality, BATCH, world_size=world_size, seed=0))
    mixed = [b for b in _batches(order) if len({modality[i] for i in b}) > 1]
    # Only the boundary between the two modalities' leftover megabatches (last in the epoch) can mix.
    assert len(mixed) <= 1
    assert not mixed or mixed[0] in _batches(order)[-(world_size * 2 + 2) :]


def test_less_padding_than_random(data):
    lengths, modality = data
    grouped = _padding(
        lengths, _batches(list(ModalityLengthGroupedSampler(lengths, modality, BATCH, seed=0)))
    )
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    assert grouped < 0.5 * _padding(lengths, _batches(shuffled))


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="modality"):
        ModalityLengthGroupedSampler([1, 2], [True], 2)
