"""Errors raised when reading, verifying or converting checkpoints.

Every problem a user can cause with a checkpoint (a missing file, a corrupt manifest, a flipped byte, an HF folder
passed where a converted one is expected, a broken source file given to the converter) is a CheckpointError. The
message names the file and says what is wrong and what to do, and the CLI prints it as one line without a traceback.
"""

from __future__ import annotations

from hpcllm.errors import HpcllmError


class CheckpointError(HpcllmError):
    """Base class of every checkpoint problem."""

    exit_code = 3


class MissingFile(CheckpointError):
    """A file or folder the checkpoint needs does not exist."""


class NotAConvertedCheckpoint(CheckpointError):
    """The folder is not in the hpcllm format (for example an HF folder that still needs `hpcllm convert`)."""


class InvalidManifest(CheckpointError):
    """manifest.json does not parse or lacks / mistypes a required field."""


class InvalidIndex(CheckpointError):
    """index.json does not parse, lacks / mistypes a field, or describes an impossible tensor layout."""


class UnsupportedFormatVersion(CheckpointError):
    """The checkpoint was written in a format version this hpcllm cannot read."""


class UnsupportedDtype(CheckpointError):
    """A tensor has a dtype this format does not know."""


class OffsetOutOfRange(CheckpointError):
    """A tensor or chunk lies (partly) outside its data file."""


class TruncatedFile(CheckpointError):
    """A data file's size differs from the size recorded in the manifest."""


class ChecksumMismatch(CheckpointError):
    """Bytes read back do not match the checksum recorded at conversion."""

    # Its own exit code: a node agent whose worker exits with it drops the corrupt cached copy and refills it.
    exit_code = 4


class InvalidSource(CheckpointError):
    """The converter's input (an HF model folder) is missing, empty or has an unreadable weight file."""


class UnsupportedSource(CheckpointError):
    """The converter's input is a model hpcllm cannot serve yet: quantized weights (config.json has a
    quantization_config), GGUF files, a model that needs remote code (auto_map without a transformers class), or a
    model_type the installed transformers does not know."""


class OutputExists(CheckpointError):
    """The converter's output folder already exists and --overwrite was not given."""
