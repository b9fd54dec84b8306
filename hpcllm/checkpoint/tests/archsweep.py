"""Sweep every causal-LM architecture of the installed transformers: tiny config -> save_pretrained -> hpcllm
convert -> hpcllm.load_model, logits compared with from_pretrained's on the same input (fp32 and bf16).

Tiny configs are made generically, from the config class's own defaults: every size attribute (found by name, with
the class's attribute_map translating names such as n_embd to hidden_size) is shrunk to one small consistent set,
lists with one entry per layer are cut to the new layer count, and the class's constructor derives the rest.
Sub-configs (vision towers...) shrink the same way; sizes left None that the model needs are set; attributes the
class derives (not constructor parameters) are left to it. There is no per-architecture table. What cannot be
swept is recorded with its reason, never silently dropped. Runs with one torch thread: for tiny matrices a second
thread only adds synchronisation (30x slower when other processes load the cores).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
HIDDEN = HEADS * HEAD_DIM
INTERMEDIATE = 64
VOCAB = 128
EXPERTS = 4
EXPERTS_PER_TOKEN = 2
POSITIONS = 128
SEQUENCE = 8
GC_EVERY = 25
MAX_PARAMETERS = 5_000_000  # a shrunk model is ~0.1M; more means a size attribute the rules missed

# canonical attribute name (after the config's attribute_map) pattern -> tiny value
SIZE_RULES: list[tuple[str, int]] = [
    (r"num_key_value_heads|num_kv_heads|n_head_kv|multi_query_group_num|num_query_groups", KV_HEADS),
    (r"(num_)?(attention_)?heads|n_heads?|.*attention_heads|.*_num_heads|num_heads|.*_n_heads", HEADS),
    (r".*head_dim|.*_head_size|attention_head_size|kv_channels|.*_rope_dim|.*_nope_dim|rotary_dim|.*d_head",
     HEAD_DIM),
    (r"(num_)?(hidden_)?layers|n_layers?|num_hidden_layers|decoder_layers|num_layers", LAYERS),
    (r".*intermediate_size.*|.*ffn_dim|n_inner|d_ff|ffn_hidden_size|.*ffn_size|.*ff_size", INTERMEDIATE),
    (r"hidden_size.*|d_model|n_embd|embed_dim|dim|model_dim|hidden_dim", HIDDEN),
    (r".*lora_rank", HEAD_DIM * 2),
    (r"vocab_size.*|n_vocab|.*_vocab_size", VOCAB),
    (r"num_experts|n_routed_experts|num_local_experts|moe_num_experts|n_experts", EXPERTS),
    (r"num_experts_per_tok|moe_topk|top_k|num_experts_per_token|moe_k", EXPERTS_PER_TOKEN),
    (r"n_group|topk_group|num_expert_group", 1),
    (r"n_shared_experts|num_shared_experts", 1),
    (r"max_position_embeddings|n_positions|n_ctx|max_seq_len|max_sequence_length", POSITIONS),
    (r"first_k_dense_replace", 1),
    (r".*expand", 1),  # Mamba: expand * hidden_size must equal heads * head_dim
]


@dataclass
class SweepResult:
    identical: dict[str, list[str]] = field(default_factory=dict)  # dtype -> model types
    skipped: dict[str, str] = field(default_factory=dict)  # model_type -> reason
    failed: dict[str, str] = field(default_factory=dict)  # model_type -> what went wrong (a bug)
    realigned: list[str] = field(default_factory=list)  # identical to from_pretrained's once its memory is aligned
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"architecture sweep: {len(self.identical.get('float32', []))} converted and identical in float32, "
                 f"{len(self.identical.get('bfloat16', []))} in bfloat16, {len(self.skipped)} skipped, "
                 f"{len(self.failed)} failed, {self.seconds:.0f} s"]
        by_reason: dict[str, list[str]] = {}
        for model_type, reason in sorted(self.skipped.items()):
            by_reason.setdefault(reason_kind(reason), []).append(model_type)
        for kind, types in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  skipped, {kind}: {len(types)} ({', '.join(types)})")
        if self.realigned:
            lines.append(f"  identical only with from_pretrained's tensors copied to fresh (aligned) memory, its own "
                         f"logits depending on their addresses: {', '.join(self.realigned)}")
        for model_type, what in sorted(self.failed.items()):
            lines.append(f"  FAILED {model_type}: {what}")
        return "\n".join(lines)


def reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


class Skip(Exception):
    """This architecture cannot be swept (the reason says why); not a converter bug."""


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# ------------------------------------------------------------------------------------------------- tiny configs


def tiny_config(model_type: str):
    """The config class's defaults with every size attribute shrunk (see SIZE_RULES), sub-configs too."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    try:
        default = config_class()
    except Exception as exc:
        raise Skip(f"config cannot be built from its defaults: {first_line(exc)}") from None
    try:
        return config_class(**_tiny_overrides(default))
    except Exception as exc:
        raise Skip(f"config cannot shrink: {first_line(exc)} {_detail(exc)}".strip()) from None


