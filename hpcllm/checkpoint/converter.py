"""Convert a Hugging Face model folder into the loading-optimized format.

    convert(hf_dir, out_dir, partitions=None, dtype=None, overwrite=False) -> Checkpoint

score_tokens turns a causal LM into a one-label cross-encoder, score_template stores a score template beside it
(hpcllm.checkpoint.scorehead).

Reads safetensors (single file or sharded with model.safetensors.index.json) or pytorch_model*.bin
(torch.load(weights_only=True, mmap=True)), applies what transformers' from_pretrained does to the tensors (its
renames and weight conversions, see hpcllm.checkpoint.hfload) so the output holds the model's own tensors under
its own names, stores tied / shared tensors once and records the other names as aliases, optionally casts floating tensors (e.g. float32 -> bfloat16), writes balanced partitions through
hpcllm.checkpoint.writer and copies config / tokenizer files. Everything is written into a temporary folder beside
out_dir and renamed into place only when complete and re-validated, so an interrupted run leaves nothing at out_dir.
"""

from __future__ import annotations

import abc
import glob
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hpcllm.checkpoint import hfload
from hpcllm.checkpoint.errors import CheckpointError, InvalidSource, OutputExists, UnsupportedDtype
from hpcllm.checkpoint.heads import SCORE_TEMPLATE_FILE, classifier_architecture
from hpcllm.checkpoint.layout import (
    DEFAULT_CHUNK_SIZE,
    CONVERT_TARGET_DTYPES,
    FLOATING_DTYPES,
    FORMAT_NAME,
    INDEX_FILE,
    MANIFEST_FILE,
    SLICE_HASHES_FILE,
    Checkpoint,
    check_replaceable,
    chunk_size_problem,
    creation_mode,
    dtype_name,
    read_checkpoint,
)
from hpcllm.checkpoint.scorehead import (ScoreHead, check_head_fits, classifier_meta_model, plan_score_head,
                                         read_score_template)
from hpcllm.checkpoint.slicehashes import write_slice_hashes
from hpcllm.checkpoint.writer import (
    TensorSpec,
    assign_partitions,
    describe_side_file,
    finish_partition,
    partition_path,
    write_index,
    write_manifest,
    write_partition,
)
from hpcllm.procs import pid_alive

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Side files are every top-level file except weights in any framework's format (and names our format uses): hub
# repositories ship them side by side (openai-community/gpt2: rust_model.ot, 64.tflite, 64-fp16.tflite, tf_model.h5,
# flax_model.msgpack beside model.safetensors), each as large as the model.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf",
                   ".npz", ".ot", ".tflite", ".mlmodel")
WEIGHT_INDEX_FILES = {SAFETENSORS_INDEX, BIN_INDEX, "tf_model.h5.index.json", "flax_model.msgpack.index.json"}
RESERVED_NAMES = {MANIFEST_FILE, INDEX_FILE}
# Partitions are read in parallel by the loader; two readers saturate the disk here, a few more help on a parallel
# file system. One partition per GiB, at most 8, at least 1.
PARTITION_TARGET_BYTES = 1 << 30
MAX_DEFAULT_PARTITIONS = 8
PROGRESS_MIN_BYTES = 256 << 20
GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # how a Git LFS pointer file starts

# safetensors header dtype -> torch dtype name
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64", "C128": "complex128",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


