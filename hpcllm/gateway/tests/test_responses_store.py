"""Stored responses of the Responses API with the official openai client, through real gateways: previous_response_id
continues a stored conversation exactly as sending it whole does (the same prompt tokens at the worker), GET, DELETE
and input_items, a key sees only its own responses, store=false keeps nothing, expiry and the byte bound
(ResponseStore with a test clock), two gateways on one database see each other's responses."""

from __future__ import annotations

import itertools
import json

import openai
import pytest

from hpcllm.gateway.response_store import (OLD_LAYOUT, Kept, NewResponse, ResponseStore, StoredResponse, TooLarge,
                                           _has_table, owner_of)
from hpcllm.gateway.shared_state import SharedState

from .conftest import MODEL, USER_KEY, scripted_gateway
from .stand_in_worker import Script, token_pieces
from .test_errors import assert_error
from .test_openai_api import chat_prompt_ids, hf_greedy
from .test_responses_api import FINAL_ANSWER, FUNCTION_TOOL, INSTRUCTIONS, QUESTION, calling_gateway  # noqa: F401
from .test_tool_calling_api import TOOLS_MODEL, tools_model_dir, tools_tokenizer  # noqa: F401

AGAIN = "and again"
OTHER_KEY = "sk-test-bob"
HERMES = "tiny-hermes"
CUT_CALL = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_a_turn_after_a_previous_response_is_its_whole_conversation(gateway, hf_pair):
    """The second turn's prompt is the first's input, its answer and the new input (not its instructions), rendered
    as chat renders them: transformers' greedy answer to those messages, their token count; whole and streamed."""
    client = gateway.client()
    first = client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=6,
                                    temperature=0)
    assert first.store is True and first.previous_response_id is None
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input=AGAIN, max_output_tokens=6,
                                     temperature=0)
    messages = [_user(QUESTION), {"role": "assistant", "content": first.output_text}, _user(AGAIN)]
    prompt_ids = chat_prompt_ids(hf_pair, messages)
    text, _, _ = hf_greedy(hf_pair, prompt_ids, 6)
    assert (second.usage.input_tokens, second.output_text) == (len(prompt_ids), text)
    assert second.previous_response_id == first.id and second.instructions is None

    whole = client.responses.create(model=MODEL, input=[_user(QUESTION), *[item.model_dump() for item in first.output],
                                                        _user(AGAIN)], max_output_tokens=6, temperature=0)
    assert (whole.usage.input_tokens, whole.output_text) == (second.usage.input_tokens, second.output_text)

    events = list(client.responses.create(model=MODEL, previous_response_id=second.id, input="once more",
                                          max_output_tokens=6, temperature=0, stream=True))
    final = events[-1].response
    messages += [{"role": "assistant", "content": second.output_text}, _user("once more")]
    prompt_ids = chat_prompt_ids(hf_pair, messages)
    assert (final.usage.input_tokens, final.output_text) == (len(prompt_ids), hf_greedy(hf_pair, prompt_ids, 6)[0])
    assert client.responses.retrieve(final.id) == final  # a streamed response is stored too, before its last event


def test_a_tool_round_by_previous_response_id_sends_the_worker_the_same_prompt(calling_gateway):  # noqa: F811
    """The Agents SDK's loop with server-side state: the call's output sent with previous_response_id reaches the
    worker as the same token ids as the whole round sent in `input`, whole and streamed."""
    client, prompts = calling_gateway.client(), calling_gateway.worker_prompts
    ask = [_user("What is the weather in Paris?")]
    first = client.responses.create(model=TOOLS_MODEL, input=ask, tools=[FUNCTION_TOOL])
    call, = first.output
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    chained = client.responses.create(model=TOOLS_MODEL, previous_response_id=first.id, input=[answer],
                                      tools=[FUNCTION_TOOL])
    whole = client.responses.create(model=TOOLS_MODEL, input=[*ask, call.model_dump(exclude_none=True), answer],
                                    tools=[FUNCTION_TOOL])
    with client.responses.stream(model=TOOLS_MODEL, previous_response_id=first.id, input=[answer],
                                 tools=[FUNCTION_TOOL]) as stream:
        streamed = stream.get_final_response()
    assert chained.output_text == whole.output_text == streamed.output_text == FINAL_ANSWER
    assert len(prompts) == 4 and prompts[1] == prompts[2] == prompts[3] != prompts[0]


def _delete(gateway, response_id: str, key: str = USER_KEY):
    return gateway.client(key=key).responses.with_raw_response.delete(response_id)


