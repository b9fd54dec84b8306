"""The Conversations API with the official openai client (`client.conversations`), through real gateways and the
stand-in worker: a conversation's life (items, metadata, listing), `conversation` on POST /v1/responses continuing
it exactly as sending its items whole does (the same prompt tokens at the worker) and appending the turn, a key
sees only its own conversations, and the 4xx for what cannot be kept or read."""

from __future__ import annotations

import itertools
import json
import threading

import httpx
import openai
import pydantic
import pytest
from openai.types.conversations import ConversationItem
from openai.types.responses import ResponseItem

from hpcllm.gateway.response_store import NewResponse, owner_of
from hpcllm.gateway.responses.serving import ResponseBuilder

from .conftest import MODEL, USER_KEY, scripted_gateway
from .stand_in_worker import Script
from .test_errors import assert_error
from .test_responses_api import QUESTION
from .test_responses_store import AGAIN, HERMES, OTHER_KEY, _stored_bytes, _user


def _delete(gw, path: str, key: str) -> httpx.Response:
    return httpx.delete(f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _texts(items) -> list[str]:
    return [item.content[0].text for item in items]


def test_a_conversation_is_created_read_updated_and_deleted(gateway):
    client = gateway.client()
    conversation = client.conversations.create(items=[_user("hello"), {"role": "assistant", "content": "hi"}],
                                               metadata={"topic": "greeting"})
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "greeting"}
    assert client.conversations.retrieve(conversation.id) == conversation

    updated = client.conversations.update(conversation.id, metadata={"topic": "farewell"})
    assert updated.metadata == {"topic": "farewell"} and updated.created_at == conversation.created_at
    assert client.conversations.retrieve(conversation.id).metadata == {"topic": "farewell"}

    added = client.conversations.items.create(conversation.id, items=[_user(AGAIN), _user("and more")])
    assert _texts(added.data) == [AGAIN, "and more"] and added.has_more is False
    listed = client.conversations.items.list(conversation.id)  # OpenAI's default order: newest first
    assert _texts(listed.data) == ["and more", AGAIN, "hi", "hello"]
    assert [(item.type, item.role, item.status) for item in listed.data][2] == ("message", "assistant", "completed")
    page = client.conversations.items.list(conversation.id, order="asc", limit=2, after=listed.data[-1].id)
    assert _texts(page.data) == ["hi", AGAIN] and page.has_more is True

    hi = listed.data[2]
    assert client.conversations.items.retrieve(hi.id, conversation_id=conversation.id) == hi
    after_delete = client.conversations.items.delete(hi.id, conversation_id=conversation.id)
    assert after_delete.id == conversation.id and after_delete.object == "conversation"
    assert _texts(client.conversations.items.list(conversation.id, order="asc").data) == ["hello", AGAIN, "and more"]
    assert_error(gateway.get(f"/v1/conversations/{conversation.id}/items/{hi.id}"), 404, "not_found", "item_id")

    deleted = client.conversations.delete(conversation.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (conversation.id, "conversation.deleted", True)
    for path in (f"/v1/conversations/{conversation.id}", f"/v1/conversations/{conversation.id}/items",
                 f"/v1/conversations/{conversation.id}/items/{listed.data[0].id}"):
        assert_error(gateway.get(path), 404, "not_found", "conversation_id")
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.create(conversation.id, items=[_user("late")])


def test_null_items_and_metadata_are_none_as_the_openai_client_sends_them(gateway):
    """openai-python types `items` and `metadata` of conversations.create as Optional, and update's `metadata` as
    required but Optional: None is sent as JSON null, meaning none (update: clear the metadata), not a 422."""
    client = gateway.client()
    conversation = client.conversations.create(items=None, metadata=None)
    assert conversation.metadata == {} and client.conversations.items.list(conversation.id).data == []
    client.conversations.update(conversation.id, metadata={"topic": "x"})
    cleared = client.conversations.update(conversation.id, metadata=None)
    assert cleared.metadata == {} and client.conversations.retrieve(conversation.id).metadata == {}


def test_items_are_listed_in_openais_item_types(gateway):
    """Every kind of item kept, as a client sent it (an assistant's text as a plain string too), is listed as
    openai-python's types (validated, not only constructed as the client does): an output_text part carries its
    `annotations`, which ResponseOutputText requires."""
    items = [_user("x"), {"role": "user", "content": [{"type": "input_text", "text": "y"}]},
             {"role": "assistant", "content": "z"},
             {"role": "assistant", "content": [{"type": "output_text", "text": "w"}]},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "r"},
             {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "t"}]}]
    conversation = gateway.client().conversations.create(items=items)
    listed = gateway.get(f"/v1/conversations/{conversation.id}/items", params={"order": "asc"}).json()
    kept = pydantic.TypeAdapter(list[ConversationItem]).validate_python(listed["data"])
    assert [item.type for item in kept] == [item.get("type", "message") for item in items]
    assert [part.annotations for item in kept[2:4] for part in item.content] == [[], []]
    answer = gateway.client().responses.create(model=MODEL, input=items, max_output_tokens=2)
    listed = gateway.get(f"/v1/responses/{answer.id}/input_items", params={"order": "asc"}).json()
    assert len(pydantic.TypeAdapter(list[ResponseItem]).validate_python(listed["data"])) == len(items)


