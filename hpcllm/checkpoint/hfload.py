"""What transformers' from_pretrained does to a checkpoint's tensors, replayed tensor by tensor for the converter.

Many architectures save tensors under names other than their modules' (legacy names such as LayerNorm.gamma,
per-expert MoE weights that the model holds merged, fused or permuted projections...). from_pretrained fixes that
while loading, with the installed transformers' own conversion mapping (`get_model_conversion_mapping`: its
WeightRenaming / WeightConverter transforms, per model class and model_type, plus the legacy renames). The converter
applies exactly that mapping, through transformers' own functions (`rename_source_key`, each transform's `convert`
and its ConversionOps), so a converted checkpoint holds the tensors from_pretrained would put into the model,
under the model's own names. No rename is listed here.

Memory stays bounded: the plan is made from names and shapes only (a WeightConverter's outputs are computed on the
meta device), and the data of one conversion group (e.g. the experts of one layer's projection) is materialised
only while it is written.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hpcllm.checkpoint.errors import InvalidSource, UnsupportedSource
from hpcllm.checkpoint.heads import auto_model_class
from hpcllm.checkpoint.layout import dtype_name
from hpcllm.checkpoint.writer import TensorSpec

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- what we refuse


def check_servable(source_dir: Path, config: dict[str, Any]) -> None:
    """UnsupportedSource for a model hpcllm cannot serve yet, before any tensor is read."""
    if not isinstance(config, dict):
        raise InvalidSource(f"{source_dir / 'config.json'}: must hold a JSON object")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise UnsupportedSource(f"{source_dir}: config.json has a quantization_config (quant_method {method}); "
                                f"hpcllm serves unquantized weights only: convert the original (unquantized) "
                                f"checkpoint, optionally with --dtype bfloat16")
    model_type = config.get("model_type")
    if model_type is None:  # transformers (so every loader) cannot build a model without it
        raise InvalidSource(f"{source_dir / 'config.json'}: has no \"model_type\"; add the architecture's "
                            f"transformers name (e.g. \"model_type\": \"llama\"), as in the model's original "
                            f"config.json")
    if config.get("auto_map") and not _transformers_knows(model_type):
        raise UnsupportedSource(f"{source_dir}: config.json's auto_map asks for the model's own Python code "
                                f"(trust_remote_code) and transformers has no built-in class for model_type "
                                f"{model_type!r}; hpcllm does not run remote code: use a checkpoint of an "
                                f"architecture transformers implements")
    if not _transformers_knows(model_type):
        import transformers

        raise UnsupportedSource(f"{source_dir}: model_type {model_type!r} in config.json is unknown to the "
                                f"installed transformers {transformers.__version__}")


def refuse_gguf(source: Path) -> None:
    """A .gguf file, or a folder holding GGUF files (quantized llama.cpp checkpoints), called for one where no other
    weights were found: say so instead of 'not a folder' or 'has no weights'."""
    if source.suffix == ".gguf" and source.is_file() or source.is_dir() and any(source.glob("*.gguf")):
        source_dir = source
        raise UnsupportedSource(f"{source_dir}: GGUF (llama.cpp) weights cannot be converted; hpcllm needs the "
                                f"original Hugging Face checkpoint (config.json with model.safetensors or "
                                f"pytorch_model.bin)")


def _transformers_knows(model_type: Any) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


# ------------------------------------------------------------------------------------------------- the model


def build_meta_model(source_dir: Path):
    """The model hpcllm.load_model builds for this folder (auto_model_class's, else the base model class), on the
    meta device and uninitialised: milliseconds, no memory."""
    import transformers
    from transformers import AutoConfig, AutoModel
    from transformers.initialization import no_init_weights

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            config = AutoConfig.from_pretrained(source_dir, local_files_only=True)
        except Exception as exc:  # transformers raises ValueError, KeyError, OSError... for configs it cannot read
            raise UnsupportedSource(f"{source_dir / 'config.json'}: transformers {transformers.__version__} cannot "
                                    f"read it ({_first_line(exc)})") from None
        with torch.device("meta"), no_init_weights():
            try:
                return auto_model_class(config).from_config(config)
            except ValueError:  # not a causal LM (e.g. an encoder): the plain model class
                return AutoModel.from_config(config)
    except UnsupportedSource:
        raise
    except Exception as exc:
        raise UnsupportedSource(f"{source_dir}: transformers {transformers.__version__} cannot build the model "
                                f"config.json describes ({_first_line(exc)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def tied_name_groups(model) -> list[list[str]]:
    """Groups of parameter names tied together (e.g. [model.embed_tokens.weight, lm_head.weight]): the names of
    one Parameter object, joined with transformers' own {target: source} tie mapping."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    group_of = {name: names for names in groups.values() for name in names}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        left, right = group_of.get(source), group_of.get(target)
        if left is None or right is None or left is right:
            continue
        left.extend(right)
        for name in right:
            group_of[name] = left
    unique = {id(names): names for names in group_of.values()}
    return [names for names in unique.values() if len(names) > 1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------- the plan


@dataclass
class Group:
    """One unit of from_pretrained's loading: a transform, the checkpoint tensors it takes and the model tensors
    it produces. A plain rename has one source and one output."""

    transform: Any  # a WeightRenaming or WeightConverter with nothing collected yet
    first_target: str
    sources: list[tuple[str, str, str]] = field(default_factory=list)  # (renamed key, checkpoint key, pattern)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)

    @property
    def is_rename(self) -> bool:
        from transformers.core_model_loading import WeightConverter

        return not isinstance(self.transform, WeightConverter)

    def run(self, read: Callable[[str], torch.Tensor], model) -> dict[str, torch.Tensor]:
        """The group's model tensors, computed by the transform from `read(checkpoint key)`."""
        if self.is_rename:  # WeightRenaming.convert hands over its first source tensor unchanged
            return {self.first_target: read(self.sources[0][1])}
        transform = copy.deepcopy(self.transform)
        for renamed, key, pattern in self.sources:
            transform.add_tensor(renamed, key, pattern, lambda key=key: read(key))  # called when converting
        try:
            produced = transform.convert(self.first_target, model=model, config=model.config)
        except Exception as exc:  # an op's own error (a shape that does not fit, ...)
            raise InvalidSource(f"transformers' conversion {type(transform).__name__}"
                                f"({transform.source_patterns} -> {transform.target_patterns}) failed on "
                                f"{[key for _, key, _ in self.sources][:4]}: {_first_line(exc)}") from None
        return {name: (value[0] if isinstance(value, list) else value) for name, value in produced.items()}


@dataclass
class Plan:
    groups: list[Group]
    unused: list[str]  # checkpoint tensors the model does not take (from_pretrained drops them too)
    missing: list[str]  # model parameters nothing produces (before ties)
    # (name, checkpoint's shape, the model's shape) of tensors whose shapes differ: from_pretrained refuses those
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def outputs(self) -> dict[str, Group]:
        return {name: group for group in self.groups for name in group.outputs}


def make_plan(model, names: list[str], spec_of: Callable[[str], TensorSpec],
              read: Callable[[str], torch.Tensor]) -> Plan:
    """Group the checkpoint's tensors the way convert_and_load_state_dict_in_model does, and work out every output's
    name, dtype and shape (on the meta device; with the real data only if an op cannot run on meta)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    expected = model.state_dict()
    prefix = model.base_model_prefix

    groups: dict[str, Group] = {}
    unused: list[str] = []
    for key in sorted(names, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:  # as from_pretrained: keep a name the model already has
            renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        if renamed not in expected:
            unused.append(key)
            continue
        group = groups.get(renamed)
        if group is None:
            transform = copy.deepcopy(by_pattern[pattern]) if pattern is not None else WeightRenaming(key, renamed)
            group = groups[renamed] = Group(transform, renamed)
        group.sources.append((renamed, key, pattern if pattern is not None else key))

    for group in groups.values():
        _plan_outputs(group, model, expected, spec_of, read)
    produced = {name for group in groups.values() for name in group.outputs}
    missing = [name for name, _ in model.named_parameters() if name not in produced]
    for group in groups.values():
        dropped = [name for name in group.outputs if name not in expected]
        for name in dropped:
            del group.outputs[name]
    mismatched = [(name, spec.shape, tuple(expected[name].shape))
                  for group in groups.values() for name, spec in group.outputs.items()
                  if tuple(spec.shape) != tuple(expected[name].shape)]
    return Plan([g for g in groups.values() if g.outputs], unused, missing, mismatched)


def _plan_outputs(group: Group, model, expected, spec_of, read) -> None:
    if group.is_rename:
        spec = spec_of(group.sources[0][1])
        group.outputs[group.first_target] = TensorSpec(group.first_target, spec.dtype, spec.shape)
        return

    def on_meta(key: str) -> torch.Tensor:
        spec = spec_of(key)
        return torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device="meta")

    try:
        produced = group.run(on_meta, model)
    except InvalidSource:  # an op that needs real data (rare): convert this one group now, then drop it
        produced = group.run(read, model)
    for name, tensor in produced.items():
        group.outputs[name] = TensorSpec(name, dtype_name(tensor.dtype), tuple(tensor.shape))
    log.debug("%s <- %d checkpoint tensors via %s", list(produced), len(group.sources), group.transform)
