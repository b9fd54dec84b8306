"""The worker's stream writer (stream_writer.py): one thread writes the generation streams after their first lines;
a slow reader is handed back to its HTTP thread; a client that leaves still cancels its request."""

import json
import socket
import ssl
import threading

from hpcllm.config import InternalHttpConfig
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.worker.protocol import GENERATE_PATH, FinalLine, GenerateRequest, TokenLine
from hpcllm.worker.requests import UnknownRequest
from hpcllm.worker.stream_writer import StreamWriter

from .conftest import SECRET, cancelled, hold_at, wait_until

PROMPT = "hello world, this"


def _generate(worker, request_id: str, max_tokens: int):
    body = GenerateRequest(request_id=request_id, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                           ignore_eos=True)
    with worker.client.generate(body) as stream:
        return list(stream)


def _generate_concurrently(worker, prefix: str, streams: int, max_tokens: int) -> dict[int, list]:
    """The streams' lines, each stream still running when its first lines are out (the writer takes only those):
    the engine waits until every request was submitted, then holds once each has a token until the writer took
    every stream."""
    engine, writer = worker.service.engine, worker.service.stream_writer
    request_ids = tuple(f"{prefix}{i}" for i in range(streams))
    submitted, taken = threading.Event(), threading.Event()
    handed_before = writer.handed_over
    for request_id in request_ids:  # any of them live: the engine waits for the others
        hold_at(engine, request_id, 0, submitted)
    hold_at(engine, request_ids, 1, taken)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _generate(worker, request_ids[i],
                                                                                     max_tokens)))
               for i in range(streams)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: all(_submitted(worker, request_id) for request_id in request_ids))
    submitted.set()
    assert wait_until(lambda: writer.handed_over == handed_before + streams, timeout=60)
    taken.set()
    for thread in threads:
        thread.join(60)
    assert len(results) == streams
    return results


def _small_send_buffer(monkeypatch) -> None:
    """A slow network: little room on the way to each client the writer takes."""
    hand_over = StreamWriter._hand_over

    def with_small_buffer(self, stream, sock, render):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return hand_over(self, stream, sock, render)

    monkeypatch.setattr(StreamWriter, "_hand_over", with_small_buffer)