def test_items_kept_without_annotations_are_listed_with_them(make_gateway):
    """An assistant message an hpcllm before kept as sent (an output_text part without `annotations`) is listed
    with them too: GET /v1/conversations/{id}/items, its item, and GET /v1/responses/{id}/input_items validate as
    openai-python's types."""
    gw = make_gateway()
    client, store = gw.client(), gw.state.responses
    owner = owner_of(gw.state.api_keys.get(USER_KEY))
    old = {"id": "msg_old", "type": "message", "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "text": "z"}]}
    conversation = client.conversations.create(items=[_user("x")])
    store.add_items(owner, conversation.id, [old])
    store.put(owner, NewResponse(input=[{**old, "id": "msg_old_input"}], response={"id": "resp_old", "output": []}))
    listed = gw.get(f"/v1/conversations/{conversation.id}/items", params={"order": "asc"}).json()["data"]
    one = gw.get(f"/v1/conversations/{conversation.id}/items/msg_old").json()
    inputs = gw.get("/v1/responses/resp_old/input_items").json()["data"]
    kept = pydantic.TypeAdapter(list[ConversationItem]).validate_python([*listed, one])
    assert [part.annotations for part in kept[1].content + kept[2].content] == [[], []]
    assert pydantic.TypeAdapter(list[ResponseItem]).validate_python(inputs)[0].content[0].annotations == []


def test_an_item_id_a_conversation_has_already_is_refused_so_its_listing_pages_to_the_end(gateway):
    """OpenAI's 400 for items repeating an id of theirs or of the conversation's: kept twice, the listing (paged by
    `after`, an item id) would page from the first of them forever."""
    client = gateway.client()
    hello = {"type": "message", "role": "user", "content": "hello", "id": "msg_hello"}
    error = assert_error(gateway.post("/v1/conversations", json={"items": [hello, _user("x"), hello]}), 400,
                         "duplicate_item", "items[2]")
    assert error["message"].startswith("Duplicate item found with id msg_hello")
    conversation = client.conversations.create(items=[hello, _user("x")])
    path = f"/v1/conversations/{conversation.id}/items"
    for items, place in (([hello], 0), ([_user("y"), {"type": "item_reference", "id": "msg_hello"}], 1)):
        assert_error(gateway.post(path, json={"items": items}), 400, "duplicate_item", f"items[{place}]")
    assert_error(gateway.post("/v1/responses", json={"model": MODEL, "conversation": conversation.id,
                                                     "input": [_user("y"), hello], "max_output_tokens": 2}),
                 400, "duplicate_item", "input[1]")
    assert_error(gateway.post("/v1/conversations/conv_nope/items", json={"items": [hello]}), 404, "not_found",
                 "conversation_id")

    client.conversations.items.create(conversation.id, items=[_user("y")])
    paged = list(itertools.islice(client.conversations.items.list(conversation.id, order="asc", limit=1), 10))
    assert _texts(paged) == ["hello", "x", "y"]


def test_an_item_id_added_by_another_request_meanwhile_is_not_added_again(make_gateway, monkeypatch):
    """Another request adds an item of the same id (the same items.create sent twice at once, a client's retry) after
    this one looked at the conversation and before it appends, or while this one's response turn generates: the
    append itself refuses the repeated id, so the conversation's listing still pages to the end."""
    gw = make_gateway()
    client, store = gw.client(), gw.state.responses
    conversation = client.conversations.create(items=[_user("x")])
    hello = {"type": "message", "role": "user", "content": "hello", "id": "msg_hello"}
    add_items, put = store.add_items, store.put

    def added_meanwhile(owner, conversation_id, items):
        add_items(owner, conversation_id, items)  # the other request's, answered first
        return add_items(owner, conversation_id, items)

    monkeypatch.setattr(store, "add_items", added_meanwhile)
    assert_error(gw.post(f"/v1/conversations/{conversation.id}/items", json={"items": [hello]}), 400,
                 "duplicate_item", "items[0]")
    monkeypatch.setattr(store, "add_items", add_items)

    def added_while_generating(owner, new):
        add_items(owner, new.conversation, new.own_input)  # items.create of the turn's input item, meanwhile
        return put(owner, new)

    monkeypatch.setattr(store, "put", added_while_generating)
    again = {**hello, "id": "msg_again", "content": AGAIN}
    answer = client.responses.create(model=MODEL, conversation=conversation.id, input=[again], max_output_tokens=2)
    # its turn not appended (it would repeat msg_again, and follow an item it did not read), kept on its own
    assert (answer.conversation, answer.store) == (None, True)

    paged = list(itertools.islice(client.conversations.items.list(conversation.id, order="asc", limit=1), 10))
    assert _texts(paged) == ["x", "hello", AGAIN]


def test_a_turn_whose_conversation_was_deleted_while_it_generated_says_it_is_in_none(make_gateway, monkeypatch):
    """The conversation is deleted (or expires) after the turn read it and before its items are appended: the
    answer, and the response stored, say `conversation: null` (OpenAI's field names the conversation its items were
    added to), not the id of a conversation that never got them."""
    gw = make_gateway()
    client, store = gw.client(), gw.state.responses
    conversation = client.conversations.create(items=[_user("x")])
    put = store.put

    def deleted_while_generating(owner, new):
        store.delete_conversation(owner, new.conversation)  # DELETE /v1/conversations/{id}, meanwhile
        return put(owner, new)

    monkeypatch.setattr(store, "put", deleted_while_generating)
    answer = client.responses.create(model=MODEL, conversation=conversation.id, input=AGAIN, max_output_tokens=2)
    assert (answer.conversation, answer.store) == (None, True)
    assert client.responses.retrieve(answer.id).conversation is None
    assert client.responses.input_items.list(answer.id).data[0].content[0].text == AGAIN  # its turn is kept there
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_a_second_turn_while_one_is_generated_in_the_conversation_is_refused(make_gateway, monkeypatch):
    """Two responses in one conversation at once would each answer without the other's turn, and the later one be
    listed after a turn it never read: as OpenAI, the second is a 400 conversation_locked (the client raises, and
    may retry). The hold is freed once a turn is answered (before its last event, on which a client sends its next
    turn, its stream still open), and once one is refused; a holder gone (its process dead, its lease run out)
    holds nothing. Each turn frees its hold once."""
    gw = make_gateway()
    client, store = gw.client(), gw.state.responses
    conversation = client.conversations.create(items=[_user("x")])
    put, refused = store.put, []
    end_turn, freed = store.end_turn, []
    monkeypatch.setattr(store, "end_turn", lambda turn_id: (freed.append(turn_id), end_turn(turn_id)))

    def another_turn_meanwhile(owner, new):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model=MODEL, conversation=conversation.id, input="other", max_output_tokens=2)
        refused.append(caught.value)
        return put(owner, new)

    monkeypatch.setattr(store, "put", another_turn_meanwhile)
    answer = client.responses.create(model=MODEL, conversation=conversation.id, input=AGAIN, max_output_tokens=2)
    events, next_sent = ResponseBuilder.events, threading.Event()

    def held_open(self, *args, **kwargs):  # the stream ends only once the next turn was answered (or refused)
        yield from events(self, *args, **kwargs)
        next_sent.wait(120)

    monkeypatch.setattr(ResponseBuilder, "events", held_open)
    with client.responses.create(model=MODEL, conversation=conversation.id, input=AGAIN, max_output_tokens=2,
                                 stream=True) as stream:
        for event in stream:
            if event.type in ("response.completed", "response.incomplete"):  # its last: the next turn, sent on it
                streamed = event.response
                monkeypatch.setattr(store, "put", put)
                try:
                    next_turn = client.responses.create(model=MODEL, conversation=conversation.id, input="next",
                                                        max_output_tokens=2)
                finally:
                    next_sent.set()
    assert answer.conversation.id == streamed.conversation.id == next_turn.conversation.id == conversation.id
    assert _texts(client.conversations.items.list(conversation.id, order="asc").data)[-2:] == [
        "next", next_turn.output_text]
    for error in refused:
        assert (error.status_code, error.code, error.param) == (400, "conversation_locked", "conversation")
        assert error.body["message"].startswith("Another process is currently operating on this conversation.")
    assert len(refused) == 2

    # refused before generating (its prompt too long): freed too
    assert_error(gw.post("/v1/responses", json={"model": MODEL, "conversation": conversation.id,
                                                "input": "hello " * 5000}), 400, "context_length_exceeded", "input")
    # a holder whose lease ran out (a gateway host gone)
    with store.shared.transaction() as db:
        db.conn.execute("INSERT INTO gateway_stream_holders (holder, host, pid, renewed) VALUES (?, ?, ?, ?)",
                        ("gone/1/x", "gone", 1, 0.0))
        db.conn.execute("INSERT INTO gateway_stream_slots (id, bucket, holder) VALUES (?, ?, ?)",
                        ("resp_gone/turn", f"conversation:{conversation.id}", "gone/1/x"))
    last = client.responses.create(model=MODEL, conversation=conversation.id, input="last", max_output_tokens=2)
    assert last.conversation.id == conversation.id
    assert _texts(client.conversations.items.list(conversation.id, order="asc").data)[-2:] == [
        "last", last.output_text]
    assert len(freed) == len(set(freed)) == 5  # answer, streamed, next, the one too long, last


