"""Python client of a worker's internal API (used by the gateway and the migration code).

    client = WorkerClient("http://127.0.0.1:8123", secret)
    with client.generate(GenerateRequest(request_id="r1", prompt="Hi", max_tokens=16)) as stream:
        for line in stream:            # TokenLine ... then one FinalLine
            ...

Leaving the `with` block (or calling close) before the final line closes the connection, and the worker then
cancels the request. HTTP errors become WorkerError with the worker's status and message.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
from pydantic import ValidationError

from hpcllm.errors import HpcllmError
from hpcllm.worker.protocol import (
    CANCEL_PATH,
    GENERATE_PATH,
    SECRET_HEADER,
    TOKENS_PATH,
    ErrorInfo,
    ErrorResponse,
    FinalLine,
    GenerateRequest,
    RequestTokens,
    TokenLine,
    parse_stream_line,
)


class WorkerError(HpcllmError):
    """The worker refused a request or could not be reached (status 0 when there was no HTTP answer)."""

    def __init__(self, status: int, message: str, info: ErrorInfo | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.info = info


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    try:
        info = ErrorResponse.model_validate_json(response.content).error
        message = info.message
    except ValidationError:
        info, message = None, response.text[:500] or response.reason_phrase
    raise WorkerError(response.status_code, f"worker answered {response.status_code}: {message}", info)


class GenerationStream:
    """Iterates a generate response's lines; the final line is also kept in `.final`."""

    def __init__(self, context, response: httpx.Response) -> None:
        self._context = context
        self._response = response
        self.final: FinalLine | None = None

    def __iter__(self) -> Iterator[TokenLine | FinalLine]:
        try:
            for raw in self._response.iter_lines():
                line = parse_stream_line(raw)
                if line is None:
                    continue
                if isinstance(line, FinalLine):
                    self.final = line
                yield line
                if self.final is not None:
                    return
        except httpx.HTTPError as exc:
            raise WorkerError(0, f"worker stream broke: {exc}") from exc
        if self.final is None:
            raise WorkerError(0, "worker stream ended without a final line (worker died?)")

    def close(self) -> None:
        self._context.__exit__(None, None, None)

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class WorkerClient:
    def __init__(
        self,
        base_url: str,
        secret: str,
        connect_timeout: float = 5.0,
        read_timeout: float | None = 600.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=30.0)
        self._client = client or httpx.Client(timeout=timeout)
        self._headers = {SECRET_HEADER: secret}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(self, method: str, path: str) -> httpx.Response:
        try:
            response = self._client.request(method, self.base_url + path, headers=self._headers)
        except httpx.HTTPError as exc:
            raise WorkerError(0, f"worker {self.base_url} unreachable: {exc}") from exc
        _raise_for_status(response)
        return response

    def generate(self, body: GenerateRequest) -> GenerationStream:
        """Start a generation; the HTTP status is checked before this returns."""
        context = self._client.stream(
            "POST",
            self.base_url + GENERATE_PATH,
            content=body.model_dump_json(exclude_none=True),
            headers={**self._headers, "Content-Type": "application/json"},
        )
        try:
            response = context.__enter__()
        except httpx.HTTPError as exc:
            raise WorkerError(0, f"worker {self.base_url} unreachable: {exc}") from exc
        try:
            _raise_for_status(response)
        except BaseException:
            context.__exit__(None, None, None)
            raise
        return GenerationStream(context, response)

    def tokens(self, request_id: str) -> RequestTokens:
        response = self._request("GET", TOKENS_PATH.format(request_id=request_id))
        return RequestTokens.model_validate_json(response.content)

    def cancel(self, request_id: str) -> RequestTokens:
        """Stop a request and get its token ids (to resume it elsewhere with resume_token_ids)."""
        response = self._request("POST", CANCEL_PATH.format(request_id=request_id))
        return RequestTokens.model_validate_json(response.content)

    def health(self) -> bool:
        try:
            return self._client.get(self.base_url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def ready(self) -> dict | None:
        """The /ready body when the worker can serve, else None."""
        try:
            response = self._client.get(self.base_url + "/ready")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def metrics_text(self) -> str:
        return self._request("GET", "/metrics").text