def test_a_stored_response_is_read_listed_and_deleted(gateway):
    client = gateway.client()
    items = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "be brief"}]},
             _user("hello"), {"role": "assistant", "content": "hi"}, _user(AGAIN)]
    first = client.responses.create(model=MODEL, input=items, max_output_tokens=2)
    assert client.responses.retrieve(first.id) == first
    assert_error(gateway.get(f"/v1/responses/{first.id}", params={"stream": "true"}), 400, "unsupported_parameter",
                 "stream")

    listed = client.responses.input_items.list(first.id)  # OpenAI's default order: newest first
    assert [(item.type, item.role, item.content[0].type, item.content[0].text) for item in listed.data] == [
        ("message", "user", "input_text", AGAIN), ("message", "assistant", "output_text", "hi"),
        ("message", "user", "input_text", "hello"), ("message", "developer", "input_text", "be brief")]
    assert all(item.id.startswith("msg_") and item.status == "completed" for item in listed.data)
    assert (listed.first_id, listed.last_id, listed.has_more) == (listed.data[0].id, listed.data[-1].id, False)
    ids = [item.id for item in listed.data]
    page = client.responses.input_items.list(first.id, order="asc", limit=2, after=ids[-1])
    assert [item.id for item in page.data] == ids[::-1][1:3] and page.has_more is True

    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="more", max_output_tokens=2)
    chained = client.responses.input_items.list(second.id, order="asc").data
    assert [item.id for item in chained] == [*ids[::-1], first.output[0].id, chained[-1].id]
    assert chained[-1].content[0].text == "more"

    deleted = _delete(gateway, first.id)
    assert deleted.http_response.json() == {"id": first.id, "object": "response", "deleted": True}
    for path in (f"/v1/responses/{first.id}", f"/v1/responses/{first.id}/input_items"):
        assert_error(gateway.get(path), 404, "not_found", "response_id")
    assert_error(gateway.post("/v1/responses", json={"model": MODEL, "previous_response_id": first.id, "input": "x"}),
                 400, "previous_response_not_found", "previous_response_id")
    with pytest.raises(openai.NotFoundError):
        _delete(gateway, first.id)
    assert client.responses.retrieve(second.id) == second  # its conversation was copied, not referenced