def test_a_turn_is_not_appended_after_items_added_while_it_generated(make_gateway, monkeypatch):
    """Items added to the conversation while a turn generates (they do not wait for its hold): its answer did not
    read them, and appended after them the conversation would say it did. It is answered, and kept on its own,
    saying `conversation: null`; the conversation holds the items added."""
    gw = make_gateway()
    client, store = gw.client(), gw.state.responses
    conversation = client.conversations.create(items=[_user("x")])
    put = store.put

    def added_meanwhile(owner, new):
        client.conversations.items.create(conversation.id, items=[_user("other")])
        return put(owner, new)

    monkeypatch.setattr(store, "put", added_meanwhile)
    answer = client.responses.create(model=MODEL, conversation=conversation.id, input=AGAIN, max_output_tokens=2)
    assert (answer.conversation, answer.store) == (None, True)
    assert _texts(client.conversations.items.list(conversation.id, order="asc").data) == ["x", "other"]
    kept = client.responses.retrieve(answer.id)
    assert kept.conversation is None and kept.output_text == answer.output_text


def test_a_conversation_stored_with_an_id_twice_still_pages_to_the_end(make_gateway):
    """A conversation stored before repeated item ids were refused may hold one twice: the openai client's listing,
    paging by `after` (the last id of a page), still ends, each way (resuming after the id's last copy: a page that
    ends on its first skips what lies between, which no id could tell apart)."""
    gw = make_gateway()
    client, store = gw.client(), gw.state.responses
    conversation = client.conversations.create(items=[_user("x")])
    hello = {"id": "msg_hello", "type": "message", "role": "user", "status": "completed",
             "content": [{"type": "input_text", "text": "hello"}]}
    with store.shared.transaction() as db:  # as an hpcllm before duplicate_item kept it: msg_hello, y, msg_hello
        owner = db.conn.execute("SELECT owner FROM gateway_stored WHERE id = ?",
                                (conversation.id,)).fetchone()["owner"]
        for item in (hello, {**hello, "id": "msg_y", "content": [{"type": "input_text", "text": "y"}]}, hello):
            db.conn.execute("INSERT INTO gateway_items (owner, id, holder, output, size, item) "
                            "VALUES (?, ?, ?, 0, 1, ?)", (owner, item["id"], conversation.id, json.dumps(item)))
    for order, ends in (("asc", ["x", "hello"]), ("desc", ["hello", "x"])):
        paged = list(itertools.islice(client.conversations.items.list(conversation.id, order=order, limit=1), 10))
        assert len(paged) < 10 and _texts(paged)[::len(paged) - 1] == ends, _texts(paged)
        whole = client.conversations.items.list(conversation.id, order=order).data  # one page: all of them
        assert _texts(whole) == (["x", "hello", "y", "hello"] if order == "asc" else ["hello", "y", "hello", "x"])


