"""LoRA adapters (lora.py): a request naming an adapter gets what the base model with that adapter merged into its
weights (W + scale * B @ A) gives, alone or batched with base rows and other adapters' rows, in the engine's process
and in the model process; what cannot be served is refused with the reason."""

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from hpcllm.worker.engine import Engine, InvalidRequest
from hpcllm.worker.protocol import GenerateRequest, TokenLine

from .conftest import wait_until
from .test_priority import StepLog

_ids = itertools.count()
PROMPTS = ["hello world, this", "the", "🙂 日本語 テスト and a longer prompt that takes a few chunks to prefill"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def request(**fields) -> GenerateRequest:
    fields.setdefault("request_id", f"l{next(_ids)}")
    fields.setdefault("temperature", 0)
    fields.setdefault("max_tokens", 12)
    fields.setdefault("ignore_eos", True)
    return GenerateRequest(**fields)


def write_adapter(folder, model, seed: int, rank: int = 4, alpha: float = 8.0, targets=TARGETS, **config):
    """A PEFT LoRA folder with seeded A and B for `targets` of every layer (PEFT's key names); its config's extra
    keys from `config`. Returns {module name: scale * B @ A} (what merging adds to the module's weight)."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    for name, module in model.named_modules():
        if name.rpartition(".")[2] not in targets:
            continue
        a = torch.randn(rank, module.in_features, generator=generator) * 0.3
        b = torch.randn(module.out_features, rank, generator=generator) * 0.3
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        deltas[name] = scale * b @ a
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
         "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, **config}))
    return deltas


def load(model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dirs["llama"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def merged_greedy(model_dirs, deltas, prompt_ids, max_new_tokens=12):
    """transformers' generate on the base model with an adapter's deltas merged into its weights (None: base)."""
    model, _ = load(model_dirs)
    with torch.no_grad():
        for name, delta in (deltas or {}).items():
            model.get_submodule(name).weight += delta
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    """Two adapters, X (every projection) and Y (attention only, rsLoRA): (folders by name, deltas by name)."""
    model, _ = load(model_dirs)
    root = tmp_path_factory.mktemp("adapters")
    deltas = {"x": write_adapter(root / "x", model, seed=1),
              "y": write_adapter(root / "y", model, seed=2, rank=2, alpha=4.0,
                                 targets=("q_proj", "v_proj", "o_proj"), use_rslora=True)}
    return {name: str(root / name) for name in deltas}, deltas


@pytest.fixture(scope="module")
def references(model_dirs, adapters):
    """Per adapter (None: base), per prompt, the merged model's greedy tokens."""
    _, tokenizer = load(model_dirs)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return prompt_ids, {name: [merged_greedy(model_dirs, adapters[1].get(name), ids) for ids in prompt_ids]
                        for name in (None, "x", "y")}


def token_ids(lines) -> list[int]:
    return [line.token_id for line in lines if isinstance(line, TokenLine)]


def run_together(engine, requests):
    with engine._lock:  # all submitted before the engine steps any
        streams = [engine.submit(r) for r in requests]
    return [[e.token_id for e in list(stream.events())[:-1]] for stream in streams]


@pytest.mark.parametrize("model_process, fast_path, speculative", [(False, True, 0), (False, False, 0), (True, True, 0),
                                                                  (False, True, 5)],
                         ids=["in-process", "unfused-linears", "model-process", "speculating"])
def test_each_request_gets_its_adapters_merged_output_alone_and_mixed_in_one_batch(model_dirs, adapters, references,
                                                                                   model_process, fast_path,
                                                                                   speculative):
    """speculating: verification chunks (several positions of one request) carry its adapter too (workers speculate
    by default)."""
    folders, _ = adapters
    prompt_ids, expected = references
    assert expected["x"] != expected[None] and expected["y"] != expected[None]  # the adapters change the output
    model, tokenizer = load(model_dirs)
    with Engine(model, tokenizer, model_name="tiny", lora_adapters=folders, model_process=model_process,
                fast_path=fast_path, prefill_chunk_tokens=8, kv_block_size=4,
                speculative_ngram_tokens=speculative) as engine:
        for name in (None, "x", "y"):
            alone = [engine.generate(request(prompt_token_ids=ids, lora=name)).token_ids for ids in prompt_ids]
            assert alone == expected[name], name
        mixed = [(name, i) for i in range(len(prompt_ids)) for name in (None, "x", "y")]
        outputs = run_together(engine, [request(prompt_token_ids=prompt_ids[i], lora=name) for name, i in mixed])
        assert outputs == [expected[name][i] for name, i in mixed]
        if speculative:
            assert engine.metrics.spec_proposed_tokens._value.get() > 0  # proposals were verified


def test_requests_preempted_and_recomputed_keep_their_adapter(model_dirs, adapters):
    folders, deltas = adapters
    model, tokenizer = load(model_dirs)
    prompt_ids = [tokenizer(p)["input_ids"][:12] for p in PROMPTS]
    names = [None, "x", "y", "x"]
    expected = [merged_greedy(model_dirs, deltas.get(name), prompt_ids[i % 3], max_new_tokens=32)
                for i, name in enumerate(names)]
    with Engine(model, tokenizer, model_name="tiny", lora_adapters=folders, max_model_len=64, kv_cache_tokens=64,
                kv_block_size=4, max_running_requests=4, prefill_chunk_tokens=8) as engine:
        outputs = run_together(engine, [request(prompt_token_ids=prompt_ids[i % 3], lora=name, max_tokens=32)
                                        for i, name in enumerate(names)])
        assert engine.metrics.preemptions._value.get() > 0
    assert outputs == expected


def test_a_cached_prompt_prefix_is_not_shared_between_adapters(model_dirs, adapters, references):
    folders, _ = adapters
    prompt_ids, expected = references
    model, tokenizer = load(model_dirs)
    with Engine(model, tokenizer, model_name="tiny", lora_adapters=folders, kv_block_size=4) as engine:
        long_prompt = prompt_ids[2]
        assert engine.generate(request(prompt_token_ids=long_prompt)).token_ids == expected[None][2]
        hits = engine.metrics.prefix_cache_hits._value.get()
        assert engine.generate(request(prompt_token_ids=long_prompt, lora="x")).token_ids == expected["x"][2]
        assert engine.metrics.prefix_cache_hits._value.get() == hits  # the base model's blocks were not taken
        assert engine.generate(request(prompt_token_ids=long_prompt, lora="x")).token_ids == expected["x"][2]
        assert engine.metrics.prefix_cache_hits._value.get() > hits  # the adapter's own blocks are


def test_a_request_naming_an_adapter_the_worker_lacks_is_refused_naming_the_loaded_ones(model_dirs, adapters):
    model, tokenizer = load(model_dirs)
    with Engine(model, tokenizer, model_name="tiny", lora_adapters={"x": adapters[0]["x"]}) as engine:
        with pytest.raises(InvalidRequest, match=r"'y' is not loaded .*loaded: x") as refused:
            engine.submit(request(prompt_token_ids=[1, 2, 3], lora="y"))
        assert refused.value.http_status == 400 and refused.value.param == "lora"
        with pytest.raises(InvalidRequest, match="not loaded"):  # a migration's destination checks it too
            engine.hold(request(prompt_token_ids=[1, 2, 3], lora="y", resume_token_ids=[4]), hold_seconds=5)


def test_a_migrated_request_carries_its_adapter(model_dirs, adapters):
    model, tokenizer = load(model_dirs)
    with Engine(model, tokenizer, model_name="tiny", lora_adapters=adapters[0]) as engine:
        stream = engine.submit(request(prompt_token_ids=[1, 2, 3], lora="y", max_tokens=200))
        assert engine.begin_migration(stream.request_id).lora == "y"
        stream.close()


@pytest.mark.parametrize("config, tensors, reason", [
    ({"use_dora": True}, None, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"bias": "all"}, None, "biases"),
    ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}, "embedding target"),
    ({}, {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
          "base_model.model.lm_head.lora_B.weight": torch.zeros(8, 4)}, "lm_head targets are not supported"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
     "trained for another model"),
    ({}, {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
          "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
     "does not exist in this base model"),
])
def test_adapters_the_runner_cannot_apply_are_refused_at_start_with_the_reason(model_dirs, tmp_path, config, tensors,
                                                                               reason):
    model, tokenizer = load(model_dirs)
    write_adapter(tmp_path / "bad", model, seed=3, **config)
    if tensors is not None:
        save_file(tensors, str(tmp_path / "bad" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=reason):
        Engine(model, tokenizer, model_name="tiny", lora_adapters={"bad": str(tmp_path / "bad")})


def test_adapters_are_refused_where_they_are_not_applied(model_dirs, adapters, tmp_path):
    model, tokenizer = load(model_dirs)
    with pytest.raises(ValueError, match="LoRA adapters need the paged runner"):
        Engine(model, tokenizer, model_name="tiny", lora_adapters=adapters[0], batching="sequential")
    with pytest.raises(ValueError, match="cuda_graphs false"):
        Engine(model, tokenizer, model_name="tiny", lora_adapters=adapters[0], cuda_graphs="eager")
    with pytest.raises(ValueError, match="does not exist"):
        Engine(model, tokenizer, model_name="tiny", lora_adapters={"z": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="not a valid model name"):
        Engine(model, tokenizer, model_name="tiny", lora_adapters={"a b": adapters[0]["x"]})
    dora = tmp_path / "dora"
    write_adapter(dora, model, seed=3, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):  # read where the forward runs: the model process says why
        Engine(load(model_dirs)[0], tokenizer, model_name="tiny", lora_adapters={"d": str(dora)}, model_process=True)


def test_workers_serve_adapters_over_http_and_migrate_a_request_only_where_its_adapter_is(model_dirs, adapters,
                                                                                         references, start_worker):
    from hpcllm.worker.client import WorkerError

    from .conftest import slow_down, ticketed

    folders, _ = adapters
    prompt_ids, expected = references
    source = start_worker(load(model_dirs), lora_adapters=folders)
    destination = start_worker(load(model_dirs), lora_adapters={"x": folders["x"]})
    with source.client.generate(request(prompt_token_ids=prompt_ids[0], lora="x")) as stream:
        assert token_ids(stream) == expected["x"][0]
    with pytest.raises(WorkerError) as refused:
        destination.client.generate(request(prompt_token_ids=prompt_ids[0], lora="y"))
    assert refused.value.status == 400 and "'y' is not loaded" in str(refused.value)

    lengths = {"x": 30, "y": 150}  # y's request is still decoding after x's migration
    reference = {name: token_ids(source.client.generate(request(prompt_token_ids=prompt_ids[0], lora=name,
                                                                max_tokens=lengths[name])))
                 for name in ("x", "y")}
    slow_down(source.service.engine, 0.01)  # still decoding when the migrations run
    moving, staying = (iter(source.client.generate(request(request_id=name, prompt_token_ids=prompt_ids[0],
                                                           lora=name, max_tokens=lengths[name])))
                       for name in ("x", "y"))
    moved_first, stayed_first = token_ids(next(moving) for _ in range(3)), token_ids(next(staying) for _ in range(3))
    source.client.migrate("x", ticketed(destination.url))
    at_source = list(moving)
    final = at_source[-1]
    assert final.finish_reason == "migrated"
    with destination.client.attach("x", final.migrated_to.from_index) as rest:
        assert moved_first + token_ids(at_source) + token_ids(rest) == reference["x"]

    with pytest.raises(WorkerError) as no_adapter:
        source.client.migrate("y", ticketed(destination.url))
    assert no_adapter.value.status == 502 and "'y' is not loaded" in str(no_adapter.value)
    assert stayed_first + token_ids(staying) == reference["y"]  # went on at the source


@pytest.mark.gpu
def test_adapters_on_cuda_give_the_merged_models_output_mixed_in_one_batch(model_dirs, adapters):
    """On a GPU the paged runner has no fast path (transformers' forward, plain Linears): each adapter's rows and
    weights live on the model's device."""
    folders, deltas = adapters
    model, tokenizer = load(model_dirs)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = {}
    for name in (None, "x", "y"):
        reference, _ = load(model_dirs)
        with torch.no_grad():
            for module, delta in deltas.get(name, {}).items():
                reference.get_submodule(module).weight += delta
        reference.to("cuda")
        expected[name] = [reference.generate(torch.tensor([ids], device="cuda"), do_sample=False,
                                             max_new_tokens=12)[0, len(ids):].tolist() for ids in prompt_ids]
    with Engine(model.to("cuda"), tokenizer, model_name="tiny", lora_adapters=folders, kv_block_size=4,
                prefill_chunk_tokens=8) as engine:
        mixed = [(name, i) for i in range(len(prompt_ids)) for name in (None, "x", "y")]
        outputs = run_together(engine, [request(prompt_token_ids=prompt_ids[i], lora=name) for name, i in mixed])
    assert outputs == [expected[name][i] for name, i in mixed]


# ---- adapters loaded and unloaded at runtime --------------------------------------------------------------------


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_an_adapter_loaded_at_runtime_serves_its_merged_output_and_once_unloaded_is_refused(model_dirs, adapters,
                                                                                            references,
                                                                                            model_process):
    """Loaded while a base request streams (between its steps): that stream is the base model's throughout; an
    unloaded adapter's weights leave every layer (y, loaded after x went, targets no MLP layer x did)."""
    from hpcllm.worker.requests import AdapterConflict, UnknownAdapter

    folders, _ = adapters
    prompt_ids, expected = references
    model, tokenizer = load(model_dirs)
    with Engine(model, tokenizer, model_name="tiny", model_process=model_process, kv_block_size=4) as engine:
        base = engine.submit(request(prompt_token_ids=prompt_ids[0]))
        first = next(base.events())
        assert engine.load_lora("x", folders["x"]) is True
        assert [first.token_id] + token_ids(base.events()) == expected[None][0]
        assert engine.generate(request(prompt_token_ids=prompt_ids[1], lora="x")).token_ids == expected["x"][1]
        assert engine.load_lora("x", folders["x"]) is False  # already served from there: nothing to do
        with pytest.raises(AdapterConflict, match="already loaded from .*unload it first") as conflict:
            engine.load_lora("x", folders["y"])
        assert (conflict.value.http_status, conflict.value.param) == (409, "lora_name")

        assert engine.unload_lora("x") == 0
        with pytest.raises(InvalidRequest, match=r"'x' is not loaded .*loaded: none") as refused:
            engine.submit(request(prompt_token_ids=prompt_ids[1], lora="x"))
        assert refused.value.param == "lora"
        with pytest.raises(UnknownAdapter, match="'x' is not loaded") as unknown:
            engine.unload_lora("x")
        assert unknown.value.http_status == 404
        assert engine.load_lora("y", folders["y"]) is True
        assert [engine.generate(request(prompt_token_ids=ids, lora="y")).token_ids
                for ids in prompt_ids] == expected["y"]
        assert engine.generate(request(prompt_token_ids=prompt_ids[2])).token_ids == expected[None][2]


def test_a_runtime_load_reads_the_adapters_config_once(model_dirs, adapters, references, monkeypatch):
    """load_lora checks the config and the runner installs the weights with what it read (a config file rewritten
    between two reads could install another scale than the one checked)."""
    from pathlib import Path

    folders, _ = adapters
    prompt_ids, expected = references
    reads = []
    read_text = Path.read_text

    def counting(path, *args, **kwargs):
        if path.name == "adapter_config.json":
            reads.append(path)
        return read_text(path, *args, **kwargs)

    model, tokenizer = load(model_dirs)
    with Engine(model, tokenizer, model_name="tiny", kv_block_size=4) as engine:
        monkeypatch.setattr(Path, "read_text", counting)
        assert engine.load_lora("x", folders["x"]) is True
        monkeypatch.undo()
        assert reads == [Path(folders["x"]) / "adapter_config.json"]
        assert engine.generate(request(prompt_token_ids=prompt_ids[1], lora="x")).token_ids == expected["x"][1]


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "model-process"])
def shared_x_engine(request, model_dirs, adapters):
    """An engine started with adapter x, in process and in a model process (whose start takes seconds here), shared
    by the runtime load and unload tests below; x_engine hands it to each in the state it started in."""
    model, tokenizer = load(model_dirs)
    with Engine(model, tokenizer, model_name="tiny", lora_adapters={"x": adapters[0]["x"]}, kv_block_size=4,
                model_process=request.param) as engine:
        yield engine


