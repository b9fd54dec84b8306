"""The Files and Batch APIs with the official openai client, through a real gateway: a batch's requests answered as
their endpoint answers them (the tiny model's worker), failures in the error file, usage counted, ownership,
validation, cancel, and a batch whose process died taken over by another without running a request twice."""

from __future__ import annotations

import io
import itertools
import json
import sqlite3
import threading
import time
from collections import deque

import httpx
import openai
import pytest

from hpcllm.gateway.batches import FINAL
from hpcllm.gateway.batches import serving as batch_serving
from hpcllm.gateway.batches.input_file import MAX_LISTED_ERRORS, parse_input
from hpcllm.gateway.batches.protocol import BatchObject, ResultLine, ResultResponse
from hpcllm.gateway.batches.results import ResultFile
from hpcllm.gateway.batches.runner import result_file_ids
from hpcllm.gateway.batches.service import EXTENSION_KEY
from hpcllm.gateway.ratelimit import _bucket_id
from hpcllm.gateway.response_store import owner_of
from hpcllm.httpkit.tests.thread_server import ThreadServer

from .conftest import ADMIN_KEY, MODEL, USER_KEY, GatewayFactory
from .stand_in_worker import stand_in_worker_app
from .test_errors import assert_error
from .test_usage import metric

OTHER_KEY = "sk-test-other"
KEYS = [{"key": USER_KEY, "name": "alice", "group": "physics"}, {"key": OTHER_KEY, "name": "bob"}]
CHAT = "/v1/chat/completions"


def jsonl(lines: list) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def chat_line(custom_id: str, question: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 6,
                     "temperature": 0, **body}}


def completion_line(custom_id: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "hello", "max_tokens": 1}}


def submit(client: openai.OpenAI, lines: list, endpoint: str = CHAT):
    uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")


def wait_until(condition, timeout_s: float = 60.0):
    """Poll a condition (a bounded wait for the runner thread): its first true value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, "timed out waiting"
            return value
        time.sleep(0.05)


def finished(client: openai.OpenAI, batch_id: str):
    return wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in FINAL and b)


def results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a request's result appears twice"
    return by_id


def service_of(gw):
    return gw.app.extensions[EXTENSION_KEY]


def lease_runs_out(gw, batch_id: str) -> None:
    """The batch's process "dies" (is stopped for a lease's length): its lease ends as if it had not been renewed in
    time, and the process's own clock has passed it too when it wakes."""
    batches = service_of(gw).batches
    with batches.shared.transaction() as db:
        db.conn.execute("UPDATE gateway_batches SET lease_expires = 0 WHERE id = ?", (batch_id,))
    batches.clock = lambda: time.time() + batches.lease_s


def usage_requests(gw) -> int:
    report = httpx.get(f"{gw.url}/v1/admin/usage", params={"by": "key"},
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
    return sum(row["requests"] for row in report["data"] if row["key"] == "alice")


def test_a_batch_answers_each_request_as_its_endpoint_does(make_gateway):
    gw = make_gateway(api_keys=KEYS)
    client = gw.client()
    questions = {"q1": "hello world", "q2": "what is two", "q3": "tell me more"}
    lines = [chat_line(cid, q) for cid, q in questions.items()]
    lines += [chat_line("bad", "x", max_tokens=-1), chat_line("streamed", "x", stream=True)]
    batch = submit(client, lines)
    assert batch.status == "in_progress" and batch.endpoint == CHAT and batch.model == MODEL
    assert batch.request_counts.total == 5 and batch.expires_at == batch.created_at + 24 * 3600

    done = finished(client, batch.id)
    assert done.status == "completed" and done.completed_at >= done.created_at
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 2)
    output, errors = results(client, done.output_file_id), results(client, done.error_file_id)
    assert set(output) == set(questions) and set(errors) == {"bad", "streamed"}
    for cid, question in questions.items():
        line = output[cid]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        direct = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                max_tokens=6, temperature=0)
        answer = line["response"]["body"]
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (
            direct.usage.prompt_tokens, direct.usage.completion_tokens)
    tokens = [output[cid]["response"]["body"]["usage"] for cid in questions]
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in tokens)
    assert done.usage.output_tokens == sum(u["completion_tokens"] for u in tokens) > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert errors["bad"]["response"]["status_code"] == 422
    assert errors["bad"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert errors["streamed"]["response"]["status_code"] == 400
    assert errors["streamed"]["response"]["body"]["error"]["param"] == "stream"

    output_file = client.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes == len(
        client.files.content(done.output_file_id).content)
    # The 3 answered requests, the invalid one (refused before a worker took it: not counted) aside, and the 3 direct.
    assert usage_requests(gw) == 6
    # The batch's requests and the downloads ended as HTTP requests do: a drain waits for none of them.
    wait_until(lambda: gw.state.in_flight == 0)
    assert [b.id for b in client.batches.list()] == [batch.id]


def test_embeddings_and_responses_batches(make_gateway):
    gw = make_gateway()
    client = gw.client()
    texts = {"e1": "one two", "e2": "three"}
    embeddings = submit(client, [{"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
                                  "body": {"model": MODEL, "input": text}} for cid, text in texts.items()],
                        endpoint="/v1/embeddings")
    responses = submit(client, [{"custom_id": "r", "method": "POST", "url": "/v1/responses",
                                 "body": {"model": MODEL, "input": "hello world", "max_output_tokens": 5,
                                          "temperature": 0}}], endpoint="/v1/responses")
    done = finished(client, embeddings.id)
    assert done.status == "completed" and done.request_counts.completed == 2
    for cid, line in results(client, done.output_file_id).items():
        direct = client.embeddings.create(model=MODEL, input=texts[cid])
        assert line["response"]["body"]["data"][0]["embedding"] == pytest.approx(direct.data[0].embedding)
    done = finished(client, responses.id)
    answer = results(client, done.output_file_id)["r"]["response"]["body"]
    direct = client.responses.create(model=MODEL, input="hello world", max_output_tokens=5, temperature=0)
    assert answer["object"] == "response" and answer["output"][0]["content"][0]["text"] == direct.output_text
    assert (done.usage.input_tokens, done.usage.output_tokens) == (direct.usage.input_tokens,
                                                                   direct.usage.output_tokens)
    assert client.responses.retrieve(answer["id"]).id == answer["id"]  # stored, as the endpoint stores it


def test_score_and_rerank_batches_answer_as_their_endpoints(make_gateway):
    """vLLM's run_batch takes score and rerank lines: a corpus reranked offline, each line's answer the endpoint's."""
    gw = make_gateway()
    client = gw.client()
    rerank = {"model": MODEL, "query": "capital of france", "documents": ["paris", "a cat", "france"]}
    score = {"model": MODEL, "text_1": "one two", "text_2": ["one", "three"]}
    batches = {url: submit(client, [{"custom_id": "x", "method": "POST", "url": url, "body": body}], endpoint=url)
               for url, body in (("/v1/rerank", rerank), ("/v1/score", score))}
    for url, body in (("/v1/rerank", rerank), ("/v1/score", score)):
        done = finished(client, batches[url].id)
        assert done.status == "completed" and done.request_counts.completed == 1, done
        answer = results(client, done.output_file_id)["x"]["response"]["body"]
        direct = gw.post(url, json=body).json()
        if url == "/v1/rerank":
            assert [(r["index"], r["relevance_score"]) for r in answer["results"]] == [
                (r["index"], pytest.approx(r["relevance_score"], abs=1e-6)) for r in direct["results"]]
        else:
            assert [d["score"] for d in answer["data"]] == pytest.approx([d["score"] for d in direct["data"]],
                                                                         abs=1e-6)
        assert answer["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]


def test_lists_page_newest_first(make_gateway):
    gw = make_gateway()
    client = gw.client()
    made = [client.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(3)]
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == made[:0:-1] and first.has_more
    rest = client.files.list(limit=2, after=first.data[-1].id)
    assert [f.id for f in rest.data] == made[:1] and not rest.has_more
    assert [f.id for f in client.files.list(order="asc")] == made
    assert_error(gw.get("/v1/files", params={"limit": 0}), 422, "invalid_value", "limit")
    assert_error(gw.get("/v1/files", params={"after": "file-nope"}), 400, "invalid_request", "after")
    assert [b.id for b in client.batches.list(limit=100)] == []
    assert_error(gw.get("/v1/batches", params={"limit": 101}), 422, "invalid_value", "limit")  # OpenAI's bound


def test_every_file_can_be_deleted_while_listing_them(make_gateway):
    """The openai client's pager asks for the next page after the last file of the page before: a user deleting the
    files as they are listed (a clean-up loop) has deleted that file. OpenAI's files list has 10,000 files a page by
    default; a page of 20 made the clean-up of a 21st file a 400 naming `after`."""
    gw = make_gateway()
    client = gw.client()
    made = {client.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(21)}
    deleted = set()
    for listed in client.files.list():
        assert client.files.delete(listed.id).deleted
        deleted.add(listed.id)
    assert deleted == made and list(client.files.list()) == []


def test_files_can_be_deleted_while_listing_them_past_a_page(make_gateway):
    """More files than a page holds (OpenAI's default page is 10,000; here pages of 5): the pager's next page after a
    file deleted meanwhile follows it still. A deleted file is gone for its owner at once: not listed, retrieved or
    downloaded, its bytes off the disk, its size no longer in the key's quota."""
    gw = make_gateway(files_quota_bytes=40)
    client = gw.client()
    made = {client.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(12)}
    with pytest.raises(openai.BadRequestError, match="4 bytes left"):  # 36 of 40 bytes are used
        client.files.create(file=("big.jsonl", io.BytesIO(b"{}\n" * 2)), purpose="batch")
    deleted = []
    for listed in client.files.list(limit=5):
        assert client.files.delete(listed.id).deleted
        deleted.append(listed.id)
    assert sorted(deleted) == sorted(made) and list(client.files.list()) == []
    gone = deleted[0]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(gone)
    assert_error(gw.get(f"/v1/files/{gone}/content"), 404, "file_not_found")
    with pytest.raises(openai.NotFoundError):  # deleted once
        client.files.delete(gone)
    assert not any(service_of(gw).files.path(file_id).exists() for file_id in deleted)
    assert client.files.create(file=("big.jsonl", io.BytesIO(b"{}\n" * 13)), purpose="batch").bytes == 39


def test_the_next_page_of_files_follows_a_file_deleted_and_swept_since_the_page_before(make_gateway):
    """A clean-up loop deletes the files of each page as the openai client's pager lists them, and a sweep runs
    between two pages (every 10 minutes): the next page still follows the last file of the page before. Its row goes
    a day later (files.PLACE_KEPT_S), not kept for ever."""
    from hpcllm.gateway.files.store import PLACE_KEPT_S

    gw = make_gateway(files_quota_bytes=9)  # three files of 3 bytes
    client, service = gw.client(), service_of(gw)
    oldest, older, newest = (client.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id
                             for i in range(3))
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == [newest, older] and first.has_more
    for listed in first.data:
        assert client.files.delete(listed.id).deleted
    service.runner.sweep()
    rest = client.files.list(limit=2, after=older)
    assert [f.id for f in rest.data] == [oldest] and not rest.has_more
    assert not service.files.path(older).exists()  # its bytes went at once

    # The row kept to place pages is no file for its owner: not retrieved, downloaded, deleted or run as a batch's
    # input, not listed, and not in the quota (a re-upload of the same name and the freed size fits at once).
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(older)
    assert_error(gw.get(f"/v1/files/{older}/content"), 404, "file_not_found")
    with pytest.raises(openai.NotFoundError):
        client.files.delete(older)
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id=older, endpoint="/v1/chat/completions", completion_window="24h")
    again = client.files.create(file=("1.jsonl", io.BytesIO(b"{}\n" * 2)), purpose="batch")
    assert [f.id for f in client.files.list()] == [again.id, oldest]

    owner = owner_of(gw.state.api_keys[USER_KEY])
    service.files.clock = lambda: time.time() + PLACE_KEPT_S + 1
    service.runner.sweep()
    assert service.files.get(owner, older, expired_too=True) is None
    assert service.files.get(owner, oldest) is not None


def test_the_sweep_removes_the_upload_temporaries_a_killed_process_left_but_not_a_live_uploads(make_gateway):
    """A gateway process killed while it copied an upload leaves its hidden temporary (outside any key's quota): the
    sweep removes one untouched for ABANDONED_UPLOAD_S, not one an upload is writing (touched at every chunk)."""
    import os

    from hpcllm.gateway.files.store import ABANDONED_UPLOAD_S

    gw = make_gateway()
    service = service_of(gw)
    kept = gw.client().files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id
    left, live = (service.files.directory / f".file-{tag}.upload" for tag in ("left", "live"))
    for temporary in (left, live):
        temporary.write_bytes(b"{}\n" * 1000)
    long_ago = time.time() - ABANDONED_UPLOAD_S - 60
    os.utime(left, (long_ago, long_ago))
    service.runner.sweep()
    assert not left.exists() and live.exists() and service.files.path(kept).exists()


def test_the_next_page_of_files_follows_a_file_that_expired_since_the_page_before(make_gateway):
    """The page before ended on a file that expired meanwhile (its expires_after): the next page still follows it, as
    it would a file still there, instead of a 400 naming `after`."""
    gw = make_gateway()
    client = gw.client()
    hour = {"anchor": "created_at", "seconds": 3600}
    older = client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id
    short = client.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="batch", expires_after=hour).id
    newest = client.files.create(file=("c.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == [newest, short] and first.has_more
    service_of(gw).files.clock = lambda: time.time() + 3601  # an hour later: `short` expired
    rest = client.files.list(limit=2, after=short)
    assert [f.id for f in rest.data] == [older] and not rest.has_more


def test_files_and_batches_belong_to_their_key(make_gateway):
    gw = make_gateway(api_keys=KEYS)
    client, other = gw.client(), gw.client(OTHER_KEY)
    content = jsonl([completion_line("a")])
    uploaded = client.files.create(file=("mine.jsonl", io.BytesIO(content)), purpose="batch")
    assert (uploaded.object, uploaded.bytes, uploaded.filename, uploaded.purpose, uploaded.status) == (
        "file", len(content), "mine.jsonl", "batch", "processed")
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).content == content
    named = client.files.create(file=("résumé 日本.jsonl", io.BytesIO(content)), purpose="batch")
    assert named.filename == "résumé 日本.jsonl" and client.files.content(named.id).content == content
    client.files.delete(named.id)
    wait_until(lambda: gw.state.in_flight == 0)  # a download is not left counted as running (a drain waits on it)
    assert [f.id for f in client.files.list()] == [uploaded.id] and list(other.files.list()) == []
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")

    for path in (f"/v1/files/{uploaded.id}", f"/v1/files/{uploaded.id}/content", f"/v1/batches/{batch.id}"):
        assert_error(gw.get(path, key=OTHER_KEY), 404, "batch_not_found" if "batches" in path else "file_not_found")
    assert_error(gw.post(f"/v1/batches/{batch.id}/cancel", key=OTHER_KEY), 404, "batch_not_found")
    assert_error(httpx.delete(f"{gw.url}/v1/files/{uploaded.id}", headers={"Authorization": f"Bearer {OTHER_KEY}"}),
                 404, "file_not_found")
    with pytest.raises(openai.NotFoundError):  # another key cannot run a batch over my file either
        other.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert list(other.batches.list()) == []

    finished(client, batch.id)
    assert client.files.delete(uploaded.id).deleted
    assert_error(gw.get(f"/v1/files/{uploaded.id}"), 404, "file_not_found")
    assert not list(gw.state.config.paths.state_dir.glob("gateway/files/*upload*"))

    # Beyond the JSON endpoints' gateway.max_request_bytes (4 MiB): a batch file may be up to files_max_bytes.
    large = jsonl([completion_line("a")]) + b" " * (5 << 20) + b"\n"
    assert client.files.create(file=("large.jsonl", io.BytesIO(large)), purpose="batch").bytes == len(large)


def test_uploads_are_refused_with_what_to_fix(make_gateway):
    gw = make_gateway(files_max_bytes=2048)
    big = jsonl([completion_line(f"r{i}") for i in range(40)])
    assert len(big) > 2048
    files = {"file": ("big.jsonl", big)}
    assert_error(gw.post("/v1/files", files=files, data={"purpose": "batch"}), 413, "request_too_large")
    assert_error(gw.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}), 400,
                 "invalid_value", "purpose")
    assert_error(gw.post("/v1/files", data={"purpose": "batch"}, files={"other": ("a", b"x")}), 400,
                 "missing_field", "file")
    assert_error(gw.post("/v1/files", json={"purpose": "batch"}), 400, "invalid_request")
    assert list(gw.client().files.list()) == []  # nothing half-kept