def test_a_response_in_a_conversation_reads_its_items_and_appends_its_turn(gateway):
    """`conversation` on responses.create: the prompt is the conversation's items then the input (the same token
    count and greedy answer as sending them whole), and the turn's input and output items are appended; the next
    turn, streamed, reads them. store: false still appends (the response itself is not kept)."""
    client = gateway.client()
    conversation = client.conversations.create(items=[_user(QUESTION)])
    first = client.responses.create(model=MODEL, conversation=conversation.id, input=AGAIN, max_output_tokens=4,
                                    temperature=0)
    whole = client.responses.create(model=MODEL, input=[_user(QUESTION), _user(AGAIN)], max_output_tokens=4,
                                    temperature=0, store=False)
    assert (first.usage.input_tokens, first.output_text) == (whole.usage.input_tokens, whole.output_text)
    assert first.conversation.id == conversation.id
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert _texts(items) == [QUESTION, AGAIN, first.output_text] and items[2].id == first.output[0].id

    events = list(client.responses.create(model=MODEL, conversation={"id": conversation.id}, input="once more",
                                          max_output_tokens=4, temperature=0, stream=True, store=False))
    second = events[-1].response
    again = client.responses.create(model=MODEL, input=[*(item.model_dump() for item in items), _user("once more")],
                                    max_output_tokens=4, temperature=0, store=False)
    assert (second.usage.input_tokens, second.output_text) == (again.usage.input_tokens, again.output_text)
    assert _texts(client.conversations.items.list(conversation.id, order="asc").data) == [
        QUESTION, AGAIN, first.output_text, "once more", second.output_text]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_another_keys_conversation_does_not_exist_for_it(make_gateway):
    gw = make_gateway(api_keys=[{"key": USER_KEY, "name": "alice"}, {"key": OTHER_KEY, "name": "bob"}])
    mine = gw.client().conversations.create(items=[_user("a secret")])
    item_id = gw.client().conversations.items.list(mine.id).data[0].id
    unknown = "conv_" + "0" * 32
    for conversation_id in (mine.id, unknown):  # told the same as an id that never existed
        for path in (f"/v1/conversations/{conversation_id}", f"/v1/conversations/{conversation_id}/items",
                     f"/v1/conversations/{conversation_id}/items/{item_id}"):
            assert_error(gw.get(path, key=OTHER_KEY), 404, "not_found", "conversation_id")
        for call in (lambda: gw.post(f"/v1/conversations/{conversation_id}", key=OTHER_KEY, json={"metadata": {}}),
                     lambda: gw.post(f"/v1/conversations/{conversation_id}/items", key=OTHER_KEY,
                                     json={"items": [_user("x")]}),
                     lambda: _delete(gw, f"/v1/conversations/{conversation_id}", OTHER_KEY),
                     lambda: _delete(gw, f"/v1/conversations/{conversation_id}/items/{item_id}", OTHER_KEY)):
            assert_error(call(), 404, "not_found", "conversation_id")
        resp = gw.post("/v1/responses", key=OTHER_KEY, json={"model": MODEL, "conversation": conversation_id,
                                                               "input": "tell"})
        assert_error(resp, 404, "not_found", "conversation")
    assert_error(gw.post("/v1/conversations", key=OTHER_KEY, json={
        "items": [{"type": "item_reference", "id": item_id}]}), 400, "item_not_found", "items[0]")
    assert _texts(gw.client().conversations.items.list(mine.id).data) == ["a secret"]


