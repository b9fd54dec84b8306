"""Property tests: whatever is in manifest.json, index.json or the data files, the reader raises only CheckpointError.

A loader trusts what read_checkpoint returns, so a damaged or hostile checkpoint must never surface as a KeyError,
TypeError, ValueError or OverflowError, and an undamaged one must still pass.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcllm.checkpoint import CheckpointError, ChecksumMismatch, InvalidManifest, TruncatedFile, read_checkpoint
from hpcllm.checkpoint.layout import DTYPE_ITEMSIZE, SLICE_HASHES_FIELD, SLICE_HASHES_FILE, checksum
from hpcllm.checkpoint.slicehashes import as_3d, read_slice_hashes, strip_span, verify_strips
from hpcllm.checkpoint.tests.conftest import write_checkpoint

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from([0, 1, 2, 4096, -4096, 2**63, 10**30, "1", "bfloat16", "float128", "data-00000.h5", "..",
                     "0123456789abcdef", []]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory) -> Path:
    import torch

    g = torch.Generator().manual_seed(0)
    return write_checkpoint({"a.weight": torch.randn(48, 40, generator=g).to(torch.bfloat16),
                             "b.weight": torch.randn(30, 30, generator=g),
                             "c.bias": torch.arange(7), "d": torch.tensor(1.0)},
                            tmp_path_factory.mktemp("fuzz") / "ckpt", partitions=2, chunk_size=4096)


@contextmanager
def checkpoint_with(valid: Path, manifest: bytes | None = None, index: bytes | None = None,
                    copy_data: bool = False, slice_hashes: bytes | None = None):
    """A throwaway copy of the valid checkpoint with manifest / index / slice-hashes.json replaced (data files linked
    unless copied); a replaced index or slice-hashes.json is recorded in the manifest, to reach their checks."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ckpt"
        root.mkdir()
        for path in valid.iterdir():
            if path.name.endswith(".h5") and not copy_data:
                (root / path.name).symlink_to(path)
            else:
                shutil.copyfile(path, root / path.name)
        if index is not None:
            (root / "index.json").write_bytes(index)
            manifest_obj = json.loads(manifest if manifest is not None else (root / "manifest.json").read_bytes())
            if isinstance(manifest_obj, dict) and isinstance(manifest_obj.get("index"), dict):
                manifest_obj["index"].update(size=len(index), xxh3_64=checksum(index))  # reach the index checks
            manifest = json.dumps(manifest_obj).encode()
        if slice_hashes is not None:
            (root / SLICE_HASHES_FILE).write_bytes(slice_hashes)
            manifest_obj = json.loads(manifest if manifest is not None else (root / "manifest.json").read_bytes())
            manifest_obj[SLICE_HASHES_FIELD].update(size=len(slice_hashes), xxh3_64=checksum(slice_hashes))
            manifest = json.dumps(manifest_obj).encode()
        if manifest is not None:
            (root / "manifest.json").write_bytes(manifest)
        yield root


def exercise_reader(root: Path) -> None:
    """Everything a loader calls; only CheckpointError may escape."""
    ckpt = read_checkpoint(root)
    ckpt.check_files_present()
    ckpt.verify_files()
    for name in list(ckpt.tensors) + list(ckpt.aliases):
        entry = ckpt.resolve(name)
        assert entry.offset + entry.nbytes <= ckpt.partitions[entry.partition].size


def exercise_strips(root: Path) -> None:
    """What a tensor-parallel rank calls on the strip hashes: read them, widen a slice (here: all of each tensor) to
    whole strips and verify those; only CheckpointError may escape."""
    ckpt = read_checkpoint(root)
    hashes = read_slice_hashes(ckpt)
    for name, entry in ckpt.tensors.items():
        data = np.fromfile(ckpt.partitions[entry.partition].path, dtype=np.uint8, count=entry.nbytes,
                           offset=entry.offset)
        for dim, table in hashes.get(name, {}).items():
            a, b = strip_span(table, entry.shape[dim], 0, entry.shape[dim])
            verify_strips(name, entry, table, dim, as_3d(data, entry.shape, dim)[:, a:b], a, str(root))


def only_checkpoint_errors(root: Path, exercise=exercise_reader) -> None:
    try:
        exercise(root)
    except CheckpointError:
        pass