@pytest.fixture
def x_engine(shared_x_engine, adapters):
    """(the shared engine serving adapter x alone from its folder, idle, StepLog(engine, pause_after) for it): what
    a test loaded, unloaded or hooked is undone before the next one (its held step let go, its requests ended)."""
    engine, x_folder = shared_x_engine, adapters[0]["x"]
    logs = []

    def step_log(pause_after: int) -> StepLog:
        logs.append(StepLog(engine, pause_after=pause_after))
        return logs[-1]

    def x_alone() -> None:
        assert engine.alive, engine.error
        for name, folder in dict(engine.lora_adapters).items():
            if name != "x" or folder != x_folder:
                engine.unload_lora(name)
        engine.load_lora("x", x_folder)
        assert engine.lora_adapters == {"x": x_folder}

    x_alone()
    try:
        yield engine, step_log
    finally:
        for log in reversed(logs):  # a test that failed while its step was held must not leave the engine stopped
            log.restore()
        assert wait_until(lambda: engine.counts() == (0, 0), timeout=120), engine.counts()
        x_alone()


def test_an_adapter_unloaded_while_a_request_runs_with_it_goes_once_that_request_ends(model_dirs, adapters, x_engine):
    """Meanwhile its name may be loaded from another folder (a new version): new requests get that one, and share
    no cached prompt prefix with the old one (vLLM's rule: blocks are keyed by adapter name and folder)."""
    from hpcllm.worker.requests import AdapterConflict

    folders, deltas = adapters
    engine, step_log = x_engine
    prompt = engine.tokenizer(PROMPTS[2])["input_ids"]
    expected = {name: merged_greedy(model_dirs, deltas[name], prompt, max_new_tokens=40) for name in ("x", "y")}
    steps = step_log(pause_after=1)  # its first step held: it runs, however loaded the machine
    events = engine.submit(request(prompt_token_ids=prompt, lora="x", max_tokens=40)).events()
    assert steps.paused.wait(60)
    assert engine.unload_lora("x") == 1  # it runs on
    with pytest.raises(InvalidRequest, match="'x' is not loaded"):
        engine.submit(request(prompt_token_ids=prompt, lora="x"))
    steps.go.set()
    assert engine.load_lora("x", folders["y"]) is True  # the new version, beside the old one
    hits = engine.metrics.prefix_cache_hits._value.get()
    assert engine.generate(request(prompt_token_ids=prompt, lora="x", max_tokens=40)).token_ids == expected["y"]
    assert engine.metrics.prefix_cache_hits._value.get() == hits
    rest = list(events)
    assert token_ids(rest) == expected["x"] and rest[-1].finish_reason == "length"
    # Its end freed the old version's weights: installing that folder again under the name is no duplicate.
    assert engine.unload_lora("x") == 0
    assert engine.load_lora("x", folders["x"]) is True
    assert engine.generate(request(prompt_token_ids=prompt, lora="x", max_tokens=40)).token_ids == expected["x"]
    with pytest.raises(AdapterConflict, match="already loaded from"):
        engine.load_lora("x", folders["y"])


