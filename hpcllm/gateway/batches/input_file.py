"""Reading a batch's input file: one request per JSONL line ({"custom_id", "method": "POST", "url", "body"}), each
checked as OpenAI checks them when a batch is created (a bad file fails the batch with errors naming the lines)."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hpcllm.gateway.batches.protocol import LineError
from hpcllm.httpkit.body import parse_json_body

# Errors a failed batch lists at most: the file is read no further (a file of 2 million broken lines is neither told
# nor held 2 million times).
MAX_LISTED_ERRORS = 100


@dataclass(frozen=True, slots=True)  # no __dict__: a short line's entry is not several times its bytes
class BatchEntry:
    line: int  # 1-based, as OpenAI's errors count them
    custom_id: str
    # The line as the file has it: a runner holds its batch's requests for the batch's whole run, and as parsed
    # objects a request takes about 5 times its line's bytes. Parsed again as it is started (body).
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        return parse_json_body(self.raw)["body"]


@dataclass
class ParsedInput:
    entries: list[BatchEntry] = field(default_factory=list)  # kept only when asked for
    count: int = 0  # the good lines
    errors: list[LineError] = field(default_factory=list)
    model: str | None = None  # the model every line names
    model_line: int | None = None  # the first line naming it


def parse_input(lines: Iterable[bytes], endpoint: str, max_requests: int, *,
                keep_entries: bool = True) -> ParsedInput:
    """The file's requests checked; without keep_entries only counted (a batch's creation: its runner parses the file
    again, so the bodies, some times the file's size in memory, are not held meanwhile)."""
    parsed = ParsedInput()
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if len(parsed.errors) >= MAX_LISTED_ERRORS:
            break
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # some editors write one; the gateway's JSON parser refuses it
        if not raw.strip():
            continue
        if parsed.count >= max_requests:
            parsed.errors.append(LineError(
                code="too_many_tasks", line=number,
                message=f"The batch has more than {max_requests} requests, the most one batch may have on this "
                        f"gateway (gateway.batch_max_requests); split the file"))
            break
        checked = _entry(raw, number, endpoint, parsed.model, parsed.errors)
        if checked is None:
            continue
        entry, body = checked
        if entry.custom_id in seen:
            parsed.errors.append(LineError(code="duplicate_custom_id", line=number, param="custom_id",
                                           message=f"The custom_id {entry.custom_id[:80]!r} is used by an earlier "
                                                   f"line; each request's custom_id must be unique in its batch"))
            continue
        seen.add(entry.custom_id)
        if parsed.model is None and isinstance(body.get("model"), str):  # else the request's own 4xx says
            parsed.model, parsed.model_line = body["model"], number
        parsed.count += 1
        if keep_entries:
            parsed.entries.append(entry)
    if not parsed.count and not parsed.errors:
        parsed.errors.append(LineError(code="empty_file", message="The input file has no requests"))
    return parsed


def _entry(raw: bytes, number: int, endpoint: str, model: str | None,
           errors: list[LineError]) -> tuple[BatchEntry, dict[str, Any]] | None:
    """The line's entry and its body; None when it is refused (its error appended)."""
    def refuse(code: str, message: str, param: str | None = None) -> None:
        errors.append(LineError(code=code, line=number, message=message, param=param))

    try:  # as the gateway parses a request: one nested deeper than it takes (200 levels) is refused here
        item = parse_json_body(raw)
    except ValueError:  # invalid UTF-8 included
        return refuse("invalid_json_line", "This line is not parseable as valid JSON.")
    if not isinstance(item, dict):
        return refuse("invalid_json_line", "This line is not a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return refuse("invalid_request", "custom_id must be a non-empty string", "custom_id")
    if item.get("method") != "POST":
        return refuse("invalid_request", "method must be \"POST\"", "method")
    if item.get("url") != endpoint:
        return refuse("url_mismatch", f"The url {str(item.get('url'))[:80]!r} does not match the batch's endpoint "
                                      f"{endpoint!r}; every request must use the endpoint of its batch", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return refuse("invalid_request", "body must be a JSON object (the request's body)", "body")
    if model is not None and body.get("model") != model:
        return refuse("model_mismatch", f"The model {str(body.get('model'))[:80]!r} differs from the batch's "
                                        f"model {model!r}; every request of a batch must use the same model",
                      "body.model")
    return BatchEntry(number, custom_id, raw), body
