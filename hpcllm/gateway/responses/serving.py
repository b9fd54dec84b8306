"""POST /v1/responses: a chat completion (hpcllm.gateway.chat.serving, so routing, limits, migration, resume and tool
calling are chat's own) answered as OpenAI's `response` object, or streamed as its typed events; kept (with `store`,
the default) for previous_response_id and GET/DELETE /v1/responses/{id}, and appended to its `conversation`
(hpcllm.gateway.response_store).

Output items: a reasoning model's thinking as a `reasoning` item (its text in content, as vLLM's), a `message` with
the answer's text (left out when the answer is only thinking or tool calls), then one `function_call` per tool call.
A chat finish_reason "length" makes the response (and its last item) "incomplete".
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, replace
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

from flask import Response

from hpcllm.gateway.chat.protocol import ChatChoice, ChatStreamChoice, DeltaToolCall
from hpcllm.gateway.chat.serving import ChatChoiceStream, chat_choice, chat_usage, start_chat
from hpcllm.gateway.errors import (STORAGE_LIMIT_EXCEEDED, STORAGE_QUOTA_EXCEEDED, InvalidRequest, NotFound,
                                   ServiceUnavailable)
from hpcllm.gateway.protocol import UsageInfo, parse_query
from hpcllm.gateway.response_store import NewResponse, OverQuota, StoredResponse, TooLarge, owner_of
from hpcllm.gateway.responses.protocol import (REFERENCE, FunctionCallItem, IncompleteDetails, InputItem,
                                               InputItemsQuery, OutputMessage, OutputText, ReasoningItem,
                                               ReasoningText, ResponseObject, ResponsesRequest, ResponseUsage,
                                               check_unique_ids, new_item_id, renamed_for_responses,
                                               stored_item)
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import SSE_HEADERS, Delta, RequestContext, collect, stream_error
from hpcllm.gateway.shared_state import WRITE_FAILED

log = logging.getLogger(__name__)


def create_response(gw: Gateway, ctx: RequestContext, req: ResponsesRequest) -> Response | dict:
    req.check_supported()
    owner = owner_of(ctx.api_key)
    req.store = req.store is not False and gw.responses.enabled  # what the response will say
    if req.conversation is not None and not gw.responses.enabled:
        raise storage_disabled("conversation")
    req = resolved(gw, owner, req)
    if req.previous_response_id is not None or req.conversation is not None:
        # Errors in this request's own items, named by their place in its input (continued() puts earlier items
        # before them), and before a turn holds its conversation: a refused request takes no hold.
        req.to_chat()
    response_id = new_item_id("resp")
    turn = None if req.conversation is None else begin_turn(gw, owner, req.conversation_id, response_id)
    try:
        answer = generated(gw, ctx, req, owner, response_id, turn)
    except BaseException:
        end_turn(gw, turn)
        raise
    if isinstance(answer, Response):  # freed as the answer is kept (keeper), else once the stream is closed
        answer.call_on_close(lambda: end_turn(gw, turn))
    else:
        end_turn(gw, turn)
    return answer


@dataclass
class Turn:
    """A response turn's hold on its conversation (begin_turn), freed once (end_turn): by its keeper, before the
    answer's last event, else when it fails or its stream closes; and the conversation's items it read under the
    hold, with the largest `seq` among them (NewResponse.read_upto)."""
    id: str
    earlier: list[dict[str, Any]]
    read_upto: int
    held: bool = True


def begin_turn(gw: Gateway, owner: str, conversation_id: str, response_id: str) -> Turn:
    """The conversation held for this turn (for end_turn): OpenAI's 400 conversation_locked while another
    turn is generated in it (it would not read this one's items, nor this one its), 404 for a conversation the key
    cannot see."""
    turn_id = f"{response_id}/turn"  # beside the response's own stream slot (its id)
    read = gw.responses.begin_turn(owner, conversation_id, turn_id)
    if read is None:
        raise NotFound(f"Conversation with id '{conversation_id[:100]}' not found.", param="conversation")
    if read is False:
        raise InvalidRequest("Another process is currently operating on this conversation. Please retry in a few "
                             "seconds.", param="conversation", code="conversation_locked")
    earlier, read_upto = read
    return Turn(turn_id, earlier, read_upto)


def end_turn(gw: Gateway, turn: Turn | None) -> None:
    """Free a turn's hold on its conversation (already freed: nothing to do); failing that, the lease's next
    renewal does."""
    if turn is None or not turn.held:
        return
    turn.held = False
    try:
        gw.responses.end_turn(turn.id)
    except WRITE_FAILED as exc:
        log.warning("could not free conversation turn %s (freed at the lease's next renewal): %s", turn.id, exc)


def generated(gw: Gateway, ctx: RequestContext, req: ResponsesRequest, owner: str, response_id: str,
              turn: Turn | None) -> Response | dict:
    """The answer (streamed: a Response) of a request resolved, its conversation held (turn)."""
    asked, carried, read_upto, origin = continued(gw, owner, req, turn)
    check_unique_ids((item.id for item in asked.input[:carried]), asked.input[carried:], "input")
    keep = None
    if req.store or req.conversation is not None:
        new = NewResponse(response={}, input=[item.listed() for item in asked.input],
                          previous=req.previous_response_id, conversation=req.conversation_id, carried=carried,
                          store=req.store, read_upto=read_upto, origin=origin)
        within_bounds(gw, owner, new)
        keep = keeper(gw, owner, new, turn)
    chat_req = asked.to_chat()
    try:
        generation, parser = start_chat(gw, ctx, chat_req, response_id)
    except InvalidRequest as exc:
        raise renamed_for_responses(exc) from None
    answer = ResponseBuilder(req, generation.response_id, ctx.created, keep)
    if req.stream:
        events = answer.events(generation.deltas(), ChatChoiceStream(parser, chat_req),
                               lambda: chat_usage(generation, parser), ctx.request_id)
        response = Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)
        response.call_on_close(generation.close)
        return response
    result, = collect(generation)
    return answer.whole(chat_choice(result, parser, chat_req), chat_usage(generation, parser))


def within_bounds(gw: Gateway, owner: str, new: NewResponse) -> None:
    """The 400s, before anything is generated, for a turn whose input alone would not be kept: its conversation
    would outgrow the whole bound, or the key its quota (a response whose output crosses the quota is still
    kept)."""
    try:
        gw.responses.check_room(owner, new)
    except TooLarge as exc:
        if exc.of_response:
            raise InvalidRequest(f"the input is larger than {_kept(gw.responses.max_bytes)} of a stored response: "
                                 f"send 'store': false, or a shorter input", param="store",
                                 code=STORAGE_LIMIT_EXCEEDED) from None
        raise too_large("conversation") from None
    except OverQuota as exc:
        raise quota_error(exc, "store" if new.store else "conversation") from None


# The words the storage 400s and store_error share.
KEY_STORED = "this API key's stored responses and conversations"
DELETE_SOME = "delete some (DELETE /v1/responses/{id}, /v1/conversations/{id})"


def _kept(max_bytes: int | None = None) -> str:
    """The whole bound, as the storage 400s and store_error name it (with its bytes where given)."""
    return f"this gateway keeps ({'' if max_bytes is None else f'{max_bytes} bytes, '}gateway.responses_max_bytes)"


def _key_quota(quota: int) -> str:
    """A key's quota, as the storage 400s and store_error name it."""
    return f"its {quota} bytes (gateway.responses_max_bytes_per_key)"


def quota_error(exc: OverQuota, param: str) -> InvalidRequest:
    """The 400 naming what was sent (`param`); 'store': false is offered only where it helps (a conversation's
    turn, or its items, are kept whatever `store` says)."""
    ways = "wait for them to expire, or send 'store': false" if param == "store" else "or wait for them to expire"
    return InvalidRequest(f"{KEY_STORED} would take more than {_key_quota(exc.quota)}, {exc.stored} now: "
                          f"{DELETE_SOME}, {ways}", param=param, code=STORAGE_QUOTA_EXCEEDED)


def too_large(param: str) -> InvalidRequest:
    """The 400 for a write (items added, a response's turn) that would make a conversation larger than the whole
    bound."""
    return InvalidRequest(f"the conversation would be larger than {_kept()}", param=param,
                          code=STORAGE_LIMIT_EXCEEDED)


def storage_disabled(param: str | None = None) -> InvalidRequest:
    """The 400 for a conversation (its routes, or a response in one) on a gateway that keeps nothing."""
    return InvalidRequest("conversations are not kept on this gateway (gateway.responses_max_bytes is 0)",
                          param=param, code="storage_disabled")


def resolved(gw: Gateway, owner: str, req: ResponsesRequest) -> ResponsesRequest:
    """The request with each item_reference input item replaced by the key's stored item of that id."""
    if not any(item.type == REFERENCE for item in req.input):
        return req
    return req.model_copy(update={"input": referenced(gw, owner, req.input, "input")})


def referenced(gw: Gateway, owner: str, items: list[InputItem], field: str) -> list[InputItem]:
    """The items with each item_reference replaced by the owner's stored item of that id; OpenAI's 400 naming
    the item's place in `field` where the owner has none."""
    found, stored_items = [], gw.responses.items(owner, [item.id for item in items if item.type == REFERENCE])
    for i, item in enumerate(items):
        if item.type == REFERENCE:
            stored = stored_items.get(item.id)
            if stored is None:
                raise InvalidRequest(f"Item with id '{item.id[:100]}' not found.", param=f"{field}[{i}]",
                                     code="item_not_found")
            item = stored_item(stored)
        found.append(item)
    return found


def continued(gw: Gateway, owner: str, req: ResponsesRequest,
              turn: Turn | None) -> tuple[ResponsesRequest, int, int, str | None]:
    """The request with its previous response's conversation (OpenAI's previous_response_id; the previous
    instructions are not carried over), or its conversation's items (as its turn read them), before its input; how
    many items came from there; the largest `seq` of the conversation's items read (NewResponse.read_upto); and the
    conversation the previous response's chain began in (NewResponse.origin). A previous response this key cannot
    see is OpenAI's 400."""
    if req.previous_response_id is None and req.conversation is None:
        return req, 0, 0, None
    read_upto, origin = 0, None
    if turn is not None:  # a turn in req.conversation
        earlier, read_upto = turn.earlier, turn.read_upto
    else:
        previous = gw.responses.continued(owner, req.previous_response_id)
        if previous is None:
            raise InvalidRequest(f"Previous response with id '{req.previous_response_id[:100]}' not found.",
                                 param="previous_response_id", code="previous_response_not_found")
        earlier, origin = previous.conversation(), previous.origin
    asked = req.continuing(earlier)
    return asked, len(asked.input) - len(req.input), read_upto, origin


def keeper(gw: Gateway, owner: str, new: NewResponse, turn: Turn | None = None) -> Callable[[dict[str, Any]], None]:
    """Stores a finished response with its conversation's input items (appending its items to its conversation).
    When it cannot be kept (the database is away, it is larger than responses_max_bytes, or its key over its
    quota), the answer still goes out, saying `store: false`; when its turn was not appended to its conversation
    (the database is away, the output made the conversation larger than responses_max_bytes; or, the response still
    kept, another request added items to it or deleted it meanwhile), saying `conversation: null` (OpenAI's field
    names the conversation its items were added to). Then its turn's hold on the conversation is freed: before the
    answer's last event, on which a client may send its next turn."""
    def keep(body: dict[str, Any]) -> None:
        try:
            store_it(body)
        finally:
            end_turn(gw, turn)

    def store_it(body: dict[str, Any]) -> None:
        refused: str | None = "unavailable"
        try:
            kept, appended, refused = gw.responses.put(owner, replace(new, response=body))
        except ServiceUnavailable:  # PostgreSQL away: logged where it failed
            kept = appended = False
        except sqlite3.Error as exc:  # the file's disk full, its lock held past the busy timeout
            log.warning("the gateway's limits database: %s", exc)
            kept = appended = False
        except TooLarge:  # the answer is out already: the transaction rolled back, neither it nor the turn is kept
            log.warning("response %s was not stored nor added to its conversation (the conversation would be larger "
                        "than gateway.responses_max_bytes)", body["id"])
            kept = appended = False
            refused = "conversation"
        else:
            if new.conversation is not None and not appended:  # put found it gone, or appended to
                log.warning("response %s was not added to its conversation (another request deleted it, or "
                            "appended to it, while it was generated)", body["id"])
        if not kept and new.store:
            log.warning("response %s was not stored (%s)", body["id"], refused)
            body["store"] = False
            body["store_error"] = not_stored(gw, refused)
        if not appended and new.conversation is not None:
            body["conversation"] = None
    return keep


def not_stored(gw: Gateway, refused: str | None) -> dict[str, str]:
    """The response's `store_error` (hpcllm's own field, beside `store: false`): why a response asked to be stored
    (store true, OpenAI's default) was answered but not kept once its output was known, and what that means."""
    limits = gw.config.gateway
    reasons = {
        "bound": (STORAGE_LIMIT_EXCEEDED, f"it is larger than {_kept(limits.responses_max_bytes)}"),
        "conversation": (STORAGE_LIMIT_EXCEEDED, f"its turn would make its conversation larger than "
                                                 f"{_kept(limits.responses_max_bytes)}: the conversation is as it "
                                                 f"was"),
        "quota": (STORAGE_QUOTA_EXCEEDED, f"{KEY_STORED} reached {_key_quota(limits.responses_max_bytes_per_key)} "
                                          f"while it was generated: {DELETE_SOME}"),
    }
    code, why = reasons.get(refused or "", ("storage_unavailable", "the gateway's database could not store it just "
                                                                   "now"))
    return {"code": code, "message": f"this response was answered but not stored: {why}. GET /v1/responses/{{id}} "
                                     f"and previous_response_id cannot find it; to continue, send its output items "
                                     f"in the next request's input"}


def stored_response(gw: Gateway, ctx: RequestContext, response_id: str) -> StoredResponse:
    """The key's stored response; 404 for any id it cannot see (another key's too: its existence is not told)."""
    stored = gw.responses.get(owner_of(ctx.api_key), response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


def delete_response(gw: Gateway, ctx: RequestContext, response_id: str) -> dict[str, Any]:
    if not gw.responses.delete(owner_of(ctx.api_key), response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def cancel_response(gw: Gateway, ctx: RequestContext, response_id: str) -> NoReturn:
    """OpenAI's cancel is for responses made with background: true, which this server refuses: every response it
    stored has already ended, and is refused as OpenAI refuses one that was not made in the background."""
    if not gw.responses.exists(owner_of(ctx.api_key), response_id):  # its conversation is not needed
        raise _not_found(response_id)
    raise InvalidRequest("Cannot cancel a synchronous response.", param="response_id")


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id[:100]}' not found.", param="response_id")


def list_input_items(gw: Gateway, ctx: RequestContext, response_id: str, query: Mapping[str, str]) -> dict[str, Any]:
    return parse_query(InputItemsQuery, query).page(stored_response(gw, ctx, response_id).input)


def status_of(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class ResponseBuilder:
    """One response's `response` objects: whole (from chat's choice) or streamed as OpenAI's `event:` + `data:`
    events, numbered (sequence_number), from chat's streamed choice (ChatChoiceStream: text as it comes, each
    tool call as it is written, its arguments in pieces)."""

    def __init__(self, req: ResponsesRequest, response_id: str, created: int,
                 keep: Callable[[dict[str, Any]], None] | None = None):
        self.req, self.response_id, self.created = req, response_id, created
        self.keep = keep or (lambda body: None)  # called with the finished response (stored responses)
        self.sequence_number = 0
        self.output: list[ReasoningItem | OutputMessage | FunctionCallItem] = []
        self.thought: ReasoningItem | None = None  # the reasoning item being streamed
        self.message: OutputMessage | None = None  # the message item being streamed
        self.call: FunctionCallItem | None = None  # the function_call item being streamed

    def response(self, status: str, usage: UsageInfo | None = None) -> dict[str, Any]:
        incomplete = IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
        return ResponseObject(id=self.response_id, created_at=self.created, model=self.req.model, status=status,
                              output=self.output, usage=ResponseUsage.of(usage) if usage is not None else None,
                              incomplete_details=incomplete).body(self.req)

    def whole(self, choice: ChatChoice, usage: UsageInfo) -> dict[str, Any]:
        """A whole chat choice: its thinking a reasoning item, its text a message item (none for an answer of only
        thinking or calls), its calls function_call items."""
        message, status = choice.message, status_of(choice.finish_reason)
        if message.reasoning:
            thinking_ended = bool(message.content or message.tool_calls)
            self.output.append(ReasoningItem(id=new_item_id("rs"), content=[ReasoningText(text=message.reasoning)],
                                             status="completed" if thinking_ended else status))
        if message.content or not (message.tool_calls or message.reasoning):
            text_ended = "completed" if message.tool_calls else status  # calls follow it: it is whole
            self.output.append(OutputMessage(id=new_item_id("msg"), status=text_ended,
                                             content=[OutputText(text=message.content or "")]))
        self.output += [FunctionCallItem.of(new_item_id("fc"), call) for call in message.tool_calls]
        if choice.last_call_cut:
            self.output[-1].status = status  # "incomplete": cut short by max_output_tokens
        body = self.response(status, usage)
        self.keep(body)
        return body

    # ------------------------------------------------------------------------------------------------ streamed
    def events(self, deltas: Iterator[Delta], choice: ChatChoiceStream, usage: Callable[[], UsageInfo],
               request_id: str) -> Iterator[bytes]:
        started = self.response("in_progress")
        try:
            yield self._event("response.created", response=started)
            yield self._event("response.in_progress", response=started)
            for delta in deltas:
                for chunk in choice.choices(delta):
                    yield from self._chunk(chunk, usage)
        except Exception as exc:
            error = stream_error(exc, request_id)
            yield self._event("error", code=error.code, message=error.message, param=error.param)

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def _chunk(self, chunk: ChatStreamChoice, usage: Callable[[], UsageInfo]) -> Iterator[bytes]:
        if chunk.delta.reasoning:
            yield from self._reasoning(chunk.delta.reasoning)
        if chunk.delta.content:
            yield from self._text(chunk.delta.content)
        for call in chunk.delta.tool_calls or []:
            yield from self._function_call(call)
        if chunk.finish_reason is None:
            return
        status = status_of(chunk.finish_reason)
        yield from self._close_reasoning(status)  # still thinking at the end: cut short, or the whole answer
        if not self.output and self.message is None and self.call is None:  # an empty answer is still a message
            yield from self._open_message()
        yield from self._close_message(status)
        yield from self._close_call(status if chunk.last_call_cut else "completed")
        final = self.response(status, usage())
        self.keep(final)  # before the event: a client may chain on the id as soon as it reads it
        yield self._event(f"response.{status}", response=final)

    def _reasoning(self, text: str) -> Iterator[bytes]:
        if self.thought is None:
            self.thought = ReasoningItem(id=new_item_id("rs"), content=[], status="in_progress")
            yield self._event("response.output_item.added", output_index=len(self.output),
                              item=self.thought.model_dump())
            self.thought.content.append(ReasoningText(text=""))
            yield self._event("response.content_part.added", **self._at(self.thought),
                              part=ReasoningText(text="").model_dump())
        self.thought.content[0].text += text
        yield self._event("response.reasoning_text.delta", **self._at(self.thought), delta=text)

    def _close_reasoning(self, status: str = "completed") -> Iterator[bytes]:
        if self.thought is None:
            return
        item, self.thought = self.thought, None
        part = item.content[0]
        yield self._event("response.reasoning_text.done", **self._at(item), text=part.text)
        yield self._event("response.content_part.done", **self._at(item), part=part.model_dump())
        item.status = status
        yield self._event("response.output_item.done", output_index=len(self.output), item=item.model_dump())
        self.output.append(item)

    def _at(self, item: ReasoningItem | OutputMessage) -> dict[str, Any]:
        """Where a content part's events point: the item being streamed (the next in output) and its part."""
        return {"item_id": item.id, "output_index": len(self.output), "content_index": 0}

    def _open_message(self) -> Iterator[bytes]:
        yield from self._close_reasoning()  # the answer's text follows the thinking
        self.message = OutputMessage(id=new_item_id("msg"), status="in_progress", content=[])
        yield self._event("response.output_item.added", output_index=len(self.output),
                          item=self.message.model_dump())
        self.message.content.append(OutputText(text=""))
        yield self._event("response.content_part.added", **self._at(self.message),
                          part=OutputText(text="").model_dump())

    def _text(self, text: str) -> Iterator[bytes]:
        if self.message is None:
            yield from self._open_message()
        self.message.content[0].text += text
        yield self._event("response.output_text.delta", **self._at(self.message), delta=text, logprobs=[])

    def _close_message(self, status: str) -> Iterator[bytes]:
        if self.message is None:
            return
        part = self.message.content[0]
        yield self._event("response.output_text.done", **self._at(self.message), text=part.text, logprobs=[])
        yield self._event("response.content_part.done", **self._at(self.message), part=part.model_dump())
        self.message.status = status
        yield self._event("response.output_item.done", output_index=len(self.output),
                          item=self.message.model_dump())
        self.output.append(self.message)
        self.message = None

    def _function_call(self, call: DeltaToolCall) -> Iterator[bytes]:
        """A call's chunk: a new call (it has an id: its name, and its arguments as far as they came) or more of
        the arguments of the one streamed (a call's pieces all come before the next call's)."""
        if call.id is not None:
            yield from self._close_reasoning()
            yield from self._close_message("completed")  # the text before the calls is whole
            yield from self._close_call()
            self.call = FunctionCallItem(id=new_item_id("fc"), call_id=call.id, name=call.function.name,
                                         arguments="", status="in_progress")
            yield self._event("response.output_item.added", output_index=len(self.output),
                              item=self.call.model_dump())
        self.call.arguments += call.function.arguments
        yield self._event("response.function_call_arguments.delta", item_id=self.call.id,
                          output_index=len(self.output), delta=call.function.arguments)

    def _close_call(self, status: str = "completed") -> Iterator[bytes]:
        """The call streamed is whole (the next began), or the answer ended with it (status "incomplete": cut
        short)."""
        if self.call is None:
            return
        item, self.call = self.call, None
        item.status = status
        where = {"item_id": item.id, "output_index": len(self.output)}
        yield self._event("response.function_call_arguments.done", **where, arguments=item.arguments,
                          name=item.name)
        yield self._event("response.output_item.done", output_index=len(self.output), item=item.model_dump())
        self.output.append(item)