def test_an_adapter_loaded_again_from_its_folder_while_unloading_is_kept(adapters, references, x_engine):
    folders, _ = adapters
    prompt_ids, expected = references
    engine, step_log = x_engine
    steps = step_log(pause_after=1)  # its first step held: it runs, however loaded the machine
    events = engine.submit(request(prompt_token_ids=prompt_ids[0], lora="x", max_tokens=30)).events()
    assert steps.paused.wait(60)
    assert engine.unload_lora("x") == 1
    assert engine.load_lora("x", folders["x"]) is True  # its weights were still there: served again
    steps.go.set()
    list(events)  # the running request ends: the weights stay, being served
    assert engine.generate(request(prompt_token_ids=prompt_ids[1], lora="x")).token_ids == expected["x"][1]
    assert engine.alive


def test_an_adapter_that_cannot_be_applied_is_refused_at_runtime_with_the_reason_and_changes_nothing(
        model_dirs, adapters, references, tmp_path, x_engine):
    """The shapes are checked where the forward runs (the model process says why)."""
    from hpcllm.worker.lora_config import AdapterError

    folders, _ = adapters
    prompt_ids, expected = references
    engine, _ = x_engine
    other = tmp_path / "other"
    write_adapter(other, load(model_dirs)[0], seed=3)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
              str(other / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="trained for another model"):
        engine.load_lora("other", str(other))
    with pytest.raises(AdapterError, match="does not exist"):
        engine.load_lora("missing", str(tmp_path / "missing"))
    with pytest.raises(InvalidRequest, match="not a valid model name") as bad_name:
        engine.load_lora("a b", folders["y"])
    assert bad_name.value.param == "lora_name"
    with pytest.raises(InvalidRequest, match="base model's name") as base_name:
        engine.load_lora("tiny", folders["y"])
    assert base_name.value.param == "lora_name"
    assert engine.lora_adapters == {"x": folders["x"]}
    assert engine.generate(request(prompt_token_ids=prompt_ids[0], lora="x")).token_ids == expected["x"][0]
    assert engine.alive