def mutate(data, value, depth: int = 0):
    """Replace, delete or insert one thing somewhere inside a JSON value (hypothesis picks where and what)."""
    if depth < 6 and isinstance(value, dict) and value and data.draw(st.integers(0, 3)) > 0:
        key = data.draw(st.sampled_from(sorted(value)))
        action = data.draw(st.sampled_from(["descend", "delete", "replace", "insert"]))
        value = dict(value)
        if action == "descend":
            value[key] = mutate(data, value[key], depth + 1)
        elif action == "delete":
            del value[key]
        elif action == "replace":
            value[key] = data.draw(json_values)
        else:
            value[data.draw(st.text(max_size=10))] = data.draw(json_values)
        return value
    if depth < 6 and isinstance(value, list) and value and data.draw(st.integers(0, 3)) > 0:
        position = data.draw(st.integers(0, len(value) - 1))
        action = data.draw(st.sampled_from(["descend", "delete", "replace", "duplicate"]))
        value = list(value)
        if action == "descend":
            value[position] = mutate(data, value[position], depth + 1)
        elif action == "delete":
            del value[position]
        elif action == "replace":
            value[position] = data.draw(json_values)
        else:
            value.append(value[position])
        return value
    return data.draw(json_values)


def load(valid: Path, name: str):
    return json.loads((valid / name).read_text())


@FUZZ
@given(payload=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)))
def test_random_manifest_gives_only_checkpoint_errors(valid_checkpoint, payload):
    with checkpoint_with(valid_checkpoint, manifest=payload) as root:
        with pytest.raises(CheckpointError):
            exercise_reader(root)


@FUZZ
@given(data=st.data())
def test_mutated_manifest_gives_only_checkpoint_errors(valid_checkpoint, data):
    manifest = mutate(data, load(valid_checkpoint, "manifest.json"))
    with checkpoint_with(valid_checkpoint, manifest=json.dumps(manifest).encode()) as root:
        only_checkpoint_errors(root)


@FUZZ
@given(data=st.data())
def test_mutated_index_gives_only_checkpoint_errors(valid_checkpoint, data):
    index = mutate(data, load(valid_checkpoint, "index.json"))
    with checkpoint_with(valid_checkpoint, index=json.dumps(index).encode()) as root:
        only_checkpoint_errors(root)


@FUZZ
@given(data=st.data())
def test_mutated_slice_hashes_give_only_checkpoint_errors(valid_checkpoint, data):
    document = load(valid_checkpoint, SLICE_HASHES_FILE)
    if data.draw(st.booleans()):  # anywhere in the document
        document = mutate(data, document)
    else:  # one strip table, where most of it is
        tables = document["tensors"][data.draw(st.sampled_from(sorted(document["tensors"])))]
        dim = data.draw(st.sampled_from(sorted(tables)))
        tables[dim] = mutate(data, tables[dim])
    with checkpoint_with(valid_checkpoint, slice_hashes=json.dumps(document).encode()) as root:
        only_checkpoint_errors(root, exercise_strips)


def _first_table(document: dict) -> dict:
    return document["tensors"]["a.weight"]["0"]


