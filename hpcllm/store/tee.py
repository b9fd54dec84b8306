"""LoadTee: write the bytes a load reads into a staging folder, so the node keeps a local copy of the checkpoint
without reading the origin a second time (cache on load, docs/node-cache.md).

    tee = LoadTee(ckpt, staging_dir)       # an existing empty folder the node agent handed to the worker
    tee.write(partition, offset, view)     # staged loads: each unit from the pipeline after its chunks were verified;
                                           # CPU loads: whole files from the model's buffers once it is ready
    tee.finish()                           # copy manifest/index/side files, write the completion file

A tee never fails the load: a write error (disk full, folder removed) is kept in `tee.error`, later writes are
skipped and finish() returns False. The tee only writes; whoever commits the folder (the node agent's CacheManager.commit_load_fill) re-hashes what
was written before it becomes visible, so a torn or corrupt write is never cached. A folder without the completion
file is an unfinished tee and is discarded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hpcllm.checkpoint import Checkpoint

TEE_COMPLETE = ".hpcllm-tee-complete"
TEE_FAILED = ".hpcllm-tee-failed"  # holds the reason: whoever waits for the copy stops waiting


class LoadTee:
    def __init__(self, ckpt: Checkpoint, dest: str | os.PathLike):
        self.ckpt = ckpt
        self.dest = Path(dest)
        self.written = {p.index: 0 for p in ckpt.partitions}
        self.error: str | None = None
        self._fds: dict[int, int] = {}
        try:
            for part in ckpt.partitions:
                fd = os.open(self.dest / part.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[part.index] = fd
                os.ftruncate(fd, part.size)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = self.error or f"writing the cache-on-load copy in {self.dest} failed: {exc.strerror or exc}"
        self.close()

    def write(self, partition: int, offset: int, data) -> None:
        """Write `data` (bytes of the partition file at `offset`, already verified by the load when it verifies);
        called by one thread (the pipeline's consumer for a staged load, else the loader's tee thread)."""
        if self.error is not None:
            return
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self._fds[partition], view[done:], offset + done)
        except OSError as exc:
            self._fail(exc)
            return
        self.written[partition] += len(view)

    def finish(self) -> bool:
        """Complete the copy: the small files beside the data files, then the completion file (not fsynced: the
        committer does that after the model is ready).
        False (and `error` says why) when the copy is incomplete; the committer then discards it."""
        if self.error is None:
            short = [p.file for p in self.ckpt.partitions if self.written[p.index] < p.size]
            if short:
                self.error = f"the load did not pass every byte of {', '.join(short)} through the tee"
        try:
            if self.error is None:  # no fsync here: it would delay the ready model; the committer syncs
                for name in self.ckpt.metadata_files + [side.file for side in self.ckpt.side_files]:
                    target = self.dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.ckpt.root / name, target)
                (self.dest / TEE_COMPLETE).write_text("")
        except OSError as exc:
            self._fail(exc)
        self.close()
        if self.error is not None:
            try:
                (self.dest / TEE_FAILED).write_text(self.error)
            except OSError:
                pass
        return self.error is None

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