def test_a_filename_with_control_characters_is_stored_without_them(make_gateway):
    gw = make_gateway()
    boundary = "hpcllm-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''a%0Ab%07.jsonl\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n{{}}\n\r\n--{boundary}--\r\n").encode()
    uploaded = gw.post("/v1/files", content=body,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["filename"] == "ab.jsonl"
    download = gw.get(f"/v1/files/{uploaded.json()['id']}/content")
    assert download.status_code == 200 and download.content == b"{}\n"
    assert download.headers["Content-Disposition"] == "attachment; filename=ab.jsonl"


def test_a_bad_input_file_fails_the_batch_naming_its_lines(make_gateway):
    gw = make_gateway()
    client = gw.client()
    lines = [chat_line("a", "hi"), b"{not json", chat_line("a", "again"),
             {**chat_line("c", "hi"), "url": "/v1/completions"},
             {**chat_line("d", "hi"), "body": {"model": "other-model", "messages": []}},
             {"custom_id": "e", "method": "GET", "url": CHAT, "body": {}}]
    batch = submit(client, lines)
    assert batch.status == "failed" and batch.failed_at
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("invalid_json_line", 2), ("duplicate_custom_id", 3), ("url_mismatch", 4), ("model_mismatch", 5),
        ("invalid_request", 6)]
    assert all(e.message for e in batch.errors.data)
    assert client.batches.retrieve(batch.id).status == "failed"
    assert_error(gw.post(f"/v1/batches/{batch.id}/cancel"), 400, "batch_not_cancellable")

    odd = submit(client, [{"custom_id": "a", "method": "POST", "url": CHAT, "body": {"model": 5, "messages": []}}])
    assert odd.status == "in_progress" and odd.model is None  # the request's own 422 goes to the error file
    assert results(client, finished(client, odd.id).error_file_id)["a"]["response"]["status_code"] == 422

    empty = submit(client, [])
    assert empty.status == "failed" and [e.code for e in empty.errors.data] == ["empty_file"]
    uploaded = client.files.create(file=("r.jsonl", io.BytesIO(jsonl([chat_line("a", "hi")]))), purpose="batch")
    body = {"input_file_id": uploaded.id, "endpoint": CHAT, "completion_window": "24h"}
    assert_error(gw.post("/v1/batches", json={**body, "endpoint": "/v1/moderations"}), 400, "invalid_value",
                 "endpoint")
    assert_error(gw.post("/v1/batches", json={**body, "completion_window": "1h"}), 400, "invalid_value",
                 "completion_window")
    assert_error(gw.post("/v1/batches", json={**body, "input_file_id": "file-nope"}), 404, "file_not_found",
                 "input_file_id")
    assert_error(gw.post("/v1/batches", json={"endpoint": CHAT}), 400, "missing_field", "input_file_id")


def test_a_file_of_many_bad_lines_lists_the_first_hundred_and_is_read_no_further():
    consumed = itertools.count()

    def bad_lines():  # a file of 2 million broken lines
        for _ in range(2_000_000):
            next(consumed)
            yield b"x\n"

    parsed = parse_input(bad_lines(), CHAT, max_requests=50_000)
    assert [e.line for e in parsed.errors] == list(range(1, MAX_LISTED_ERRORS + 1))
    assert next(consumed) == MAX_LISTED_ERRORS + 1  # read up to the line after the last listed error, no further


def test_a_batch_of_a_model_the_gateway_does_not_serve_fails_at_creation_naming_it(make_gateway):
    """A misspelt model would otherwise run the whole batch into 404s and end 'completed'; as a mismatched model,
    it fails the batch at once, naming the first line that asks for it and the models there are."""
    gw = make_gateway()
    client = gw.client()
    lines = [{**chat_line(f"r{i}", "hi"), "body": {"model": "tiny-lama", "messages": []}} for i in range(3)]
    batch = submit(client, [b"", *lines])
    assert batch.status == "failed", batch.status
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [("model_not_found", 2, "body.model")]
    assert "'tiny-lama'" in batch.errors.data[0].message and MODEL in batch.errors.data[0].message


def test_a_batch_is_made_at_once_while_the_controller_cannot_say_which_models_it_serves(make_gateway):
    """The controller down, in a fresh process (no model list yet): the batch's model cannot be checked, and the batch
    is made at once (its requests wait for the controller as any request, when they run), neither refused nor kept
    waiting the outage wait that interactive requests wait (here longer than the client's 60 s timeout)."""
    gw = make_gateway(static_models={}, controller_url="http://127.0.0.1:9", upstream_connect_timeout_seconds=1,
                      controller_outage_wait_seconds=600, route_timeout_seconds=600)
    # Its runner stopped first: its run's request would wait out the route timeout past the test, the gateway's
    # close spending its whole budget on it. Creation does not involve the runner.
    service_of(gw).runner.close()
    batch = submit(gw.client(), [chat_line("a", "hi")])
    assert (batch.status, batch.model, batch.request_counts.total) == ("in_progress", MODEL, 1), batch


def test_a_line_nested_too_deep_to_parse_fails_the_batch_naming_it_not_a_500(make_gateway):
    """JSON nested deeper than Python's parser goes (a generated body gone wrong) is a line that cannot be parsed."""
    gw = make_gateway()
    client = gw.client()
    deep = b'{"custom_id": "b", "method": "POST", "url": "%s", "body": %s}' % (CHAT.encode(),
                                                                           b"[" * 100_000 + b"]" * 100_000)
    batch = submit(client, [chat_line("a", "hi"), deep])
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("invalid_json_line", 2)]


def test_a_line_nested_deeper_than_the_gateway_takes_fails_the_batch_at_creation(make_gateway):
    """The gateway's JSON parser (every hpcllm service's) takes 200 levels of nesting: a deeper line, which Python's
    parser would take, is refused when the batch is made, naming it, not sent on when it runs."""
    gw = make_gateway()
    client = gw.client()
    deep = b'{"custom_id": "b", "method": "POST", "url": "%s", "body": {"model": "%s", "x": %s}}' % (
        CHAT.encode(), MODEL.encode(), b"[" * 300 + b"]" * 300)
    batch = submit(client, [chat_line("a", "hi"), deep])
    assert batch.status == "failed", batch.status
    assert [(e.code, e.line) for e in batch.errors.data] == [("invalid_json_line", 2)]


def test_a_file_that_starts_with_a_utf8_bom_runs(make_gateway):
    """Editors on Windows write a UTF-8 byte order mark before the first line: it is not part of the request."""
    gw = make_gateway()
    client = gw.client()
    batch = submit(client, [b"\xef\xbb\xbf" + json.dumps(chat_line("a", "hi")).encode(), chat_line("b", "hi")])
    done = finished(client, batch.id)
    assert (done.status, done.request_counts.completed, done.request_counts.total) == ("completed", 2, 2), done
    assert sorted(results(client, done.output_file_id)) == ["a", "b"]


def test_an_input_file_whose_bytes_are_gone_is_a_404_naming_it(make_gateway):
    gw = make_gateway()
    uploaded = gw.client().files.create(file=("r.jsonl", io.BytesIO(jsonl([chat_line("a", "hi")]))),
                                        purpose="batch")
    service_of(gw).files.path(uploaded.id).unlink()  # deleted by another host since its row was read
    answer = gw.post("/v1/batches", json={"input_file_id": uploaded.id, "endpoint": CHAT,
                                          "completion_window": "24h"})
    assert_error(answer, 404, "file_not_found", "input_file_id")
    assert uploaded.id in answer.json()["error"]["message"]