@pytest.mark.parametrize("body, status, code, param", [
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, 422, "invalid_value", "metadata"),
    ({"metadata": {"k": "v" * 513}}, 422, "invalid_value", "metadata"),
    ({"items": [_user("x")] * 21}, 422, "invalid_value", "items"),
    ({"items": [{"type": "web_search_call", "id": "ws_1"}]}, 400, "unsupported_parameter", "items[0].type"),
    ({"items": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, 400,
     "unsupported_parameter", "items[0].content[0].type"),
    ({"items": [_user("x"), {"type": "item_reference", "id": "msg_none"}]}, 400, "item_not_found", "items[1]"),
    ({"items": [{"role": "user"}]}, 422, "invalid_value", "items[0]"),
    ({"items": [{"type": "function_call_output", "call_id": "", "output": "x"}]}, 422, "invalid_value", "items[0]"),
    ({"items": [{"type": "function_call", "call_id": "c", "name": "", "arguments": "{}"}]}, 422, "invalid_value",
     "items[0]"),
])
def test_what_cannot_be_kept_or_read_is_a_4xx_naming_it(gateway, body, status, code, param):
    assert_error(gateway.post("/v1/conversations", json=body), status, code, param)


def test_a_conversation_is_kept_within_the_byte_bound_or_refused(make_gateway):
    off = make_gateway(responses_max_bytes=0)
    assert_error(off.post("/v1/conversations", json={}), 400, "storage_disabled")
    assert_error(off.post("/v1/responses", json={"model": MODEL, "input": "hi", "conversation": "conv_1"}), 400,
                 "storage_disabled", "conversation")  # the same answer, not the 404 of an unknown conversation
    small = make_gateway(responses_max_bytes=1000)
    conversation = small.client().conversations.create(items=[_user("x")])
    resp = small.post(f"/v1/conversations/{conversation.id}/items", json={"items": [_user("y" * 1000)]})
    assert_error(resp, 400, "storage_limit_exceeded", "items")
    assert _stored_bytes(small.state.shared)[0] == 1  # nothing half-added
    assert_error(small.post("/v1/conversations", json={"items": [_user("y" * 1000)]}), 400, "storage_limit_exceeded",
                 "items")