@pytest.mark.parametrize("query, param", [({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                                          ({"order": "up"}, "order"), ({"after": "msg_unknown"}, "after")])
def test_a_bad_input_items_query_is_a_4xx_naming_it(gateway, query, param):
    response_id = gateway.client().responses.create(model=MODEL, input="hi", max_output_tokens=1).id
    resp = gateway.get(f"/v1/responses/{response_id}/input_items", params=query)
    assert_error(resp, 400 if param == "after" else 422, "invalid_request" if param == "after" else "invalid_value",
                 param)


def test_other_paths_and_methods_are_refused_as_elsewhere(gateway):
    response_id = gateway.client().responses.create(model=MODEL, input="hi", max_output_tokens=1).id
    assert_error(gateway.get("/v1/responses"), 405, "method_not_allowed")
    assert_error(gateway.post(f"/v1/responses/{response_id}", json={}), 405, "method_not_allowed")
    assert_error(gateway.get(f"/v1/responses/{response_id}/output_items"), 404, "unknown_url")
    assert_error(gateway.get(f"/v1/responses/{response_id}", key=None), 401, "missing_api_key")


def test_cancelling_a_response_is_refused_as_openai_refuses_one_not_made_in_the_background(make_gateway,
                                                                                           monkeypatch):
    """The refusal reads none of the response's conversation (it loaded the whole previous_response_id chain, every
    item decoded, to answer a 400)."""
    gw = make_gateway(api_keys=[{"key": USER_KEY, "name": "alice"}, {"key": OTHER_KEY, "name": "bob"}])
    mine = gw.client().responses.create(model=MODEL, input="hi", max_output_tokens=2)
    loaded, get = [], gw.state.responses.get
    monkeypatch.setattr(gw.state.responses, "get", lambda *args: loaded.append(args) or get(*args))
    with pytest.raises(openai.BadRequestError) as refused:
        gw.client().responses.cancel(mine.id)
    assert "synchronous" in refused.value.message and refused.value.param == "response_id"
    assert loaded == []
    assert gw.client().responses.retrieve(mine.id) == mine  # left as it was
    for response_id in (mine.id, "resp_" + "0" * 32):  # another key's is an unknown id, not an unknown URL
        assert_error(gw.post(f"/v1/responses/{response_id}/cancel", key=OTHER_KEY), 404, "not_found", "response_id")


def test_another_keys_response_does_not_exist_for_it(make_gateway):
    gw = make_gateway(api_keys=[{"key": USER_KEY, "name": "alice"}, {"key": OTHER_KEY, "name": "bob"}])
    mine = gw.client().responses.create(model=MODEL, input="a secret", max_output_tokens=2)
    unknown = "resp_" + "0" * 32
    for response_id in (mine.id, unknown):  # told the same as an id that never existed
        for path in (f"/v1/responses/{response_id}", f"/v1/responses/{response_id}/input_items"):
            assert_error(gw.get(path, key=OTHER_KEY), 404, "not_found", "response_id")
        with pytest.raises(openai.NotFoundError):
            _delete(gw, response_id, key=OTHER_KEY)
        with pytest.raises(openai.BadRequestError) as refused:
            gw.client(key=OTHER_KEY).responses.create(model=MODEL, previous_response_id=response_id, input="tell")
        assert refused.value.code == "previous_response_not_found"
    assert gw.client().responses.retrieve(mine.id) == mine


def test_store_false_keeps_nothing(make_gateway):
    gw = make_gateway()
    client = gw.client()
    unstored = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, previous_response_id=unstored.id, input="hi")
    rows = _rows(gw.state.shared)
    assert rows == []

    off = make_gateway(responses_max_bytes=0)  # storing turned off: every answer says so
    assert off.client().responses.create(model=MODEL, input="hi", max_output_tokens=2).store is False
    small = make_gateway(responses_max_bytes=500)  # one larger than the whole bound: answered, said unstored
    too_big = small.client().responses.create(model=MODEL, input="hi", max_output_tokens=2)
    assert too_big.store is False and _rows(small.state.shared) == []


def test_a_response_whose_input_alone_is_over_the_bound_is_refused_before_it_is_generated(make_gateway):
    """Asked to store (OpenAI's default) a response whose input items alone are larger than the whole bound: a 400
    saying the bound, before anything is generated (not an answer said unstored that the next turn's
    previous_response_id cannot find); store false is answered."""
    small = make_gateway(responses_max_bytes=500)
    body = {"model": MODEL, "input": "hi " * 200, "max_output_tokens": 2}
    error = assert_error(small.post("/v1/responses", json=body), 400, "storage_limit_exceeded", "store")
    assert "500 bytes" in error["message"] and "'store': false" in error["message"], error
    assert small.post("/v1/responses", json={**body, "store": False}).json()["store"] is False
    assert _rows(small.state.shared) == []


def test_a_conversation_turn_whose_input_alone_is_over_the_bound_is_refused_naming_the_conversation(make_gateway):
    """In a conversation the turn is kept whatever `store` says: its input alone over the whole bound is the
    conversation's 400 (param conversation), not one telling to send 'store': false, which would fail the same."""
    small = make_gateway(responses_max_bytes=500)
    conversation = small.client().conversations.create()
    body = {"model": MODEL, "conversation": conversation.id, "input": "hi " * 200, "max_output_tokens": 2}
    for store in (True, False):
        error = assert_error(small.post("/v1/responses", json={**body, "store": store}), 400,
                             "storage_limit_exceeded", "conversation")
        assert "'store': false" not in error["message"], error


def test_a_response_the_database_refuses_is_still_answered_unstored(make_gateway):
    """An insert that fails (here a trigger raising as a full disk would) loses no answer, whole or streamed."""
    gw = make_gateway()
    with gw.state.shared.connection() as db:
        db.conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON gateway_stored "
                        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    client = gw.client()
    whole = client.responses.create(model=MODEL, input="hi", max_output_tokens=3, temperature=0)
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=3, temperature=0, stream=True))
    for response in (whole, events[-1].response):
        assert response.status == "incomplete" and response.usage.output_tokens == 3 and response.store is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response.id)


def _rows(shared: SharedState) -> list[str]:
    with shared.connection() as db:
        return [row["id"] for row in db.conn.execute("SELECT id FROM gateway_stored ORDER BY seen")]


def _message(item_id: str, text: str = "x", role: str = "user") -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"id": item_id, "type": "message", "role": role, "status": "completed",
            "content": [{"type": kind, "text": text}]}


def _response(number: int, text: str = "x") -> NewResponse:
    return NewResponse(input=[_message(f"msg_{number}", text)], response={"id": f"resp_{number}", "output": []})


def _stored(new: NewResponse) -> StoredResponse:
    return StoredResponse(input=new.input, response=new.response)


@pytest.fixture
def store_at(limits_url):
    """A ResponseStore on each kind of database, read with a clock the test sets (now[0])."""
    shared = SharedState(limits_url)
    now = [1_000_000.0]
    yield lambda **bounds: ResponseStore(shared, clock=lambda: now[0], **bounds), now
    shared.close()


def test_responses_expire_after_the_ttl_and_are_deleted_by_a_later_store(store_at):
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    assert store.put("alice", _response(1)).stored
    now[0] += 3599
    assert store.get("alice", "resp_1") == _stored(_response(1)) and store.get("bob", "resp_1") is None
    now[0] += 2
    assert store.get("alice", "resp_1") is None and not store.delete("alice", "resp_1")
    assert _rows(store.shared) == ["resp_1"]  # lazily: the next store deletes it
    store.put("alice", _response(2))
    assert _rows(store.shared) == ["resp_2"]


