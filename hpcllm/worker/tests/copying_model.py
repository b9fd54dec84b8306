"""A devmodels Llama rewired to copy: its greedy next token after t is always cycle[t] (one random cycle through the
vocabulary), so its output reproduces any stretch of that cycle found in its prompt - the copy-heavy workload that
n-gram speculation is for, which random weights never produce. Every layer still runs in full (attention and MLP
compute as before; their outputs are zeroed), so a step costs what the devmodel's step costs.
Used by test_spec_decode.py and bench/spec_decode.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def rewire_to_copy(model, seed: int = 0) -> list[int]:
    """Rewire a Llama-family model in place (o_proj and down_proj zero: the residual stream is the token's
    embedding; the LM head's row j is the embedding of the token whose successor is j); returns the successor table."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    order = torch.randperm(vocab, generator=generator)
    successor = torch.empty(vocab, dtype=torch.long)
    successor[order] = order.roll(-1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embeddings = model.get_input_embeddings().weight
        embeddings.copy_(torch.nn.functional.normalize(embeddings, dim=-1))
        predecessor = torch.empty_like(successor)
        predecessor[successor] = torch.arange(vocab)
        model.get_output_embeddings().weight.copy_(embeddings[predecessor] * 10.0)
    return successor.tolist()


def cycle_from(successor: list[int], token: int, length: int) -> list[int]:
    """`length` tokens of the cycle starting at `token`."""
    tokens = [token]
    while len(tokens) < length:
        tokens.append(successor[tokens[-1]])
    return tokens


def run_out_of_memory_at_flagged_steps(model, flag: str) -> None:
    """Make the model's forward run out of memory at the step whose positions (all its fed tokens', sorted, as a
    JSON list) the file `flag` holds, then remove the file: a test's way to fail one chosen step inside a model
    process (the hook is pickled with the model; fast_path off, or the runner skips the model's own forward)."""
    model.oom_flag = flag
    model.register_forward_pre_hook(_out_of_memory_if_flagged, with_kwargs=True)


def _out_of_memory_if_flagged(model, args, kwargs):
    flag = Path(model.oom_flag)
    if flag.exists() and json.loads(flag.read_text()) == sorted(kwargs["position_ids"].flatten().tolist()):
        flag.unlink()
        raise torch.OutOfMemoryError("injected")
