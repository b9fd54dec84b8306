"""The TP forward at degrees 2 and 4 in one process: each rank's shard runs in its own thread, and a collective made
of a barrier and shared buffers stands in for MPI (the MPI collectives run in test_mpirun_tp.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoConfig

from hpcllm.checkpoint import read_checkpoint
from hpcllm.checkpoint.layout import INDEX_FILE
from hpcllm.checkpoint.slicehashes import read_slice_hashes
from hpcllm.mpi.tests.fakes import OneRankWorld
from hpcllm.store import load_model
from hpcllm.tp.model import build_shard_model
from hpcllm.tp.plan import module_plan, slice_plan
from hpcllm.tp.reader import read_slices
from hpcllm.tp.serve import ShardRunner, Step


class ThreadGroup:
    """What the ranks of one collective call share: a barrier and one slot per rank."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * size


class ThreadCollective:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        parts = list(self.group.slots)
        self.group.barrier.wait()  # nobody overwrites a slot before everyone has read them all
        return parts

    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(tensor)
        tensor.copy_(torch.stack(parts).sum(0))
        return tensor

    def allgather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(tensor), dim=-1)


def _shards(root, degree: int):
    ckpt = read_checkpoint(root)
    config = AutoConfig.from_pretrained(root)
    plan = module_plan(config)
    shapes = {name: entry.shape for name, entry in ckpt.tensors.items()}
    group = ThreadGroup(degree)
    models = []
    for rank in range(degree):
        tensors, _ = read_slices(ckpt, slice_plan(shapes, ckpt.aliases, plan, degree, rank), read_slice_hashes(ckpt))
        models.append(build_shard_model(config, tensors, plan, ThreadCollective(group, rank), torch.float32,
                                        root / INDEX_FILE))
    return models


def _run_all(runners: list[ShardRunner], step: Step) -> list[torch.Tensor]:
    with ThreadPoolExecutor(len(runners)) as pool:
        return list(pool.map(lambda runner: runner.run(step), runners))