def test_beyond_the_byte_bound_the_oldest_responses_go_first(store_at):
    make, now = store_at
    one = len(json.dumps(_response(1).input[0])) + len(json.dumps(_response(1).response))  # its item, its body
    store = make(ttl_s=3600, max_bytes=3 * one)
    for number in range(1, 6):
        now[0] += 1
        assert store.put("alice", _response(number)).stored
    assert _rows(store.shared) == ["resp_3", "resp_4", "resp_5"]
    assert not store.put("alice", _response(6, text="x" * 3 * one)).stored  # larger than the whole bound: not kept
    assert _rows(store.shared) == ["resp_3", "resp_4", "resp_5"]


def test_two_gateways_on_one_database_share_the_stored_responses(make_gateway, limits_url):
    """Two gateway apps (as two processes or hosts would) with one limits database: a response stored through one
    is read, listed, continued and deleted through the other."""
    one, two = make_gateway(limits_db=limits_url), make_gateway(limits_db=limits_url)
    first = one.client().responses.create(model=MODEL, input=QUESTION, max_output_tokens=2)
    assert two.client().responses.retrieve(first.id) == first
    assert [item.content[0].text for item in two.client().responses.input_items.list(first.id).data] == [QUESTION]
    second = two.client().responses.create(model=MODEL, previous_response_id=first.id, input=AGAIN,
                                           max_output_tokens=2)
    assert len(one.client().responses.input_items.list(second.id).data) == 3
    assert _delete(one, second.id).http_response.status_code == 200
    with pytest.raises(openai.NotFoundError):
        two.client().responses.retrieve(second.id)


def _stored_bytes(shared: SharedState) -> tuple[int, int]:
    """(item rows, bytes of every stored item and body) in the database."""
    with shared.connection() as db:
        items = db.conn.execute("SELECT COUNT(*) AS n, COALESCE(SUM(LENGTH(item)), 0) AS b FROM gateway_items")
        items = items.fetchone()
        bodies = db.conn.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) AS b FROM gateway_stored").fetchone()
    return items["n"], items["b"] + bodies["b"]


def _turn(store: ResponseStore, number: int, previous: str | None) -> NewResponse:
    """What a request chained on `previous` stores: the stored conversation, a new input item, an output item."""
    earlier = store.get("alice", previous).conversation() if previous is not None else []
    return NewResponse(input=[*earlier, _message(f"msg_in_{number:03d}", f"turn {number:03d}")],
                       response={"id": f"resp_{number:03d}", "output": [_message(f"msg_out_{number:03d}", "ok",
                                                                                    "assistant")]},
                       previous=previous, carried=len(earlier))


def test_a_50_turn_chain_stores_each_item_once(store_at):
    """Each turn chained by previous_response_id stores its own input and output items, not its conversation's
    again: 50 turns, 100 item rows (a copy per response would be 2550) and the same bytes added every turn; the
    last turn still reads the whole conversation."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 9)
    previous, growth = None, set()
    for number in range(50):
        before = _stored_bytes(store.shared)[1]
        now[0] += 1
        turn = _turn(store, number, previous)
        assert store.put("alice", turn).stored
        growth.add(_stored_bytes(store.shared)[1] - before)
        previous = turn.response["id"]
    assert _stored_bytes(store.shared)[0] == 100 and len(growth) == 1
    last = store.get("alice", previous)
    assert last.input == turn.input and len(last.conversation()) == 100


def test_a_chain_through_the_gateway_stores_each_item_once(make_gateway):
    """The same through a gateway: 10 turns by previous_response_id, 20 items stored; the last lists them all."""
    gw = make_gateway()
    client = gw.client()
    previous = None
    for turn in range(10):
        previous = client.responses.create(model=MODEL, input=f"turn {turn}", previous_response_id=previous,
                                           max_output_tokens=1, temperature=0).id
    assert _stored_bytes(gw.state.shared)[0] == 20
    listed = client.responses.input_items.list(previous, order="asc", limit=100).data
    assert len(listed) == 19 and [item.content[0].text for item in listed[::2]] == [f"turn {t}" for t in range(10)]


def test_a_chained_response_keeps_its_expired_ancestors_for_its_own_ttl(store_at):
    """An ancestor past the TTL cannot be read or chained on, but the response continuing it still reads the whole
    conversation until its own TTL; then both go."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    first = _turn(store, 1, None)
    store.put("alice", first)
    now[0] += 3000
    second = _turn(store, 2, "resp_001")
    store.put("alice", second)
    now[0] += 1000
    store.put("alice", _response(9))  # a store deletes what expired
    assert store.get("alice", "resp_001") is None and "msg_in_001" in store.items("alice", ["msg_in_001"])
    assert store.get("alice", "resp_002").input == second.input
    now[0] += 3000
    store.put("alice", _response(10))
    assert store.get("alice", "resp_002") is None and _rows(store.shared) == ["resp_9", "resp_10"]


