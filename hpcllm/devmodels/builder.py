"""Builds small real Hugging Face checkpoints offline: config + seeded weights + trained tokenizer.

Weights do not come from transformers' own initialisation (which may change between versions and depends on
construction order): the model is built with initialisation switched off, then every parameter is filled from its
own generator seeded by (seed, architecture, parameter name). The same seed therefore gives byte-identical weight files, and a
tied parameter is filled once.

The checkpoint is written by save_pretrained (it knows which tied keys to drop) as one safetensors file, then
re-split into exactly the requested number of shards, or rewritten as torch .bin files, in a temporary directory
that is renamed into place when complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hpcllm.checkpoint.heads import auto_class
from hpcllm.checkpoint.layout import check_replaceable, creation_mode
from hpcllm.devmodels.tokenizer import CHAT_TEMPLATES, make_tokenizer
from hpcllm.errors import HpcllmError

ARCHITECTURES: tuple[str, ...] = ("llama", "gpt2", "qwen2", "opt")
SIZES: tuple[str, ...] = ("tiny", "small", "bench")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
FORMATS: tuple[str, ...] = ("safetensors", "bin")
# The bench model exists to measure loading at a realistic size; bf16 is how such checkpoints ship.
DEFAULT_DTYPE = {"tiny": "float32", "small": "float32", "bench": "bfloat16"}
MAX_SHARDS = 64

# Weight matrices and embeddings are drawn from N(0, INIT_STD_SQRT_HIDDEN / sqrt(hidden)); norms start at 1 and
# biases at 0, as in the real models. That is std 0.2 for the tiny models: with the usual 0.02 their greedy
# output is mostly one token repeated; with 0.2 it varies with the prompt (checked for every architecture).
INIT_STD_SQRT_HIDDEN = 1.6
INIT_THREADS = 4

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# What a build writes (save_pretrained's side files vary a little between transformers versions): --overwrite
# replaces a folder holding only such files, or an empty one, never anything else.
BUILT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "model*.safetensors", SAFE_INDEX,
               "pytorch_model*.bin", BIN_INDEX)


class DevModelError(HpcllmError):
    """A test model cannot be built as asked (bad argument, existing output directory)."""

    exit_code = 2


# Shapes per architecture and size: (tiny: ~1 MB, small: tens of MB, bench: ~1B parameters = ~2 GB in bf16).
_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "positions": 512},
    "small": {"hidden": 384, "layers": 6, "heads": 6, "kv_heads": 2, "ffn": 1024, "positions": 1024},
    "bench": {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "ffn": 5632, "positions": 2048},
}
# GPT-2 and OPT have no grouped-query attention and a 4x MLP; fewer layers keep the bench size near 2 GB.
_BENCH_LAYERS_FULL_ATTENTION = 20


def _config(arch: str, size: str, special_ids: dict[str, int], vocab_size: int):
    import transformers

    shape = _SHAPES[size]
    common: dict[str, Any] = dict(vocab_size=vocab_size, **special_ids)
    if arch in ("llama", "qwen2"):
        config_class = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
        return config_class(
            hidden_size=shape["hidden"],
            intermediate_size=shape["ffn"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=shape["positions"],
            tie_word_embeddings=False,
            **common,
        )
    layers = _BENCH_LAYERS_FULL_ATTENTION if size == "bench" else shape["layers"]
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=shape["hidden"], n_layer=layers, n_head=shape["heads"], n_positions=shape["positions"],
            n_inner=4 * shape["hidden"], tie_word_embeddings=True, **common,
        )
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=shape["hidden"], word_embed_proj_dim=shape["hidden"], ffn_dim=4 * shape["hidden"],
            num_hidden_layers=layers, num_attention_heads=shape["heads"],
            max_position_embeddings=shape["positions"], tie_word_embeddings=True, **common,
        )
    raise AssertionError(f"no config for {arch}")  # guarded by _check_args


def _parameter_seed(seed: int, arch: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{arch}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_norm_or_bias(name: str, ndim: int) -> tuple[bool, bool]:
    is_bias = name.endswith(".bias")
    is_norm_weight = ndim == 1 and not is_bias
    return is_norm_weight, is_bias


def _seeded_init(model, seed: int, arch: str, progress: Callable[[int, int], None] | None = None) -> None:
    """Fills every parameter deterministically from (seed, arch, name), independent of construction order.

    Each parameter has its own generator, so parameters are filled in parallel threads (sampling is the slow part
    of the 1B bench build; torch releases the GIL) without changing a single bit of the result.
    """
    import torch

    std = INIT_STD_SQRT_HIDDEN / math.sqrt(model.config.hidden_size)
    params = list(model.named_parameters())  # tied parameters appear once
    total = sum(p.numel() for _, p in params)
    done = 0
    lock = threading.Lock()

    def fill(name: str, param) -> None:
        nonlocal done
        is_norm_weight, is_bias = _is_norm_or_bias(name, param.ndim)
        with torch.no_grad():
            if is_norm_weight:
                param.fill_(1.0)
            elif is_bias:
                param.zero_()
            else:
                # Drawn in float32 whatever the dtype, so every dtype variant of a seed holds the same weights up to
                # rounding.
                generator = torch.Generator().manual_seed(_parameter_seed(seed, arch, name))
                param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))
        with lock:
            done += param.numel()
            if progress is not None:
                progress(done, total)

    workers = min(INIT_THREADS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="devmodels-init") as pool:
        for future in [pool.submit(fill, name, param) for name, param in params]:
            future.result()


def _build_model(config, arch: str, dtype_name: str, seed: int, show_progress: bool, classifier: bool = False):
    import torch
    from transformers.initialization import no_init_weights

    # Allocated in the target dtype directly (the bench model is 2 GB in bf16, 4 GB in float32) and left
    # uninitialised: _seeded_init fills every parameter.
    with no_init_weights():
        model = auto_class(classifier).from_config(config, dtype=getattr(torch, dtype_name))
    model.tie_weights()  # no_init_weights also skips tying: tie first so a tied pair is one parameter, filled once
    _seeded_init(model, seed, arch, progress=_progress_bar("init weights", show_progress))
    return model.eval()


def _progress_bar(description: str, enabled: bool) -> Callable[[int, int], None] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=description, unit="param", unit_scale=True, leave=True)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()

    return update


def _balanced_groups(names_and_sizes: list[tuple[str, int]], groups: int) -> list[list[str]]:
    """Splits names, kept in order, into exactly `groups` non-empty runs of roughly equal byte size."""
    total = sum(size for _, size in names_and_sizes) or 1
    count = len(names_and_sizes)
    result: list[list[str]] = [[] for _ in range(groups)]
    previous, cumulative = -1, 0
    for index, (name, size) in enumerate(names_and_sizes):
        by_size = min(int((cumulative + size / 2) * groups / total), groups - 1)
        # Never go back, never skip a group, and leave enough tensors for every later group.
        group = max(min(max(by_size, previous), previous + 1), groups - (count - index))
        result[group].append(name)
        previous, cumulative = group, cumulative + size
    return result


def _shard_file_name(stem: str, extension: str, index: int, count: int) -> str:
    return f"{stem}-{index:05d}-of-{count:05d}.{extension}"


def _rewrite_weights(directory: Path, shards: int, fmt: str) -> None:
    """Replaces save_pretrained's single model.safetensors by `shards` files (+ index when > 1) in format `fmt`."""
    import torch
    from safetensors.torch import load_file, save_file

    single = directory / SAFE_WEIGHTS
    tensors = load_file(single)
    # save_pretrained writes tensors sorted by name; keep that order so shards hold neighbouring layers.
    names = sorted(tensors)
    if shards > len(names):
        raise DevModelError(f"this model has only {len(names)} tensors: ask for at most {len(names)} shards")
    groups = _balanced_groups([(n, tensors[n].numel() * tensors[n].element_size()) for n in names], shards)
    stem, extension = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map: dict[str, str] = {}
    for index, group in enumerate(groups, start=1):
        file_name = BIN_WEIGHTS if shards == 1 else _shard_file_name(stem, extension, index, shards)
        part = {name: tensors[name].contiguous() for name in group}
        if fmt == "safetensors":
            save_file(part, directory / f".{file_name}.partial", metadata={"format": "pt"})
        else:
            torch.save(part, directory / f".{file_name}.partial")
        os.replace(directory / f".{file_name}.partial", directory / file_name)
        weight_map.update({name: file_name for name in group})
    single.unlink()  # only called when it is replaced (sharded, or .bin)
    if shards > 1:
        total_size = sum(t.numel() * t.element_size() for t in tensors.values())
        index_doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        index_name = SAFE_INDEX if fmt == "safetensors" else BIN_INDEX
        (directory / index_name).write_text(json.dumps(index_doc, indent=2, sort_keys=True) + "\n")