def test_an_input_file_deleted_while_its_batch_is_made_is_a_404_not_a_batch_that_fails_later(make_gateway,
                                                                                              monkeypatch):
    """The key's DELETE lands while POST /v1/batches reads the file, before the batch is recorded: the deletion cannot
    see the batch, so the file goes, and the batch is refused as over any deleted file (not made, to fail
    input_file_missing once it runs: 'deleted before the batch ran', though the key was told it was made)."""
    gw = make_gateway()
    client = gw.client()
    uploaded = client.files.create(file=("r.jsonl", io.BytesIO(jsonl([chat_line("a", "hi")]))), purpose="batch")

    def deleted_meanwhile(*args, **kwargs):
        parsed = parse_input(*args, **kwargs)
        assert client.files.delete(uploaded.id).deleted  # another of the key's requests, answered meanwhile
        return parsed

    monkeypatch.setattr(batch_serving, "parse_input", deleted_meanwhile)
    answer = gw.post("/v1/batches", json={"input_file_id": uploaded.id, "endpoint": CHAT,
                                          "completion_window": "24h"})
    assert_error(answer, 404, "file_not_found", "input_file_id")
    assert list(client.batches.list()) == []


def test_a_checked_file_keeps_no_request_bodies_when_only_counted():
    lines = [json.dumps(chat_line(f"r{i}", "hi")).encode() for i in range(3)]
    counted = parse_input(lines, CHAT, max_requests=50_000, keep_entries=False)
    assert (counted.count, counted.entries, counted.errors, counted.model) == (3, [], [], MODEL)
    assert [entry.custom_id for entry in parse_input(lines, CHAT, max_requests=50_000).entries] == ["r0", "r1", "r2"]
    too_many = parse_input(lines, CHAT, max_requests=2, keep_entries=False)
    assert [(e.code, e.line) for e in too_many.errors] == [("too_many_tasks", 3)]


@pytest.mark.parametrize("short", [False, True], ids=["chat", "short-chat"])
def test_a_running_batch_holds_its_requests_as_the_file_has_them_not_as_objects(tmp_path, short):
    """A batch's runner holds its pending requests for the batch's whole run (hours), up to batch_concurrency
    batches a process: held as parsed objects a chat request takes about 5 times its line's bytes (a 200 MB file,
    1 GB in the gateway process); held as its line, little more than the file, short lines too (each entry's own
    overhead is not several times a short line)."""
    import tracemalloc

    lines = [json.dumps(chat_line(f"r{i}", "Hi") if short else chat_line(
                 f"r{i}", f"What is the capital of country number {i}? Answer briefly.",
                 messages=[{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": f"Country number {i}?"}])).encode() + b"\n"
             for i in range(5000)]
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"".join(lines))
    size = requests.stat().st_size
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with open(requests, "rb") as source:  # as the runner reads it
            parsed = parse_input(source, CHAT, max_requests=50_000)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * size, f"{len(lines)} requests of {size} bytes held {held} bytes"
    assert [entry.body for entry in parsed.entries] == [json.loads(line)["body"] for line in lines]
    assert (parsed.entries[0].line, parsed.entries[0].custom_id) == (1, "r0")


def test_results_are_read_back_a_line_at_a_time_not_held_whole(tmp_path):
    """A process taking a batch over, or whose turn of it comes back, reads its output back for the requests done and
    their tokens: a batch of 50,000 embeddings writes gigabytes, which read whole and made into objects (each vector
    a list of floats) were held in memory at once, several times the file's size."""
    import tracemalloc

    partial, final = tmp_path / ".out.partial", tmp_path / "out"
    first = ResultFile(partial, final)
    body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.123456789] * 2000}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    for i in range(500):
        first.append(ResultLine(id=f"batch_req_{i}", custom_id=f"r{i}",
                                response=ResultResponse(status_code=200, request_id="x", body=body)))
    first.close()
    whole = partial.stat().st_size
    with open(partial, "ab") as out:  # the process died writing a line
        out.write(b'{"id": "batch_req_cut", "custom_id": "cut", "response": {"status_')
    tracemalloc.start()
    try:
        again = ResultFile(partial, final)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    again.close()
    assert again.custom_ids == {f"r{i}" for i in range(500)}
    assert (again.input_tokens, again.output_tokens) == (first.input_tokens, first.output_tokens) == (1500, 0)
    assert partial.stat().st_size == whole  # the cut line dropped: its request runs again
    assert peak < whole / 20, f"reading {whole} bytes of results back held {peak} bytes"


class GatedWorker:
    """A stand-in worker (one token per request) whose `blocked`-th request (0-based) waits for `release`."""

    def __init__(self, blocked: int):
        self.calls = itertools.count()
        self.blocked = blocked
        self.reached = threading.Event()
        self.release = threading.Event()
        self.server = ThreadServer(stand_in_worker_app("gated", self._after_token))

    def _after_token(self, index: int) -> None:
        if next(self.calls) == self.blocked:
            self.reached.set()
            self.release.wait(60)


@pytest.fixture
def gated_factory(tmp_path, tiny_model_dir):
    """(GatewayFactory in front of a GatedWorker factory) - gateways and workers stopped at the end."""
    made = []

    def make(blocked: int):
        worker = GatedWorker(blocked)
        factory = GatewayFactory(tmp_path / f"f{len(made)}", worker.server.url, tiny_model_dir)
        made.append((worker, factory))
        return worker, factory

    yield make
    for worker, factory in made:
        worker.release.set()
        factory.stop_all()
        worker.server.stop()


def test_cancel_stops_starting_requests_and_keeps_what_finished(gated_factory):
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1)
    client = gw.client()
    batch = submit(client, [completion_line(f"r{i}") for i in range(3)], endpoint="/v1/completions")
    assert worker.reached.wait(30)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    worker.release.set()
    done = finished(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 1, 0)
    assert list(results(client, done.output_file_id)) == ["r0"] and done.error_file_id is None


def test_a_batch_whose_process_died_is_finished_by_another_without_duplicates(gated_factory, tmp_path, limits_url):
    """On SQLite (one host's processes) and PostgreSQL (several hosts sharing the database and files_dir)."""
    worker, factory = gated_factory(blocked=1)  # the second request hangs in the first process
    shared = {"limits_db": limits_url, "files_dir": str(tmp_path / "files"),
              "batch_concurrency": 1, "batch_lease_seconds": 300}
    first = factory(**shared)
    client = first.client()
    batch = submit(client, [completion_line(f"r{i}") for i in range(4)], endpoint="/v1/completions")
    assert worker.reached.wait(30)
    first_runner = service_of(first).runner
    assert list(first_runner.running) == [batch.id]
    lease_runs_out(first, batch.id)
    output_id, _ = result_file_ids(batch.id)
    with open(tmp_path / "files" / f".{output_id}.partial", "ab") as partial:  # it died writing r1's line
        partial.write(b'{"id": "batch_req_0", "custom_id": "r1", "response": {"status_')

    second = factory(**shared)  # another process, sharing the database and the files directory
    service_of(second).runner.wake()
    done = finished(second.client(), batch.id)
    assert done.status == "completed" and done.request_counts.completed == 4
    assert done.usage.output_tokens == 4  # one token each, r0's counted from the file the first process wrote
    worker.release.set()  # the first process's hung request ends: its result must not be written again
    wait_until(lambda: not first_runner.running)  # it found its lease gone and gave the batch up
    output = results(second.client(), done.output_file_id)
    assert sorted(output) == ["r0", "r1", "r2", "r3"]
    # On disk too (a download stops at the size the file was published with).
    assert len((tmp_path / "files" / done.output_file_id).read_bytes().splitlines()) == 4
    # The worker ran r0 once (the second process counted it from the file), r1 twice (the first process died in
    # it), r2 and r3 once: the first process started nothing after it found its lease gone.
    assert next(worker.calls) == 5


def test_a_process_whose_run_lost_its_batchs_lease_does_not_run_the_batch_twice_at_once(gated_factory):
    """batch_concurrency 2: the batch's lease runs out while its one request runs, and the same process, with a slot
    free, claims it again: it hands it back instead of running it beside the run still ending (two runs writing one
    batch's files), and runs it once that run has ended."""
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=2, batch_lease_seconds=300)
    client, service = gw.client(), service_of(gw)
    batch = submit(client, [completion_line("r0")], endpoint="/v1/completions")
    assert worker.reached.wait(30)
    handed_back, release = threading.Event(), service.batches.release

    def noted_release(claim, **changes):
        release(claim, **changes)
        handed_back.set()

    service.batches.release = noted_release
    lease_runs_out(gw, batch.id)
    service.runner.look()
    assert handed_back.wait(30), "the process ran the batch a second time beside its run still ending"
    assert list(service.runner.running) == [batch.id]
    worker.release.set()
    done = finished(client, batch.id)
    assert done.status == "completed" and list(results(client, done.output_file_id)) == ["r0"]


def first_process_running_a_batch(gated_factory, tmp_path, blocked: int, **settings):
    """A gateway process sharing its database and files_dir with the processes `factory(**shared)` makes, running a
    batch of 3 requests r0-r2 whose request number `blocked` hangs in the worker until worker.release is set.
    Returns (worker, factory, shared, first, batch)."""
    worker, factory = gated_factory(blocked=blocked)
    shared = {"limits_db": str(tmp_path / "limits.db"), "files_dir": str(tmp_path / "files"),
              "batch_concurrency": 1, **settings}
    first = factory(**shared)
    batch = submit(first.client(), [completion_line(f"r{i}") for i in range(3)], endpoint="/v1/completions")
    assert worker.reached.wait(30)
    return worker, factory, shared, first, batch


def drain_until_it_gives_its_batch_up(first, worker):
    first.state.start_draining()
    worker.release.set()  # the request it was running finishes and is kept; it starts no other
    wait_until(lambda: not service_of(first).runner.running)


def taken_over(factory, shared, batch_id):
    """(another process sharing the database and files_dir, the batch it claimed and ran to its end)"""
    second = factory(**shared)
    service_of(second).runner.wake()
    return second, finished(second.client(), batch_id)


def test_a_batch_cancelled_while_nobody_runs_it_runs_no_more_requests(gated_factory, tmp_path):
    worker, factory, shared, first, batch = first_process_running_a_batch(gated_factory, tmp_path, blocked=1,
                                                                          batch_lease_seconds=300)
    client = first.client()
    lease_runs_out(first, batch.id)
    assert client.batches.cancel(batch.id).status == "cancelling"

    _, done = taken_over(factory, shared, batch.id)
    assert done.status == "cancelled" and list(results(client, done.output_file_id)) == ["r0"]
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 0)
    worker.release.set()
    wait_until(lambda: not service_of(first).runner.running)


def test_past_its_window_a_batch_expires_and_lists_the_requests_it_did_not_run(gated_factory):
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1)
    client = gw.client()
    batch = submit(client, [completion_line(f"r{i}") for i in range(3)], endpoint="/v1/completions")
    assert worker.reached.wait(30)
    service = service_of(gw)
    service.batches.renew(service.runner.running[batch.id], expires_at=int(time.time()) - 1)  # its 24 h are over
    service.runner.wake()  # the run reads the batch again at its next result (else at its next renewal)
    worker.release.set()
    done = finished(client, batch.id)
    assert done.status == "expired" and done.expired_at
    assert list(results(client, done.output_file_id)) == ["r0"]
    errors = results(client, done.error_file_id)
    assert sorted(errors) == ["r1", "r2"]
    assert all(line["response"] is None and line["error"]["code"] == "batch_expired" for line in errors.values())
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)


def test_a_run_whose_batch_was_handed_back_as_it_expired_writes_no_expiry_lines(gated_factory, monkeypatch):
    """The process's close hands the batch back (LocalLease.give_up) as its run finds the completion window over: the
    run still wrote the batch_expired lines of the requests it had not run, into the files of the process that takes
    the batch over. Now it writes nothing once the batch is given back; the next run lists them, each once."""
    from hpcllm.gateway.batches import runner as runner_module

    leases, second_claimed, go = itertools.count(), threading.Event(), threading.Event()

    class HandedBackAsItExpires(runner_module.LocalLease):
        def __init__(self, *args):
            super().__init__(*args)
            self.number = next(leases)

        def renew(self, **changes):
            if self.number > 0:  # the next run: once the test has looked at what the first one wrote
                second_claimed.set()
                go.wait(60)
                return super().renew(**changes)
            self.batches.renew(self.claim, expires_at=int(time.time()) - 1)  # its 24 h are over
            batch = super().renew(**changes)
            self.give_up()  # the close, from its thread
            return batch

    monkeypatch.setattr(runner_module, "LocalLease", HandedBackAsItExpires)
    worker, factory = gated_factory(blocked=-1)
    gw = factory(batch_concurrency=1)
    client = gw.client()
    batch = submit(client, [completion_line(f"r{i}") for i in range(3)], endpoint="/v1/completions")
    try:
        assert second_claimed.wait(60)  # claimed again: the first run has ended
        _, error_id = result_file_ids(batch.id)
        partial = runner_module.partial_path(service_of(gw).runner.files, error_id)
        assert partial.read_bytes() == b"", "the run wrote results after its batch was handed back"
    finally:
        go.set()
    done = finished(client, batch.id)
    assert done.status == "expired"
    errors = results(client, done.error_file_id)
    assert sorted(errors) == ["r0", "r1", "r2"]
    assert all(line["error"]["code"] == "batch_expired" for line in errors.values())