def test_beyond_the_byte_bound_a_chain_goes_from_its_newest_response(store_at):
    """Oldest first by last use: a chain is used when a response continues it, and its responses go newest first,
    so no response ever loses the turns before it."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    now[0] += 1
    store.put("alice", _turn(store, 1, None))
    now[0] += 1
    store.put("alice", _response(2))
    now[0] += 1
    store.put("alice", _turn(store, 3, "resp_001"))  # the chain 1-3 is now newer than 2
    _, total = _stored_bytes(store.shared)
    store.max_bytes = total - 1  # one must go: the oldest by last use, 2
    now[0] += 1
    store.put("alice", NewResponse(input=[], response={"id": "resp_004", "output": []}))
    assert _rows(store.shared) == ["resp_001", "resp_003", "resp_004"]
    sizes = _sizes(store.shared)
    store.max_bytes = sizes["resp_001"] + sizes["resp_004"] + sizes["resp_004"]  # one more must go: 3, not 1
    now[0] += 1
    store.put("alice", NewResponse(input=[], response={"id": "resp_005", "output": []}))
    assert _rows(store.shared) == ["resp_001", "resp_004", "resp_005"]
    assert len(store.get("alice", "resp_001").input) == 1


def _sizes(shared: SharedState) -> dict[str, int]:
    with shared.connection() as db:
        return {row["id"]: row["size"] for row in db.conn.execute("SELECT id, size FROM gateway_stored")}


def test_deleting_a_continued_response_hides_it_until_its_descendants_go(gateway):
    """The deleted response is a 404 at once; the one continuing it still lists and continues the whole
    conversation; deleting that one too removes both responses' items."""
    client = gateway.client()
    first = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2)
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input=AGAIN, max_output_tokens=2)
    _delete(gateway, first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    listed = client.responses.input_items.list(second.id, order="asc").data
    assert [item.content[0].text for item in listed] == [QUESTION, first.output_text, AGAIN]
    third = client.responses.create(model=MODEL, previous_response_id=second.id, input="x", max_output_tokens=2)
    assert len(client.responses.input_items.list(third.id).data) == 5
    for response in (third, second):
        _delete(gateway, response.id)
    with gateway.state.shared.connection() as db:
        held = db.conn.execute("SELECT COUNT(*) AS n FROM gateway_items WHERE holder IN (?, ?, ?)",
                               (first.id, second.id, third.id)).fetchone()["n"]
    assert held == 0


def test_a_database_with_the_old_layout_is_upgraded_in_place(limits_url):
    """gateway_responses (the layout before: each response with its conversation copied) is adopted at start: its
    responses are read as before (their input and output items, their owner's only) and the old table is gone."""
    shared = SharedState(limits_url)
    shared.create_tables("CREATE TABLE gateway_responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL "
                         "NOT NULL, size INTEGER NOT NULL, input TEXT NOT NULL, response TEXT NOT NULL)")
    conversation = [{"id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text",
                                                                                     "text": QUESTION}]}]
    answered = {"id": "resp_old", "object": "response", "created_at": 1000,
                "output": [{"id": "msg_2", "type": "message", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "old answer", "annotations": []}]}]}
    with shared.transaction() as db:
        db.conn.execute("INSERT INTO gateway_responses VALUES ('resp_old', 'alice', 1000, 2, ?, ?)",
                        (json.dumps(conversation), json.dumps(answered)))
    store = ResponseStore(shared, ttl_s=3600, max_bytes=10 ** 6, clock=lambda: 1500.0)
    assert store.get("alice", "resp_old") == StoredResponse(input=conversation, response=answered)
    assert store.get("bob", "resp_old") is None
    assert store.items("alice", ["msg_2", "msg_none"]) == {"msg_2": answered["output"][0]}
    assert ResponseStore(shared, ttl_s=3600, max_bytes=10 ** 6, clock=lambda: 1500.0).get(
        "alice", "resp_old") == StoredResponse(input=conversation, response=answered)  # adopted once, not twice
    with shared.connection() as db:
        assert not _has_table(db, shared.postgres, OLD_LAYOUT)
        assert db.conn.execute("SELECT COUNT(*) AS n FROM gateway_items").fetchone()["n"] == 2
    shared.close()


