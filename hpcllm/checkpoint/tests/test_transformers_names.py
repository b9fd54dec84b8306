"""The converter stores what from_pretrained builds: transformers' renames and weight conversions applied (MoE
experts merged, legacy gamma/beta), for safetensors, sharded safetensors, .bin and sharded .bin inputs; and what
hpcllm cannot serve fails at convert time with UnsupportedSource."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpcllm.checkpoint import InvalidSource, UnsupportedSource, read_checkpoint
from hpcllm.checkpoint.converter import convert
from hpcllm.checkpoint.tests.archsweep import tiny_config
from hpcllm.checkpoint.tests.conftest import read_raw, same_bits, source_state_dict


def save_tiny(model_type: str, folder: Path, **save_kwargs) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    model.save_pretrained(folder, **save_kwargs)
    return model


def as_bin(folder: Path, shards: int) -> None:
    """Rewrite a safetensors folder as pytorch_model.bin (or `shards` .bin files with their index)."""
    state = source_state_dict(folder)
    for path in folder.glob("*.safetensors*"):
        path.unlink()
    names = list(state)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        torch.save({name: state[name] for name in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def from_pretrained_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixtral") / "hf"
    save_tiny("mixtral", folder)
    return folder


def assert_holds_what_from_pretrained_builds(hf: Path, out: Path) -> None:
    ckpt = read_checkpoint(out)
    expected = from_pretrained_state(hf)
    assert set(ckpt.tensors) | set(ckpt.aliases) == set(expected)
    for name, tensor in expected.items():
        assert same_bits(read_raw(ckpt, ckpt.resolve(name)), tensor), name


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "sharded_bin"])
def test_moe_experts_saved_one_by_one_are_stored_merged_as_the_model_holds_them(layout, tmp_path):
    hf = tmp_path / "hf"
    save_tiny("mixtral", hf, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    if layout.endswith("bin"):
        as_bin(hf, 3 if layout == "sharded_bin" else 1)
    saved = source_state_dict(hf)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in saved  # what transformers writes
    assert layout != "sharded" or len(list(hf.glob("*.safetensors"))) > 1
    ckpt = convert(hf, tmp_path / "out")
    assert "model.layers.0.mlp.experts.gate_up_proj" in ckpt.tensors  # what the model holds
    assert not any(".experts.0." in name for name in ckpt.tensors)
    assert_holds_what_from_pretrained_builds(hf, ckpt.root)


def test_legacy_layernorm_gamma_beta_names_are_renamed(tmp_path):
    hf = tmp_path / "hf"
    save_tiny("bert", hf)
    state = load_file(hf / "model.safetensors")
    legacy = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
              for name, t in state.items()}
    assert legacy.keys() != state.keys()
    save_file(legacy, hf / "model.safetensors", metadata={"format": "pt"})
    ckpt = convert(hf, tmp_path / "out")
    assert not any(name.endswith((".gamma", ".beta")) for name in ckpt.tensors)
    assert_holds_what_from_pretrained_builds(hf, ckpt.root)


def test_planning_reads_no_tensor_data(mixtral_dir, tmp_path, monkeypatch):
    # Memory stays bounded: names and shapes decide the plan (converted groups are worked out on the meta device),
    # and data is read only while writing, one conversion group at a time.
    from hpcllm.checkpoint import converter, hfload

    reads = []
    real_plan = hfload.make_plan

    def spying_plan(model, names, spec_of, read):
        return real_plan(model, names, spec_of, lambda key: reads.append(key) or read(key))

    monkeypatch.setattr(hfload, "make_plan", spying_plan)
    converter.convert(mixtral_dir, tmp_path / "out")
    assert reads == []


def test_checkpoint_lacking_a_tensor_fails_at_convert_time(mixtral_dir, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((mixtral_dir / "config.json").read_text())
    state = load_file(mixtral_dir / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, hf / "model.safetensors")
    with pytest.raises(InvalidSource, match=r"lack 1 tensor\(s\).*model\.norm\.weight"):
        convert(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_weights_of_another_size_than_config_json_fail_at_convert_time(model_type, tmp_path):
    """A config.json copied from another size of the model: the weights would fail every load (from_pretrained
    refuses mismatched shapes), so the conversion fails and names a tensor, instead of publishing a checkpoint."""
    hf = tmp_path / "hf"
    save_tiny(model_type, hf)
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] *= 2
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidSource, match=r"do not have the shape.*mlp.* is \[[\d, ]+\] where the model needs"):
        convert(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unused_checkpoint_tensors_are_dropped_and_recorded(mixtral_dir, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((mixtral_dir / "config.json").read_text())
    state = load_file(mixtral_dir / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry these
    save_file(state, hf / "model.safetensors")
    ckpt = convert(hf, tmp_path / "out")
    assert ckpt.manifest["source"]["unused_tensors"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in ckpt.tensors


# ------------------------------------------------------------------------------------------------- refused inputs


def copy_with_config(source: Path, target: Path, **changes) -> Path:
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    (target / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    return target


@pytest.mark.parametrize("changes, fragments", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, ["quantization_config", "gptq", "unquantized"]),
    ({"model_type": "my_private_llm", "auto_map": {"AutoModelForCausalLM": "modeling_mine.MyForCausalLM"}},
     ["auto_map", "remote code", "my_private_llm"]),
    ({"model_type": "not_a_transformers_model"}, ["not_a_transformers_model", "unknown"]),
])
def test_models_hpcllm_cannot_serve_fail_at_convert_time(mixtral_dir, tmp_path, changes, fragments):
    hf = copy_with_config(mixtral_dir, tmp_path / "hf", **changes)
    with pytest.raises(UnsupportedSource) as caught:
        convert(hf, tmp_path / "out")
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_auto_map_with_a_builtin_class_converts_with_it(mixtral_dir, tmp_path):
    # from_pretrained without trust_remote_code uses transformers' own class when it has one; so does hpcllm.
    hf = copy_with_config(mixtral_dir, tmp_path / "hf", auto_map={"AutoModelForCausalLM": "modeling.MixtralX"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in convert(hf, tmp_path / "out").tensors


@pytest.mark.parametrize("as_folder", [True, False])
def test_gguf_is_refused_with_what_to_convert_instead(mixtral_dir, tmp_path, as_folder):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "config.json").write_text((mixtral_dir / "config.json").read_text())
    gguf = folder / "model-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(UnsupportedSource, match="GGUF.*original Hugging Face checkpoint"):
        convert(folder if as_folder else gguf, tmp_path / "out")


def test_a_gguf_beside_the_safetensors_does_not_stop_the_conversion(mixtral_dir, tmp_path):
    """Repositories such as google/gemma-7b ship a .gguf beside their safetensors: those convert (and the .gguf is
    neither read nor copied)."""
    hf = tmp_path / "hf"
    shutil.copytree(mixtral_dir, hf)
    (hf / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(64))
    ckpt = convert(hf, tmp_path / "out")
    assert not (ckpt.root / "model-Q4_K_M.gguf").exists()
    assert_holds_what_from_pretrained_builds(mixtral_dir, ckpt.root)


def test_cli_refuses_a_quantized_checkpoint_in_one_line(mixtral_dir, tmp_path, capsys):
    from hpcllm.cli.main import main

    hf = copy_with_config(mixtral_dir, tmp_path / "hf", quantization_config={"quant_method": "awq"})
    code = main(["convert", str(hf), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "awq" in lines[0], err


def test_tied_embedding_saved_only_as_the_lm_head_is_stored_once(tmp_path):
    # Some exporters keep the tied matrix under the head's name: the model's embedding becomes its alias.
    from hpcllm.store.loader import load_model

    hf = tmp_path / "hf"
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    state = load_file(hf / "model.safetensors")
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    ckpt = convert(hf, tmp_path / "out")
    assert ckpt.aliases == {"model.embed_tokens.weight": "lm_head.weight"}
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(input_ids=ids).logits
        loaded = load_model(ckpt.root, dtype=torch.float32, tokenizer=False).model
        assert loaded.model.embed_tokens.weight is loaded.lm_head.weight
        assert torch.equal(loaded(input_ids=ids).logits, expected)
