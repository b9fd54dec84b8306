"""Wire types of the Batch API: the create request, the Batch object, its list; the lines of input and output
files."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from hpcllm.gateway.batches import BatchStatus
from hpcllm.gateway.files.protocol import ExpiresAfter
from hpcllm.gateway.protocol import ListPage, OpenAIRequest, OpenAIResponse

COMPLETION_WINDOWS = {"24h": 24 * 3600}
# OpenAI's metadata bounds.
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512


class CreateBatchRequest(OpenAIRequest):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None  # the output and error files', from their creation


class RequestCounts(OpenAIResponse):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(OpenAIResponse):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIResponse):
    reasoning_tokens: int = 0


class BatchUsage(OpenAIResponse):
    """The tokens of the batch's requests so far (OpenAI's Batch.usage): their answers' usage added up."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class LineError(OpenAIResponse):
    """Why the input file was refused, at which line (OpenAI's BatchError)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[LineError]


class BatchObject(OpenAIResponse):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None


BatchList = ListPage[BatchObject]


class ResultResponse(OpenAIResponse):
    status_code: int
    request_id: str
    body: Any


class ResultError(OpenAIResponse):
    code: str
    message: str


class ResultLine(OpenAIResponse):
    """One line of an output or error file."""

    id: str
    custom_id: str
    response: ResultResponse | None = None
    error: ResultError | None = None