def test_item_references_are_the_keys_stored_items(make_gateway):
    """Codex CLI's item_reference input items: the key's stored items by id, the same prompt as the items sent
    whole, listed as those items; another key's id, or an unknown one, is OpenAI's 400 naming the item's place."""
    gw = make_gateway(api_keys=[{"key": USER_KEY, "name": "alice"}, {"key": OTHER_KEY, "name": "bob"}])
    client = gw.client()
    first = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, temperature=0)
    asked, = client.responses.input_items.list(first.id).data
    references = [{"type": "item_reference", "id": asked.id}, {"type": "item_reference", "id": first.output[0].id}]
    referenced = client.responses.create(model=MODEL, input=[*references, _user(AGAIN)], max_output_tokens=3,
                                         temperature=0)
    whole = client.responses.create(model=MODEL, input=[_user(QUESTION), first.output[0].model_dump(), _user(AGAIN)],
                                    max_output_tokens=3, temperature=0)
    assert (referenced.usage.input_tokens, referenced.output_text) == (whole.usage.input_tokens, whole.output_text)
    listed = client.responses.input_items.list(referenced.id, order="asc").data
    assert [item.id for item in listed[:2]] == [asked.id, first.output[0].id]
    assert listed[1].content[0].text == first.output_text

    for key, place in ((OTHER_KEY, 0), (USER_KEY, 1)):
        resp = gw.post("/v1/responses", key=key, json={"model": MODEL, "input": [
            references[0], {"type": "item_reference", "id": "msg_" + "0" * 32}][:place + 1]})
        error = assert_error(resp, 400, "item_not_found", f"input[{place}]")
        assert error["message"].startswith("Item with id ")


def test_a_function_call_stored_with_an_empty_call_id_is_still_continued(make_gateway):
    """An hpcllm before an empty call_id was refused kept a client's function_call with call_id "": items read back
    from the store are not checked as a client's are, so continuing it (previous_response_id, its conversation, an
    item_reference naming it) is answered, not a 500 (a pydantic ValidationError reading the stored item)."""
    gw = make_gateway()
    client, store = gw.client(), gw.state.responses
    owner = owner_of(gw.state.api_keys.get(USER_KEY))
    call = {"id": "fc_old", "type": "function_call", "status": "completed", "call_id": "", "name": "get_weather",
            "arguments": "{}"}
    store.put(owner, NewResponse(input=[_message("msg_old", QUESTION), call],
                                 response={"id": "resp_old", "output": [_message("msg_out", "sunny", "assistant")]}))
    conversation = client.conversations.create(items=[_user(QUESTION)])
    store.add_items(owner, conversation.id, [{**call, "id": "fc_old_in_conversation"}])
    for continuing in ({"previous_response_id": "resp_old", "input": AGAIN},
                       {"conversation": conversation.id, "input": AGAIN},
                       {"input": [{"type": "item_reference", "id": "fc_old"}, _user(AGAIN)]}):
        answer = client.responses.create(model=MODEL, max_output_tokens=2, **continuing)
        assert answer.error is None and answer.output_text  # generated (cut at max_output_tokens)


def test_an_item_id_its_conversation_has_already_is_refused_so_its_listing_pages_to_the_end(gateway):
    """OpenAI's 400 for an input repeating an item id, its own or its previous response's: kept twice, the input_items
    listing (paged by `after`, an item id) would page from the first of them forever."""
    client = gateway.client()
    first = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2)
    again = {"type": "message", "role": "user", "content": AGAIN, "id": "msg_again"}
    for body in ({"input": [again, _user("x"), again]},
                 {"previous_response_id": first.id, "input": [_user("x"), first.output[0].model_dump()]},
                 {"previous_response_id": first.id, "input": [{"type": "item_reference", "id": first.output[0].id}]}):
        error = assert_error(gateway.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 2, **body}),
                             400, "duplicate_item", "input[2]" if "previous_response_id" not in body else
                             f"input[{len(body['input']) - 1}]")
        assert error["message"].startswith("Duplicate item found with id ")

    second = client.responses.create(model=MODEL, previous_response_id=first.id, input=[again, _user("x")],
                                     max_output_tokens=2)
    paged = list(itertools.islice(client.responses.input_items.list(second.id, order="asc", limit=1), 10))
    assert len(paged) == 4 and len({item.id for item in paged}) == 4


def _owner_bytes(gw, key: str) -> int:
    owner = owner_of(next(api_key for api_key in gw.config.gateway.api_keys if api_key.key == key))
    with gw.state.shared.connection() as db:
        return db.conn.execute("SELECT COALESCE(SUM(size), 0) AS total FROM gateway_stored WHERE owner = ?",
                               (owner,)).fetchone()["total"]