def _check_args(arch: str, size: str, shards: int, seed: int, dtype: str, fmt: str, chat_template: str) -> None:
    if chat_template not in CHAT_TEMPLATES:
        raise DevModelError(f"unknown chat template {chat_template!r}: choose one of {', '.join(CHAT_TEMPLATES)}")
    if arch not in ARCHITECTURES:
        raise DevModelError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise DevModelError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    if dtype not in DTYPES:
        raise DevModelError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise DevModelError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DevModelError(f"seed must be an integer, got {seed!r}")
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise DevModelError(f"shards must be an integer from 1 to {MAX_SHARDS}, got {shards!r}")


def make_model(
    arch: str,
    out_dir: str | os.PathLike,
    *,
    size: str = "tiny",
    shards: int = 1,
    seed: int = 0,
    dtype: str | None = None,
    overwrite: bool = False,
    fmt: str = "safetensors",
    show_progress: bool | None = None,
    chat_template: str = "plain",
    num_labels: int | None = None,
) -> Path:
    """Builds a real HF checkpoint directory (config, seeded weights, tokenizer, generation config) at out_dir.

    dtype defaults to float32 for tiny/small and bfloat16 for bench. fmt="bin" writes legacy pytorch_model*.bin
    files instead of safetensors. show_progress (default: only for bench) prints tqdm progress on stderr.
    chat_template: "plain", "hermes-tools" (OpenAI tools rendered in the Hermes/Qwen2.5 format), "qwen3-think"
    (hermes-tools with Qwen3's <think> blocks and enable_thinking), "qwen3-coder-tools" (Qwen3-Coder's XML calls) or
    "mistral-tools" (Mistral's [TOOL_CALLS] calls, its markers special tokens).
    num_labels: a *ForSequenceClassification model (its `score` head, num_labels outputs: 1 is a reranker's) instead
    of the causal LM (llama and qwen2 only).
    Returns the output directory. Raises DevModelError for bad arguments, an existing out_dir without overwrite,
    or one that overwrite must not replace (anything but an empty folder or an earlier build).
    """
    dtype = dtype or DEFAULT_DTYPE.get(size, "float32")
    _check_args(arch, size, shards, seed, dtype, fmt, chat_template)
    if num_labels is not None and (arch not in ("llama", "qwen2") or isinstance(num_labels, bool)
                                   or not isinstance(num_labels, int) or num_labels < 1):
        raise DevModelError(f"num_labels (a classification head) is for llama and qwen2, at least 1; got {arch!r}, "
                            f"{num_labels!r}")
    out_path = Path(out_dir).absolute()
    _check_output(out_path, overwrite)
    if show_progress is None:
        show_progress = size == "bench"

    tokenizer = make_tokenizer(chat_template)
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _config(arch, size, special_ids, vocab_size=len(tokenizer))
    if num_labels is not None:
        config.num_labels = num_labels
    started = time.monotonic()
    staging = _make_staging_dir(out_path)  # before the (bench: long) build, so an unwritable place fails fast
    try:
        model = _build_model(config, arch, dtype, seed, show_progress, classifier=num_labels is not None)
        with _transformers_progress_bars(show_progress):
            model.save_pretrained(staging, max_shard_size=_no_sharding_limit(model))
        del model
        if shards > 1 or fmt != "safetensors":
            _rewrite_weights(staging, shards, fmt)
        tokenizer.save_pretrained(staging)
        _check_written(staging, shards, fmt, generates=num_labels is None)
        # Readable like any other folder and file: mkdtemp made the folder 0700 and safetensors its files 0600.
        staging.chmod(creation_mode(directory=True))
        file_mode = creation_mode(directory=False)
        for path in staging.iterdir():
            path.chmod(file_mode)
        _publish(staging, out_path, overwrite)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DevModelError(f"cannot write the model to {out_path}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if show_progress:
        size_bytes = sum(f.stat().st_size for f in out_path.iterdir())
        print(f"built {arch}/{size} ({size_bytes / 1e9:.2f} GB) at {out_path} in {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
    return out_path


@contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Hides save_pretrained's per-file progress bar for quick builds (it spams every test log); restores it after."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _make_staging_dir(out_path: Path) -> Path:
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent))
    except OSError as exc:
        raise DevModelError(f"cannot create {out_path}: {exc}") from exc


