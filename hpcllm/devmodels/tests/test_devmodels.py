"""Offline test models: they load with plain transformers, generate deterministically, and build reproducibly."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpcllm.devmodels import ARCHITECTURES, DevModelError, make_model, make_tokenizer
from hpcllm.devmodels.builder import _balanced_groups, _config

PROMPT = "Hello world, the cluster runs"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def greedy(model, tokenizer, prompt: str = PROMPT, new_tokens: int = 12) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return out[0, inputs.input_ids.shape[1]:].tolist()


def load_pair(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    for file in sorted(path.glob("pytorch_model*.bin")):
        tensors.update(torch.load(file, weights_only=True))
    return tensors


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_loads_and_generates_the_same_tokens_twice(tiny_models, arch):
    model, tokenizer = load_pair(tiny_models[arch])
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    first = greedy(model, tokenizer)
    assert first == greedy(model, tokenizer)
    assert len(set(first)) > 1, f"greedy output is one repeated token: {first}"
    assert first != greedy(model, tokenizer, "Question: what is a checkpoint?")
    assert (tiny_models[arch] / "model.safetensors").stat().st_size < 4 * 2**20


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tiny_llama_dir, tmp_path):
    again = make_model("llama", tmp_path / "again", seed=0)
    other = make_model("llama", tmp_path / "other", seed=1)
    weights = "model.safetensors"
    assert file_digest(again / weights) == file_digest(tiny_llama_dir / weights)
    assert file_digest(other / weights) != file_digest(tiny_llama_dir / weights)
    for name in ("tokenizer.json", "config.json"):
        assert file_digest(again / name) == file_digest(tiny_llama_dir / name)


def test_sharded_checkpoint_has_an_index_and_the_same_tensors(tiny_sharded_dir, tiny_llama_dir):
    index = json.loads((tiny_sharded_dir / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in tiny_sharded_dir.glob("model-*.safetensors"))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (tiny_sharded_dir / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shard_files
    sharded, single = all_tensors(tiny_sharded_dir), all_tensors(tiny_llama_dir)
    assert sorted(index["weight_map"]) == sorted(sharded) == sorted(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    assert all(torch.equal(sharded[name], single[name]) for name in single)
    model, tokenizer = load_pair(tiny_sharded_dir)
    reference, _ = load_pair(tiny_llama_dir)
    assert greedy(model, tokenizer) == greedy(reference, tokenizer)


def test_bin_format_holds_the_same_tensors_as_safetensors(tiny_bin_dir, tiny_gpt2_dir, tmp_path):
    assert (tiny_bin_dir / "pytorch_model.bin").is_file()
    assert not list(tiny_bin_dir.glob("*.safetensors"))
    from_bin, from_safe = all_tensors(tiny_bin_dir), all_tensors(tiny_gpt2_dir)
    assert sorted(from_bin) == sorted(from_safe)
    assert all(torch.equal(from_bin[name], from_safe[name]) for name in from_safe)
    sharded_bin = make_model("gpt2", tmp_path / "bin2", shards=2, fmt="bin")
    index = json.loads((sharded_bin / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    model, tokenizer = load_pair(sharded_bin)
    reference, _ = load_pair(tiny_gpt2_dir)
    assert greedy(model, tokenizer) == greedy(reference, tokenizer)


def test_gpt2_embeddings_are_tied_in_the_file_and_after_load(tiny_gpt2_dir):
    assert "lm_head.weight" not in all_tensors(tiny_gpt2_dir)
    model, _ = load_pair(tiny_gpt2_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_llama_output_embeddings_are_separate(tiny_llama_dir):
    tensors = all_tensors(tiny_llama_dir)
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_chat_template_renders_role_tagged_turns_ending_with_the_assistant_prompt(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello 🙂"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nSay hello 🙂</s>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 2
    assert tokenizer.decode(ids) == text


def test_hermes_tools_template_renders_tools_calls_and_tool_answers(tmp_path, tiny_llama_dir):
    out = tmp_path / "tools"
    result = run_cli("make-model", "llama", str(out), "--chat-template", "hermes-tools")
    assert result.returncode == 0, result.stderr
    assert all_tensors(out).keys() == all_tensors(tiny_llama_dir).keys()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]},
                {"role": "tool", "content": "12:00"}]
    text = tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>\n# Tools\n") and f"<tools>\n{json.dumps(tool)}\n</tools>" in text
    assert text.endswith("<|user|>\nTime?</s>\n<|assistant|>\n<tool_call>\n"
                         '{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call></s>\n'
                         "<|tool|>\n<tool_response>\n12:00\n</tool_response></s>\n<|assistant|>\n")
    # Without tools it is the plain template.
    plain = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert (tokenizer.apply_chat_template(messages[:1], tokenize=False)
            == plain.apply_chat_template(messages[:1], tokenize=False))


def test_tokenizer_round_trips_any_text_without_unknown_tokens():
    tokenizer = make_tokenizer()
    text = "naïve café 日本語 🚀 def f(x): return {'a': 1}\n\ttabs and  spaces \x00"
    ids = tokenizer.encode(text)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert 256 < len(tokenizer) <= 2048


def test_tokenizer_training_is_identical_in_a_fresh_process():
    from hpcllm.devmodels.tokenizer import _trained_tokenizer_json

    code = "from hpcllm.devmodels.tokenizer import _trained_tokenizer_json as t; print(t(), end='')"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert fresh == _trained_tokenizer_json()


def test_bfloat16_weights_are_the_float32_weights_rounded(tmp_path, tiny_qwen2_dir):
    path = make_model("qwen2", tmp_path / "bf16", dtype="bfloat16")
    bf16, fp32 = all_tensors(path), all_tensors(tiny_qwen2_dir)
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[name], fp32[name].to(torch.bfloat16)) for name in fp32)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    model, tokenizer = load_pair(path)
    assert model.dtype == torch.bfloat16
    assert greedy(model, tokenizer) == greedy(model, tokenizer)


def test_existing_directory_is_kept_unless_overwrite(tmp_path):
    target = make_model("gpt2", tmp_path / "model")
    before = file_digest(target / "model.safetensors")
    with pytest.raises(DevModelError, match="already exists; pass --overwrite to replace it or"):  # what the CLI user can pass
        make_model("gpt2", target, seed=1)
    assert file_digest(target / "model.safetensors") == before
    make_model("gpt2", target, seed=1, overwrite=True)  # an earlier build is replaced
    assert file_digest(target / "model.safetensors") != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or trash left behind
    (tmp_path / "empty").mkdir()
    assert (make_model("gpt2", tmp_path / "empty", overwrite=True) / "model.safetensors").is_file()


@pytest.mark.parametrize("make, why", [
    (lambda out: (out.mkdir(), (out / "thesis.tex").write_text("x")), "files a model build does not write"),
    (lambda out: (out.mkdir(), (out / "config.json").write_text("{}"), (out / "thesis.tex").write_text("x")),
     r"files a model build does not write \(thesis.tex\)"),
    (lambda out: (out.mkdir(), (out / "tokenizer.json").write_text("{}")), "holds no config.json"),
    (lambda out: out.write_text("x"), "is not a folder"),
    (lambda out: out.symlink_to(out.parent), "is a symbolic link"),
])
def test_overwrite_never_replaces_what_a_build_did_not_make(tmp_path, make, why):
    out = tmp_path / "out"
    make(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(DevModelError, match=why):
        make_model("llama", out, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_overwrite_never_replaces_the_current_folder(tmp_path, monkeypatch):
    out = make_model("llama", tmp_path / "out")
    monkeypatch.chdir(out)
    with pytest.raises(DevModelError, match="current folder"):
        make_model("llama", ".", overwrite=True)
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("shards", [1, 2])
def test_files_and_folder_are_readable_as_the_umask_allows(tmp_path, shards):
    old = os.umask(0o027)
    try:
        out = make_model("llama", tmp_path / "out", shards=shards)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes  # safetensors wrote its files 0600


def test_unwritable_destination_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(DevModelError, match="cannot create .*a-file/model"):
        make_model("llama", tmp_path / "a-file" / "model")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "bert"}, "unknown architecture 'bert': choose one of llama, gpt2"),
        ({"size": "huge"}, "unknown size 'huge'"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"fmt": "gguf"}, "unknown format 'gguf'"),
        ({"chat_template": "chatml"}, "unknown chat template 'chatml': choose one of plain, hermes-tools, qwen3-think"),
        ({"shards": 0}, "shards must be an integer from 1"),
        ({"shards": 40}, "has only 21 tensors: ask for at most 21 shards"),
    ],
)
def test_bad_arguments_raise_clear_errors_and_leave_nothing(tmp_path, kwargs, message):
    args = {"arch": "llama", **kwargs}
    arch = args.pop("arch")
    with pytest.raises(DevModelError, match=message):
        make_model(arch, tmp_path / "out", **args)
    assert list(tmp_path.iterdir()) == []


def test_bench_size_is_about_one_billion_parameters():
    from transformers.initialization import no_init_weights

    config = _config("llama", "bench", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}, 1024)
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert 0.9e9 < parameters < 1.1e9  # ~2 GB in bfloat16


@given(sizes=st.lists(st.integers(0, 10_000), min_size=1, max_size=40), data=st.data())
def test_balanced_groups_gives_exactly_n_nonempty_runs_in_order(sizes, data):
    groups = data.draw(st.integers(1, len(sizes)))
    names = [f"t{i:03d}" for i in range(len(sizes))]
    result = _balanced_groups(list(zip(names, sizes)), groups)
    assert len(result) == groups and all(result)
    assert [name for group in result for name in group] == names


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcllm.cli.main", "dev", *args], capture_output=True, text=True)


def test_cli_lists_architectures():
    result = run_cli("list-archs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == list(ARCHITECTURES)


def test_cli_builds_a_sharded_model_that_loads(tmp_path):
    out = tmp_path / "cli-llama"
    result = run_cli("make-model", "llama", str(out), "--shards", "2", "--seed", "7", "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert len(list(out.glob("model-*-of-00002.safetensors"))) == 2
    model, tokenizer = load_pair(out)
    assert model.dtype == torch.float16
    assert len(greedy(model, tokenizer)) == 12


def test_cli_bad_arch_is_a_clear_error_without_traceback(tmp_path):
    result = run_cli("make-model", "bert", str(tmp_path / "x"))
    assert result.returncode != 0
    assert "'bert' is not one of" in result.stderr and "'llama'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_existing_directory_is_a_clear_error_without_traceback(tmp_path):
    result = run_cli("make-model", "gpt2", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
