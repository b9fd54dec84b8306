"""A list's `after` cursor naming a row the sweep forgot (deleted or expired more than files.PLACE_KEPT_S ago): a pager
that resumes a saved cursor that late is told to list again from the start, not only that the id is unknown."""

from __future__ import annotations

import io
import time

from hpcllm.gateway.files.store import PLACE_KEPT_S

from .test_batches_api import service_of
from .test_errors import assert_error


def assert_restart_listing(resp, kind: str, cursor: str) -> None:
    error = assert_error(resp, 400, "invalid_request", "after")
    message = error["message"]
    assert cursor in message and kind in message, message
    assert f"{PLACE_KEPT_S / 3600:g} hours" in message, message  # why it is unknown now
    assert "list again from the start" in message and "without 'after'" in message, message  # what to do


def test_a_files_cursor_forgotten_by_the_sweep_says_to_list_again(make_gateway):
    gw = make_gateway()
    client, service = gw.client(), service_of(gw)
    kept, cursor = (client.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id
                    for i in range(2))
    assert client.files.delete(cursor).deleted
    service.files.clock = lambda: time.time() + PLACE_KEPT_S + 1
    service.runner.sweep()
    assert_restart_listing(gw.get(f"/v1/files?after={cursor}&limit=1"), "file", cursor)
    assert [f.id for f in client.files.list()] == [kept]  # listing again from the start works


def test_a_batches_cursor_forgotten_by_the_sweep_says_to_list_again(make_gateway):
    gw = make_gateway()
    client, service = gw.client(), service_of(gw)
    source = client.files.create(file=("in.jsonl", io.BytesIO(b"not json\n")), purpose="batch")
    cursor = client.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h",
                                   output_expires_after={"anchor": "created_at", "seconds": 3600}).id
    service.files.clock = lambda: time.time() + 3601 + PLACE_KEPT_S + 1
    service.runner.sweep()
    assert_restart_listing(gw.get(f"/v1/batches?after={cursor}&limit=1"), "batch", cursor)
    assert client.batches.list().data == []


def test_an_items_cursor_naming_a_deleted_item_says_to_list_again(gateway):
    """A conversation's items (and a response's input_items) say the same as files and batches: why the cursor
    places no page, and to list again from the start."""
    client = gateway.client()
    conversation = client.conversations.create(items=[{"role": "user", "content": c} for c in "abc"])
    cursor = client.conversations.items.list(conversation.id, limit=1).data[0].id
    client.conversations.items.delete(cursor, conversation_id=conversation.id)
    error = assert_error(gateway.get(f"/v1/conversations/{conversation.id}/items?after={cursor}&limit=1"), 400,
                         "invalid_request", "after")
    assert cursor in error["message"] and "deleted" in error["message"], error
    assert "list again from the start" in error["message"] and "without 'after'" in error["message"], error
