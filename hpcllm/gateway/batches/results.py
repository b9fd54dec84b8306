"""A batch's output and error files while it runs: appended one whole line per result, read back by a process
that takes the batch over (which requests are done), published under their file ids when the batch ends."""

from __future__ import annotations

import os
from pathlib import Path

from hpcllm.gateway.batches.protocol import ResultLine


class ResultFile:
    """Results in `partial` (a hidden name in the files directory) until published as `final`."""

    def __init__(self, partial: Path, final: Path):
        self.partial, self.final = partial, final
        if not partial.exists() and final.exists():  # a process died between publishing and recording the batch
            os.rename(final, partial)
        self.input_tokens = self.output_tokens = 0  # of the answers' usage
        self.custom_ids = self._recover()
        self._out = open(partial, "ab")

    def _recover(self) -> set[str]:
        """The custom_ids already written; a last line cut off by a crash is dropped (that request runs again)."""
        if not self.partial.exists():
            return set()
        data = self.partial.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with open(self.partial, "r+b") as out:
                out.truncate(len(whole))
        results = [ResultLine.model_validate_json(line) for line in whole.splitlines() if line.strip()]
        for result in results:
            self._count_tokens(result)
        return {result.custom_id for result in results}

    def _count_tokens(self, result: ResultLine) -> None:
        """Add the answer's usage: prompt/completion tokens (completions, chat, embeddings) or input/output tokens
        (Responses)."""
        body = result.response.body if result.response is not None else None
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict):
            self.input_tokens += usage.get("prompt_tokens") or usage.get("input_tokens") or 0
            self.output_tokens += usage.get("completion_tokens") or usage.get("output_tokens") or 0

    def append(self, result: ResultLine) -> None:
        """One line, flushed at once: a process that takes the batch over sees every result written."""
        self._out.write(result.model_dump_json().encode() + b"\n")
        self._out.flush()
        self.custom_ids.add(result.custom_id)
        self._count_tokens(result)

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