def convert(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    partitions: int | None = None,
    dtype: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool | None = None,
    score_tokens: tuple[str, ...] = (),
    score_template: str | os.PathLike | None = None,
) -> Checkpoint:
    """Convert hf_dir into out_dir; return the written checkpoint (already validated). score_tokens: the causal LM's
    answer tokens ("no", "yes") its score head is made of; score_template: a score template's file."""
    source_dir = Path(hf_dir).absolute()
    out = Path(out_dir).absolute()
    _check_arguments(source_dir, out, partitions, dtype, chunk_size, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_killed_conversions(out)
        tmp = Path(tempfile.mkdtemp(prefix=_converting_prefix(out, os.getpid()), dir=out.parent))
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        _convert_into(source_dir, tmp, partitions, dtype, chunk_size, progress, tuple(score_tokens),
                      None if score_template is None else Path(score_template))
        write_slice_hashes(tmp, verify=False)  # hashes of the bytes just written, for tensor-parallel ranks
        read_checkpoint(tmp).check_files_present()  # never publish something the reader would reject
        _fsync_dir(tmp)
        _publish(tmp, out, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {source_dir} -> {out} failed: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_checkpoint(out)


def _converting_prefix(out: Path, pid: int) -> str:
    """The temporary folder's name up to mkdtemp's random part: whose conversion it is (pid@host)."""
    return f".{out.name}.converting-{pid}@{socket.gethostname()}."


def _remove_killed_conversions(out: Path) -> None:
    """A SIGKILLed conversion into `out` (OOM, scancel, power loss) leaves its hidden temporary folder, as large as
    the checkpoint, on the shared FS. The next conversion into `out` removes those of this host's dead processes
    (another host's pid means nothing here: that conversion may be running)."""
    ours = re.compile(re.escape(f".{out.name}.converting-") + r"(\d+)" + re.escape(f"@{socket.gethostname()}.")
                      + "[a-z0-9_]+")
    for leftover in out.parent.glob(glob.escape(f".{out.name}.converting-") + "*"):
        killed = ours.fullmatch(leftover.name)
        if killed and not pid_alive(int(killed.group(1))) and leftover.is_dir() and not leftover.is_symlink():
            log.info("removing %s, left by a conversion that was killed", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _check_arguments(source: Path, out: Path, partitions: int | None, dtype: str | None, chunk_size: int,
                     overwrite: bool) -> None:
    if not source.is_dir():
        hfload.refuse_gguf(source)
    if not source.exists():
        raise InvalidSource(f"{source}: no such folder (expected a Hugging Face model folder)")
    if not source.is_dir():
        raise InvalidSource(f"{source}: is not a folder (expected a Hugging Face model folder)")
    if partitions is not None and partitions < 1:
        raise CheckpointError(f"--partitions must be at least 1, got {partitions}")
    if dtype is not None and dtype not in CONVERT_TARGET_DTYPES:
        raise UnsupportedDtype(f"--dtype {dtype!r} is not one of {', '.join(CONVERT_TARGET_DTYPES)}")
    chunk_problem = chunk_size_problem(chunk_size)
    if chunk_problem:
        raise CheckpointError(f"chunk size {chunk_size} {chunk_problem}")
    _refuse_links_leaving(source)  # before any file of it is read (and quoted in an error)
    # The weights are looked for early: a folder holding only GGUF files is refused as such, one with a .gguf beside
    # its safetensors (google/gemma-7b ships one) converts from those.
    find_weight_files(source)
    for path in _side_file_sources(source):  # before the weights are converted, which can take long
        _check_readable(path, "the file")
    real_source, real_out = source.resolve(), out.resolve()
    if real_out == real_source or real_out in real_source.parents or real_source in real_out.parents:
        raise CheckpointError(f"{out}: the output folder must not be the source folder, contain it or lie in it")
    _check_output(out, overwrite)


def _check_output(out: Path, overwrite: bool) -> None:
    """OutputExists unless out is free, or may be replaced and overwrite is given: only an empty folder or one a
    conversion made (hpcllm's manifest and the files it lists) is replaced; anything else may be someone's work."""
    check_replaceable(out, overwrite, lambda entries: _not_of_a_checkpoint(out, entries), OutputExists,
                      "a converted checkpoint")


def _hpcllm_manifest(folder: Path) -> dict | None:
    """The folder's manifest.json if it is one of hpcllm's (read leniently: only its format name is checked)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME else None


def _not_of_a_checkpoint(out: Path, entries: list[Path]) -> str | None:
    manifest = _hpcllm_manifest(out)
    if manifest is None:
        return f"is not a converted checkpoint (it has no hpcllm {MANIFEST_FILE})"
    listed = {MANIFEST_FILE, INDEX_FILE, SLICE_HASHES_FILE}
    for key in ("partitions", "side_files"):
        items = manifest.get(key)
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and isinstance(item.get("file"), str):
                listed.add(item["file"])
    others = sorted(p.name for p in entries if p.name not in listed or p.is_dir() and not p.is_symlink())
    if others:
        return f"holds files that are not part of the checkpoint ({', '.join(others[:3])})"
    return None


def _refuse_links_leaving(source: Path) -> None:
    """Symbolic links in the source folder must stay inside it: a link to another user's file (or to /etc) would
    otherwise be read and published in the checkpoint with the converter's own permissions. A snapshot of the
    Hugging Face hub cache (models--ORG--NAME/snapshots/REV, whose files link to ../../blobs) may also link into
    its own repository's blobs folder."""
    allowed = _link_roots(source)
    for folder, dirs, files in os.walk(source):  # does not descend into linked folders; they are checked here
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() and not any(path.resolve().is_relative_to(root) for root in allowed):
                raise InvalidSource(f"{path} is a symbolic link to {path.resolve()}, outside the source folder "
                                    f"{source}; copy that file into the folder (or convert from a folder without "
                                    f"such links)")


def _link_roots(source: Path) -> list[Path]:
    """Where links in the source folder may point: the folder itself, and for a hub-cache snapshot its
    repository's blobs."""
    real_source = source.resolve()
    roots = [real_source]
    snapshots = real_source.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith(("models--", "datasets--")):
        roots.append(snapshots.parent / "blobs")
    return roots


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; with overwrite, the old one is swapped out and then removed."""
    # mkdtemp made it 0700; others (service accounts, node agents) read checkpoints like any folder of the user's.
    tmp.chmod(creation_mode(directory=True))
    _check_output(out, overwrite)  # again: out may have appeared or changed while converting
    if not (out.exists() or out.is_symlink()):
        _rename_into_place(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    old = trash / "old"
    try:
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another --overwrite conversion swapped it out meanwhile: out is free (or taken)
            _rename_into_place(tmp, out)
            return
        try:
            _rename_into_place(tmp, out)
        except BaseException as exc:
            if not (out.exists() or out.is_symlink()):  # nothing took its place: the old checkpoint goes back
                try:
                    os.rename(old, out)
                except OSError as restore_error:
                    raise CheckpointError(f"{out}: publishing the new checkpoint failed ({exc}) and so did putting "
                                          f"the old one back ({restore_error.strerror or restore_error}); the old "
                                          f"one is kept in {old}: move it back to {out}") from None
            raise
    finally:  # the replaced checkpoint (or, when another conversion's took its place, the one it was to replace);
        # kept while it is the only copy, out being empty
        if out.exists() or out.is_symlink() or not (old.exists() or old.is_symlink()):
            shutil.rmtree(trash, ignore_errors=True)


def _rename_into_place(tmp: Path, out: Path) -> None:
    try:
        os.rename(tmp, out)
    except OSError:
        if out.exists() or out.is_symlink():  # taken since it was checked (rename replaces only an empty folder)
            raise OutputExists(f"{out}: something was put there while converting (another conversion into the "
                               f"same folder?); this conversion was discarded") from None
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------- the conversion


def _convert_into(source_dir: Path, out: Path, partitions: int | None, dtype: str | None, chunk_size: int,
                  progress: bool | None, score_tokens: tuple[str, ...], score_template: Path | None) -> None:
    config = _read_config(source_dir)
    hfload.check_servable(source_dir, config)
    head = plan_score_head(source_dir, config, score_tokens) if score_tokens else None
    template = _score_template(source_dir, config, head, score_template)
    config_updates = head.config_updates(config) if head is not None else {}
    with open_weights(source_dir) as files:
        source, tied_groups = _as_the_model_holds_it(source_dir, config, files)
        source_info = {"path": str(source_dir), "format": files.kind, "files": [p.name for p in files.files]}
        if source.plan.unused:
            source_info["unused_tensors"] = source.plan.unused
        if head is not None:
            source, tied_groups = _with_score_head(source_dir, source, tied_groups, head, config_updates)
            source_info["score_head"] = {"classifier_from_token": list(head.tokens), "method": head.method}
        aliases = find_aliases(source, tied_groups)
        specs = [_target_spec(source.spec(name), dtype) for name in source.names if name not in aliases]
        total = sum(spec.nbytes for spec in specs)
        count = partitions or _default_partitions(total)
        show = progress if progress is not None else (total >= PROGRESS_MIN_BYTES and sys.stderr.isatty())
        entries = []
        written = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {source_dir.name}",
                  disable=not show) as bar:
            for index, group in enumerate(assign_partitions(specs, count)):
                path = partition_path(out, index)
                fetch = _fetcher(source, dtype)
                entries.extend(write_partition(path, group, fetch, index, on_bytes=bar.update).values())
                written.append(finish_partition(path, index, chunk_size))
    side_files = _copy_side_files(source_dir, out, dtype, config_updates)
    if template is not None:  # it replaces a score template the source folder has
        (out / SCORE_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        side_files = [f for f in side_files if f.file != SCORE_TEMPLATE_FILE]
        side_files.append(describe_side_file(out / SCORE_TEMPLATE_FILE))
    index_ref = write_index(out, entries, aliases)
    model = _model_info({**config, **config_updates}, entries, aliases, dtype)
    write_manifest(out, written, index_ref, side_files, model, source_info)


def _score_template(source_dir: Path, config: dict, head: ScoreHead | None, path: Path | None) -> str | None:
    """The score template's text (checked), None when none is given; only a cross-encoder has one."""
    if path is None:
        return None
    if head is None and classifier_architecture(config.get("architectures")) is None:
        raise CheckpointError(f"--score-template is for a cross-encoder, and {source_dir} is a causal LM: give "
                              "--classifier-from-token too (its answer tokens), or convert a "
                              "*ForSequenceClassification")
    return read_score_template(path, source_dir, head.tokenizer if head is not None else None)


def _with_score_head(source_dir: Path, source: "ConvertedSource", tied_groups: list[list[str]], head: ScoreHead,
                     config_updates: dict) -> tuple["ScoreHeadSource", list[list[str]]]:
    """The causal LM's tensors with its LM head replaced by the score head, and the classifier's tie groups."""
    classifier = classifier_meta_model(source_dir, config_updates)
    lm_head, score_name = check_head_fits(source_dir, source.model, classifier, head, source.names)
    # A tied LM head is not among the tensors: its tied embedding holds the same rows.
    stored = lm_head if lm_head in source.names else next(
        name for name in _group_of(lm_head, tied_groups) if name in source.names)
    return ScoreHeadSource(source, head, lm_head, stored, score_name), hfload.tied_name_groups(classifier)


def _as_the_model_holds_it(source_dir: Path, config: dict, files: "WeightSource"):
    """(the tensors to store, tie groups): the model's tensors as from_pretrained would load them."""
    model = hfload.build_meta_model(source_dir)
    plan = hfload.make_plan(model, files.names, files.spec, files.tensor)
    source = ConvertedSource(files, plan, model)
    tied_groups = hfload.tied_name_groups(model)
    tied = {name for group in tied_groups for name in group}
    present = set(source.names)
    lacking = [name for name in plan.missing
               if not (name in tied and any(other in present for other in _group_of(name, tied_groups)))]
    if lacking:
        raise InvalidSource(f"{source_dir}: the weights lack {len(lacking)} tensor(s) that {type(model).__name__} "
                            f"(built from config.json) needs, e.g. {', '.join(lacking[:3])}; the weight files and "
                            f"config.json are of different models")
    if plan.mismatched:
        name, stored, wanted = plan.mismatched[0]
        raise InvalidSource(f"{source_dir}: {len(plan.mismatched)} tensor(s) of the weights do not have the shape "
                            f"that {type(model).__name__} (built from config.json) needs, e.g. {name} is "
                            f"{list(stored)} where the model needs {list(wanted)}; the weight files and config.json "
                            f"are of different models")
    if plan.unused:
        log.warning("%s: %d tensor(s) are not used by %s and are not stored (as from_pretrained drops them), "
                    "e.g. %s", source_dir, len(plan.unused), type(model).__name__, plan.unused[0])
    return source, tied_groups


def _group_of(name: str, groups: list[list[str]]) -> list[str]:
    return next(group for group in groups if name in group)


def _default_partitions(total_bytes: int) -> int:
    return max(1, min(MAX_DEFAULT_PARTITIONS, math.ceil(total_bytes / PARTITION_TARGET_BYTES)))


def _target_spec(spec: TensorSpec, dtype: str | None) -> TensorSpec:
    if dtype is not None and spec.dtype in FLOATING_DTYPES:
        return TensorSpec(spec.name, dtype, spec.shape)
    return spec


def _fetcher(source: "WeightSource", dtype: str | None):
    target = getattr(torch, dtype) if dtype else None

    def fetch(name: str) -> torch.Tensor:
        tensor = source.tensor(name)
        if target is not None and dtype_name(tensor.dtype) in FLOATING_DTYPES:
            tensor = tensor.to(target)
        return tensor

    return fetch


def _read_config(source_dir: Path) -> dict[str, Any]:
    path = source_dir / "config.json"
    if not path.is_file():
        raise InvalidSource(f"{source_dir}: has no config.json; a Hugging Face model folder needs one "
                            f"(save the model with save_pretrained)")
    return _read_json(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidSource(f"{path}: cannot be read as JSON ({exc})") from None


def _model_info(config: dict[str, Any], entries: list, aliases: dict[str, str], dtype: str | None) -> dict:
    float_bytes: dict[str, int] = {}
    for entry in entries:
        if entry.dtype in FLOATING_DTYPES:
            float_bytes[entry.dtype] = float_bytes.get(entry.dtype, 0) + entry.nbytes
    main_dtype = max(float_bytes, key=float_bytes.get) if float_bytes else None
    return {
        "model_type": config.get("model_type") if isinstance(config, dict) else None,
        "architectures": config.get("architectures") if isinstance(config, dict) else None,
        "dtype": dtype or main_dtype,
        "num_tensors": len(entries),
        "num_aliases": len(aliases),
        "tensor_bytes": sum(e.nbytes for e in entries),
        "num_parameters": sum(math.prod(e.shape) for e in entries),
    }


# ------------------------------------------------------------------------------------------------- side files


def _is_weight_file(name: str) -> bool:
    return name in WEIGHT_INDEX_FILES or name.endswith(WEIGHT_SUFFIXES)


def _side_file_sources(source_dir: Path) -> list[Path]:
    """The source folder's files copied into the checkpoint as they are (config.json updated)."""
    return [path for path in sorted(source_dir.iterdir())
            if path.is_file() and not path.name.startswith(".") and not _is_weight_file(path.name)
            and path.name not in RESERVED_NAMES and not (path.name.startswith("data-") and path.name.endswith(".h5"))]


def _copy_side_files(source_dir: Path, out: Path, dtype: str | None, config_updates: dict) -> list:
    side_files = []
    for path in _side_file_sources(source_dir):
        name = path.name
        target = out / name
        if name == "config.json" and (dtype is not None or config_updates):
            _write_config(path, target, dtype, config_updates)
        else:
            shutil.copyfile(path, target)
        side_files.append(describe_side_file(target))
    return side_files


def _write_config(source: Path, target: Path, dtype: str | None, updates: dict) -> None:
    """Copy config.json recording the new dtype (transformers 5 reads "dtype"; older ones "torch_dtype") and the
    updates (a score head's classifier)."""
    config = _read_json(source)
    if not isinstance(config, dict):
        raise InvalidSource(f"{source}: must hold a JSON object")
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
    for key in keys if dtype is not None else ():
        config[key] = dtype
    config.update(updates)
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------- weight sources


class WeightSource(abc.ABC):
    """The tensors of an HF folder, read one at a time (never the whole model in memory at once)."""

    kind = ""

    def __init__(self, files: list[Path]):
        self.files = files
        self.names: list[str] = []

    @abc.abstractmethod
    def spec(self, name: str) -> TensorSpec:
        """Stored dtype and shape, without reading the data."""

    @abc.abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The tensor's data (read now, or mapped)."""

    def storage_key(self, name: str) -> tuple | None:
        """Identity of the memory behind a tensor when the file format can share it (torch.save does)."""
        return None

    def close(self) -> None:
        pass


class SafetensorsSource(WeightSource):
    kind = "safetensors"

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        super().__init__(files)
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, Path] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for bad files
                raise InvalidSource(f"{path}: not a readable safetensors file ({exc})") from None
            for name in handle.keys():
                if name in self._file_of:
                    raise InvalidSource(f"{path}: tensor {name!r} is also in {self._file_of[name].name}")
                self._handles[name] = handle
                self._file_of[name] = path
                self.names.append(name)

    def spec(self, name: str) -> TensorSpec:
        piece = self._handles[name].get_slice(name)
        code = piece.get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise UnsupportedDtype(f"{self._file_of[name]}: tensor {name!r} has dtype {code}, which the hpcllm "
                                   f"format cannot store")
        return TensorSpec(name, SAFETENSORS_DTYPES[code], tuple(piece.get_shape()))

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handles[name].get_tensor(name)
        except Exception as exc:
            raise InvalidSource(f"{self._file_of[name]}: cannot read tensor {name!r} ({exc})") from None

    def close(self) -> None:
        self._handles = {}  # dropping the handles closes the files


class TorchBinSource(WeightSource):
    kind = "pytorch_bin"

    def __init__(self, files: list[Path]):
        super().__init__(files)
        self._tensors: dict[str, torch.Tensor] = {}
        self._file_of: dict[str, Path] = {}
        for path in files:
            state = _torch_load(path)
            for name, value in state.items():
                if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                    raise InvalidSource(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; expected "
                                        f"a state_dict of tensors")
                if name in self._file_of:
                    raise InvalidSource(f"{path}: tensor {name!r} is also in {self._file_of[name].name}")
                self._tensors[name] = value
                self._file_of[name] = path
                self.names.append(name)
        for name in self.names:
            dtype_name_for(self._tensors[name], self._file_of[name], name)

    def spec(self, name: str) -> TensorSpec:
        tensor = self._tensors[name]
        return TensorSpec(name, dtype_name_for(tensor, self._file_of[name], name), tuple(tensor.shape))

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def storage_key(self, name: str) -> tuple | None:
        tensor = self._tensors[name]
        if tensor.numel() == 0:  # empty tensors may all report data_ptr 0
            return None
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype)

    def close(self) -> None:
        self._tensors = {}


class ConvertedSource(WeightSource):
    """The model's tensors under the model's names: the checkpoint's tensors passed through transformers'
    conversion plan (hfload). A rename reads its checkpoint tensor directly; a converted group is computed when one
    of its outputs is read, and its other outputs are kept only until the next group is computed."""

    def __init__(self, files: WeightSource, plan: "hfload.Plan", model):
        super().__init__(files.files)
        self.kind = files.kind
        self.plan = plan
        self._files = files
        self._model = model
        self._group_of = plan.outputs()
        self.names = list(self._group_of)
        self._last_group: hfload.Group | None = None
        self._last_outputs: dict[str, torch.Tensor] = {}

    def spec(self, name: str) -> TensorSpec:
        return self._group_of[name].outputs[name]

    def tensor(self, name: str) -> torch.Tensor:
        group = self._group_of[name]
        if group.is_rename:
            return self._files.tensor(group.sources[0][1])
        if group is not self._last_group or name not in self._last_outputs:
            self._last_group, self._last_outputs = None, {}  # free the previous group first
            self._last_outputs = group.run(self._files.tensor, self._model)
            self._last_group = group
        return self._last_outputs[name]

    @property
    def model(self):
        """The (meta) model the tensors are of."""
        return self._model

    def storage_key(self, name: str) -> tuple | None:
        group = self._group_of[name]
        return self._files.storage_key(group.sources[0][1]) if group.is_rename else None


class ScoreHeadSource(WeightSource):
    """A causal LM's tensors with its LM head (lm_head; its rows read from `stored`, itself or its tied embedding)
    replaced by the score head made of the answer tokens' rows (hpcllm.checkpoint.scorehead)."""

    def __init__(self, lm: ConvertedSource, head: ScoreHead, lm_head: str, stored: str, score_name: str):
        super().__init__(lm.files)
        self.kind = lm.kind
        self._lm, self._head, self._stored, self._score = lm, head, stored, score_name
        self.names = [name for name in lm.names if name != lm_head] + [score_name]

    def spec(self, name: str) -> TensorSpec:
        if name != self._score:
            return self._lm.spec(name)
        rows = self._lm.spec(self._stored)
        return TensorSpec(name, rows.dtype, (1, rows.shape[1]))

    def tensor(self, name: str) -> torch.Tensor:
        return self._head.row(self._lm.tensor(self._stored)) if name == self._score else self._lm.tensor(name)

    def storage_key(self, name: str) -> tuple | None:
        return None if name == self._score else self._lm.storage_key(name)


def dtype_name_for(tensor: torch.Tensor, path: Path, name: str) -> str:
    try:
        return dtype_name(tensor.dtype)
    except UnsupportedDtype:
        raise UnsupportedDtype(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which the hpcllm format cannot "
                               f"store") from None


def _torch_load(path: Path) -> dict:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (pre-zipfile) files cannot be mmapped: read them normally
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...) for bad files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidSource(f"{path}: cannot be loaded as a PyTorch state_dict ({first_line})") from None
    if not isinstance(state, dict):
        raise InvalidSource(f"{path}: holds a {type(state).__name__}, expected a state_dict (dict of tensors)")
    return state


def find_weight_files(source_dir: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'pytorch_bin', files) for an HF folder; InvalidSource when it holds no weights."""
    for index_name, kind in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "pytorch_bin")):
        index_path = source_dir / index_name
        if index_path.is_file():
            return kind, _shards_from_index(index_path)
    if (source_dir / "model.safetensors").is_file():
        return "safetensors", [source_dir / "model.safetensors"]
    safetensors_files = sorted(source_dir.glob("*.safetensors"))
    if safetensors_files:
        return "safetensors", safetensors_files
    bin_files = sorted(source_dir.glob("pytorch_model*.bin"))
    if bin_files:
        return "pytorch_bin", bin_files
    hfload.refuse_gguf(source_dir)
    converted = _hpcllm_manifest(source_dir)
    if converted is not None:  # e.g. given to convert again for another --dtype
        origin = converted.get("source", {}).get("path") if isinstance(converted.get("source"), dict) else None
        raise InvalidSource(f"{source_dir}: is a converted hpcllm checkpoint already, not a Hugging Face model "
                            f"folder; convert the Hugging Face folder it was made from ({origin or 'not recorded'})")
    raise InvalidSource(f"{source_dir}: has no weights (expected model.safetensors, sharded *.safetensors with "
                        f"{SAFETENSORS_INDEX}, or pytorch_model*.bin){_hub_cache_hint(source_dir)}")


def _hub_cache_hint(source_dir: Path) -> str:
    """For a Hugging Face hub cache repository (models--ORG--NAME), given where one of its snapshots belongs."""
    snapshots = source_dir / "snapshots"
    if not snapshots.is_dir():
        return ""
    try:
        revision = (source_dir / "refs" / "main").read_text().strip()
    except OSError:
        revision = ""
    snapshot = snapshots / revision if revision and (snapshots / revision).is_dir() else snapshots / "REVISION"
    return f"; it is a Hugging Face hub cache folder: convert one of its snapshots, e.g. {snapshot}"


def _shards_from_index(index_path: Path) -> list[Path]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidSource(f"{index_path}: needs a non-empty 'weight_map' of tensor name -> shard file")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard = index_path.parent / name
        if Path(name).name != name or not shard.is_file():
            raise InvalidSource(f"{index_path}: lists shard {name!r}, which is missing from {index_path.parent}")
        shards.append(shard)
    return shards


def _check_readable(path: Path, what: str = "the weights") -> None:
    """Open the file first: safetensors reports any file it cannot open as "No such file or directory". A Git LFS
    pointer (a clone made without git-lfs) is said to be one: safetensors calls it a header too large, torch.load
    suggests loading it with weights_only=False, and a tokenizer copied as one fails only when served."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(GIT_LFS_POINTER))
    except OSError as exc:
        hint = "; let the user running hpcllm read it" if isinstance(exc, PermissionError) else ""
        raise InvalidSource(f"{path}: is not readable ({exc.strerror or exc}){hint}") from None
    if start == GIT_LFS_POINTER:
        raise InvalidSource(f"{path}: is a Git LFS pointer, not {what} (the repository was cloned without "
                            f"git-lfs): fetch them with `git lfs pull` in the clone, or download the model with "
                            f"`huggingface-cli download`")


@contextmanager
def open_weights(source_dir: Path) -> Iterator[WeightSource]:
    kind, files = find_weight_files(source_dir)
    for path in files:
        _check_readable(path)
    source = SafetensorsSource(files) if kind == "safetensors" else TorchBinSource(files)
    try:
        if not source.names:
            raise InvalidSource(f"{source_dir}: the weight files ({', '.join(p.name for p in files)}) hold no tensors")
        yield source
    finally:
        source.close()


# ------------------------------------------------------------------------------------------------- tied tensors


def find_aliases(source: WeightSource, tied_groups: list[list[str]]) -> dict[str, str]:
    """alias name -> stored name, for tensors stored once.

    1. .bin files: names whose tensors share the same memory (same storage, offset, shape, stride, dtype).
    2. transformers' tied parameters: a tied name absent from the files becomes an alias of the present one, and a
       present one with byte-identical contents is stored once.
    """
    present = set(source.names)
    aliases: dict[str, str] = {}
    first_with_key: dict[tuple, str] = {}
    for name in source.names:
        key = source.storage_key(name)
        if key is None:
            continue
        if key in first_with_key:
            aliases[name] = first_with_key[key]
        else:
            first_with_key[key] = name
    for group in tied_groups:
        in_files = [name for name in group if name in present]
        if not in_files:
            continue
        canonical = aliases.get(in_files[0], in_files[0])
        for name in group:
            if name == canonical or name in aliases:
                continue
            if name not in present or _same_contents(source, canonical, name):
                aliases[name] = canonical
    return aliases


def _same_contents(source: WeightSource, a: str, b: str) -> bool:
    if source.spec(a).dtype != source.spec(b).dtype or source.spec(a).shape != source.spec(b).shape:
        return False
    left, right = source.tensor(a).contiguous(), source.tensor(b).contiguous()
    return torch.equal(left.reshape(-1).view(torch.uint8), right.reshape(-1).view(torch.uint8))