def _detail(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines()[1:] if line.strip()]
    return lines[0][:120] if lines else ""


def _tiny_overrides(config) -> dict:
    """Constructor arguments that shrink `config`: size attributes (also those left None, which the model would
    derive or need), per-layer lists cut to the new layer count, special token ids inside the vocabulary, and
    every sub-config (vision tower, text model...) shrunk the same way."""
    canonical = {actual: name for name, actual in getattr(type(config), "attribute_map", {}).items()}
    parameters = _constructor_parameters(type(config))  # sizes not among them are derived by the class
    values = {key: value for key, value in vars(config).items()
              if key in parameters or not key.startswith("_") and isinstance(value, (list, dict))}
    layers_before = getattr(config, "num_hidden_layers", None)
    sub_configs = getattr(config, "sub_configs", None) or {}
    overrides = {}
    for key, value in values.items():
        name = canonical.get(key, key)
        if key in sub_configs and hasattr(value, "to_dict"):
            overrides[key] = {**value.to_dict(), **_tiny_overrides(value)}
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int) or value is None:
            tiny = _tiny_value(name)
            if tiny is not None and (value is None or value > tiny):
                overrides[key] = tiny
        elif isinstance(value, list) and layers_before and len(value) == layers_before and layers_before > LAYERS:
            overrides[key] = _spread(value, LAYERS)
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # per layer index
            overrides[key] = {k: v for k, v in value.items() if int(k) < LAYERS}
    heads, kv_heads = _actual(config, "num_attention_heads"), _actual(config, "num_key_value_heads")
    if kv_heads in overrides and values.get(kv_heads) == values.get(heads):
        overrides[kv_heads] = HEADS  # no grouped-query attention before (MLA needs that): none after
    vocab = overrides.get(_actual(config, "vocab_size"), getattr(config, "vocab_size", None))
    if isinstance(vocab, int):
        for key, value in values.items():  # special tokens must exist in the tiny vocabulary
            if key.endswith("token_id") and isinstance(value, int) and value >= vocab:
                overrides[key] = vocab - 1
    overrides.pop("model_type", None)
    return overrides


def _constructor_parameters(config_class) -> set[str]:
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class)}
    return set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}


def _actual(config, name: str) -> str:
    return getattr(type(config), "attribute_map", {}).get(name, name)


def _tiny_value(name: str) -> int | None:
    for pattern, value in SIZE_RULES:
        if re.fullmatch(pattern, name):
            return value
    return None


def _spread(values: list, count: int) -> list:
    """`count` entries that keep the variety of a per-layer list (e.g. both attention and mamba layers)."""
    distinct = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
    chosen = [json.loads(v) for v in distinct[:count]]
    while len(chosen) < count:
        chosen.append(values[len(chosen)])
    return chosen


# ------------------------------------------------------------------------------------------------- one case


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:160]


def build_reference(model_type: str, folder: Path):
    """The tiny model saved with save_pretrained in `folder`; returns the input ids to compare logits on."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception as exc:
        raise Skip(f"tiny model cannot be built: {first_line(exc)}") from None
    if size > MAX_PARAMETERS:
        raise Skip(f"config cannot shrink: still {size / 1e6:.1f}M parameters")
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise Skip(f"tiny model cannot be built: {first_line(exc)}") from None
    vocab = min(VOCAB, getattr(model.config.get_text_config(), "vocab_size", VOCAB) or VOCAB)
    ids = torch.randint(0, vocab, (1, SEQUENCE), generator=torch.Generator().manual_seed(1))
    try:
        model.save_pretrained(folder)
    except Exception as exc:
        raise Skip(f"save_pretrained fails: {first_line(exc)}") from None
    return ids


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=ids, use_cache=False) if _takes_use_cache(model) else model(input_ids=ids)
    logits = output.logits if hasattr(output, "logits") else output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"output has no logits tensor ({type(logits).__name__})")
    return logits


def _takes_use_cache(model) -> bool:
    import inspect

    return "use_cache" in inspect.signature(model.forward).parameters


@dataclass
class Reference:
    """from_pretrained's model and its logits on the sweep's input."""

    model: torch.nn.Module
    logits: torch.Tensor

    def realigned_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits once the model's tensors are copied to freshly allocated memory. They can differ in the last
        bit: a few kernels round differently for tensors at an unaligned address, and from_pretrained leaves its
        tensors at the safetensors file's offsets."""
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            tensor.data = tensor.data.clone()
        with torch.no_grad():
            torch.manual_seed(2)
            return _logits(self.model, ids)