def test_a_draining_gateway_hands_its_batch_to_another_process(gated_factory, tmp_path):
    worker, factory, shared, first, batch = first_process_running_a_batch(gated_factory, tmp_path, blocked=0)
    drain_until_it_gives_its_batch_up(first, worker)
    row = service_of(first).batches.get(owner_of(first.state.api_keys[USER_KEY]), batch.id)
    assert row.batch.status == "in_progress" and row.batch.request_counts.completed == 1

    second, done = taken_over(factory, shared, batch.id)
    assert done.status == "completed" and sorted(results(second.client(), done.output_file_id)) == ["r0", "r1", "r2"]


def test_a_batch_accepted_before_the_site_lowered_batch_max_requests_still_runs_every_request(gated_factory,
                                                                                                tmp_path):
    """The site lowers gateway.batch_max_requests and restarts its gateways while a batch of 3 runs: the batch was
    checked when it was made, and the process that takes it over runs all of it, not only the first line."""
    worker, factory, shared, first, batch = first_process_running_a_batch(gated_factory, tmp_path, blocked=0)
    drain_until_it_gives_its_batch_up(first, worker)

    second, done = taken_over(factory, {**shared, "batch_max_requests": 1}, batch.id)
    assert done.status == "completed" and done.request_counts.total == 3
    assert sorted(results(second.client(), done.output_file_id)) == ["r0", "r1", "r2"]


def test_a_gateway_process_closing_hands_its_running_batch_back(gated_factory, tmp_path):
    """What gunicorn's worker_exit hook does as a worker process ends (server._worker_exit: Gateway.close, whose
    closers hold the batch runner's): the batch it runs is handed back at close - its running request finishes and
    is kept, no other starts - and another process takes it over at once, not a lease's length later; each request
    runs and is written once."""
    worker, factory, shared, first, batch = first_process_running_a_batch(gated_factory, tmp_path, blocked=0,
                                                                          batch_lease_seconds=300)
    closing = threading.Thread(target=first.state.close, args=(60,), name="worker-exit")
    closing.start()
    wait_until(lambda: service_of(first).runner.stopping)
    worker.release.set()  # r0 ends while the close waits for it
    closing.join(90)
    assert not closing.is_alive(), "the gateway's close did not end"
    with service_of(first).batches.shared.connection() as db:
        row = db.conn.execute("SELECT status, lease_holder, batch FROM gateway_batches").fetchone()
    assert (row["status"], row["lease_holder"]) == ("in_progress", None)  # released, not left to run out
    assert json.loads(row["batch"])["request_counts"]["completed"] == 1

    second, done = taken_over(factory, shared, batch.id)
    assert done.status == "completed" and sorted(results(second.client(), done.output_file_id)) == ["r0", "r1", "r2"]
    assert next(worker.calls) == 3  # r0 ran once: the closing process ran nothing after it


def test_a_gateway_process_whose_close_runs_out_of_time_cancels_its_running_batch_request_and_hands_the_batch_back(
        gated_factory, tmp_path):
    """A quick stop (server.QUICK_CLOSE_S) closes a gateway process while its batch request still generates: the
    batch was left held by the exiting process, a lease's length (here 300 s) before another could take it, while the
    worker went on generating for nobody. Now the close cancels that request (its result not recorded) and releases
    the batch; another process takes it over at once and runs the request again, each result written once."""
    from hpcllm.gateway.server import QUICK_CLOSE_S

    worker, factory, shared, first, batch = first_process_running_a_batch(gated_factory, tmp_path, blocked=0,
                                                                          batch_lease_seconds=300)
    first.state.close(QUICK_CLOSE_S)  # r0 is held in the worker (60 s): it outlasts the close's budget

    def released():
        with service_of(first).batches.shared.connection() as db:
            row = db.conn.execute("SELECT status, lease_holder, batch FROM gateway_batches").fetchone()
        return row["lease_holder"] is None and row

    row = wait_until(released, timeout_s=30)  # well before the held request's 60 s (then it would have ended)
    assert row["status"] == "in_progress"
    assert json.loads(row["batch"])["request_counts"]["completed"] == 0  # r0's result is not kept

    second, done = taken_over(factory, shared, batch.id)
    assert done.status == "completed" and sorted(results(second.client(), done.output_file_id)) == ["r0", "r1", "r2"]
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
    assert next(worker.calls) == 4  # r0 twice (cancelled, then taken over), r1 and r2 once


def test_an_input_file_deleted_while_its_batch_runs_is_gone_for_its_key_and_the_batch_still_finishes(gated_factory,
                                                                                                      tmp_path):
    """The key deletes the input file while the batch runs: the file is gone for it at once, and the process that
    takes the batch over (this one drains) still reads it; its bytes go once the batch has ended."""
    worker, factory, shared, first, batch = first_process_running_a_batch(gated_factory, tmp_path, blocked=0)
    client = first.client()
    assert client.files.delete(batch.input_file_id).deleted
    assert_error(first.get(f"/v1/files/{batch.input_file_id}"), 404, "file_not_found")
    assert list(client.files.list()) == []
    drain_until_it_gives_its_batch_up(first, worker)

    second, done = taken_over(factory, shared, batch.id)
    assert done.status == "completed" and done.errors is None, done
    assert sorted(results(second.client(), done.output_file_id)) == ["r0", "r1", "r2"]
    files = service_of(second).files
    assert service_of(second).runner.sweep() == 1 and not files.path(batch.input_file_id).exists()
    assert not list((tmp_path / "files").glob(".*"))  # no partial result file left behind


def test_a_batch_that_fails_after_some_results_keeps_them_downloadable(gated_factory, tmp_path):
    """A batch that fails once it has results (here its input's bytes are gone for the process that takes it over: a
    files_dir not shared by every host) keeps what it finished: its output file is published with the failed batch
    (OpenAI's output_file_id, any status), counted, and no partial result file is left in the files directory, which
    no sweep, listing or quota would ever see."""
    worker, factory, shared, first, batch = first_process_running_a_batch(gated_factory, tmp_path, blocked=0)
    drain_until_it_gives_its_batch_up(first, worker)  # r0 is written to the batch's partial output file
    assert list((tmp_path / "files").glob(".*.partial"))
    service_of(first).files.path(batch.input_file_id).unlink()

    second, done = taken_over(factory, shared, batch.id)
    assert done.status == "failed" and [e.code for e in done.errors.data] == ["input_file_missing"]
    assert list(results(second.client(), done.output_file_id)) == ["r0"] and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 1, 0)
    assert done.usage.output_tokens == 1
    assert sorted(path.name for path in (tmp_path / "files").iterdir()) == [done.output_file_id]


def test_a_process_that_loses_the_lease_while_failing_a_batch_says_so_and_leaves_it_to_the_next(gated_factory,
                                                                                                  caplog):
    """The process failing a batch (its input's bytes gone for it) is stopped for a lease's length first: its failure
    is not recorded, and the log says the lease was lost (as for a batch it completes), not nothing; the process that
    takes the batch over (here the same one, reading the input) runs it to its end."""
    import logging

    caplog.set_level(logging.WARNING, logger="hpcllm.gateway.batches.runner")
    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(batch_concurrency=1)
    files, read_lines, stalled = service_of(gw).files, service_of(gw).files.read_lines, []

    def stalled_once(file_id: str):  # the runner's first read: the bytes are gone, and the process stalls
        if threading.current_thread().name.startswith("batch-") and not stalled:
            stalled.append(file_id)
            batch_id, = service_of(gw).runner.running
            lease_runs_out(gw, batch_id)
            raise FileNotFoundError(file_id)
        return read_lines(file_id)

    files.read_lines = stalled_once
    client = gw.client()
    done = finished(client, submit(client, [completion_line("r0")], endpoint="/v1/completions").id)
    assert stalled and done.status == "completed" and done.errors is None
    assert f"batch {done.id}: its lease was lost while finishing" in caplog.text


def test_a_batch_writes_its_row_every_third_of_its_lease_not_with_every_result(gated_factory):
    """The limits database (the rate limiter's) is not written once per result: 20 results, 2 renewals (the claim's
    first and the finalizing one)."""
    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(batch_concurrency=2, batch_lease_seconds=300)
    batches, renewals = service_of(gw).batches, itertools.count()
    renew = batches.renew

    def counted(*args, **changes):
        next(renewals)
        return renew(*args, **changes)

    batches.renew = counted
    batch = submit(gw.client(), [completion_line(f"r{i}") for i in range(20)], endpoint="/v1/completions")
    done = finished(gw.client(), batch.id)
    assert done.status == "completed" and done.request_counts.completed == 20
    assert next(renewals) == 2


def test_creating_a_batch_does_not_make_the_running_batches_write_their_rows(gated_factory):
    """Only a cancel has a running batch renew at once (to read it): a batch created beside it does not cost a
    database transaction per running batch; the running one renews once more, to finish."""
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1, batch_lease_seconds=300)
    client, batches = gw.client(), service_of(gw).batches
    running = submit(client, [completion_line("a0")], endpoint="/v1/completions")
    assert worker.reached.wait(30)  # its claim's renewal is behind it
    renewals, renew = [], batches.renew

    def noted(claim, **changes):
        renewals.append(claim.batch_id)
        return renew(claim, **changes)

    batches.renew = noted
    created = submit(client, [completion_line("b0")], endpoint="/v1/completions")
    worker.release.set()
    for batch in (running, created):
        assert finished(client, batch.id).status == "completed"
    assert renewals.count(running.id) == 1


def test_a_result_that_comes_when_the_lease_is_due_is_written_after_a_renewal_not_dropped(gated_factory,
                                                                                         monkeypatch):
    """A result that finishes when this process's last renewal is too old to write on (a slow input parse or renewal
    held the loop past two thirds of the lease) is written once the lease is renewed, not dropped with the batch
    running on to 'completed' one short."""
    from hpcllm.gateway.batches import runner

    stale = itertools.count()
    valid = runner.LocalLease.valid
    monkeypatch.setattr(runner.LocalLease, "valid", lambda lease: next(stale) > 0 and valid(lease))
    worker, factory = gated_factory(blocked=-1)
    gw = factory(batch_concurrency=1, batch_lease_seconds=300)
    batch = submit(gw.client(), [completion_line(f"r{i}") for i in range(3)], endpoint="/v1/completions")
    done = finished(gw.client(), batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3, done
    assert sorted(results(gw.client(), done.output_file_id)) == ["r0", "r1", "r2"]


class ReceivedList(list):
    """The requests a stand-in worker received, each also noted as the one its serving thread answers."""

    def __init__(self):
        super().__init__()
        self.serving = threading.local()

    def append(self, request) -> None:
        self.serving.request = request
        super().append(request)


class TurnsWorker:
    """A stand-in worker whose first `held` requests wait for `release` (`reached`: all of them wait at once), and
    the later requests of one token for `one_token_may_run` (set unless asked otherwise), recording every request
    (GenerateRequest)."""

    def __init__(self, held: int = 1):
        self.received, self.reached, self.release = ReceivedList(), threading.Event(), threading.Event()
        self.one_token_may_run = threading.Event()
        self.one_token_may_run.set()
        self.held, self.begun = held, itertools.count(1)
        self.server = ThreadServer(stand_in_worker_app("turns", self._after_token, received=self.received))

    def _after_token(self, index: int) -> None:
        if index > 0:
            return
        if (begun := next(self.begun)) <= self.held:
            if begun == self.held:
                self.reached.set()
            self.release.wait(60)
        elif self.received.serving.request.max_tokens == 1:
            self.one_token_may_run.wait(60)


@pytest.fixture
def turns_factory(tmp_path, tiny_model_dir, caplog):
    """make(concurrency, held) -> (gateway, TurnsWorker): one process, `concurrency` requests at once, turns of 5 s
    (the long batch's ends while its first requests are held; a short batch's two requests end long before its own
    would)."""
    import logging

    caplog.set_level(logging.INFO, logger="hpcllm.gateway.batches.runner")
    made = []

    def make(concurrency: int = 1, held: int = 1, **gateway):
        worker = TurnsWorker(held)
        factory = GatewayFactory(tmp_path / f"t{len(made)}", worker.server.url, tiny_model_dir)
        made.append((worker, factory))
        return factory(**{"batch_concurrency": concurrency, "batch_turn_seconds": 5, "batch_lease_seconds": 3,
                          **gateway}), worker

    yield make
    for worker, factory in made:
        worker.release.set()
        factory.stop_all()
        worker.server.stop()


@pytest.fixture
def turns(turns_factory):
    """(gateway, TurnsWorker): one request at a time, the first held."""
    return turns_factory()


def turn_lines(prefix: str, count: int, max_tokens: int) -> list[dict]:
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens}} for i in range(count)]