def test_concurrent_streams_are_written_by_the_writer_and_read_as_the_engine_generated(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    expected = worker.service.engine.generate(GenerateRequest(request_id="solo", prompt=PROMPT, max_tokens=48,
                                                              temperature=0, ignore_eos=True))
    for lines in _generate_concurrently(worker, "w", 4, 48).values():
        tokens = [line for line in lines if isinstance(line, TokenLine)]
        assert [t.index for t in tokens] == list(range(48))
        assert [t.token_id for t in tokens] == expected.token_ids
        assert "".join(t.text for t in tokens) == expected.text
        assert isinstance(lines[-1], FinalLine) and lines[-1].finish_reason == "length"
    assert worker.service.stream_writer.handed_over == 4 and worker.service.stream_writer.handed_back == 0


def _raw_generate(worker, request_id: str, max_tokens: int, receive_buffer: int = 2048,
                  tls: ssl.SSLContext | None = None) -> socket.socket:
    """A generate request on a plain (or TLS) socket with a small receive buffer, left unread by the caller."""
    body = GenerateRequest(request_id=request_id, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                           ignore_eos=True).model_dump_json(exclude_none=True).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", worker.server.port))
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="localhost")
    head = (f"POST {GENERATE_PATH} HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
            f"{SECRET_HEADER}: {SECRET}\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def _submitted(worker, request_id: str) -> bool:
    try:
        worker.service.engine.tokens(request_id)
    except UnknownRequest:
        return False
    return True


def _finished(worker, request_id: str) -> bool:
    try:
        return worker.service.engine.tokens(request_id).state == "finished"
    except UnknownRequest:  # not submitted yet
        return False


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(60)
    while not data.endswith(b"0\r\n\r\n"):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def _ndjson_lines(response: bytes) -> list[dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"chunked" in head.lower(), head
    payload = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        payload, body = payload + rest[:length], rest[length + 2:]
        if length == 0:
            break
    return [json.loads(line) for line in payload.split(b"\n") if line.strip()]


def _read_late_and_check(worker, request_id: str, expected_ids: list[int], tls: ssl.SSLContext | None = None) -> None:
    """A client that reads nothing until its 480-token request has finished, then every line, once, in order. The
    request is held at its first token until the writer took the stream (it takes only a running one)."""
    writer, taken = worker.service.stream_writer, threading.Event()
    handed_before = writer.handed_over
    hold_at(worker.service.engine, request_id, 1, taken)
    sock = _raw_generate(worker, request_id, 480, tls=tls)
    try:
        assert wait_until(lambda: writer.handed_over == handed_before + 1, timeout=60)
        taken.set()
        assert wait_until(lambda: _finished(worker, request_id), timeout=60)
        lines = _ndjson_lines(_read_all(sock))
    finally:
        sock.close()
    assert [line["token_id"] for line in lines[:-1]] == expected_ids
    assert lines[-1]["finish_reason"] == "length"


def test_a_client_that_stops_reading_is_handed_back_and_still_gets_every_line(load_pair, start_worker, monkeypatch):
    """The writer never waits on one client: once a socket takes no more, the rest goes back to the stream's HTTP
    thread, which sends it blocking, and the client, reading late, gets every line in order."""
    _small_send_buffer(monkeypatch)
    worker = start_worker(load_pair("llama"))
    expected = worker.service.engine.generate(GenerateRequest(request_id="solo", prompt=PROMPT, max_tokens=480,
                                                              temperature=0, ignore_eos=True))
    _read_late_and_check(worker, "slow", expected.token_ids)
    assert worker.service.stream_writer.handed_back == 1


def test_a_client_that_leaves_a_written_stream_cancels_its_request(load_pair, start_worker):
    """The request waits at its first token until it is cancelled: the writer finds the client gone through its
    keep-alive lines, however slowly the engine would otherwise have run to the end."""
    worker = start_worker(load_pair("llama"))
    engine = worker.service.engine
    hold_at(engine, "leaves", 1, cancelled(engine, "leaves"))
    sock = _raw_generate(worker, "leaves", 400, receive_buffer=65536)
    try:
        sock.settimeout(30)
        assert sock.recv(4096)  # the head and the first lines: then the writer has the stream
        assert wait_until(lambda: worker.service.stream_writer.handed_over == 1)
    finally:
        sock.close()
    assert wait_until(lambda: _finished(worker, "leaves"), timeout=20)
    tokens = worker.service.engine.tokens("leaves")
    assert tokens.finish_reason == "abort" and len(tokens.output_token_ids) < 400


def test_tls_streams_are_written_by_the_writer_and_a_slow_tls_reader_gets_every_line(load_pair, start_worker, site_ca,
                                                                                     monkeypatch):
    """Over TLS ([internal_http]) the writer takes the streams too; a TLS write that finds no room goes back whole
    to the HTTP thread (OpenSSL finishes the record it began), and the late reader gets every line once, in order."""
    tls = InternalHttpConfig(tls_cert_file=site_ca.cert, tls_key_file=site_ca.key, tls_ca_file=site_ca.ca)
    worker = start_worker(load_pair("llama"), http=tls)
    expected = worker.service.engine.generate(GenerateRequest(request_id="solo", prompt=PROMPT, max_tokens=480,
                                                              temperature=0, ignore_eos=True))
    for lines in _generate_concurrently(worker, "t", 3, 48).values():
        assert [line.token_id for line in lines if isinstance(line, TokenLine)] == expected.token_ids[:48]
        assert lines[-1].finish_reason == "length"
    assert worker.service.stream_writer.handed_over == 3

    _small_send_buffer(monkeypatch)
    _read_late_and_check(worker, "slow-tls", expected.token_ids, tls=ssl.create_default_context(cafile=str(site_ca.ca)))
    assert worker.service.stream_writer.handed_over == 4 and worker.service.stream_writer.handed_back == 1
