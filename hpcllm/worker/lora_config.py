"""A PEFT LoRA adapter folder's config, read without torch: the worker's adapters (lora.py) and the controller's
deploy check (a model's lora_adapters) refuse the same adapters with the same reasons."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from hpcllm.config import MODEL_NAME_PATTERN

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Config keys whose non-default value changes what the adapter computes beyond scale * B @ A.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA (use_dora = true)"),
    "fan_in_fan_out": (False, "fan_in_fan_out = true (GPT-2 style Conv1D layers)"),
    "bias": ("none", "trained biases (bias other than \"none\")"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules)"),
    "rank_pattern": ({}, "per-layer ranks (rank_pattern)"),
    "alpha_pattern": ({}, "per-layer alphas (alpha_pattern)"),
}


class AdapterError(ValueError):
    """An adapter that cannot be served (make_runner's refusals are ValueErrors too: the worker does not start)."""


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora


def check_adapter_names(adapters: dict[str, str]) -> None:
    for name in adapters:
        if not re.match(MODEL_NAME_PATTERN, name):
            raise AdapterError(f"LoRA adapter name {name!r} is not a valid model name (letters, digits, '.', '_', "
                               f"'-', as model names)")


def read_adapter_config(name: str, folder: str | Path) -> AdapterConfig:
    """The adapter's rank and scale; AdapterError saying what is wrong when the folder is not a PEFT LoRA adapter
    that can be served."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    for path in (config_path, folder / ADAPTER_WEIGHTS):
        if not path.is_file():
            raise AdapterError(f"LoRA adapter {name!r}: {path} does not exist (a PEFT adapter folder holds "
                               f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"LoRA adapter {name!r}: {config_path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"LoRA adapter {name!r}: {config_path} is not a LoRA adapter's config (peft_type LORA)")
    for key, (default, what) in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, [], {}):
            raise AdapterError(f"LoRA adapter {name!r}: {what} is not supported; merge it into the base model or "
                               "retrain without it")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"LoRA adapter {name!r}: {ADAPTER_CONFIG} needs r (a positive integer) and lora_alpha")
    return AdapterConfig(rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)