def test_batches_share_a_process_in_turns(turns, caplog):
    """A long batch running past gateway.batch_turn_seconds while another waits hands its process over (its running
    request finishing first) and goes on where it stopped once the other is done: a colleague's few requests do not
    wait behind thousands."""
    gw, worker = turns
    client = gw.client()
    long_batch = submit(client, turn_lines("long", 4, 1), endpoint="/v1/completions")
    assert worker.reached.wait(30)  # its first request is running
    short_batch = submit(client, turn_lines("short", 2, 2), endpoint="/v1/completions")
    wait_until(lambda: "its turn is over" in caplog.text, 30)
    worker.release.set()
    for batch in (short_batch, long_batch):
        done = finished(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == done.request_counts.total
    # the long batch's running request, then the short batch whole, then the rest of the long one
    assert [r.max_tokens for r in worker.received] == [1, 2, 2, 1, 1, 1]
    assert f"batch {long_batch.id}: continuing after 1 of 4 requests" in caplog.text


@pytest.mark.parametrize("end", ["cancelled", "all_ran"])
def test_a_batch_that_ends_at_its_turns_end_is_finished_not_handed_over(turns, caplog, end):
    """A turn that ends while the batch's last request runs, or while it is being cancelled, finishes the batch
    (completed, or cancelled with what ran) instead of handing it back to wait for a turn it does not need."""
    gw, worker = turns
    client = gw.client()
    batches, renewals = service_of(gw).batches, []
    renew = batches.renew

    def noted(*args, **changes):
        renewals.append(time.monotonic())
        return renew(*args, **changes)

    batches.renew = noted
    long_batch = submit(client, turn_lines("long", 3 if end == "cancelled" else 1, 1), endpoint="/v1/completions")
    assert worker.reached.wait(30)
    turn_ends = time.monotonic() + 5  # at least: the turn began before the request reached the worker
    short_batch = submit(client, turn_lines("short", 2, 2), endpoint="/v1/completions")
    if end == "cancelled":
        wait_until(lambda: "its turn is over" in caplog.text, 30)
        client.batches.cancel(long_batch.id)
    else:  # nothing left to start: no hand-over is decided at the renewals past the turn's end
        wait_until(lambda: renewals and renewals[-1] > turn_ends, 30)
    worker.release.set()
    done = finished(client, long_batch.id)
    assert done.status == ("cancelled" if end == "cancelled" else "completed")
    assert done.request_counts.completed == 1
    assert finished(client, short_batch.id).status == "completed"
    assert "continuing after" not in caplog.text  # the long batch was never claimed again


def test_small_batches_run_at_once_in_the_slots_one_leaves_free(turns_factory):
    """One process, batch_concurrency 2: a batch of one request leaves a slot free, and a second batch runs in it
    at once instead of waiting for the first to end (both held by the worker together, one request of each)."""
    gw, worker = turns_factory(concurrency=2, held=2)
    client = gw.client()
    one = submit(client, turn_lines("one", 1, 1), endpoint="/v1/completions")
    two = submit(client, turn_lines("two", 2, 2), endpoint="/v1/completions")
    assert worker.reached.wait(30), "the second batch did not run while the first one's request ran"
    assert sorted(r.max_tokens for r in worker.received[:2]) == [1, 2]
    worker.release.set()
    for batch, total in ((one, 1), (two, 2)):
        done = finished(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == total
    assert len(worker.received) == 3


def test_a_slot_a_batch_leaves_free_when_it_starts_runs_another_batch_at_once_not_at_the_next_poll(turns_factory,
                                                                                                  monkeypatch):
    """batch_concurrency 2, polls an hour apart: the second batch, created while the first was being started (the
    runner then claims nothing: the first may take both slots), runs in the slot the first leaves free as soon as
    that one has started its request (held by the worker: the one of one token)."""
    from hpcllm.gateway.batches import runner as runner_module

    monkeypatch.setattr(runner_module, "MAX_POLL_S", 3600.0)
    gw, worker = turns_factory(concurrency=2, held=0, batch_lease_seconds=3 * 3600)
    worker.one_token_may_run.clear()
    client, runner = gw.client(), service_of(gw).runner
    api_token, sweep_when_due = runner.api_token, runner.sweep_when_due
    may_start, looked = threading.Event(), threading.Event()

    def held_token(owner: str):  # the first run is held just before it starts its requests
        assert may_start.wait(30)
        return api_token(owner)

    def noted_sweep() -> None:  # the runner's loop looks (its first step)
        looked.set()
        sweep_when_due()

    runner.api_token = held_token
    first = submit(client, turn_lines("a", 1, 1), endpoint="/v1/completions")
    wait_until(lambda: first.id in runner.running)
    runner.sweep_when_due = noted_sweep
    second = submit(client, turn_lines("b", 1, 2), endpoint="/v1/completions")
    assert looked.wait(30)  # it looked, found the first run not started yet, and waits for its next poll
    may_start.set()
    done = finished(client, second.id)
    assert done.status == "completed" and client.batches.retrieve(first.id).status == "in_progress"
    worker.one_token_may_run.set()
    assert finished(client, first.id).status == "completed"


def test_a_draining_gateway_hands_back_every_batch_it_runs(turns_factory, tmp_path):
    shared = {"limits_db": str(tmp_path / "limits.db"), "files_dir": str(tmp_path / "files")}
    first, worker = turns_factory(concurrency=2, held=2, **shared)
    one = submit(first.client(), turn_lines("one", 1, 1), endpoint="/v1/completions")
    two = submit(first.client(), turn_lines("two", 3, 2), endpoint="/v1/completions")
    assert worker.reached.wait(30)  # a request of each runs
    runner = service_of(first).runner
    assert sorted(runner.running) == sorted([one.id, two.id])
    first.state.start_draining()
    worker.release.set()  # the requests running finish and are kept; no other starts
    wait_until(lambda: not runner.running)
    with service_of(first).batches.shared.connection() as db:
        rows = db.conn.execute("SELECT status, lease_holder, batch FROM gateway_batches").fetchall()
    assert [(row["status"], row["lease_holder"], json.loads(row["batch"])["request_counts"]["completed"])
            for row in rows] == [("in_progress", None, 1)] * 2  # released at once, not left to run out

    second, _ = turns_factory(concurrency=2, held=0, **shared)
    service_of(second).runner.wake()
    for batch, total in ((one, 1), (two, 3)):
        done = finished(second.client(), batch.id)
        assert done.status == "completed" and len(results(second.client(), done.output_file_id)) == total


def test_a_batch_filling_every_slot_still_hands_them_over_at_its_turns_end(turns_factory, caplog):
    """batch_concurrency 2, a long batch in both slots when a short one comes: at its turn's end the short batch
    runs to its end while the long batch's next requests are held (it is not starved: a short batch whose requests
    waited behind the long one's would never end), then the long one goes on; each request of both once."""
    gw, worker = turns_factory(concurrency=2, held=2)
    worker.one_token_may_run.clear()  # the long batch's requests after its first two are held
    client = gw.client()
    long_batch = submit(client, turn_lines("long", 8, 1), endpoint="/v1/completions")
    assert worker.reached.wait(30)  # its first two requests run, one in each slot
    short_batch = submit(client, turn_lines("short", 2, 2), endpoint="/v1/completions")
    wait_until(lambda: "its turn is over" in caplog.text, 30)
    assert len(worker.received) == 2  # the short batch waited: no slot was free
    worker.release.set()
    done = finished(client, short_batch.id)
    assert done.status == "completed" and done.request_counts.completed == 2
    worker.one_token_may_run.set()
    done = finished(client, long_batch.id)
    assert done.status == "completed" and done.request_counts.completed == 8
    assert sorted(r.max_tokens for r in worker.received) == [1] * 8 + [2] * 2


def test_a_failing_run_gives_its_slot_to_the_next_batch_only_once_its_running_request_ended(gated_factory,
                                                                                          monkeypatch):
    """batch_concurrency 1: a renewal that fails ("database is locked") while the batch's request runs ends its run,
    but the slot goes to the waiting batch only once that request has ended (never more requests at once than
    gateway.batch_concurrency); then both batches complete."""
    from concurrent.futures import ThreadPoolExecutor

    from hpcllm.gateway.batches import runner as runner_module

    failed, request_ended_when_slot_freed = threading.Event(), []

    class Pool(ThreadPoolExecutor):
        def shutdown(self, wait=True, **options):
            if failed.is_set():  # the failed run's exit waits for its running request: let that end now
                worker.release.set()
            super().shutdown(wait, **options)

    monkeypatch.setattr(runner_module, "ThreadPoolExecutor", Pool)
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1)
    client, service = gw.client(), service_of(gw)
    first = submit(client, [completion_line("a0"), completion_line("a1")], endpoint="/v1/completions")
    assert worker.reached.wait(30)
    second = submit(client, [completion_line("b0")], endpoint="/v1/completions")
    slots, batches = service.runner.slots, service.batches
    spare, renew = slots.spare, batches.renew

    def noted_spare(run, in_use: int, keep: bool) -> None:
        if run.claim.batch_id == first.id and failed.is_set() and not request_ended_when_slot_freed:
            request_ended_when_slot_freed.append(worker.release.is_set())
        spare(run, in_use, keep)

    def locked(claim, **changes):
        if claim.batch_id == first.id and not failed.is_set():
            failed.set()
            raise sqlite3.OperationalError("database is locked")
        return renew(claim, **changes)

    slots.spare, batches.renew = noted_spare, locked
    service.runner.wake()  # the running batch renews at once: that renewal fails
    for batch, total in ((second, 1), (first, 2)):
        done = finished(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == total
    assert request_ended_when_slot_freed == [True]


def test_a_batch_whose_runs_keep_failing_fails_naming_why_and_the_next_batch_runs(gated_factory):
    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(batch_lease_seconds=3)  # a poll a second
    runner = service_of(gw).runner
    api_token = runner.api_token

    def broken(owner: str):
        raise RuntimeError("a bug in the runner")

    runner.api_token = broken
    client = gw.client()
    stuck = submit(client, [completion_line("r0")], endpoint="/v1/completions")
    done = finished(client, stuck.id)
    assert done.status == "failed" and [e.code for e in done.errors.data] == ["batch_run_failed"]
    assert "3 times" in done.errors.data[0].message and "a bug in the runner" in done.errors.data[0].message
    runner.api_token = api_token
    after = finished(client, submit(client, [completion_line("r0")], endpoint="/v1/completions").id)
    assert after.status == "completed"


def test_a_batch_whose_run_could_not_start_is_claimed_again_and_runs(gated_factory, monkeypatch):
    """Starting the claimed batch's run fails once (a bug): its slot and the batch go back, and the next poll runs
    it (before, the process's one slot stayed reserved for nothing and no batch ever ran on it again)."""
    from hpcllm.gateway.batches import runner as runner_module

    attempts = itertools.count()
    lease = runner_module.LocalLease

    def failing_once(*args):
        if next(attempts) == 0:
            raise RuntimeError("a bug starting the run")
        return lease(*args)

    monkeypatch.setattr(runner_module, "LocalLease", failing_once)
    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(batch_concurrency=1, batch_lease_seconds=3)  # a poll a second
    client = gw.client()
    done = finished(client, submit(client, [completion_line("r0")], endpoint="/v1/completions").id)
    assert done.status == "completed" and done.request_counts.completed == 1
    assert next(attempts) == 2


def test_a_batch_waits_out_its_keys_rate_limit(gated_factory):
    """The key's request bucket is emptied while the batch's first request runs: the second is answered 429 with
    Retry-After, which the runner waits out (retrying) instead of failing the request."""
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1, api_keys=[{"key": USER_KEY, "name": "alice", "requests_per_minute": 60}])
    batch = submit(gw.client(), [completion_line(f"r{i}") for i in range(3)], endpoint="/v1/completions")
    assert worker.reached.wait(30)
    key, limit = gw.state.api_keys[USER_KEY], {"capacity": 60, "per_second": 1.0}
    bucket = _bucket_id(key, "requests")
    # Taken whole and 1 more, as of an hour from now: the bucket stays at -1 (not refilled) until the test refills it.
    gw.state.shared.take(bucket, **limit, cost=61, now=time.time() + 3600)
    worker.release.set()
    wait_until(lambda: metric(gw, "hpcllm_http_requests_total", endpoint="/v1/completions", status="429") >= 1)
    gw.state.shared.refund(bucket, **limit, amount=61, now=time.time())  # full again: the retry goes through
    service, owner = service_of(gw), owner_of(key)
    done = wait_until(lambda: (row := service.batches.get(owner, batch.id)).batch.status in FINAL and row.batch)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)


