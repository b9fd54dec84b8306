"""Worker test fixtures: tiny real models (llama, gpt2, qwen2) loaded with from_pretrained, plus servers.

TEMPORARY builder until hpcllm.devmodels lands; then these fixtures come from the root conftest.
"""

from __future__ import annotations

import functools

import pytest

ARCHS = ["llama", "gpt2", "qwen2"]


def _build(root):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              Qwen2Config, Qwen2ForCausalLM)
    text = ["hello world, this is a small test corpus. héllo wörld ünïcödé 日本語 テスト 🙂 🚀"] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")
    V = len(t)
    torch.manual_seed(0)
    built = {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=1)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)),
    }
    dirs = {}
    for name, m in built.items():
        m.save_pretrained(root / name)
        t.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("worker-models"))


@pytest.fixture(scope="session")
def load_pair(model_dirs):
    """load_pair(arch) -> (model, tokenizer), loaded once per session with from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    @functools.cache
    def load(arch):
        path = model_dirs[arch]
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

    return load
