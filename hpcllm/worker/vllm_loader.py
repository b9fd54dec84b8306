"""vLLM model-loader plugin: vLLM reads a converted checkpoint's weights through hpcllm's tiered store.

vLLM builds the model; the weights come from `hpcllm.load_model` (tier detected from where the path lives, chunk
checksums verified as the tier says, the buffer pool reused) and go in through the model's own
`load_weights(iter of (hf_name, tensor))`, which maps Hugging Face names onto vLLM's fused parameters.

vLLM loads the model in its engine-core process, not in the process that built the engine, so the load format
must be registered there too: pyproject.toml ships `register` as a `vllm.general_plugins` entry point, which vLLM
calls in every process it starts. Select it with `load_format="hpcllm"`; `model_loader_extra_config` may carry
`stats_file`, a path where the load's LoadStats are written as JSON (the worker reports tier and seconds from it),
or, when hpcllm refuses the checkpoint (a checksum mismatch, a missing file), `{"error": {module, type, message}}`:
vLLM's engine-core process only reports "initialization failed", so the worker re-raises hpcllm's own error from
it, with its message and exit status (the node agent refills a corrupt cached copy on ChecksumMismatch's).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

LOAD_FORMAT = "hpcllm"
STATS_FILE_KEY = "stats_file"

log = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """Register the "hpcllm" load format with vLLM (idempotent; vLLM calls this through the entry point)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(_loader_class())
    _registered = True


def _loader_class():
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class HpcllmModelLoader(BaseModelLoader):
        """Weights from a converted hpcllm checkpoint (the model folder vLLM was given)."""

        def download_model(self, model_config) -> None:
            """Nothing to download: the checkpoint is a local folder (node cache tier or shared filesystem)."""

        def load_weights(self, model, model_config) -> None:
            import torch

            import hpcllm
            from hpcllm.errors import HpcllmError

            extra_config = self.load_config.model_loader_extra_config or {}
            try:
                with torch.device("cpu"):  # vLLM loads under its target device; hpcllm's loader places by itself
                    loaded = hpcllm.load_model(model_config.model, device="cpu", dtype=model_config.dtype,
                                               tokenizer=False)
            except HpcllmError as exc:
                kind = type(exc)
                _write_stats(extra_config, {"error": {"module": kind.__module__, "type": kind.__name__,
                                                      "message": str(exc)}})
                raise
            try:
                # Tied embeddings share one tensor under two names; vLLM's load_weights skips what it ties itself.
                weights = loaded.model.state_dict(keep_vars=False)
                model.load_weights(weights.items())
            finally:
                loaded.release()  # vLLM copied the values into its own parameters
            _write_stats(extra_config, loaded.stats.as_dict())

    return HpcllmModelLoader


def load_error(stats: dict) -> Exception | None:
    """The hpcllm error the plugin reported in the stats file, rebuilt (None if there is none)."""
    import importlib

    from hpcllm.errors import HpcllmError

    error = stats.get("error")
    if not error:
        return None
    try:
        kind = getattr(importlib.import_module(error["module"]), error["type"])
    except (ImportError, AttributeError, KeyError):
        kind = None
    if not (isinstance(kind, type) and issubclass(kind, HpcllmError)):
        return HpcllmError(error.get("message", "loading the weights failed"))
    return kind(error["message"])


def _write_stats(extra_config: dict, stats: dict) -> None:
    path = extra_config.get(STATS_FILE_KEY)
    if not path:
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)
