"""Tiny real models (llama, gpt2 tied, qwen2, opt, a sharded llama) saved as HF folders and converted.

Built once per session on the real disk (/var/tmp: O_DIRECT works there, unlike some tmpfs / overlay /tmp), with
small chunks so every load runs many pipeline units.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from hpcllm.store import readers

CHUNK = 16 << 10  # 16 KiB chunks: a tiny model still spans many chunks and read units

ARCHS = ["llama", "gpt2", "qwen2", "opt", "llama_sharded"]


def _config(arch: str):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    if arch.startswith("llama"):
        return LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":  # lm_head tied to wte
        return GPT2Config(vocab_size=384, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                          eos_token_id=2)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "opt":  # lm_head tied to embed_tokens
        return OPTConfig(vocab_size=384, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    raise ValueError(arch)


DTYPES = {"llama": "bfloat16", "gpt2": "float32", "qwen2": "float16", "opt": "float32", "llama_sharded": "bfloat16"}


def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "slurm schedules jobs on the cluster nodes",
            "a checkpoint is loaded from the fastest tier"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(out)


def build_hf_model(arch: str, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch))
    model.to(getattr(torch, DTYPES[arch]))
    with torch.no_grad():  # non-trivial norm weights/biases, so a mix-up between tensors would show
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    shard = {"max_shard_size": "60KB"} if arch == "llama_sharded" else {}
    model.save_pretrained(out, **shard)
    if arch == "llama":
        _tokenizer(out)
    return out


def odirect_supported(directory: Path) -> bool:
    probe = directory / f".odirect-probe-{uuid.uuid4().hex[:6]}"
    probe.write_bytes(b"\0" * 4096)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
        probe.unlink()


def evict_from_page_cache(folder: Path) -> None:
    """Drop a checkpoint's data files from the page cache."""
    readers.evict_from_page_cache(folder.glob("data-*.h5"))


def cache_in_page_cache(folder: Path) -> None:
    for path in folder.glob("data-*.h5"):
        path.read_bytes()


@pytest.fixture(scope="session")
def disk_dir():
    base = Path(tempfile.mkdtemp(prefix="hpcllm-store-tests-", dir="/var/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def expected_disk_mode(disk_dir) -> str:
    return "odirect" if odirect_supported(disk_dir) else "buffered"


@pytest.fixture(scope="session")
def models(disk_dir):
    """arch -> (HF folder, converted folder); built lazily, once per session."""
    from hpcllm.checkpoint import convert

    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            hf = build_hf_model(arch, disk_dir / f"hf-{arch}")
            converted = disk_dir / f"ckpt-{arch}"
            convert(hf, converted, chunk_size=CHUNK, partitions=2, progress=False)
            cache[arch] = (hf, converted)
        return cache[arch]

    return get


@pytest.fixture
def copy_checkpoint(disk_dir, models):
    """A private copy of a converted checkpoint that a test may damage."""
    made = []

    def copy(arch: str = "llama") -> Path:
        _, converted = models(arch)
        target = disk_dir / f"damaged-{uuid.uuid4().hex[:8]}"
        shutil.copytree(converted, target)
        made.append(target)
        return target

    yield copy
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dram_tier():
    from hpcllm.store.dram import DramTier

    tier = DramTier(namespace=f"test-{uuid.uuid4().hex[:10]}")
    yield tier
    shutil.rmtree(tier.dir, ignore_errors=True)


def reference(hf_dir: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, **kwargs).eval()
