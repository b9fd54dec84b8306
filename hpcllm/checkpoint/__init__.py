"""Loading-optimized checkpoint format (see docs/checkpoint-format.md).

`read_checkpoint(path)` validates a converted checkpoint and describes where every tensor lies; `convert` (lazy,
imports torch / transformers) turns a Hugging Face folder into one. Importing this package is cheap: no torch, no h5py.
"""

from hpcllm.checkpoint.errors import (
    CheckpointError,
    ChecksumMismatch,
    InvalidIndex,
    InvalidManifest,
    InvalidSource,
    MissingFile,
    NotAConvertedCheckpoint,
    OffsetOutOfRange,
    OutputExists,
    TruncatedFile,
    UnsupportedDtype,
    UnsupportedFormatVersion,
    UnsupportedSource,
)
from hpcllm.checkpoint.layout import (
    ALIGNMENT,
    DEFAULT_CHUNK_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    Checkpoint,
    Partition,
    SideFile,
    TensorEntry,
    read_checkpoint,
)

__all__ = [
    "ALIGNMENT", "DEFAULT_CHUNK_SIZE", "FORMAT_NAME", "FORMAT_VERSION", "INDEX_FILE", "MANIFEST_FILE",
    "Checkpoint", "Partition", "SideFile", "TensorEntry", "read_checkpoint", "convert",
    "CheckpointError", "ChecksumMismatch", "InvalidIndex", "InvalidManifest", "InvalidSource", "MissingFile",
    "NotAConvertedCheckpoint", "OffsetOutOfRange", "OutputExists", "TruncatedFile", "UnsupportedDtype",
    "UnsupportedFormatVersion", "UnsupportedSource",
]


def __getattr__(name: str):
    if name == "convert":  # lazy: the converter imports torch, safetensors and h5py
        from hpcllm.checkpoint.converter import convert

        return convert
    raise AttributeError(f"module 'hpcllm.checkpoint' has no attribute {name!r}")
