"""A model's context length (max_model_len): derived from its config.json once, by one rule, for every part.

`hpcllm deploy` (the controller), the gateway (its context checks and default max_tokens) and the worker (its
engine) all call `max_model_len_for`, so the three can never disagree about how long a request may be. The rule
is vLLM's (`_get_and_verify_max_len` in vllm/config/model.py), so a model gets here the context length it gets
there:

- the smallest of the position keys below that config.json sets; `model_max_length` in config.json (Command-R,
  Cohere) wins over the others;
- capped by `model_max_length` in tokenizer_config.json (tokenizers without one report 1e30: no cap);
- RoPE scaling (`rope_scaling`, or transformers 5's `rope_parameters`, possibly one per layer type) multiplies it
  by `factor`; YaRN scales `original_max_position_embeddings` instead; `llama3`, `longrope` and `su` configs already
  give the extended length in max_position_embeddings, and Gemma 3's is already scaled, so those are not multiplied;
- a sliding window does not shorten it: the transformers models the worker runs keep their sliding-window attention,
  which attends to the last `sliding_window` tokens at any length (vLLM caps at the window only when it is told to
  disable sliding windows);
- a LongRoPE model (Phi-3 128k) may be deployed up to the scaled length but gets `original_max_position_embeddings`
  by default, as in vLLM (short prompts are served better with the original scaling).

A multimodal config's text model (`text_config`) is the one that decides. A config.json that sets none of the
position keys gets them as transformers sets them (its config class's defaults, e.g. LlamaConfig's 2048): the model
from_pretrained builds has them, and the worker's engine and vLLM read that model's config. Otherwise only json is
read here, so the gateway and the controller call it cheaply: transformers (and torch) are imported for such a config
only, which costs the controller or node agent some seconds and a few hundred MB, once per process; a config
transformers cannot build is a ContextLengthError.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcllm.checkpoint.errors import CheckpointError

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Where config.json files of the various families keep their number of positions (vLLM's list, same order).
POSITION_KEYS = (
    "max_position_embeddings",  # Llama, Mistral, Qwen, OPT, most
    "n_positions",  # GPT-2
    "max_seq_len",  # MPT
    "seq_length",  # ChatGLM
    "model_max_length",  # Command-R
    "max_target_positions",  # Whisper
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE types whose config already states the extended length in max_position_embeddings.
_ROPE_TYPES_ALREADY_EXTENDED = ("su", "longrope", "llama3")


class ContextLengthError(CheckpointError):
    """A model's context length cannot be derived, or a deployment asks for more than the model has."""

    exit_code = 2


@dataclass(frozen=True)
class ContextWindow:
    """What a model's config says about its context length."""

    limit: int  # the largest max_model_len it may be served with
    default: int  # what it is served with when max_model_len is not given
    derived_from: str  # where `limit` comes from, e.g. "max_position_embeddings=512", for messages
    # config.json's own model_max_length: vLLM lets a deployment go up to it even above `limit`.
    model_max_length: int | None = None


def context_window(config: Mapping[str, Any], tokenizer_max_length: int | None = None) -> ContextWindow | None:
    """The model's context window from its config (a config.json dict), or None when the config names no length."""
    config, filled, model_type = _as_transformers_builds(config)
    derived: float = float("inf")
    derived_key = derived_from = ""  # the winning key of config.json ("" for the tokenizer's), its description
    for key in POSITION_KEYS:
        value = _positive_int(config.get(key))
        if value is not None and value < derived:
            derived, derived_key, derived_from = value, key, f"{key}={value}"
    model_max_length = _positive_int(config.get("model_max_length"))
    if model_max_length is not None:
        derived, derived_key = model_max_length, "model_max_length"
        derived_from = f"model_max_length={model_max_length}"
    tokenizer_max_length = _positive_int(tokenizer_max_length)
    if tokenizer_max_length is not None and tokenizer_max_length < derived:
        derived, derived_key = tokenizer_max_length, ""
        derived_from = f"{TOKENIZER_CONFIG_FILE} model_max_length={tokenizer_max_length}"
    if derived == float("inf"):
        return None
    if derived_key in filled:
        derived_from = f"transformers' default {derived_from} for {model_type}, which is not set"
    limit, derived_from, longrope = _rope_scaled(config, int(derived), derived_from)
    default = limit
    if longrope:
        default = min(limit, _positive_int(config.get("original_max_position_embeddings")) or limit)
    return ContextWindow(limit=limit, default=default, derived_from=derived_from, model_max_length=model_max_length)


def max_model_len_for(config: Mapping[str, Any], requested: int | None = None, *,
                      tokenizer_max_length: int | None = None, where: str = "the model's config") -> int:
    """The max_model_len to serve with: `requested` if the model supports it, else its own when requested is None.

    Raises ContextLengthError naming both numbers when `requested` is larger than the model's context length, and
    when the config names no length and none is requested. `where` says which config, for the messages."""
    window = context_window(config, tokenizer_max_length)
    if window is None:
        if requested is not None:
            return requested  # nothing to check against: the deployment's word is all there is (as in vLLM)
        raise ContextLengthError(
            f"{where} does not give the model's context length (none of {', '.join(POSITION_KEYS)}): "
            f"set max_model_len")
    if requested is None:
        return window.default
    if requested > window.limit and (window.model_max_length is None or requested > window.model_max_length):
        raise ContextLengthError(
            f"max_model_len = {requested} is more than the model's context length of {window.limit} tokens "
            f"({window.derived_from} in {where}): set max_model_len to at most {window.limit}, or leave it out "
            f"to use {window.default}")
    return requested