def test_a_key_over_its_storage_quota_is_told_so_and_others_are_not(make_gateway):
    """gateway.responses_max_bytes_per_key: the response that crosses it is kept (its size is known only once
    generated), then every request to store more is a 400 naming the quota (store: false still answered), for that
    key only; deleting frees it."""
    gw = make_gateway(api_keys=[{"key": USER_KEY, "name": "alice"}, {"key": OTHER_KEY, "name": "bob"}],
                      responses_max_bytes_per_key=4000)
    client = gw.client()
    kept = []
    while _owner_bytes(gw, USER_KEY) <= 4000:
        kept.append(client.responses.create(model=MODEL, input="hi", max_output_tokens=2, temperature=0))
        assert kept[-1].store is True
    assert len(kept) >= 2
    resp = gw.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
    error = assert_error(resp, 400, "storage_quota_exceeded", "store")
    assert "gateway.responses_max_bytes_per_key" in error["message"] and "'store': false" in error["message"]
    error = assert_error(gw.post("/v1/conversations", json={"items": [_user("x")]}), 400, "storage_quota_exceeded",
                         "items")
    assert "'store'" not in error["message"]  # it would not help there
    assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False).store is False
    assert gw.client(key=OTHER_KEY).responses.create(model=MODEL, input="hi", max_output_tokens=2).store is True

    for response in kept:
        _delete(gw, response.id)
    assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).store is True


def test_an_input_that_alone_would_cross_the_quota_is_refused_before_generating(tmp_path, hermes_script):
    """The output's size is known only once generated (the response it takes over the quota is kept), the
    input's before: one that would take the key over is the quota's 400 and the worker is never asked (it was
    generated, then kept over the quota)."""
    with scripted_gateway(tmp_path, HERMES, "hermes-tools", hermes_script,
                          responses_max_bytes_per_key=1500) as gw:
        hermes_script.answer = "ok"
        client = gw.client()
        first = client.responses.create(model=HERMES, input="hi")
        asked = len(hermes_script.requests)
        too_long = "y" * (1500 - _owner_bytes(gw, USER_KEY))
        resp = gw.post("/v1/responses", json={"model": HERMES, "input": too_long})
        error = assert_error(resp, 400, "storage_quota_exceeded", "store")
        assert "gateway.responses_max_bytes_per_key" in error["message"]
        assert len(hermes_script.requests) == asked and _rows(gw.state.shared) == [first.id]
        assert client.responses.create(model=HERMES, input="hi").store is True


@pytest.fixture(scope="module")
def hermes_script():
    from hpcllm.devmodels import make_tokenizer

    return Script(make_tokenizer("hermes-tools"))


@pytest.fixture(scope="module")
def hermes_gateway(tmp_path_factory, hermes_script):
    """A gateway serving HERMES (a devmodel with a Hermes tools template) on a scripted worker."""
    with scripted_gateway(tmp_path_factory.mktemp("hermes"), HERMES, "hermes-tools", hermes_script) as gateway:
        yield gateway


def test_a_turn_after_a_call_cut_short_continues_it(hermes_gateway, hermes_script):
    """A call cut short by max_output_tokens is stored with its arguments as far as they came (not a JSON object):
    the next turn, by previous_response_id or by item_reference, still runs, and lists the call as stored."""
    hermes_script.answer = CUT_CALL
    pieces = token_pieces(hermes_script.tokenizer, CUT_CALL, skip_special_tokens=True)
    cut_at = next(n for n in range(len(pieces)) if "".join(p for _, p in pieces[:n]).endswith('"Par'))
    client = hermes_gateway.client()
    first = client.responses.create(model=HERMES, input=QUESTION, tools=[FUNCTION_TOOL], max_output_tokens=cut_at)
    call = first.output[-1]
    assert (first.status, call.type, call.status) == ("incomplete", "function_call", "incomplete")
    assert call.arguments == '{"city": "Par'
    hermes_script.answer = "sorry"
    chained = client.responses.create(model=HERMES, input=AGAIN, previous_response_id=first.id,
                                      tools=[FUNCTION_TOOL])
    referenced = client.responses.create(model=HERMES, tools=[FUNCTION_TOOL],
                                         input=[{"type": "item_reference", "id": call.id}, _user(AGAIN)])
    for response in chained, referenced:
        assert response.status == "completed"
        listed = [item for item in client.responses.input_items.list(response.id, order="asc").data
                  if item.type == "function_call"]
        assert [(item.id, item.arguments) for item in listed] == [(call.id, '{"city": "Par')]