def test_a_batch_waiting_out_its_keys_rate_limit_leaves_its_slots_to_another_keys_batch(gated_factory):
    """batch_concurrency 2: alice's key allows a request a minute, which is taken: her batch's requests are
    answered 429 with a Retry-After of about a minute, which it waits out without holding the process's slots: bob's
    batch runs and ends meanwhile."""
    from hpcllm.gateway.batches.protocol import CreateBatchRequest
    from hpcllm.gateway.batches.serving import create

    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(batch_concurrency=2, api_keys=[{"key": USER_KEY, "name": "alice", "requests_per_minute": 1},
                                                {"key": OTHER_KEY, "name": "bob"}])
    service, alice = service_of(gw), owner_of(gw.state.api_keys[USER_KEY])
    lines = jsonl([completion_line(f"r{i}") for i in range(3)])
    source = gw.client().files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
    gw.state.limiter.take_request(gw.state.api_keys[USER_KEY])  # her minute's one request: her bucket is empty
    limited = create(service, alice, CreateBatchRequest(input_file_id=source.id, endpoint="/v1/completions",
                                                        completion_window="24h"))  # her bucket is empty: not by HTTP
    wait_until(lambda: metric(gw, "hpcllm_http_requests_total", endpoint="/v1/completions", status="429") >= 2)

    bob = gw.client(OTHER_KEY)
    done = finished(bob, submit(bob, [completion_line("b0")], endpoint="/v1/completions").id)
    assert done.status == "completed" and done.request_counts.completed == 1
    waiting = service.batches.get(alice, limited.id).batch
    assert waiting.status == "in_progress" and waiting.request_counts.completed == 0


def test_a_batch_waiting_out_its_keys_rate_limit_keeps_its_place_where_the_process_has_room_for_another(
        gated_factory, caplog):
    """batch_concurrency 2: alice's batch waits out her key's limit; bob's batch, created while the runner has not
    yet looked (held here till alice's batch has renewed twice, seeing bob's waiting), runs in the process's free
    place beside hers: hers is not handed back to wait behind the queue."""
    import logging

    from hpcllm.gateway.batches.protocol import CreateBatchRequest
    from hpcllm.gateway.batches.serving import create

    caplog.set_level(logging.INFO, logger="hpcllm.gateway.batches.runner")
    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(batch_concurrency=2, batch_lease_seconds=3,  # a renewal a second
                 api_keys=[{"key": USER_KEY, "name": "alice", "requests_per_minute": 1},
                           {"key": OTHER_KEY, "name": "bob"}])
    service, alice = service_of(gw), owner_of(gw.state.api_keys[USER_KEY])
    runner = service.runner
    source = gw.client().files.create(file=("in.jsonl", io.BytesIO(jsonl([completion_line("r0")]))),
                                      purpose="batch")
    gw.state.limiter.take_request(gw.state.api_keys[USER_KEY])  # her minute's one request: her bucket is empty
    limited = create(service, alice, CreateBatchRequest(input_file_id=source.id, endpoint="/v1/completions",
                                                        completion_window="24h")).id  # her bucket is empty
    wait_until(lambda: metric(gw, "hpcllm_http_requests_total", endpoint="/v1/completions", status="429") >= 1)
    run = runner._runs[limited]
    sweep_when_due, may_look = runner.sweep_when_due, threading.Event()

    def held_look() -> None:  # the runner's loop (its first step) waits; the runs' renewals go on
        if threading.current_thread().name == "batch-runner":
            assert may_look.wait(30)
        sweep_when_due()

    runner.sweep_when_due = held_look
    bob = gw.client(OTHER_KEY)
    other = submit(bob, [completion_line("b0")], endpoint="/v1/completions").id
    renewals = [run.lease.due_at]
    wait_until(lambda: renewals.append(run.lease.due_at) or len(set(renewals)) >= 3 or limited not in runner.running)
    may_look.set()
    assert finished(bob, other).status == "completed"
    assert limited in runner.running and "handed over" not in caplog.text
    assert service.batches.get(alice, limited).batch.status == "in_progress"


def test_with_one_slot_a_batch_waiting_out_its_keys_rate_limit_hands_the_process_to_another_keys_batch(
        gated_factory):
    """batch_concurrency 1: alice's batch waits out her key's rate limit (a request a minute, which is taken);
    the process runs one batch at a time, so it hands hers back at once (not at its turn's end, 5 minutes later):
    bob's batch runs and ends meanwhile, hers goes on after."""
    from hpcllm.gateway.batches.protocol import CreateBatchRequest
    from hpcllm.gateway.batches.serving import create

    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(batch_concurrency=1, batch_lease_seconds=3,  # a renewal (where it sees bob's waiting) a second
                 api_keys=[{"key": USER_KEY, "name": "alice", "requests_per_minute": 1},
                           {"key": OTHER_KEY, "name": "bob"}])
    service, alice = service_of(gw), owner_of(gw.state.api_keys[USER_KEY])
    source = gw.client().files.create(file=("in.jsonl", io.BytesIO(jsonl([completion_line("r0")]))),
                                      purpose="batch")
    gw.state.limiter.take_request(gw.state.api_keys[USER_KEY])  # her minute's one request: her bucket is empty
    limited = create(service, alice, CreateBatchRequest(input_file_id=source.id, endpoint="/v1/completions",
                                                        completion_window="24h"))  # her bucket is empty: not by HTTP
    wait_until(lambda: metric(gw, "hpcllm_http_requests_total", endpoint="/v1/completions", status="429") >= 1)

    bob = gw.client(OTHER_KEY)
    done = finished(bob, submit(bob, [completion_line("b0")], endpoint="/v1/completions").id)
    assert done.status == "completed" and done.request_counts.completed == 1
    waiting = service.batches.get(alice, limited.id).batch
    assert waiting.status == "in_progress" and waiting.request_counts.completed == 0


def test_a_batch_that_runs_on_after_a_hand_over_mid_turn_keeps_its_turns_end(gated_factory, monkeypatch):
    """batch_concurrency 1, turns of 5 minutes: a batch waiting out its key's rate limit 100 s into its turn hands
    the process over to a waiting batch, which another process claims meanwhile; the batch runs on, but in the turn
    it had: a batch created later gets the process at that turn's end, not a whole turn after the hand-over. The
    run's steps are driven here on a clock of the test's (the gateway's own runner is stopped)."""
    from types import SimpleNamespace

    from hpcllm.gateway.batches import runner as runner_module
    from hpcllm.gateway.batches.runner import BatchRun, BatchRunner

    worker, factory = gated_factory(blocked=-1)  # no request is sent
    gw = factory(batch_concurrency=1, batch_turn_seconds=300)
    service = service_of(gw)
    service.runner.close()
    now = [1000.0]
    monkeypatch.setattr(runner_module, "time", SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    runner = BatchRunner(gw.app, service.runner.gw, service.files, service.batches)
    client = gw.client()
    lines = [completion_line(f"r{i}") for i in range(3)]
    ours = submit(client, lines, endpoint="/v1/completions")
    claim = service.batches.claim(runner.holder)
    assert claim.batch_id == ours.id
    run = BatchRun(runner, claim)  # its turn: from 1000 to 1300
    runner._runs[claim.batch_id] = run  # as the runner's claim lists it: the process is full
    batch = run.lease.renew()
    pending = deque(parse_input(jsonl(lines).splitlines(), "/v1/completions", 10).entries)

    now[0] = 1100.0
    run.resume_at = now[0] + 60  # a request was answered 429, Retry-After 60
    waiting = submit(client, lines, endpoint="/v1/completions")
    batch, stop = run._renew(batch, None, {}, may_turn_over=True)
    assert stop == "turn_over"  # handed over mid-turn: it waits out its limit in a full process
    assert service.batches.claim("another-process").batch_id == waiting.id
    batch, stop = run._after_turn(batch, pending, {})
    assert stop is None  # nobody waits any more: it runs on

    now[0] = 1301.0  # past the end of its turn, its limit long over
    later = submit(client, lines, endpoint="/v1/completions")
    assert service.batches.claimable()
    batch, stop = run._renew(batch, None, {}, may_turn_over=True)
    assert stop == "turn_over", f"{later.id} waits while {ours.id} runs past its turn's end"


def test_two_batches_of_one_rate_limited_key_do_not_hand_the_process_to_each_other_in_a_loop(gated_factory):
    """batch_concurrency 1, two batches of alice's key, which allows a request a minute (taken): the
    batch handed back while waiting out her limit is not claimed again before the limit's end (each claim would send
    a request only to be refused 429 and hand back again, in a loop); the other waits it out holding the process."""
    from hpcllm.gateway.batches.protocol import CreateBatchRequest
    from hpcllm.gateway.batches.serving import create

    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(batch_concurrency=1, api_keys=[{"key": USER_KEY, "name": "alice", "requests_per_minute": 1}])
    service, alice = service_of(gw), owner_of(gw.state.api_keys[USER_KEY])
    source = gw.client().files.create(file=("in.jsonl", io.BytesIO(jsonl([completion_line("r0")]))),
                                      purpose="batch")
    gw.state.limiter.take_request(gw.state.api_keys[USER_KEY])  # her minute's one request: her bucket is empty
    made = [create(service, alice, CreateBatchRequest(input_file_id=source.id, endpoint="/v1/completions",
                                                      completion_window="24h")).id for _ in range(2)]
    wait_until(lambda: metric(gw, "hpcllm_http_requests_total", endpoint="/v1/completions", status="429") >= 2)
    wait_until(lambda: set(service.runner.running) <= set(made) and len(service.runner.running) == 1)
    assert metric(gw, "hpcllm_http_requests_total", endpoint="/v1/completions", status="429") == 2
    assert not service.batches.claimable()  # the one handed back waits out the limit too
    assert all(service.batches.get(alice, batch_id).batch.status == "in_progress" for batch_id in made)


def test_expired_files_are_gone_at_once_and_swept_from_disk_but_a_running_batch_keeps_its_input(gated_factory):
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1, batch_lease_seconds=3)  # files_ttl_days: 30 by default
    client, files, runner = gw.client(), service_of(gw).files, service_of(gw).runner
    hour = {"anchor": "created_at", "seconds": 3600}
    short = client.files.create(file=("short.jsonl", io.BytesIO(b"{}\n")), purpose="batch", expires_after=hour)
    assert short.expires_at == short.created_at + 3600
    kept = client.files.create(file=("kept.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert kept.expires_at == kept.created_at + 30 * 24 * 3600  # the site's retention
    assert_error(gw.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")},
                         data={"purpose": "batch", "expires_after[anchor]": "created_at",
                               "expires_after[seconds]": "60"}), 422, "invalid_value", "expires_after.seconds")
    lines = jsonl([completion_line(f"r{i}") for i in range(2)])
    source = client.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch", expires_after=hour)
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 7200})
    assert worker.reached.wait(30)  # the batch runs its first request

    files.clock = lambda: time.time() + 3601  # an hour later
    for file_id in (short.id, source.id):
        assert_error(gw.get(f"/v1/files/{file_id}"), 404, "file_not_found")
        assert_error(gw.get(f"/v1/files/{file_id}/content"), 404, "file_not_found")
    assert [f.id for f in client.files.list()] == [kept.id]
    assert_error(gw.post("/v1/batches", json={"input_file_id": short.id, "endpoint": "/v1/completions",
                                              "completion_window": "24h"}), 404, "file_not_found")
    runner._next_sweep = 0  # due: the runner sweeps while it runs the batch (it checks each lease_s / 3)
    wait_until(lambda: not files.path(short.id).exists())
    assert files.path(source.id).exists()  # the running batch reads it

    worker.release.set()
    done = finished(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 2
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 7200
    assert runner.sweep() == 1 and not files.path(source.id).exists()  # the batch has ended

    files.clock = lambda: time.time() + 7201
    assert_error(gw.get(f"/v1/files/{output.id}/content"), 404, "file_not_found")
    runner._next_sweep = 0  # due: between batches the runner sweeps at its next poll
    runner.wake()
    wait_until(lambda: not files.path(output.id).exists())
    assert [f.id for f in client.files.list()] == [kept.id] and files.path(kept.id).exists()


def test_an_ended_batch_is_deleted_by_the_sweep_that_finds_its_files_expired(gated_factory, tmp_path, limits_url):
    """A campus gateway's batches do not pile up in every listing: an ended batch goes with its output and error
    files (one that failed at creation when they would have expired); a running one, and one whose files are kept
    forever, stay. On SQLite and PostgreSQL."""
    worker, factory = gated_factory(blocked=2)  # the third batch's request runs until released
    gw = factory(limits_db=limits_url, files_dir=str(tmp_path / "files"), batch_concurrency=1)
    client, files, runner = gw.client(), service_of(gw).files, service_of(gw).runner
    hour = {"anchor": "created_at", "seconds": 3600}

    def create(lines: list, **options):
        source = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        return client.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h",
                                     **options)

    short = finished(client, create([completion_line("r0")], output_expires_after=hour).id)
    kept = finished(client, create([completion_line("r0")]).id)  # files_ttl_days: 30 by default
    refused, refused_short = create([b"not json"]), create([b"not json"], output_expires_after=hour)
    assert refused.status == refused_short.status == "failed"
    running = create([completion_line("r0")])
    assert worker.reached.wait(30)
    listed = [running.id, refused_short.id, refused.id, kept.id, short.id]
    assert [b.id for b in client.batches.list()] == listed

    files.clock = lambda: time.time() + 3601  # an hour later
    runner.sweep()
    assert [b.id for b in client.batches.list()] == [running.id, refused.id, kept.id]
    for gone in (short.id, refused_short.id):
        assert_error(gw.get(f"/v1/batches/{gone}"), 404, "batch_not_found", "batch_id")
    assert_error(gw.post(f"/v1/batches/{short.id}/cancel"), 404, "batch_not_found", "batch_id")

    files.clock = lambda: time.time() + 31 * 24 * 3600  # past the site's retention: the running batch stays
    runner.sweep()
    assert [b.id for b in client.batches.list()] == [running.id]
    assert client.batches.retrieve(running.id).status == "in_progress"

    forever = factory(limits_db=str(tmp_path / "forever.db"), files_dir=str(tmp_path / "forever"),
                      files_ttl_days=0)
    worker.release.set()
    kept_forever = finished(forever.client(), submit(forever.client(), [completion_line("r0")],
                                                     endpoint="/v1/completions").id)
    service_of(forever).files.clock = lambda: time.time() + 365 * 24 * 3600
    service_of(forever).runner.sweep()
    assert forever.client().batches.retrieve(kept_forever.id).status == "completed"