def read_source_config(source: Path) -> tuple[dict, int | None]:
    """config.json of a checkpoint folder (converted or Hugging Face) and its tokenizer's model_max_length."""
    config = _read_json(Path(source) / CONFIG_FILE, required=True)
    tokenizer_config = _read_json(Path(source) / TOKENIZER_CONFIG_FILE, required=False) or {}
    return config, _positive_int(tokenizer_config.get("model_max_length"))


def source_max_model_len(source: Path, requested: int | None = None) -> int:
    """max_model_len_for the checkpoint folder `source` (reads its config.json and tokenizer_config.json)."""
    config, tokenizer_max_length = read_source_config(source)
    return max_model_len_for(config, requested, tokenizer_max_length=tokenizer_max_length,
                             where=str(Path(source) / CONFIG_FILE))


# --------------------------------------------------------------------------------------------------- details


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def _as_transformers_builds(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], frozenset[str], str]:
    """(the text model's config, the position keys transformers filled in, the model_type they come from).

    A config.json whose text model sets no position key is read as from_pretrained builds it (its config class for
    the model_type, with that class's defaults, also for a multimodal config's text_config): the config the worker's
    engine and vLLM read. Any other, and one of a model_type transformers does not know (remote code), as it is."""
    text = _text_config(config)
    model_type = config.get("model_type")
    if any(key in text for key in POSITION_KEYS) or not isinstance(model_type, str):
        return text, frozenset(), ""
    try:
        # Heavy (transformers and torch: seconds, a few hundred MB), so only for such a config, once per process.
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            return text, frozenset(), ""
        built = _text_config(CONFIG_MAPPING[model_type].from_dict(dict(config)).to_dict())
    except Exception as exc:  # noqa: BLE001 - config classes refuse values with errors of many types (strict
        # dataclass validation, ValueError, ZeroDivisionError, ...), a broken install with ImportError: all a bad model
        reason = " ".join(str(exc).split())  # some are several lines
        raise ContextLengthError(
            f"the model's config sets no context length and transformers cannot build its {model_type!r} config for "
            f"the default ({type(exc).__name__}: {reason}): fix the config, or set max_position_embeddings in it"
        ) from None
    return built, frozenset(key for key in POSITION_KEYS if key in built), model_type


def _rope_scaled(config: Mapping[str, Any], length: int, derived_from: str) -> tuple[int, str, bool]:
    """(length after RoPE scaling, its description, whether the model uses LongRoPE)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if not isinstance(rope, Mapping) or "gemma3" in str(config.get("model_type", "")):
        return length, derived_from, False
    # transformers 5 may keep one set of RoPE parameters per layer type ({"full_attention": {...}, ...}).
    per_layer = list(rope.values()) if rope and all(isinstance(v, Mapping) for v in rope.values()) else [rope]
    factor = 1.0
    longrope = False
    for params in per_layer:
        rope_type = params.get("rope_type") or params.get("type") or "default"
        longrope = longrope or rope_type in ("longrope", "su")
        if rope_type in _ROPE_TYPES_ALREADY_EXTENDED:
            continue
        factor = _positive_float(params.get("factor", factor)) or 1.0
        original = _positive_int(params.get("original_max_position_embeddings"))
        if rope_type == "yarn" and original is not None:
            length, derived_from = original, f"original_max_position_embeddings={original}"
    if factor == 1.0:
        return length, derived_from, longrope
    return int(length * factor), f"{derived_from} x rope factor {factor:g}", longrope


def _positive_float(value: Any) -> float | None:
    """A finite positive number, else None (a config's strings, lists, Infinity and NaN are no length or factor)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


# No model has a context of 2**31 tokens; Hugging Face tokenizers write 1e30 for "no limit".
NO_LENGTH_FROM = 2**31


def _positive_int(value: Any) -> int | None:
    number = _positive_float(value)
    return None if number is None or number >= NO_LENGTH_FROM else int(value)


# config.json and tokenizer_config.json are small: a bigger one is not a model's (and is not read into memory).
MAX_CONFIG_BYTES = 16 << 20


def _read_json(path: Path, *, required: bool) -> dict | None:
    try:
        if path.exists() and not path.is_file():  # a FIFO would block the read; a folder or device is no config
            raise ContextLengthError(f"{path} is not a regular file: the model's context length is read from it")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ContextLengthError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a model's config")
        data = json.loads(raw)
    except FileNotFoundError:
        if not required:
            return None
        raise ContextLengthError(
            f"{path} does not exist: the model's context length is read from it (is {path.parent} a checkpoint "
            f"folder, and readable from here?)") from None
    except OSError as exc:
        raise ContextLengthError(f"cannot read {path} for the model's context length: {exc}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ContextLengthError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ContextLengthError(f"{path} does not hold a JSON object")
    return data
