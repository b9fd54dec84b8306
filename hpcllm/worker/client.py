"""Python client of a worker's internal API (used by the gateway and the migration code).

    client = WorkerClient("http://127.0.0.1:8123", secret)
    with client.generate(GenerateRequest(request_id="r1", prompt="Hi", max_tokens=16)) as stream:
        for line in stream:            # TokenLine ... then one FinalLine
            ...

Leaving the `with` block (or calling close) before the final line closes the connection, and the worker then
cancels the request. HTTP errors become WorkerError with the worker's status and message.

Generation streams (generate, attach) are read with hpcllm.httpkit.streaming (h11 straight on the socket, one
connection per stream: the gateway's per-token hot path); the other calls go through the httpx client.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
from pydantic import BaseModel, ValidationError

from hpcllm.config import InternalHttpConfig
from hpcllm.credentials import GRANT_HEADER
from hpcllm.errors import HpcllmError
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.httpkit.client import internal_client, verify_of
from hpcllm.httpkit.streaming import ReadWait, StreamBroken, StreamingPost
from hpcllm.worker.protocol import (
    ATTACH_MIGRATION_PATH,
    CANCEL_PATH,
    EMBED_PATH,
    EXTEND_MIGRATION_PATH,
    GENERATE_PATH,
    HELD_MIGRATION_PATH,
    LOAD_LORA_PATH,
    MIGRATE_ALL_PATH,
    MIGRATE_REQUEST_PATH,
    NDJSON_MEDIA_TYPE,
    PREPARE_MIGRATION_PATH,
    TOKENS_PATH,
    UNLOAD_LORA_PATH,
    AttachMigration,
    EmbedRequest,
    EmbedResult,
    ErrorInfo,
    ErrorResponse,
    ExtendMigration,
    ExtendResult,
    FinalLine,
    GenerateRequest,
    LoadLoraAdapter,
    LoraAdapterResult,
    MigrateAllResult,
    MigrateRequest,
    MigrationResult,
    PrepareMigration,
    PrepareResult,
    RequestTokens,
    TokenLine,
    UnloadLoraAdapter,
    parse_stream_line,
)

# Default read timeout of the migration calls (a prepare waits for a whole prefill, migrate for all its rounds).
MIGRATION_CALL_TIMEOUT = 300.0
# Of a LoRA adapter load or unload: its weights are read and installed between two steps of the worker.
ADAPTER_CALL_TIMEOUT = 120.0


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
    _raise_error_answer(response.status_code, response.content, response.reason_phrase)


def _raise_error_answer(status: int, content: bytes, reason: str) -> None:
    try:
        info = ErrorResponse.model_validate_json(content).error
        message = info.message
    except ValidationError:
        info, message = None, content.decode("utf-8", "replace")[:500] or reason
    raise WorkerError(status, f"worker answered {status}: {message}", info)


class KeepAlive:
    """Yielded by a GenerationStream that was asked to (yield_keepalives) for a piece of the body with keep-alive
    lines only: the worker still holds the request (it waits for a slot, a long step runs)."""


KEEPALIVE_PIECE = KeepAlive()


class GenerationStream:
    """Iterates a generate response's lines; the final line is also kept in `.final`.

    `tokens_buffered` says how many token lines came behind the one just yielded in the same piece of the body
    (what one receive got: the worker sends what queued up while its stream thread waited in one write, and what
    piled up in the socket while this reader waited comes in one receive): a reader can pass them on together."""

    def __init__(self, post: StreamingPost) -> None:
        self._post = post
        self.final: FinalLine | None = None
        self.tokens_buffered = 0
        self._keepalives = False

    def yield_when_idle(self) -> None:
        """Read without blocking from now on: iterating yields a ReadWait when nothing has come (see
        hpcllm.httpkit.streaming); the caller waits for it and iterates on."""
        self._post.yield_when_idle()

    def yield_keepalives(self) -> None:
        """Iterating yields KEEPALIVE_PIECE for the worker's keep-alive lines from now on (a reader can check on its
        own client while the worker sends nothing else)."""
        self._keepalives = True

    def __iter__(self) -> Iterator[TokenLine | FinalLine | ReadWait | KeepAlive]:
        try:
            for lines in self._line_batches():
                if lines.__class__ is ReadWait or lines is KEEPALIVE_PIECE:
                    yield lines
                    continue
                tokens = sum(isinstance(line, TokenLine) for line in lines)
                for line in lines:
                    if isinstance(line, TokenLine):
                        tokens -= 1
                    self.tokens_buffered = tokens
                    if isinstance(line, FinalLine):
                        self.final = line
                    yield line
                    if self.final is not None:
                        return
        except StreamBroken as exc:
            raise WorkerError(0, f"worker stream broke: {exc}") from exc
        if self.final is None:
            raise WorkerError(0, "worker stream ended without a final line (worker died?)")

    def _line_batches(self) -> Iterator[list[TokenLine | FinalLine] | ReadWait | KeepAlive]:
        """The stream's lines, parsed, as they arrived: the complete lines of one piece of the body together;
        keep-alives dropped, or a piece of them alone as KEEPALIVE_PIECE (yield_keepalives) (and the body's ReadWaits
        passed on)."""
        partial = b""
        for data in self._post.pieces():
            if data.__class__ is ReadWait:
                yield data
                continue
            *complete, partial = (partial + data).split(b"\n")
            lines = [line for line in map(_parse_line, complete) if line is not None]
            if lines:
                yield lines
            elif complete and self._keepalives:
                yield KEEPALIVE_PIECE
        last = _parse_line(partial)
        if last is not None:
            yield [last]

    def close(self) -> None:
        """Close the connection (any thread): the worker cancels the request at its next write."""
        self._post.close()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _parse_line(raw: bytes) -> TokenLine | FinalLine | None:
    try:
        return parse_stream_line(raw)
    except ValidationError as exc:
        raise WorkerError(0, f"worker sent a line that is not a stream line ({raw[:200]!r}): "
                             f"{exc.errors()[0]['msg']}") from None


class WorkerClient:
    def __init__(
        self,
        base_url: str,
        secret: str,
        connect_timeout: float = 5.0,
        read_timeout: float | None = 600.0,
        client: httpx.Client | None = None,
        http: InternalHttpConfig | None = None,
        grant: str | None = None,
    ) -> None:
        """secret: the key the worker accepts; grant (instead): a migration ticket's grant, good on the destination
        for the moved requests only (hpcllm.credentials). client: a shared connection pool to use (never closed
        here; generation streams take its timeouts); else one of its own, verifying TLS against http's site CA.
        Generation streams verify TLS against http's site CA (pass it with a shared client too)."""
        self.base_url = base_url.rstrip("/")
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=30.0)
        self._client = client or internal_client(http, timeout=timeout)
        self._stream_timeout = client.timeout if client is not None else timeout
        self._verify = verify_of(http)
        self._headers = {GRANT_HEADER: grant} if grant else {SECRET_HEADER: secret}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(
        self, method: str, path: str, body: BaseModel | None = None, timeout: float | None = None
    ) -> httpx.Response:
        """One JSON call; timeout (seconds) overrides the client's read timeout for slow calls."""
        kwargs: dict = {"headers": self._headers}
        if body is not None:
            kwargs["content"] = body.model_dump_json(exclude_none=True)
            kwargs["headers"] = {**self._headers, "Content-Type": "application/json"}
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        try:
            response = self._client.request(method, self.base_url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise WorkerError(0, f"worker {self.base_url} unreachable: {exc}") from exc
        except httpx.InvalidURL as exc:  # not an HTTPError
            raise WorkerError(0, f"worker URL {self.base_url!r} is not a valid URL: {exc}") from exc
        _raise_for_status(response)
        return response

    def _stream(self, path: str, body: BaseModel) -> GenerationStream:
        """POST that answers an NDJSON generation stream; the HTTP status is checked before this returns."""
        post = StreamingPost(self.base_url + path, body.model_dump_json(exclude_none=True).encode(),
                             {**self._headers, "Content-Type": "application/json", "Accept": NDJSON_MEDIA_TYPE},
                             self._stream_timeout, self._verify)
        try:
            post.open()
        except StreamBroken as exc:
            raise WorkerError(0, f"worker {self.base_url} unreachable: {exc}") from exc
        if not 200 <= post.status < 300:
            try:
                content = post.read()
            except StreamBroken:
                content = b""
            finally:
                post.close()
            _raise_error_answer(post.status, content, post.reason)
        return GenerationStream(post)

    def generate(self, body: GenerateRequest) -> GenerationStream:
        """Start a generation; the HTTP status is checked before this returns."""
        return self._stream(GENERATE_PATH, body)

    def embed(self, inputs: list[list[int]], request_id: str | None = None) -> EmbedResult:
        """Embeddings (last-token hidden state, L2-normalized) of token id lists; with a request_id, cancel(request_id)
        ends the call on the worker."""
        response = self._request("POST", EMBED_PATH, EmbedRequest(inputs=inputs, request_id=request_id))
        return EmbedResult.model_validate_json(response.content)

    def tokens(self, request_id: str) -> RequestTokens:
        response = self._request("GET", TOKENS_PATH.format(request_id=request_id))
        return RequestTokens.model_validate_json(response.content)

    def cancel(self, request_id: str) -> RequestTokens:
        """Stop a request and get its token ids (to resume it elsewhere with resume_token_ids)."""
        response = self._request("POST", CANCEL_PATH.format(request_id=request_id))
        return RequestTokens.model_validate_json(response.content)

    # ---- live migration (docs/migration.md) --------------------------------------------------------------------

    def prepare_migration(self, body: PrepareMigration, timeout: float | None = MIGRATION_CALL_TIMEOUT) -> PrepareResult:
        """Destination: create a held request and wait until its prompt and output so far are prefilled."""
        response = self._request("POST", PREPARE_MIGRATION_PATH, body, timeout)
        return PrepareResult.model_validate_json(response.content)

    def extend_migration(
        self, request_id: str, token_ids: list[int], wait: bool = False,
        timeout: float | None = MIGRATION_CALL_TIMEOUT,
    ) -> ExtendResult:
        """Destination: append tokens the source produced since the last round (wait: until prefilled)."""
        body = ExtendMigration(token_ids=token_ids, wait=wait)
        response = self._request("POST", EXTEND_MIGRATION_PATH.format(request_id=request_id), body, timeout)
        return ExtendResult.model_validate_json(response.content)

    def attach(self, request_id: str, from_index: int) -> GenerationStream:
        """Destination: release a held request and stream it from output index from_index (like generate)."""
        return self._stream(ATTACH_MIGRATION_PATH.format(request_id=request_id), AttachMigration(from_index=from_index))

    def drop_migration(self, request_id: str, timeout: float | None = None) -> RequestTokens:
        """Destination: drop a held request that will not be attached (409 if the id is not a held request)."""
        response = self._request("DELETE", HELD_MIGRATION_PATH.format(request_id=request_id), timeout=timeout)
        return RequestTokens.model_validate_json(response.content)

    def migrate(
        self, request_id: str, body: MigrateRequest, timeout: float | None = MIGRATION_CALL_TIMEOUT
    ) -> MigrationResult:
        """Source: move one running request to body.destination_url (live, in rounds)."""
        response = self._request("POST", MIGRATE_REQUEST_PATH.format(request_id=request_id), body, timeout)
        return MigrationResult.model_validate_json(response.content)

    def migrate_all(self, body: MigrateRequest, timeout: float | None = MIGRATION_CALL_TIMEOUT) -> MigrateAllResult:
        """Source: move every running and waiting request of this worker (node drain)."""
        response = self._request("POST", MIGRATE_ALL_PATH, body, timeout)
        return MigrateAllResult.model_validate_json(response.content)

    # ---- LoRA adapters at runtime ---------------------------------------------------------------------------------

    def load_lora_adapter(self, name: str, folder: str, timeout: float | None = ADAPTER_CALL_TIMEOUT
                          ) -> LoraAdapterResult:
        """Serve one more adapter (idempotent for the same folder); WorkerError 400 saying what is wrong with it."""
        body = LoadLoraAdapter(lora_name=name, lora_path=folder)
        return LoraAdapterResult.model_validate_json(self._request("POST", LOAD_LORA_PATH, body, timeout).content)

    def unload_lora_adapter(self, name: str, timeout: float | None = ADAPTER_CALL_TIMEOUT) -> LoraAdapterResult:
        """Stop serving an adapter (its running requests end first); WorkerError 404 for one it does not serve."""
        body = UnloadLoraAdapter(lora_name=name)
        return LoraAdapterResult.model_validate_json(self._request("POST", UNLOAD_LORA_PATH, body, timeout).content)

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
