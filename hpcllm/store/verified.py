"""Verify once per file version: a node-local record of checkpoint files whose checksums were all checked.

After a load that verified every chunk of a checkpoint on the node-local disk tier, the loader writes
`.hpcllm-verified.json` beside the data files (atomically), holding each file's identity: device, inode, size,
mtime_ns and ctime_ns. A later load whose files still have exactly those identities skips re-hashing them: any
rewrite, truncation, copy or replacement changes the inode or ctime and brings verification back. This is the disk
tier's version of "verified at fill" (the DRAM tier's marker); an explicit verify=True always re-checks.
"""

from __future__ import annotations

import json
import os
import uuid

from hpcllm.checkpoint import Checkpoint

RECORD_FILE = ".hpcllm-verified.json"


def file_identity(path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _identities(ckpt: Checkpoint) -> dict[str, list[int]]:
    files = [p.file for p in ckpt.partitions] + [side.file for side in ckpt.side_files]
    return {name: file_identity(ckpt.root / name) for name in files}


def verified_before(ckpt: Checkpoint) -> bool:
    """True if every data file is byte-for-byte the version a previous load verified."""
    try:
        record = json.loads((ckpt.root / RECORD_FILE).read_text())
        return record.get("files") == _identities(ckpt)
    except (OSError, ValueError, AttributeError):
        return False


def record_verified(ckpt: Checkpoint) -> bool:
    """Remember that the current versions of the data files were verified; False if the folder is read-only."""
    target = ckpt.root / RECORD_FILE
    tmp = ckpt.root / f".{RECORD_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps({"files": _identities(ckpt)}))
        os.replace(tmp, target)
        return True
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return False