def test_the_next_page_of_batches_follows_a_batch_gone_with_its_files_since_the_page_before(make_gateway):
    """The openai client's pager lists batches, and the page before ended on a batch that went with its files since
    (the sweep ran between two pages): the next page still follows it, instead of a 400 naming `after`. Its row goes
    a day later (files.PLACE_KEPT_S), not kept for ever."""
    from hpcllm.gateway.files.store import PLACE_KEPT_S

    gw = make_gateway()
    client, service = gw.client(), service_of(gw)
    hour = {"anchor": "created_at", "seconds": 3600}

    def refused(**options) -> str:  # a batch that failed at creation: it goes when its files would have expired
        source = client.files.create(file=("in.jsonl", io.BytesIO(b"not json\n")), purpose="batch")
        return client.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h",
                                     **options).id

    oldest, older, newest = refused(), refused(output_expires_after=hour), refused(output_expires_after=hour)
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == [newest, older] and first.has_more
    service.files.clock = lambda: time.time() + 3601
    service.runner.sweep()
    rest = client.batches.list(limit=2, after=older)
    assert [b.id for b in rest.data] == [oldest] and not rest.has_more
    assert_error(gw.get(f"/v1/batches/{older}"), 404, "batch_not_found", "batch_id")  # gone for its owner
    assert_error(gw.post(f"/v1/batches/{older}/cancel"), 404, "batch_not_found", "batch_id")

    owner = owner_of(gw.state.api_keys[USER_KEY])
    service.files.clock = lambda: time.time() + 3601 + PLACE_KEPT_S + 1
    service.runner.sweep()
    assert service.batches.get(owner, older, gone_too=True) is None
    assert service.batches.get(owner, oldest) is not None


def test_a_database_an_earlier_hpcllm_made_gets_the_columns_batches_now_need(limits_url, tmp_path):
    """A gateway upgraded in place keeps its batches: the first release's gateway_batches (no expires, no waiting)
    gets the columns, and a batch it stored is counted, listed, claimed and swept as a new one is; one that had ended
    goes with its result files (kept while one never expires; with none left, when they would have). On SQLite and
    PostgreSQL."""
    from hpcllm.gateway.batches.protocol import BatchObject
    from hpcllm.gateway.batches.store import BatchStore, PageQuery
    from hpcllm.gateway.files.store import FileStore, StoredFile
    from hpcllm.gateway.shared_state import SharedState

    today = 1_765_000_123.0  # an epoch of today's size: held whole
    ttl = 3600.0
    shared = SharedState(limits_url, host="old")
    files = FileStore(shared, tmp_path / "files", max_bytes=1 << 20, ttl_s=ttl)
    ended = {  # id: (its BatchObject's changes, its result files' expiry)
        "batch_done": ({"status": "completed", "completed_at": 100, "output_file_id": "file-out",
                        "error_file_id": "file-err"}, {"file-out": today + 5, "file-err": today + 9}),
        "batch_kept": ({"status": "completed", "completed_at": 100, "output_file_id": "file-kept"},
                       {"file-kept": None}),
        "batch_failed": ({"status": "failed", "failed_at": int(today)}, {}),  # failed at creation: no files
        "batch_swept": ({"status": "expired", "expired_at": 100, "output_file_id": "file-swept"}, {}),
    }
    with shared.transaction() as db:  # as the first release made it (on PostgreSQL: double precision reals)
        db.conn.execute(db.dialect("CREATE TABLE gateway_batches (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created "
                                   "REAL NOT NULL, status TEXT NOT NULL, lease_holder TEXT, lease_expires REAL NOT "
                                   "NULL, batch TEXT NOT NULL, output_ttl REAL, turn REAL)"))
        old = BatchObject(id="batch_old", endpoint="/v1/completions", input_file_id="file-x",
                          completion_window="24h", status="in_progress", created_at=1,
                          request_counts={"total": 3, "completed": 1, "failed": 0})
        for batch in [old, *(old.model_copy(update={"id": id, **changes}) for id, (changes, _) in ended.items())]:
            db.conn.execute("INSERT INTO gateway_batches (id, owner, created, status, lease_expires, batch) VALUES "
                            "(?, 'me', 1, ?, 0, ?)", (batch.id, batch.status, batch.model_dump_json()))
        for _, expiries in ended.values():
            for file_id, expires in expiries.items():
                FileStore.record(db, "me", StoredFile(file_id, 1, f"{file_id}.jsonl", "batch_output", 10, expires))
    store = BatchStore(files, lease_s=60)
    # The added column holds what a new table's does (PostgreSQL's bare REAL is float4: 128 s steps at today's
    # epoch)
    assert column_types(shared, "gateway_batches")["expires"] == column_types(shared, "gateway_batches")["created"]
    assert store.queue() == {"in_progress": (1, 2, 1)}  # the metrics' queue: its requests without a result
    files.clock = lambda: 100.0  # before any of the ended batches' files expired
    rows, _ = store.list("me", PageQuery())
    assert {row.batch.id for row in rows} == {"batch_old", *ended}
    assert store.claim("host-a").batch_id == "batch_old"

    def left(now: float) -> set[str]:
        files.clock = lambda: now  # the batches' expiry is their files'
        store.sweep(now)
        return {row.batch.id for row in store.list("me", PageQuery())[0]}

    assert left(100 + ttl) == {"batch_old", "batch_done", "batch_kept", "batch_failed"}  # its files swept
    assert left(today + 8) == {"batch_old", "batch_done", "batch_kept", "batch_failed"}
    assert left(today + 9) == {"batch_old", "batch_kept", "batch_failed"}  # when its last file expires
    assert left(today + ttl - 1) == {"batch_old", "batch_kept", "batch_failed"}
    assert left(today + ttl) == {"batch_old", "batch_kept"}  # as its files would have
    assert left(today * 2) == {"batch_old", "batch_kept"}  # not ended; a file never expires
    shared.close()


def test_a_cancelled_batch_handed_back_till_its_rate_limit_ends_is_claimed_first(limits_url, tmp_path):
    """A batch handed back while its key's rate limit holds waits for the limit's end behind the other batches; once
    cancelled it is claimed before them (and ended), not left cancelling until every batch queued has had a turn. On
    SQLite and PostgreSQL."""
    from hpcllm.gateway.batches.protocol import BatchObject
    from hpcllm.gateway.batches.store import BatchStore
    from hpcllm.gateway.files.store import FileStore, StoredFile
    from hpcllm.gateway.shared_state import SharedState

    now = [1_765_000_000.0]
    shared = SharedState(limits_url, host="a")
    files = FileStore(shared, tmp_path / "files", max_bytes=1 << 20, ttl_s=3600.0)
    store = BatchStore(files, lease_s=60, clock=lambda: now[0])
    with shared.transaction() as db:
        FileStore.record(db, "me", StoredFile("file-in", now[0], "in.jsonl", "batch", 10))
    for batch_id in ("batch_limited", "batch_other"):
        store.insert("me", BatchObject(id=batch_id, endpoint="/v1/completions", input_file_id="file-in",
                                       completion_window="24h", status="in_progress", created_at=int(now[0])))
        now[0] += 1
    limited = store.claim("host-a")
    assert limited.batch_id == "batch_limited"
    store.release(limited, not_before=now[0] + 60)  # its key's limit ends in a minute
    store.cancel("me", "batch_limited")
    assert store.claim("host-b").batch_id == "batch_limited"
    shared.close()


