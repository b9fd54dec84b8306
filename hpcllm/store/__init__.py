"""Tiered checkpoint store and the pipelined loader (see docs/loader.md).

    from hpcllm.store import load_model, DramTier
    model, tokenizer, stats = load_model("/var/tmp/hpcllm/nvme/llama", device="cpu")
    tier = DramTier("default"); tier.put(converted_dir, "llama"); load_model(tier.open("llama"))

Importing this package does not import torch or transformers (load_model does, on first use).
"""

from hpcllm.store.dram import DramEntry, DramTier, DramTierError
from hpcllm.store.loader import DeviceSpecError, LoadedModel, LoadStats, load_model
from hpcllm.store.memory import HostBufferPool, default_pool
from hpcllm.store.tiers import TIERS, TierSettings, detect_tier

__all__ = ["DramEntry", "DramTier", "DramTierError", "DeviceSpecError", "LoadedModel", "LoadStats", "load_model",
           "HostBufferPool", "default_pool", "TIERS", "TierSettings", "detect_tier"]