def _conversation_bytes(gw, conversation_id: str) -> int:
    with gw.state.shared.connection() as db:
        return db.conn.execute("SELECT size FROM gateway_stored WHERE id = ?", (conversation_id,)).fetchone()["size"]


def test_a_turn_its_conversation_cannot_hold_is_refused_before_anything_is_generated(tmp_path):
    """A turn whose input alone would take its conversation over gateway.responses_max_bytes is the Conversations
    API's 400, before the worker is asked (it was generated, paid for, and answered unkept); a turn that fits is
    still appended; one whose output takes it over is answered, saying `conversation: null` and `store: false`,
    whole and streamed, and the conversation is left as it was."""
    from hpcllm.devmodels import make_tokenizer

    script = Script(make_tokenizer("hermes-tools"))
    script.answer = "ok"
    with scripted_gateway(tmp_path, HERMES, "hermes-tools", script, responses_max_bytes=1000) as gw:
        client = gw.client()
        conversation = client.conversations.create(items=[_user("x" * 100)])
        fits = client.responses.create(model=HERMES, conversation=conversation.id, input="hi", store=False)
        assert fits.conversation.id == conversation.id and len(script.requests) == 1
        before = client.conversations.items.list(conversation.id, order="asc").data
        assert _texts(before) == ["x" * 100, "hi", "ok"]

        too_long = "y" * (1000 - _conversation_bytes(gw, conversation.id))
        for store in (True, False):
            resp = gw.post("/v1/responses", json={"model": HERMES, "conversation": conversation.id,
                                                  "input": too_long, "store": store})
            error = assert_error(resp, 400, "storage_limit_exceeded", "conversation")
            assert "gateway.responses_max_bytes" in error["message"]
        assert len(script.requests) == 1  # the worker was never asked

        script.answer = "z" * 200  # the input fits, the output does not
        whole = client.responses.create(model=HERMES, conversation=conversation.id, input="hi")
        events = list(client.responses.create(model=HERMES, conversation=conversation.id, input="hi", stream=True))
        for answer in (whole, events[-1].response):
            assert answer.output_text == "z" * 200
            assert (answer.conversation, answer.store) == (None, False)
        assert client.conversations.items.list(conversation.id, order="asc").data == before