@pytest.mark.parametrize("model, degree", [("tp_llama", 2), ("wide_llama", 4)])
def test_shards_compute_the_logits_and_greedy_tokens_of_the_whole_model(model, degree, request):
    root = request.getfixturevalue(model)
    torch.set_num_threads(1)
    models = _shards(root, degree)
    hidden, vocab = models[0].config.hidden_size, models[0].config.vocab_size
    head = models[0].model.layers[0].self_attn
    assert head.q_proj.weight.shape == (hidden // degree, hidden)
    assert head.o_proj.weight.shape == (hidden, hidden // degree)
    assert models[0].lm_head.weight.shape == (vocab // degree, hidden)

    whole = load_model(root, tokenizer=False).model
    prompt = [5, 17, 300, 42, 7, 900]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        expected_logits = whole(ids).logits[0, -1]
        expected_tokens = whole.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=10, min_new_tokens=10)[0, len(prompt):].tolist()

    runners = [ShardRunner(model) for model in models]
    logits = _run_all(runners, Step("forward", "r", tuple(prompt), 0))
    for rank_logits in logits:  # every rank ends with the full, identical logits (the lm_head all-gather)
        assert rank_logits.shape == expected_logits.shape
        assert torch.allclose(rank_logits, expected_logits, atol=1e-5, rtol=0)
    tokens = []
    for _ in range(10):
        tokens.append(int(torch.argmax(logits[0])))
        logits = _run_all(runners, Step("forward", "r", (tokens[-1],), len(prompt) + len(tokens) - 1))
    assert tokens == expected_tokens

    _run_all(runners, Step("forward", "other", (1, 2), 0, release=("r",)))
    assert all(set(runner.caches) == {"other"} for runner in runners)


def test_a_degree_that_cuts_kv_heads_is_refused_before_anything_is_read(tp_llama):
    from hpcllm.tp.mpiload import TensorParallelLoadError, load_shard

    class FourRanks:  # rank 0's view of a 4-rank world: the plan fails before any collective but the first
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 4

        def bcast(self, value, root=0):
            return value

    # k_proj has 32 rows, divisible by 4, but they hold 2 KV heads of 16: a rank would get half a head.
    with pytest.raises(TensorParallelLoadError, match=r"rank 0 on .*: tensor_parallel = 4 does not fit model type "
                                                      r"'llama': KV heads \(num_key_value_heads\) = 2 is not "
                                                      r"divisible by 4"):
        load_shard(tp_llama, FourRanks())


def test_a_follower_s_load_time_is_its_own_not_the_wait_for_the_lead_s_start(tp_llama, monkeypatch):
    """A follower rank waits in the plan's broadcast until the lead, which starts its HTTP server first, reads the
    plan: its "ready in" time (the lead's log, /ready's rank_loads) counted that wait as its own load."""
    import time

    from hpcllm.tp import mpiload
    from hpcllm.tp.model import SingleRank

    lead_start_up = 1000.0
    clock = {"offset": 0.0}
    real_perf_counter = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_perf_counter() + clock["offset"])

    class Done:
        def Test(self):
            return True

        def Wait(self):
            return None

    class FollowerOfASlowLead:  # rank 1 of 2; rank 0 succeeds at every step, its replicated tensors arrive as zeros
        def Get_rank(self):
            return 1

        def Get_size(self):
            return 2

        def bcast(self, value, root=0):
            clock["offset"] += lead_start_up  # the lead reaches its load this much later
            return mpiload._read_plan(tp_llama, 2)

        def Isend(self, buffer, dest, tag):
            return Done()

        def Irecv(self, buffer, source, tag):
            buffer[0] = 0  # rank 0's status: loaded
            return Done()

        def Bcast(self, buffer, root=0):
            buffer[...] = 0

        def gather(self, value, root=0):
            return None

    began = time.monotonic()
    loaded = mpiload.load_shard(tp_llama, FollowerOfASlowLead(), tokenizer=False, collective=SingleRank())
    assert loaded.stats["rank"] == 1 and loaded.stats["bytes_read"] > 0
    assert loaded.stats["seconds"] <= time.monotonic() - began, loaded.stats  # not the 1000 s wait


def test_shards_fuse_their_own_slices_and_the_batched_runner_keeps_the_whole_models_tokens(tp_llama):
    """The paged runner's CPU fast path on TP ranks: each rank fuses its local q/k/v and gate/up slices (after
    sharding), and the o_proj/down_proj/lm_head collectives still run on the packed linears."""
    from hpcllm.tp.serve import BATCH, RUNNER
    from hpcllm.worker.runner import SequenceChunk, StepBatch

    torch.set_num_threads(1)
    models = _shards(tp_llama, 2)
    whole = load_model(tp_llama, tokenizer=False).model
    prompt = [5, 17, 300, 42, 7, 900]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        expected = whole.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                  min_new_tokens=10)[0, len(prompt):].tolist()

    runners = [ShardRunner(model) for model in models]
    _run_all(runners, Step(RUNNER, options=(("batching", "paged"), ("num_blocks", 8), ("block_size", 4),
                                            ("fast_path", True))))
    config = models[0].config
    for runner in runners:
        assert runner.batch_runner.fast_path.fused_attention == config.num_hidden_layers
        attention = runner.model.model.layers[0].self_attn
        full = whole.model.layers[0].self_attn
        assert attention.qkv_sizes == [full.q_proj.weight.shape[0] // 2, full.k_proj.weight.shape[0] // 2,
                                       full.v_proj.weight.shape[0] // 2]  # this rank's heads of each

    table = [0, 1, 2, 3]  # 16 positions: the prompt and the 10 new tokens
    tokens: list[int] = []
    chunk = SequenceChunk(seq_id=1, token_ids=prompt, start=0, block_table=table)
    for _ in range(10):
        logits = _run_all(runners, Step(BATCH, batch=StepBatch([chunk])))
        tokens.append(int(torch.argmax(logits[0][0])))
        chunk = SequenceChunk(seq_id=1, token_ids=[tokens[-1]], start=len(prompt) + len(tokens) - 1,
                              block_table=table)
    assert tokens == expected


def test_only_the_lead_scores_prompt_logprobs(tp_llama):
    """A follower runs the lead's batch (the same forward rows: the lm_head all-gather must match) but does not
    score its prompt positions: a vocabulary-wide log-softmax per position it would discard, and a common place to
    run out of memory on a long prompt. The lead's scores are the whole model's."""
    import pickle

    from hpcllm.tp.serve import BATCH, RUNNER
    from hpcllm.worker.runner import SequenceChunk, StepBatch, make_runner

    torch.set_num_threads(1)
    models = _shards(tp_llama, 2)
    options = {"batching": "paged", "num_blocks": 8, "block_size": 4}
    lead, follower = ShardRunner(models[0]), ShardRunner(models[1])
    lead.batch_runner = make_runner(models[0], **options)  # as TensorParallelEngine gives the lead its own runner
    follower.run(Step(RUNNER, options=tuple(options.items())))
    prompt = [5, 17, 300, 42, 7, 900]
    chunk = SequenceChunk(seq_id=1, token_ids=prompt, start=0, block_table=[0, 1], score_ids=prompt[1:] + [3],
                          score_top=2)
    batches = [StepBatch([chunk]), pickle.loads(pickle.dumps(StepBatch([chunk])))]  # each rank its own copy

    with ThreadPoolExecutor(2) as pool:
        logits = list(pool.map(lambda pair: pair[0].run(Step(BATCH, batch=pair[1])),
                               [(lead, batches[0]), (follower, batches[1])]))

    whole = StepBatch([chunk])
    expected = make_runner(load_model(tp_llama, tokenizer=False).model, **options).step(whole)
    assert batches[1].scores == {}
    assert batches[0].scores[1].logprobs == pytest.approx(whole.scores[1].logprobs, abs=1e-4)
    assert batches[0].scores[1].top_ids == whole.scores[1].top_ids
    assert torch.allclose(logits[0], logits[1]) and torch.allclose(logits[0], expected, atol=1e-4)


def test_gathering_an_empty_output_gives_the_empty_whole():
    """A step whose chunks are all mid-prefill keeps no logits rows: the output projection's all-gather of zero rows
    (it broke a migration's destination, whose prefill of a long context takes several steps)."""
    from mpi4py import MPI

    from hpcllm.tp.model import MpiCollective

    collective = MpiCollective(MPI.COMM_SELF)
    assert collective.allgather_last_dim(torch.zeros(1, 0, 6, dtype=torch.bfloat16)).shape == (1, 0, 6)
    full = torch.arange(12.0).reshape(1, 2, 6)
    assert torch.equal(collective.allgather_last_dim(full), full)


def test_the_tensor_parallel_loader_takes_the_dtype_from_pretrained_takes(tiny_llama_dir, tmp_path):
    """A Hugging Face folder whose config.json says bfloat16 while its weights are stored in float32 (the converter
    keeps them so, and its manifest records float32): from_pretrained and the single-rank loader build a bfloat16
    model (config.json's dtype), the tensor-parallel loader built a float32 one (the manifest's), so a model's
    answers depended on its degree."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from hpcllm.checkpoint import convert
    from hpcllm.tp.mpiload import load_shard

    hf = shutil.copytree(tiny_llama_dir, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (hf / "config.json").write_text(json.dumps(config))
    converted = tmp_path / "converted"
    convert(hf, converted, progress=False)
    assert read_checkpoint(converted).model["dtype"] == "float32"

    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    single = load_model(converted, tokenizer=False).model
    sharded = load_shard(converted, OneRankWorld(), tokenizer=False).model
    expected = {name: p.dtype for name, p in reference.named_parameters()}
    assert set(expected.values()) == {torch.bfloat16}
    assert {name: p.dtype for name, p in single.named_parameters()} == expected
    assert {name: p.dtype for name, p in sharded.named_parameters()} == expected
    ids = torch.tensor([[5, 17, 300, 42, 7, 900]])
    with torch.inference_mode():
        assert torch.equal(sharded(ids).logits, reference(ids).logits)


def test_a_checkpoint_whose_lm_head_differs_from_its_tied_embedding_answers_as_from_pretrained(tiny_llama_dir,
                                                                                              tmp_path, caplog):
    """config.json says tie_word_embeddings but the checkpoint stores an lm_head of its own (other values than the
    embedding): transformers 5's from_pretrained keeps that lm_head (it warns, and does not tie), and so does a
    tensor-parallel instance of degree 2 (its lm_head is split from the stored one). The single-rank loader (and a
    degree-1 instance) tied it to the embedding instead: other logits, other tokens, depending on the degree."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from hpcllm.checkpoint import convert
    from hpcllm.tp.mpiload import load_shard

    hf = shutil.copytree(tiny_llama_dir, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (hf / "config.json").write_text(json.dumps(config))
    converted = tmp_path / "converted"
    convert(hf, converted, progress=False)
    assert "lm_head.weight" in read_checkpoint(converted).tensors  # stored, not an alias of the embedding

    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert not torch.equal(reference.lm_head.weight, reference.model.embed_tokens.weight)
    prompt = [5, 17, 300, 42, 7, 900]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        expected = reference(ids).logits[0, -1]
        single = load_model(converted, tokenizer=False).model
        one_rank = load_shard(converted, OneRankWorld(), tokenizer=False).model
        for model in (single, one_rank):
            assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
            assert torch.allclose(model(ids).logits[0, -1], expected, atol=1e-5, rtol=0)
    # The warning says which lm_head each engine serves (vllm_loader loads through here too; vLLM ties them).
    assert ("hpcllm's engine keeps the stored lm_head.weight, as from_pretrained does; vLLM ties it"
            in caplog.text)
    torch.set_num_threads(1)
    two_ranks = _run_all([ShardRunner(model) for model in _shards(converted, 2)],
                         Step("forward", "r", tuple(prompt), 0))
    for rank_logits in two_ranks:
        assert torch.allclose(rank_logits, expected, atol=1e-5, rtol=0)