def test_adapters_are_refused_at_runtime_where_they_are_not_applied(model_dirs, adapters):
    from hpcllm.worker.requests import LoraUnsupported

    model, tokenizer = load(model_dirs)
    with Engine(model, tokenizer, model_name="tiny", batching="sequential") as engine:
        with pytest.raises(LoraUnsupported, match="need the paged runner") as refused:
            engine.load_lora("x", adapters[0]["x"])
        assert refused.value.http_status == 409 and engine.lora_adapters == {}


def test_workers_load_and_unload_adapters_over_http_with_their_key(model_dirs, adapters, references, start_worker,
                                                                   tmp_path):
    """vLLM's endpoints and bodies, behind the worker's key; a bad folder is a 400 saying what to fix, an unknown
    adapter's unload a 404."""
    import httpx

    from hpcllm.worker.client import WorkerError

    folders, _ = adapters
    prompt_ids, expected = references
    worker = start_worker(load(model_dirs))
    answer = httpx.post(worker.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": folders["x"]})
    assert answer.status_code == 401  # no key, no load

    loaded = worker.client.load_lora_adapter("x", folders["x"])
    assert loaded.changed and loaded.lora_adapters == {"x": folders["x"]}
    with worker.client.generate(request(prompt_token_ids=prompt_ids[0], lora="x")) as stream:
        assert token_ids(stream) == expected["x"][0]
    assert not worker.client.load_lora_adapter("x", folders["x"]).changed
    with pytest.raises(WorkerError) as bad:
        worker.client.load_lora_adapter("z", str(tmp_path / "nowhere"))
    assert bad.value.status == 400 and "does not exist (a PEFT adapter folder holds adapter_config.json" in str(
        bad.value) and bad.value.info.param == "lora_path"
    with pytest.raises(WorkerError) as base_name:  # the name is at fault, not the folder
        worker.client.load_lora_adapter("tiny-llama", folders["y"])
    assert (base_name.value.status, base_name.value.info.param) == (400, "lora_name")
    with pytest.raises(WorkerError) as conflict:  # the worker's state is in the way: a conflict
        worker.client.load_lora_adapter("x", folders["y"])
    assert (conflict.value.status, conflict.value.info.param, conflict.value.info.code) == (
        409, "lora_name", "lora_already_loaded")

    unloaded = worker.client.unload_lora_adapter("x")
    assert unloaded.lora_adapters == {} and unloaded.running_requests == 0
    with pytest.raises(WorkerError) as refused:
        worker.client.generate(request(prompt_token_ids=prompt_ids[0], lora="x"))
    assert refused.value.status == 400 and refused.value.info.param == "lora"
    with pytest.raises(WorkerError) as unknown:
        worker.client.unload_lora_adapter("x")
    assert unknown.value.status == 404 and unknown.value.info.code == "lora_not_found"
