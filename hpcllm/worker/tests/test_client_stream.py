"""How WorkerClient reads a generation stream (hpcllm.httpkit.streaming under GenerationStream), against a scripted
server that writes exactly the bytes, HTTP chunks and pauses a test gives: lines split across receives, many lines
in one receive, keep-alives, a stream that breaks mid-line, the final line, error answers, a reader closed from
another thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

import pytest

from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.protocol import GENERATE_PATH, FinalLine, GenerateRequest, TokenLine

SECRET = "stream-test-secret"
REQUEST = GenerateRequest(request_id="r1", prompt_token_ids=[1, 2, 3], max_tokens=8)


def token(index: int, text: str = "") -> bytes:
    text = text or f" t{index}"
    return json.dumps({"type": "token", "index": index, "token_id": 100 + index, "text": text}).encode() + b"\n"


def final(tokens: int, reason: str = "length") -> bytes:
    usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens}
    return json.dumps({"type": "final", "finish_reason": reason, "usage": usage}).encode() + b"\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
END = b"0\r\n\r\n"


class ScriptedWorker:
    """Accepts one connection, reads the request, then runs script(send) where send(bytes) writes to the socket
    (a pause between two sends puts them in two receives of the reader). Keeps what it received."""

    def __init__(self, script: Callable[[Callable[[bytes], None]], None], close_after_script: bool = False):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.request = b""
        self.closed_by_client = threading.Event()
        self._script = script
        self._close_after_script = close_after_script  # a worker that dies mid-stream: the reader sees EOF now
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(65536)
            head, body = self.request.split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(body) < length:
                body += conn.recv(65536)
            self.request = head + b"\r\n\r\n" + body
            self._script(conn.sendall)
            if self._close_after_script:
                conn.shutdown(socket.SHUT_WR)
            conn.settimeout(10)
            try:  # the reader closes its end: recv sees EOF (or a reset)
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            self.closed_by_client.set()
        self._listener.close()

    def join(self) -> None:
        self._thread.join(timeout=15)


def read_all(worker: ScriptedWorker, **client_options) -> tuple[list, list[int]]:
    """The stream's lines and, per line, tokens_buffered right after it was yielded."""
    lines, buffered = [], []
    with WorkerClient(worker.url, SECRET, **client_options) as client:
        with client.generate(REQUEST) as stream:
            for line in stream:
                lines.append(line)
                buffered.append(stream.tokens_buffered)
    worker.join()
    return lines, buffered


def test_request_carries_the_key_and_the_json_body():
    worker = ScriptedWorker(lambda send: send(CHUNKED_HEAD + chunk(final(0)) + END))
    lines, _ = read_all(worker)
    head, body = worker.request.split(b"\r\n\r\n", 1)
    assert head.startswith(f"POST {GENERATE_PATH} HTTP/1.1".encode())
    assert f"{SECRET_HEADER}: {SECRET}".lower().encode() in head.lower()
    assert GenerateRequest.model_validate_json(body) == REQUEST
    assert [type(line) for line in lines] == [FinalLine]


def test_lines_split_across_receives_and_chunks_arrive_whole_and_in_order():
    whole = token(0) + token(1, " ünï") + final(2)
    cut1, cut2 = 10, len(token(0)) + 7  # inside the first line, inside the second

    def script(send):
        send(CHUNKED_HEAD + chunk(whole[:cut1]))
        time.sleep(0.2)
        send(chunk(whole[cut1:cut2]))
        time.sleep(0.2)
        send(chunk(whole[cut2:]) + END)

    lines, _ = read_all(ScriptedWorker(script))
    assert [(line.index, line.text) for line in lines[:2]] == [(0, " t0"), (1, " ünï")]
    assert isinstance(lines[2], FinalLine) and lines[2].usage.completion_tokens == 2


def test_lines_that_piled_up_in_the_socket_come_as_one_piece():
    """Five chunks (five writes of the worker) already in the socket when the reader gets to it: one receive takes
    them all, and tokens_buffered says how many came behind each (the gateway merges them into one SSE event)."""

    def script(send):
        send(CHUNKED_HEAD + chunk(token(0)))
        time.sleep(0.3)
        send(b"".join(chunk(token(i)) for i in range(1, 6)))
        time.sleep(0.3)
        send(chunk(final(6)) + END)

    lines, buffered = read_all(ScriptedWorker(script))
    assert [line.index for line in lines[:6]] == list(range(6))
    assert buffered == [0, 4, 3, 2, 1, 0, 0]


def test_keepalive_lines_are_skipped():
    def script(send):
        send(CHUNKED_HEAD + chunk(b"\n"))
        time.sleep(0.1)
        send(chunk(b"\n\n") + chunk(token(0) + b"\n" + token(1)) + chunk(b"\n" + final(2)) + END)

    lines, buffered = read_all(ScriptedWorker(script))
    assert [type(line) for line in lines] == [TokenLine, TokenLine, FinalLine]
    assert buffered[:2] == [1, 0]


def test_a_final_line_without_a_newline_at_the_end_of_the_body_counts():
    worker = ScriptedWorker(lambda send: send(CHUNKED_HEAD + chunk(token(0) + final(1).rstrip(b"\n")) + END))
    lines, _ = read_all(worker)
    assert isinstance(lines[-1], FinalLine) and lines[-1].finish_reason == "length"


def test_a_body_with_content_length_instead_of_chunks_reads_the_same():
    body = token(0) + final(1)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: %d\r\n\r\n" % len(body)
    lines, _ = read_all(ScriptedWorker(lambda send: send(head + body)))
    assert [type(line) for line in lines] == [TokenLine, FinalLine]