def reference(folder: Path, ids: torch.Tensor, dtype: torch.dtype) -> Reference:
    """from_pretrained's model and logits (Skip when from_pretrained or its forward fails, or is random)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as exc:
        raise Skip(f"from_pretrained itself fails: {first_line(exc)}") from None
    with torch.no_grad():
        try:
            torch.manual_seed(2)
            expected = _logits(model, ids)
        except Exception as exc:
            raise Skip(f"needs inputs other than token ids or fails on them: {first_line(exc)}") from None
        torch.manual_seed(2)
        if not torch.equal(expected, _logits(model, ids)):
            raise Skip("forward is not deterministic: two runs of the from_pretrained model differ")
    return Reference(model, expected)


def hpcllm_difference(converted: Path, ids: torch.Tensor, dtype: torch.dtype, expected: Reference) -> str | None:
    """None when hpcllm.load_model's model gives from_pretrained's logits bit for bit, "realigned" when it gives
    them only once from_pretrained's tensors are copied to fresh memory; else what differs."""
    from hpcllm.store.loader import load_model

    loaded = load_model(converted, dtype=dtype, tokenizer=False, verify=True)
    with torch.no_grad():
        torch.manual_seed(2)
        got = _logits(loaded.model, ids)
    want = expected.logits
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{dtype}: logits {got.dtype} {tuple(got.shape)} vs from_pretrained {want.dtype} {tuple(want.shape)}"
    if torch.equal(got, want):
        return None
    if torch.equal(got, expected.realigned_logits(ids)):
        return "realigned"
    return f"{dtype}: logits differ by up to {(got.float() - want.float()).abs().max().item():.3g}"


def sweep(root: Path, model_types: list[str] | None = None, dtypes=(torch.float32, torch.bfloat16),
          progress: bool = False) -> SweepResult:
    from hpcllm.checkpoint.converter import convert

    result = SweepResult(identical={str(d).removeprefix("torch."): [] for d in dtypes})
    started = time.perf_counter()
    done = 0
    for model_type in model_types or causal_lm_types():
        if progress:
            print(f"{time.perf_counter() - started:6.1f} s  {model_type}", file=sys.stderr, flush=True)
        folder, converted = root / model_type / "hf", root / model_type / "converted"
        try:
            with _quiet():
                ids = build_reference(model_type, folder)
                expected = {dtype: reference(folder, ids, dtype) for dtype in dtypes}
                convert(folder, converted, progress=False)
                for dtype in dtypes:
                    problem = hpcllm_difference(converted, ids, dtype, expected[dtype])
                    if problem == "realigned":
                        result.realigned.append(f"{model_type} ({str(dtype).removeprefix('torch.')})")
                        problem = None
                    if problem is not None:
                        result.failed[model_type] = problem
                        break
                    result.identical[str(dtype).removeprefix("torch.")].append(model_type)
        except Skip as skip:
            result.skipped[model_type] = str(skip)
        except Exception as exc:
            result.failed[model_type] = f"{type(exc).__name__}: {first_line(exc)}"
        finally:
            shutil.rmtree(root / model_type, ignore_errors=True)
            done += 1
            if done % GC_EVERY == 0:  # a full collection costs ~0.5 s with transformers' modules loaded
                gc.collect()
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _quiet():
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    hpcllm_level = logging.getLogger("hpcllm").level
    logging.getLogger("hpcllm").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation (30x slower under load)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        logging.getLogger("hpcllm").setLevel(hpcllm_level)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outcome = sweep(Path(tmp), sys.argv[1:] or None, progress=True)
    print(outcome.summary())