def test_an_upgrade_fills_the_queue_column_parsing_no_ended_batch(tmp_path, monkeypatch):
    """The release before `waiting` (expires there): the upgrade fills the column of the batches not yet ended, the
    one the metrics' queue reads, without parsing the JSON of every ended batch a site keeps (its results' weeks)."""
    from hpcllm.gateway.batches.protocol import BatchObject
    from hpcllm.gateway.batches.store import BatchStore
    from hpcllm.gateway.files.store import FileStore
    from hpcllm.gateway.shared_state import SharedState

    shared = SharedState(str(tmp_path / "limits.db"), host="old")
    files = FileStore(shared, tmp_path / "files", max_bytes=1 << 20, ttl_s=3600.0)
    running = BatchObject(id="batch_running", endpoint="/v1/completions", input_file_id="file-x",
                          completion_window="24h", status="in_progress", created_at=1,
                          request_counts={"total": 3, "completed": 1, "failed": 0})
    done = running.model_copy(update={"id": "batch_done", "status": "completed", "completed_at": 100})
    with shared.transaction() as db:
        db.conn.execute("CREATE TABLE gateway_batches (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT "
                        "NULL, status TEXT NOT NULL, lease_holder TEXT, lease_expires REAL NOT NULL, batch TEXT NOT "
                        "NULL, output_ttl REAL, turn REAL, expires REAL)")
        for batch in (running, done):
            db.conn.execute("INSERT INTO gateway_batches (id, owner, created, status, lease_expires, batch) VALUES "
                            "(?, 'me', 1, ?, 0, ?)", (batch.id, batch.status, batch.model_dump_json()))
    parsed, validate = [], BatchObject.model_validate_json

    def noted(data, *args, **kwargs):
        batch = validate(data, *args, **kwargs)
        parsed.append(batch.id)
        return batch

    monkeypatch.setattr(BatchObject, "model_validate_json", noted)
    store = BatchStore(files, lease_s=60)
    assert parsed == ["batch_running"]
    monkeypatch.undo()
    assert store.queue() == {"in_progress": (1, 2, 1)}
    shared.close()


def column_types(shared, table: str) -> dict[str, str]:
    with shared.connection() as db:
        if shared.postgres:
            rows = db.conn.execute("SELECT column_name AS name, data_type AS type FROM information_schema.columns "
                                   "WHERE table_name = ? AND table_schema = current_schema()", (table,))
        else:
            rows = db.conn.execute(f"PRAGMA table_info({table})")
        return {row["name"]: row["type"] for row in rows}


def test_a_keys_files_may_not_hold_more_than_its_quota(make_gateway):
    gw = make_gateway(api_keys=KEYS, files_quota_bytes=2048)
    client, other = gw.client(), gw.client(OTHER_KEY)
    first = client.files.create(file=("a.jsonl", io.BytesIO(b"x" * 1500)), purpose="batch")
    refused = gw.post("/v1/files", files={"file": ("b.jsonl", b"y" * 1000)}, data={"purpose": "batch"})
    assert_error(refused, 400, "storage_quota_exceeded", "file")
    assert "548 bytes left" in refused.json()["error"]["message"]
    assert [f.id for f in client.files.list()] == [first.id]  # nothing half-kept
    assert not list(service_of(gw).files.directory.glob(".*upload"))
    assert other.files.create(file=("b.jsonl", io.BytesIO(b"y" * 1000)), purpose="batch").bytes == 1000  # per key
    client.files.delete(first.id)
    assert client.files.create(file=("b.jsonl", io.BytesIO(b"y" * 1000)), purpose="batch").bytes == 1000


def test_the_input_of_a_batch_not_yet_ended_counts_against_the_quota_though_deleted(gated_factory):
    """Its bytes stay until the batch ends: else upload, batch, delete, again would hold any amount on the gateway's
    disk past the key's quota."""
    worker, factory = gated_factory(blocked=0)
    gw = factory(api_keys=KEYS, files_quota_bytes=2048, batch_concurrency=1)
    client, runner = gw.client(), service_of(gw).runner
    lines = jsonl([completion_line("r0")]) + b" " * 1500 + b"\n"
    batch = submit(client, [lines.rstrip(b"\n")], endpoint="/v1/completions")
    assert worker.reached.wait(30)
    client.files.delete(batch.input_file_id)
    refused = gw.post("/v1/files", files={"file": ("b.jsonl", b"y" * 1000)}, data={"purpose": "batch"})
    assert_error(refused, 400, "storage_quota_exceeded", "file")

    worker.release.set()
    finished(client, batch.id)
    runner.sweep()  # the batch has ended: its input goes
    assert client.files.create(file=("b.jsonl", io.BytesIO(b"y" * 1000)), purpose="batch").bytes == 1000


def test_other_keys_running_batches_however_many_leave_a_keys_uploads_and_deletions_working(make_gateway,
                                                                                              empty_postgres):
    """The quota counts the key's own files that its running batches read, not every key's: more running batches on
    the site than one SQL statement takes parameters (PostgreSQL's 65,535; SQLite's 32,766 unless built with more)
    failed every upload."""
    gw = make_gateway(api_keys=KEYS, files_quota_bytes=2048, limits_db=empty_postgres)
    client, batches = gw.client(), service_of(gw).batches
    mine = client.files.create(file=("a.jsonl", io.BytesIO(b"x" * 1000)), purpose="batch")
    running = [BatchObject(id=f"batch_{i}", endpoint=CHAT, input_file_id=f"file-{i}", completion_window="24h",
                           status="in_progress", created_at=0) for i in range(66_000)]
    with batches.shared.transaction() as db:  # held by a process that is not there: nobody here runs them
        db.conn.executemany("INSERT INTO gateway_batches (id, owner, created, status, lease_holder, lease_expires, "
                            "batch) VALUES (?, 'another-key', 0, 'in_progress', 'elsewhere', 1e12, ?)",
                            [(batch.id, batch.model_dump_json()) for batch in running])
    assert client.files.create(file=("b.jsonl", io.BytesIO(b"y" * 1000)), purpose="batch").bytes == 1000
    assert client.files.delete(mine.id).deleted
    assert [f.filename for f in client.files.list()] == ["b.jsonl"]


def test_metrics_show_the_batch_queue_its_results_and_the_files_stored(gated_factory):
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1)
    client = gw.client()
    streamed = {**completion_line("s"), "body": {**completion_line("s")["body"], "stream": True}}
    lines = jsonl([completion_line("r0"), completion_line("r1"), streamed])
    source = client.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
    assert metric(gw, "hpcllm_files_bytes") == len(lines) and metric(gw, "hpcllm_files") == 1
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h")
    assert worker.reached.wait(30)  # r0 runs; nothing has a result yet
    assert metric(gw, "hpcllm_batches", status="in_progress") == 1
    assert metric(gw, "hpcllm_batch_requests_waiting") == 3
    gauges = gw.state.metrics._collectors[0]
    created = service_of(gw).batches.get(owner_of(gw.state.api_keys[USER_KEY]), batch.id).created
    gauges.clock = lambda: created + 42
    assert metric(gw, "hpcllm_batch_oldest_in_progress_age_seconds") == 42

    worker.release.set()
    done = finished(client, batch.id)
    assert metric(gw, "hpcllm_batches", status="in_progress") == 0
    assert metric(gw, "hpcllm_batch_requests_waiting") == 0
    assert metric(gw, "hpcllm_batch_oldest_in_progress_age_seconds") == 0
    assert metric(gw, "hpcllm_batch_requests_total", model_name=MODEL, status="completed") == 2
    assert metric(gw, "hpcllm_batch_requests_total", model_name=MODEL, status="failed") == 1  # the streamed line
    assert metric(gw, "hpcllm_batches_finished_total", status="completed") == 1
    outputs = [client.files.retrieve(done.output_file_id).bytes, client.files.retrieve(done.error_file_id).bytes]
    assert metric(gw, "hpcllm_files_bytes") == len(lines) + sum(outputs) and metric(gw, "hpcllm_files") == 3

    refused = client.files.create(file=("bad.jsonl", io.BytesIO(b"not json\n")), purpose="batch")
    assert client.batches.create(input_file_id=refused.id, endpoint="/v1/completions",
                                 completion_window="24h").status == "failed"
    assert metric(gw, "hpcllm_batches_finished_total", status="failed") == 1


def test_batch_gauges_read_no_batchs_json_and_follow_its_states(gated_factory, monkeypatch):
    """The batch gauges come from columns each batch write keeps, not from every running batch's JSON parsed at each
    scrape (its cost grew with the batches running), and they follow batches through their states: two in_progress,
    one cancelling, then both ended."""
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1)
    client = gw.client()
    first = submit(client, [completion_line(f"r{i}") for i in range(3)], endpoint="/v1/completions")
    assert worker.reached.wait(30)  # r0 runs; nothing has a result yet
    second = submit(client, [completion_line(f"s{i}") for i in range(2)], endpoint="/v1/completions")  # waits
    assert (metric(gw, "hpcllm_batches", status="in_progress"), metric(gw, "hpcllm_batch_requests_waiting")) == (2, 5)

    parsed, validate = [], BatchObject.model_validate_json
    scraping = threading.current_thread()

    def noted(data, *args, **kwargs):  # this thread's parses only: the runner's threads parse as they renew
        if threading.current_thread() is scraping:
            parsed.append(data)
        return validate(data, *args, **kwargs)

    monkeypatch.setattr(BatchObject, "model_validate_json", noted)
    gauges = {family.name: family for family in gw.state.metrics._collectors[0].collect()}
    assert parsed == [] and gauges["hpcllm_batch_requests_waiting"].samples[0].value == 5
    monkeypatch.undo()

    client.batches.cancel(first.id)
    assert metric(gw, "hpcllm_batches", status="cancelling") == 1
    assert (metric(gw, "hpcllm_batches", status="in_progress"), metric(gw, "hpcllm_batch_requests_waiting")) == (1, 2)
    worker.release.set()
    assert finished(client, first.id).status == "cancelled" and finished(client, second.id).status == "completed"
    for status in ("in_progress", "cancelling", "finalizing"):
        assert metric(gw, "hpcllm_batches", status=status) == 0
    assert metric(gw, "hpcllm_batch_requests_waiting") == 0
    assert metric(gw, "hpcllm_batch_oldest_in_progress_age_seconds") == 0


def test_a_groups_batch_usage_is_reported_apart_from_its_interactive_usage(gated_factory):
    worker, factory = gated_factory(blocked=-1)  # no request held
    gw = factory(api_keys=KEYS)
    client = gw.client()
    done = finished(client, submit(client, [completion_line(f"r{i}") for i in range(3)],
                                   endpoint="/v1/completions").id)
    assert done.request_counts.completed == 3
    client.completions.create(model=MODEL, prompt="hello", max_tokens=1)
    wait_until(lambda: gw.state.in_flight == 0)

    report = httpx.get(f"{gw.url}/v1/admin/usage", params={"by": "endpoint", "group": "physics"}, timeout=30,
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    rows = {row["endpoint"]: (row["requests"], row["prompt_tokens"], row["completion_tokens"])
            for row in report["data"]}
    prompt = rows["completions"][1]  # "hello"'s tokens, the same in every request
    assert rows == {"batch:completions": (3, 3 * prompt, 3), "completions": (1, prompt, 1)}


def test_two_uploads_of_one_key_at_once_never_take_it_over_its_quota(limits_url, tmp_path, monkeypatch):
    """Each upload checks the key's room again as it records its file: two at once (two gateway hosts on one
    PostgreSQL) could each read the room before either recorded, and both be kept past the quota."""
    from hpcllm.gateway.errors import InvalidRequest
    from hpcllm.gateway.files.store import FileStore
    from hpcllm.gateway.shared_state import SharedState

    # Two gateway hosts on one database (within a process, one PostgreSQL connection runs one transaction at once).
    hosts = {name: FileStore(SharedState(limits_url, host=name), tmp_path / "files", max_bytes=1000, quota_bytes=150)
             for name in ("first", "second")}
    first_recording, first_may_record = threading.Event(), threading.Event()
    record = FileStore.record

    def held_record(db, owner, stored):  # the first upload holds between its check and its record
        if threading.current_thread().name == "first":
            first_recording.set()
            first_may_record.wait(30)
        return record(db, owner, stored)

    monkeypatch.setattr(FileStore, "record", staticmethod(held_record))
    outcomes = {}

    def upload():
        name = threading.current_thread().name
        try:
            outcomes[name] = hosts[name].save("alice", f"{name}.jsonl", "batch", io.BytesIO(b"x" * 100)).bytes
        except InvalidRequest as exc:
            outcomes[name] = exc.code

    first, second = (threading.Thread(target=upload, name=name) for name in ("first", "second"))
    first.start()
    assert first_recording.wait(30)
    second.start()
    second.join(2)  # unserialized, the second checks and records now; serialized, it waits for the first
    first_may_record.set()
    first.join(30)
    second.join(30)
    assert sorted(map(str, outcomes.values())) == ["100", "storage_quota_exceeded"], outcomes