def test_a_turn_that_would_outgrow_the_bound_leaves_its_conversation_as_it_was(store_at):
    """A turn appended to a conversation is held to the whole bound as added items are: nothing is kept (the
    response not stored, the conversation not changed) instead of the conversation being pruned whole."""
    make, now = store_at
    first = [_message("msg_1", "x" * 500)]
    store = make(ttl_s=3600, max_bytes=1000)
    store.create_conversation("alice", {"id": "conv_1"}, first)
    read, read_upto = store.read_conversation("alice", "conv_1")
    turn = NewResponse(input=[*read, _message("msg_2", "y" * 500)], response={"id": "resp_1", "output": []},
                       conversation="conv_1", carried=len(read), read_upto=read_upto)
    with pytest.raises(TooLarge):
        store.put("alice", turn)
    assert store.conversation_items("alice", "conv_1") == first and store.get("alice", "resp_1") is None


def test_a_turn_is_appended_to_its_conversation_though_its_response_is_too_large_to_keep(store_at):
    """The whole bound holds the response object (not kept with store false, nor where larger than the bound)
    apart from its conversation: the turn was dropped with it."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=1000)
    store.create_conversation("alice", {"id": "conv_1"}, [_message("msg_1")])
    for store_it in (False, True):
        read, read_upto = store.read_conversation("alice", "conv_1")  # each turn reads the conversation as it is
        turn = NewResponse(input=[*read, _message(f"msg_2_{store_it}")], conversation="conv_1", carried=len(read),
                           read_upto=read_upto, store=store_it,
                           response={"id": "resp_1", "tools": "t" * 1000, "output": []})
        assert store.put("alice", turn) == Kept(stored=False, appended=True, refused="bound" if store_it else None)
    assert [item["id"] for item in store.conversation_items("alice", "conv_1")] == [
        "msg_1", "msg_2_False", "msg_2_True"]
    assert store.get("alice", "resp_1") is None


def test_a_turn_is_not_appended_after_items_another_request_appended_while_it_generated(store_at):
    """A turn is appended only where nothing came after the items it read: another request adding one item and
    deleting another leaves as many items as the turn read, yet the answer never read the new one, so the turn is
    kept on its own (its response says conversation None) and not appended after it. Items only deleted meanwhile
    are no reason: appended after fewer items, the conversation is one a client could have made."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    store.create_conversation("alice", {"id": "conv_1"}, [_message("msg_1"), _message("msg_2")])

    def turn(number: int) -> NewResponse:
        read, read_upto = store.read_conversation("alice", "conv_1")
        return NewResponse(input=[*read, _message(f"msg_in_{number}")], conversation="conv_1", carried=len(read),
                           read_upto=read_upto, response={"id": f"resp_{number}", "conversation": {"id": "conv_1"},
                                                          "output": [_message(f"msg_out_{number}", role="assistant")]})

    changed = turn(1)
    store.add_items("alice", "conv_1", [_message("msg_3")])
    store.delete_item("alice", "conv_1", "msg_1")
    assert store.put("alice", changed) == Kept(stored=True, appended=False)
    assert store.get("alice", "resp_1").response["conversation"] is None  # kept on its own
    assert [item["id"] for item in store.conversation_items("alice", "conv_1")] == ["msg_2", "msg_3"]

    deleted_only = turn(2)
    store.delete_item("alice", "conv_1", "msg_3")
    assert store.put("alice", deleted_only) == Kept(stored=True, appended=True)
    assert store.get("alice", "resp_2").response["conversation"] == {"id": "conv_1"}
    assert [item["id"] for item in store.conversation_items("alice", "conv_1")] == [
        "msg_2", "msg_in_2", "msg_out_2"]


def test_deleting_an_item_is_a_change_a_conversation_expires_after(store_at):
    """A conversation expires responses_ttl_hours after its last change: deleting one of its items is one (as
    adding items or changing its metadata are), so it is there until the TTL after the delete."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    store.create_conversation("alice", {"id": "conv_1"}, [_message("msg_1"), _message("msg_2")])
    now[0] += 3000
    assert store.delete_item("alice", "conv_1", "msg_1") is True
    now[0] += 3000
    assert store.conversation("alice", "conv_1") == {"id": "conv_1"}
    assert [item["id"] for item in store.conversation_items("alice", "conv_1")] == ["msg_2"]


def test_an_input_naming_a_hundred_thousand_item_references_is_read_in_chunks(store_at):
    """PostgreSQL takes at most 65,535 parameters a query: one IN (...) of every id named was an error there (a 503
    for the client, the connection dropped); the ids are read ITEMS_PER_QUERY at a time, the latest of an id kept."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 7)
    store.put("alice", _response(1, "first"))
    store.put("alice", NewResponse(input=[_message("msg_1", "again")], response={"id": "resp_2", "output": []}))
    named = [f"msg_missing_{i}" for i in range(100_000)] + ["msg_1"]
    assert store.items("alice", named) == {"msg_1": _message("msg_1", "again")}  # the latest stored of the id
