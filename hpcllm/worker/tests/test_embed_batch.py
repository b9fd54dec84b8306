"""Pooling (embeddings, score, rerank, classify) in batched forwards: a piece of an embed call's inputs runs as ONE
forward padded on the right (runner.last_hidden_states), and each output equals the input's output alone."""

from __future__ import annotations

import contextlib

import pytest
import torch

from .conftest import ARCHS


@contextlib.contextmanager
def forward_shapes(model):
    """The [rows, columns] of input_ids of every forward of the model's base model while in the block."""
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    handle = model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def token_lists(vocab_size: int, lengths: list[int]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_sixteen_short_inputs_take_one_forward_and_equal_their_outputs_alone(arch, load_pair, make_engine):
    model, tokenizer = load_pair(arch)
    engine = make_engine(model, tokenizer)
    inputs = token_lists(model.config.vocab_size, [1, 9, 3, 30, 2, 17, 5, 1, 12, 8, 25, 4, 6, 2, 14, 7])
    alone = [engine.embed([ids])[0] for ids in inputs]
    with forward_shapes(model) as shapes:
        batched = engine.embed(inputs)
    assert shapes == [(16, 30)]  # one forward, padded to the longest input
    assert len({tuple(row) for row in alone}) == 16  # distinct outputs: the order check below means something
    for got, want in zip(batched, alone, strict=True):  # in the call's order, not the length order it ran in
        assert got == pytest.approx(want, abs=1e-5)


def test_a_piece_holds_at_most_prefill_chunk_tokens_padded_tokens(load_pair, make_engine):
    """Inputs are taken shortest first; a piece counts its padding, and an input longer than a piece runs alone."""
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer, prefill_chunk_tokens=32)
    inputs = token_lists(model.config.vocab_size, [30, 2, 3, 2, 16, 15, 1, 40])
    alone = [engine.embed([ids])[0] for ids in inputs]
    with forward_shapes(model) as shapes:
        batched = engine.embed(inputs)
    assert shapes == [(4, 3), (2, 16), (1, 30), (1, 40)]
    for got, want in zip(batched, alone, strict=True):
        assert got == pytest.approx(want, abs=1e-5)

