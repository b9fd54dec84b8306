"""A batch's output and error files while it runs: appended one whole line per result, read back by a process
that takes the batch over or whose turn comes back (which requests are done), published under their file ids when
the batch ends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from hpcllm.gateway.batches.protocol import ResultLine


class _Usage(BaseModel):
    """An answer's usage: prompt/completion tokens (completions, chat, the pooling APIs) or input/output tokens
    (Responses)."""

    prompt_tokens: int | None = None
    input_tokens: int | None = None
    completion_tokens: int | None = None
    output_tokens: int | None = None


class _Body(BaseModel):
    usage: _Usage | None = None


class _Response(BaseModel):
    body: _Body | Any = Field(None, union_mode="left_to_right")  # any other answer counts no tokens


class _Counted(BaseModel):
    """What a result line is read back for: its custom_id and its answer's tokens; the rest (a chat's text, an
    embedding's vector) is skipped by the parser, never made into objects (other fields are ignored)."""

    custom_id: str
    response: _Response | None = None

    def tokens(self) -> tuple[int, int]:
        body = self.response.body if self.response is not None else None
        usage = body.usage if isinstance(body, _Body) else None
        if usage is None:
            return 0, 0
        return usage.prompt_tokens or usage.input_tokens or 0, usage.completion_tokens or usage.output_tokens or 0


class ResultFile:
    """Results in `partial` (a hidden name in the files directory) until published as `final`."""

    def __init__(self, partial: Path, final: Path):
        self.partial, self.final = partial, final
        if not partial.exists() and final.exists():  # a process died between publishing and recording the batch
            os.rename(final, partial)
        self.input_tokens = self.output_tokens = 0  # of the answers' usage
        self.custom_ids: set[str] = set()
        self._recover()
        self._out = open(partial, "ab")

    def _recover(self) -> None:
        """Count the results already written, a line at a time (a batch of 50,000 embeddings writes gigabytes: read
        whole and made into objects, each turn of the batch held them in memory at once); a last line cut off by a
        crash is dropped (that request runs again)."""
        if not self.partial.exists():
            return
        whole = 0
        with open(self.partial, "rb") as lines:
            for line in lines:
                if not line.endswith(b"\n"):
                    break
                whole += len(line)
                if line.strip():
                    self._count(line)
        if whole != self.partial.stat().st_size:
            with open(self.partial, "r+b") as out:
                out.truncate(whole)

    def _count(self, line: bytes) -> None:
        counted = _Counted.model_validate_json(line)
        self.custom_ids.add(counted.custom_id)
        tokens_in, tokens_out = counted.tokens()
        self.input_tokens += tokens_in
        self.output_tokens += tokens_out

    def append(self, result: ResultLine) -> None:
        """One line, flushed at once: a process that takes the batch over sees every result written."""
        line = result.model_dump_json().encode() + b"\n"
        self._out.write(line)
        self._out.flush()
        self._count(line)  # as a process reading the file back counts it

    def publish(self) -> int | None:
        """Close, and move the file to its final name; its size, None (and no file) when no line was written."""
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        size = self.partial.stat().st_size
        if size == 0:
            self.partial.unlink()
            return None
        os.replace(self.partial, self.final)
        return size

    def close(self) -> None:
        self._out.close()