def _no_sharding_limit(model) -> int:
    # save_pretrained writes one file when the limit exceeds the model; _rewrite_weights does exact sharding.
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(2 * size, 1 << 30)


def _check_written(directory: Path, shards: int, fmt: str, generates: bool = True) -> None:
    """Guards against transformers changing what save_pretrained writes: fail loudly, not with a wrong layout.
    generates: a causal LM (a classifier has no generation_config.json)."""
    expected = ["config.json", *(["generation_config.json"] if generates else []), "tokenizer.json",
                "tokenizer_config.json"]
    if shards == 1:
        expected.append(SAFE_WEIGHTS if fmt == "safetensors" else BIN_WEIGHTS)
    else:
        expected.append(SAFE_INDEX if fmt == "safetensors" else BIN_INDEX)
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        raise DevModelError(f"building the model wrote no {', '.join(missing)} in {directory}")


def _check_output(out_path: Path, overwrite: bool) -> None:
    """DevModelError unless out_path is free, or may be replaced (an empty folder, or one holding only what a build
    writes) and overwrite is given."""
    check_replaceable(out_path, overwrite, lambda entries: _not_of_a_build(out_path, entries), DevModelError,
                      "a model this command built")


def _not_of_a_build(out_path: Path, entries: list[Path]) -> str | None:
    others = sorted(p.name for p in entries if not p.is_file() or p.is_symlink()
                    or not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in BUILT_FILES))
    if others:
        return f"holds files a model build does not write ({', '.join(others[:3])})"
    if not (out_path / "config.json").is_file():
        return "holds no config.json (it is not a model)"
    return None


def _publish(staging: Path, out_path: Path, overwrite: bool) -> None:
    """Renames the finished directory into place; an overwritten one is moved aside first, then deleted."""
    _check_output(out_path, overwrite)  # again: it may have appeared or changed while building
    if out_path.exists() or out_path.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".old", dir=out_path.parent))
        os.replace(out_path, trash / out_path.name)
        os.replace(staging, out_path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_path)