def test_a_stream_broken_mid_line_is_a_worker_error_after_the_lines_before():
    worker = ScriptedWorker(lambda send: send(CHUNKED_HEAD + chunk(token(0) + token(1)[:9])),
                            close_after_script=True)  # the worker dies mid-line
    got = []
    with WorkerClient(worker.url, SECRET) as client, client.generate(REQUEST) as stream:
        with pytest.raises(WorkerError, match="worker stream broke") as raised:
            for line in stream:
                got.append(line)
    assert raised.value.status == 0
    assert [line.index for line in got] == [0]


def test_a_body_that_ends_without_a_final_line_is_a_worker_error():
    worker = ScriptedWorker(lambda send: send(CHUNKED_HEAD + chunk(token(0)) + END))
    with pytest.raises(WorkerError, match="without a final line"):
        read_all(worker)


def test_a_line_that_is_not_a_stream_line_is_a_worker_error():
    worker = ScriptedWorker(lambda send: send(CHUNKED_HEAD + chunk(token(0) + b'{"type": "tokn"}\n') + END))
    with pytest.raises(WorkerError, match="not a stream line") as raised:
        read_all(worker)
    assert raised.value.status == 0


def test_an_error_answer_is_a_worker_error_with_the_workers_status_and_message():
    body = json.dumps({"error": {"message": "prompt too long", "type": "invalid_request_error",
                                 "param": "prompt", "code": "context_length_exceeded"}}).encode()
    head = b"HTTP/1.1 400 BAD REQUEST\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    worker = ScriptedWorker(lambda send: send(head + body))
    with WorkerClient(worker.url, SECRET) as client, pytest.raises(WorkerError) as raised:
        client.generate(REQUEST)
    assert raised.value.status == 400 and raised.value.info.code == "context_length_exceeded"
    assert "prompt too long" in str(raised.value)


def test_an_unreachable_worker_is_a_worker_error_with_status_0():
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    with WorkerClient(f"http://127.0.0.1:{port}", SECRET) as client, pytest.raises(WorkerError) as raised:
        client.generate(REQUEST)
    assert raised.value.status == 0 and "unreachable" in str(raised.value)


def test_a_silent_worker_hits_the_read_timeout():
    worker = ScriptedWorker(lambda send: (send(CHUNKED_HEAD + chunk(token(0))), time.sleep(2)))
    with WorkerClient(worker.url, SECRET, read_timeout=0.5) as client, client.generate(REQUEST) as stream:
        lines = iter(stream)
        assert next(lines).index == 0
        started = time.monotonic()
        with pytest.raises(WorkerError, match="within 0.5 s"):
            next(lines)
    assert time.monotonic() - started < 1.8  # the timeout, not the worker's 2 s of silence ending


def test_closing_from_another_thread_wakes_the_reader_and_the_worker_sees_the_connection_go():
    """What the gateway's shutdown does to a stuck generation, and how a reader cancels a request on the worker."""
    worker = ScriptedWorker(lambda send: send(CHUNKED_HEAD + chunk(token(0))))  # then silence
    with WorkerClient(worker.url, SECRET) as client:
        stream = client.generate(REQUEST)
        lines = iter(stream)
        assert next(lines).index == 0
        threading.Timer(0.3, stream.close).start()
        started = time.monotonic()
        with pytest.raises(WorkerError):
            next(lines)
        assert time.monotonic() - started < 5
    assert worker.closed_by_client.wait(5)


def read_without_blocking(stream) -> list:
    """What the gateway does with several choices: iterate a stream read without blocking, waiting for its socket
    (wait_for_any) whenever it yields a ReadWait. The lines, and 'wait' for every ReadWait."""
    from hpcllm.httpkit.streaming import ReadWait, wait_for_any

    stream.yield_when_idle()
    seen = []
    for item in stream:
        if isinstance(item, ReadWait):
            assert wait_for_any([item]) == [item]
            seen.append("wait")
        else:
            seen.append(item)
    return seen


def test_read_without_blocking_yields_waits_between_pieces_and_the_same_lines():
    def script(send):
        send(CHUNKED_HEAD + chunk(token(0)))
        time.sleep(0.2)
        send(chunk(token(1) + token(2)[:9]))
        time.sleep(0.2)
        send(chunk(token(2)[9:] + final(3)) + END)

    worker = ScriptedWorker(script)
    with WorkerClient(worker.url, SECRET) as client, client.generate(REQUEST) as stream:
        seen = read_without_blocking(stream)
    lines = [item for item in seen if item != "wait"]
    assert [line.index for line in lines[:-1]] == [0, 1, 2] and isinstance(lines[-1], FinalLine)
    assert seen.index("wait") < seen.index(lines[1])  # it waited for the worker instead of blocking in a receive


def test_read_without_blocking_keeps_the_read_timeout_and_sees_a_close_from_another_thread():
    worker = ScriptedWorker(lambda send: (send(CHUNKED_HEAD + chunk(token(0))), time.sleep(2)))
    with WorkerClient(worker.url, SECRET, read_timeout=0.5) as client, client.generate(REQUEST) as stream:
        started = time.monotonic()
        with pytest.raises(WorkerError, match="within 0.5 s"):
            read_without_blocking(stream)
        assert time.monotonic() - started < 1.8
    worker = ScriptedWorker(lambda send: send(CHUNKED_HEAD + chunk(token(0))))  # then silence
    with WorkerClient(worker.url, SECRET) as client:
        stream = client.generate(REQUEST)
        threading.Timer(0.3, stream.close).start()
        with pytest.raises(WorkerError):
            read_without_blocking(stream)
    assert worker.closed_by_client.wait(5)