def test_metadata_that_would_outgrow_the_bound_is_refused(make_gateway):
    """Metadata that would take a conversation over gateway.responses_max_bytes is the 400 naming it, and the
    conversation is kept as it was (the update went through, and the prune then deleted the conversation whole)."""
    small = make_gateway(responses_max_bytes=1500)
    client = small.client()
    conversation = client.conversations.create(items=[_user("x" * 1000)])
    resp = small.post(f"/v1/conversations/{conversation.id}", json={"metadata": {"k": "v" * 500}})
    assert_error(resp, 400, "storage_limit_exceeded", "metadata")
    assert client.conversations.retrieve(conversation.id) == conversation
    assert client.conversations.update(conversation.id, metadata={"k": "v"}).metadata == {"k": "v"}


def test_include_asking_for_data_no_item_carries_is_refused_not_ignored(gateway):
    """The items' and stored responses' `include` query (OpenAI's): reasoning.encrypted_content is answered (reasoning
    items carry their text), anything else - logprobs, images, built-in tools' outputs, never stored here - is a 400
    naming include, where it was ignored and the client got items without what it asked for."""
    client = gateway.client()
    conversation = client.conversations.create(items=[_user("hello")])
    [item] = client.conversations.items.list(conversation.id).data
    listed = client.conversations.items.list(conversation.id, include=["reasoning.encrypted_content"])
    assert [i.id for i in listed.data] == [item.id]
    response = client.responses.create(model=MODEL, input="hi", max_output_tokens=3)
    paths = (f"/v1/conversations/{conversation.id}/items", f"/v1/conversations/{conversation.id}/items/{item.id}",
             f"/v1/responses/{response.id}", f"/v1/responses/{response.id}/input_items")
    for path in paths:
        for query in ("include=message.output_text.logprobs", "include[]=reasoning.encrypted_content&"
                                                              "include[]=file_search_call.results"):
            error = assert_error(gateway.get(f"{path}?{query}"), 400, "unsupported_parameter", "include")
            assert "output_text.logprobs" in error["message"] or "file_search_call" in error["message"], error
        assert gateway.get(f"{path}?include[]=reasoning.encrypted_content").status_code == 200
    assert_error(gateway.post(f"/v1/conversations/{conversation.id}/items?include=message.input_image.image_url",
                              json={"items": [_user("more")]}), 400, "unsupported_parameter", "include")
    assert len(client.conversations.items.list(conversation.id).data) == 1  # nothing added by the refused call


def test_a_turn_refused_for_its_own_items_takes_no_hold_on_its_conversation(make_gateway, monkeypatch):
    """A request whose own items are refused (a bad text.format here) is answered 4xx before its turn holds the
    conversation: nothing is written for it, and no other turn could be refused conversation_locked meanwhile."""
    gw = make_gateway()
    client, store = gw.client(), gw.state.responses
    conversation = client.conversations.create(items=[_user("x")])
    begin_turn, held = store.begin_turn, []
    monkeypatch.setattr(store, "begin_turn", lambda *args: (held.append(args), begin_turn(*args))[1])
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, conversation=conversation.id, input="hi",
                                text={"format": {"type": "json_schema", "schema": {"type": "object"}}})
    assert refused.value.body["param"] == "text.format.name", refused.value.body
    assert held == []
