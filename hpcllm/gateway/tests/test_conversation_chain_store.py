"""A previous_response_id chain begun as a conversation's turn replays what that turn read (the conversation's items
before it), however the conversation fares after (ResponseStore with a test clock, on each kind of database): it
lives as long as the chain that replays it, and a turn that could not be appended to its conversation keeps the
items it read itself."""

from __future__ import annotations

from hpcllm.gateway.response_store import Kept, NewResponse

from .test_responses_store import _message, store_at  # noqa: F401

MINUTE = 60


def _turn(store, number: int) -> NewResponse:
    """A response turn of conv_1 reading its items as they are now."""
    read, read_upto = store.read_conversation("alice", "conv_1")
    return NewResponse(input=[*read, _message(f"msg_in_{number}")], conversation="conv_1", carried=len(read),
                       read_upto=read_upto, response={"id": f"resp_{number}", "conversation": {"id": "conv_1"},
                                                      "output": [_message(f"msg_out_{number}", role="assistant")]})


def _link(store, number: int, previous: str) -> NewResponse:
    """A response chained on `previous` (previous_response_id), carrying what it continues."""
    continued = store.continued("alice", previous)
    earlier = continued.conversation()
    return NewResponse(input=[*earlier, _message(f"msg_in_{number}")], previous=previous, carried=len(earlier),
                       origin=continued.origin,
                       response={"id": f"resp_{number}", "output": [_message(f"msg_out_{number}", role="assistant")]})


def _ids(items) -> list[str]:
    return [item["id"] for item in items]


def test_only_a_continuation_reads_the_conversation_before_the_chain(store_at):  # noqa: F811
    """GET /v1/responses/{id} and its input_items show the response's own items: reading it (get) does not read its
    conversation's earlier items; continuing it (previous_response_id) does."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    store.create_conversation("alice", {"id": "conv_1"}, [_message("m_before")])
    store.put("alice", _turn(store, 1))
    assert store.get("alice", "resp_1").before == []
    assert _ids(store.continued("alice", "resp_1").conversation()) == ["m_before", "msg_in_1", "msg_out_1"]


def test_a_chain_used_past_its_conversations_ttl_still_replays_the_conversation(store_at):  # noqa: F811
    """Three links 25 minutes apart with a one-hour TTL: the conversation, untouched since the turn, expires for its
    own routes, yet the chain (alive: each link refreshes it) still replays its items before the turn, and a store
    that prunes expired rows keeps it."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    store.create_conversation("alice", {"id": "conv_1"}, [_message("m_before")])
    assert store.put("alice", _turn(store, 1)) == Kept(stored=True, appended=True)
    previous = "resp_1"
    for number in (2, 3, 4):
        now[0] += 25 * MINUTE
        assert store.put("alice", _link(store, number, previous)).stored  # a store prunes what expired
        previous = f"resp_{number}"
    assert store.conversation("alice", "conv_1") is None  # 75 minutes unchanged: expired for its own routes
    assert _ids(store.continued("alice", "resp_4").conversation()) == [
        "m_before", "msg_in_1", "msg_out_1", "msg_in_2", "msg_out_2", "msg_in_3", "msg_out_3", "msg_in_4", "msg_out_4"]

    now[0] += 3601  # the chain unused for the TTL: it and the conversation go together at the next store
    store.put("alice", NewResponse(input=[_message("msg_other")], response={"id": "resp_other", "output": []}))
    with store.shared.connection() as db:
        assert [row["id"] for row in db.conn.execute("SELECT id FROM gateway_stored")] == ["resp_other"]


def test_a_chain_used_past_its_conversations_place_in_the_byte_bound_goes_from_its_newest_link(store_at):  # noqa: F811
    """Beyond the byte bound the oldest used rows go first: the conversation a chain replays is used with it, so the
    chain's newest link goes before it, never the conversation before the chain."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    store.create_conversation("alice", {"id": "conv_1"}, [_message("m_before")])
    store.put("alice", _turn(store, 1))
    now[0] += 1
    store.put("alice", _link(store, 2, "resp_1"))
    now[0] += 1
    store.put("alice", NewResponse(input=[_message("msg_other")], response={"id": "resp_other", "output": []}))
    with store.shared.connection() as db:
        order = [row["id"] for row in db.conn.execute("SELECT id FROM gateway_stored ORDER BY used, seen DESC, id")]
    assert order.index("resp_2") < order.index("conv_1")  # the prune's order: resp_2 goes first


def test_a_turn_not_appended_to_its_conversation_keeps_what_it_read(store_at):  # noqa: F811
    """Another request appended to the conversation (or deleted it) while a turn generated: the turn is kept on its
    own (conversation None), with every conversation item its answer read, so a chain from it replays them."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=10 ** 6)
    store.create_conversation("alice", {"id": "conv_1"}, [_message("msg_1"), _message("msg_2")])
    appended_to = _turn(store, 1)
    store.add_items("alice", "conv_1", [_message("msg_3")])
    assert store.put("alice", appended_to) == Kept(stored=True, appended=False)
    assert _ids(store.continued("alice", "resp_1").conversation()) == ["msg_1", "msg_2", "msg_in_1", "msg_out_1"]

    deleted = _turn(store, 2)
    store.delete_conversation("alice", "conv_1")
    assert store.put("alice", deleted) == Kept(stored=True, appended=False)
    assert _ids(store.continued("alice", "resp_2").conversation()) == [
        "msg_1", "msg_2", "msg_3", "msg_in_2", "msg_out_2"]