@pytest.mark.parametrize("damage", [
    lambda doc: _first_table(doc).update(strips=0),  # a rank divided by it: ZeroDivisionError
    lambda doc: _first_table(doc)["xxh3_64"].pop(),  # a rank indexed past the end: IndexError
    lambda doc: _first_table(doc).update(strips=_first_table(doc)["strips"] // 2),  # blamed the data file
    lambda doc: doc["tensors"].pop("b.weight"),  # its slices went unverified
    lambda doc: doc["tensors"]["a.weight"].pop("1"),
    lambda doc: _first_table(doc)["xxh3_64"].__setitem__(0, 12345),
    lambda doc: doc["tensors"].update({"nowhere": {"0": {"strips": 1, "xxh3_64": ["0123456789abcdef"]}}}),
])
def test_strip_hashes_that_do_not_fit_the_index_are_refused(valid_checkpoint, damage):
    document = load(valid_checkpoint, SLICE_HASHES_FILE)
    damage(document)
    with checkpoint_with(valid_checkpoint, slice_hashes=json.dumps(document).encode()) as root:
        with pytest.raises(InvalidManifest, match="add-slice-hashes"):
            read_slice_hashes(read_checkpoint(root))


@FUZZ
@given(
    field=st.sampled_from(["partition", "offset", "nbytes", "dtype", "shape", "stride"]),
    number=st.integers(min_value=-(2**80), max_value=2**80),
    shape=st.lists(st.integers(min_value=-3, max_value=2**64), max_size=8),
    dtype=st.one_of(st.sampled_from(sorted(DTYPE_ITEMSIZE)), st.text(max_size=12)),
    tensor=st.sampled_from(["a.weight", "b.weight", "c.bias", "d"]),
)
def test_out_of_range_numbers_shapes_and_dtypes(valid_checkpoint, field, number, shape, dtype, tensor):
    index = load(valid_checkpoint, "index.json")
    entry = index["tensors"][tensor]
    entry[field] = {"dtype": dtype, "shape": shape, "stride": shape}.get(field, number)
    with checkpoint_with(valid_checkpoint, index=json.dumps(index).encode()) as root:
        only_checkpoint_errors(root)


@FUZZ
@given(version=st.one_of(st.integers(min_value=-(2**70), max_value=2**70), json_scalars))
def test_unknown_format_versions_are_refused(valid_checkpoint, version):
    manifest = load(valid_checkpoint, "manifest.json")
    manifest["format_version"] = version
    with checkpoint_with(valid_checkpoint, manifest=json.dumps(manifest).encode()) as root:
        if version == 1 and type(version) is int:
            exercise_reader(root)
        else:
            with pytest.raises(CheckpointError):
                read_checkpoint(root)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_truncated_or_flipped_data_files_are_caught(valid_checkpoint, data):
    with checkpoint_with(valid_checkpoint, copy_data=True) as root:
        ckpt = read_checkpoint(root)
        partition = data.draw(st.sampled_from(ckpt.partitions))
        content = bytearray(partition.path.read_bytes())
        if data.draw(st.booleans()):
            new_size = data.draw(st.integers(0, len(content) - 1))
            partition.path.write_bytes(content[:new_size])
            with pytest.raises(TruncatedFile, match=partition.file):
                ckpt.check_files_present()
            with pytest.raises(TruncatedFile):
                ckpt.verify_files()
            return
        position = data.draw(st.integers(0, len(content) - 1))
        content[position] ^= data.draw(st.integers(1, 255))
        partition.path.write_bytes(content)
        ckpt.check_files_present()
        with pytest.raises(ChecksumMismatch, match=partition.file):
            ckpt.verify_files()
        bad_chunk = position // partition.chunk_size
        for chunk in range(partition.num_chunks):
            start, length = partition.chunk_range(chunk)
            if chunk == bad_chunk:
                with pytest.raises(ChecksumMismatch, match=f"chunk {chunk} "):
                    ckpt.verify_chunk(partition.index, chunk, content[start:start + length])
            else:
                ckpt.verify_chunk(partition.index, chunk, content[start:start + length])


def test_the_untouched_checkpoint_passes_everything(valid_checkpoint):
    with checkpoint_with(valid_checkpoint, index=(valid_checkpoint / "index.json").read_bytes(),
                         slice_hashes=(valid_checkpoint / SLICE_HASHES_FILE).read_bytes()) as root:
        exercise_reader(root)
        exercise_strips(root)
    exercise_reader(valid_checkpoint)
    exercise_strips(valid_checkpoint)


@FUZZ
@given(data=st.data())
def test_fast_index_entry_check_accepts_exactly_what_the_checked_one_accepts(valid_checkpoint, data):
    """The loader's fast path (_valid_entry_fast) must never let through an entry the full check refuses."""
    from hpcllm.checkpoint.layout import _parse_entry_checked, _valid_entry_fast

    ckpt = read_checkpoint(valid_checkpoint)
    raw_entries = load(valid_checkpoint, "index.json")["tensors"]
    name = data.draw(st.sampled_from(sorted(raw_entries)))
    raw = mutate(data, raw_entries[name]) if data.draw(st.booleans()) else raw_entries[name]
    fast = _valid_entry_fast(name, raw, ckpt.partitions)
    try:
        checked = _parse_entry_checked(name, raw, ckpt.partitions, "index.json")
    except CheckpointError:
        assert fast is None
    else:
        assert fast is None or fast == checked
        assert fast is not None or not isinstance(raw, dict)  # a valid entry takes the fast path
