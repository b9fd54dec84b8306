"""Wire types of POST /v1/responses (OpenAI's Responses API) and their translation to a chat completions request.

The request becomes a ChatCompletionRequest (instructions a system message first, input items messages, function
tools chat tools, text.format chat's response_format); the answer is built from chat's choice or chunks. Shapes as
OpenAI's (openai-python's types/responses) and vLLM's serving_responses.py.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, get_args

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from werkzeug.datastructures import MultiDict

from hpcllm.gateway.chat.protocol import (ChatCompletionRequest, ChatMessage, ChatUsage, FunctionCall,
                                          FunctionDefinition, ReasoningEffort, ToolCallIn, ToolCallOut, ToolDefinition,
                                          function_name, json_object_arguments)
from hpcllm.gateway.errors import InvalidRequest, InvalidValue
from hpcllm.gateway.protocol import (ListPage, OpenAIRequest, OpenAIResponse, Priority, UsageInfo, unplaced_after,
                                     unsupported, validation_error)

InputRole = Literal["user", "system", "developer", "assistant"]
# Content part types whose text reaches the prompt (what a user sends, what the model answered before).
TEXT_PARTS = ("input_text", "output_text")
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
E = TypeVar("E", InvalidRequest, InvalidValue)  # the errors a chat request's field gets
REFERENCE = "item_reference"  # an input item that names a stored item by id (resolved by the serving layer)
# The validation context of items read back from the store (stored_item).
STORED = {"stored": True}


def new_item_id(prefix: str) -> str:
    """OpenAI's ids: resp_..., rs_..., msg_..., fc_..."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _content_shape(value: Any, what: str) -> str | list[dict]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in value):
        return value
    raise ValueError(f"{what} must be a string or a list of content parts like "
                     f"{{\"type\": \"input_text\", \"text\": ...}}")


def _text_of(value: str | list[dict], where: str) -> str:
    if isinstance(value, str):
        return value
    texts = []
    for i, part in enumerate(value):
        if part["type"] not in TEXT_PARTS:
            raise unsupported(f"{where}[{i}].type", f"content of type {part['type']!r}")
        if not isinstance(part.get("text"), str):
            raise unsupported(f"{where}[{i}].text", "a text part without a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


class InputItem(OpenAIRequest):
    """One item of `input`: a message (`type` may be left out), an earlier function call, or its output, or an
    earlier answer's reasoning, or a stored item named by id (item_reference, replaced by that item before the
    translation). The fields of the other types are checked by type (check_supported refuses unknown types with a
    400)."""

    type: str = "message"
    id: str | None = None
    role: InputRole | None = None
    content: Any = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: Any = None
    summary: Any = None  # a reasoning item's
    encrypted_content: Any = None

    def reasoning_text(self, where: str) -> str:
        """A reasoning item's text: its reasoning_text parts (as this server returns them), else its summary's (as
        vLLM reads them); an encrypted one (OpenAI's) is a 400: only OpenAI can read it."""
        if self.encrypted_content is not None:
            raise unsupported(f"{where}.encrypted_content", "encrypted reasoning (send its text in 'content')")
        for name, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
            parts = getattr(self, name)
            if parts:
                if not (isinstance(parts, list) and all(isinstance(p, dict) and p.get("type") == kind
                                                        and isinstance(p.get("text"), str) for p in parts)):
                    raise InvalidRequest(f"a reasoning item's {name} must be a list of {{\"type\": \"{kind}\", "
                                         f"\"text\": ...}} parts", param=f"{where}.{name}", code="invalid_value")
                return "".join(part["text"] for part in parts)
        return ""

    @model_validator(mode="after")
    def _fields_of_its_type(self, info: ValidationInfo) -> InputItem:
        needed = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                  "function_call_output": ("call_id", "output"), REFERENCE: ("id",)}.get(self.type, ())
        missing = next((name for name in needed if getattr(self, name) is None), None)
        if missing is not None:
            raise ValueError(f"a {self.type} item needs '{missing}'")
        # An empty call_id pairs nothing: a client's is refused (one stored by an hpcllm before is read back as kept)
        if self.call_id == "" and self.type in ("function_call", "function_call_output") and info.context != STORED:
            raise ValueError(f"a {self.type} item needs a non-empty 'call_id'")
        if self.type == "message":
            _content_shape(self.content, "content")
        elif self.type == "function_call" and info.context != STORED:
            # any name a parser took from a model's answer (Hermes models write "functions.get_weather") comes back
            # as the answer gave it (OpenAI's tool loop: input += response.output); an empty one names nothing
            if not self.name:
                raise ValueError("a function_call item needs a non-empty 'name'")
            json_object_arguments(self.arguments)
        elif self.type == "function_call_output":
            _content_shape(self.output, "output")
        return self

    def listed(self) -> dict[str, Any]:
        """This item as it is stored and listed (GET /v1/responses/{id}/input_items): OpenAI's item shape, with an
        id and a status, a message's content as parts. Read back as an InputItem, it is the same message again."""
        item = {"id": self.id or new_item_id(ITEM_ID_PREFIXES.get(self.type, "item")), "type": self.type,
                "status": "completed"}
        if self.type == "message":
            kind = "output_text" if self.role == "assistant" else "input_text"
            content = [{"type": kind, "text": self.content}] if isinstance(self.content, str) else self.content
            return annotated({**item, "role": self.role, "content": content})
        if self.type == "function_call":
            return {**item, "call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        if self.type == "function_call_output":
            return {**item, "call_id": self.call_id, "output": self.output}
        return {**self.model_dump(exclude_none=True), **item}


def annotated(item: dict[str, Any]) -> dict[str, Any]:
    """A kept item as it is listed: a message's output_text parts with their annotations (openai-python's
    ResponseOutputText requires them; [] where none were sent, and on items an hpcllm before kept without)."""
    if item.get("type") != "message" or not isinstance(item.get("content"), list):
        return item
    return {**item, "content": [{**part, "annotations": part.get("annotations", [])}
                                if isinstance(part, dict) and part.get("type") == "output_text" else part
                                for part in item["content"]]}


def stored_item(item: dict[str, Any]) -> InputItem:
    """An item read back from the store (an earlier turn's, or one an item_reference names): the gateway wrote it,
    and a function call cut short or malformed is stored with its arguments as the model wrote them, so they are
    not checked again (a client's own items are)."""
    return InputItem.model_validate(item, context=STORED)


class FunctionTool(OpenAIRequest):
    """A tool: Responses' function tools have name, description, parameters and strict at the top level; other
    types are OpenAI's built-in tools (web_search, file_search, ...), refused by check_supported."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _named_function(self) -> FunctionTool:
        if self.type == "function":
            if self.name is None:
                raise ValueError("a function tool needs a 'name'")
            function_name(self.name)
        return self

    def for_chat(self) -> ToolDefinition:
        return ToolDefinition(type="function", function=FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict))


class TextConfig(OpenAIRequest):
    format: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def _typed(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and not isinstance(value.get("type"), str):
            raise ValueError("format needs a 'type': 'text', 'json_object' or 'json_schema'")
        return value

    def response_format(self) -> dict[str, Any] | None:
        """chat's response_format: json_schema's name/schema/strict/description are nested there, flat here."""
        if self.format is None:
            return None
        kind = self.format["type"]
        if kind == "json_schema":
            return {"type": kind, "json_schema": {k: v for k, v in self.format.items() if k != "type"}}
        return {"type": kind}


# The keys of `reasoning` (OpenAI's Reasoning; generate_summary is summary's older name).
REASONING_SETTINGS = ("effort", "summary", "generate_summary")
# What a chat request's errors call the Responses fields they come from.
PARAM_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
               "response_format": "text.format"}
# Fields nested in those (a chat param that starts with one): json_schema's fields are flat in text.format, a
# function tool's at the top of its tool. (Not messages[i]: an input item's index is not its message's.)
PARAM_PATHS = ((r"response_format(\.json_schema)?", "text.format"), (r"(tools\[\d+\])\.function", r"\1"),
               (r"tool_choice\.function", "tool_choice"))


class ResponsesRequest(OpenAIRequest):
    model: str = Field(min_length=1)
    input: list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool | None = False
    tools: list[FunctionTool] | None = None
    # "auto" (the default), "none", "required" or a named function {"type": "function", "name": ...} (chat's)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # OpenAI's default is true: kept (hpcllm.gateway.response_store)
    previous_response_id: str | None = Field(None, min_length=1)
    # vLLM's extension, as chat's: variables of the chat template ({"enable_thinking": false})
    chat_template_kwargs: dict[str, Any] | None = None
    # {"effort": ...}: "none" turns thinking off, as chat's reasoning_effort; "summary" is accepted, and none is
    # written (the reasoning item holds the whole thinking)
    reasoning: dict[str, Any] | None = None
    include_reasoning: bool = True  # vLLM's extension, as chat's: false leaves the reasoning item out
    priority: Priority = 0  # as chat's
    truncation: Literal["auto", "disabled"] | None = None
    conversation: str | dict[str, Any] | None = None  # a conversation's id, or {"id": ...} (OpenAI's two shapes)
    # Declared to be refused when set (unknown fields are dropped silently)
    prompt: Any = None
    background: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _string_is_one_user_message(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[FunctionTool] | None) -> list[FunctionTool] | None:
        names = [tool.name for tool in tools or [] if tool.type == "function"]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise ValueError(f"function {twice!r} is defined twice")
        return tools

    def check_supported(self) -> None:
        """400s for what this server cannot do, naming the field (chat's own checks follow in to_chat's request)."""
        if self.conversation is not None and self.previous_response_id is not None:
            raise InvalidRequest("Mutually exclusive parameters: Ensure you are only providing one of: "
                                 "'previous_response_id' or 'conversation'.", param="conversation",
                                 code="mutually_exclusive_parameters")
        if isinstance(self.conversation, dict) and not isinstance(self.conversation.get("id"), str):
            raise InvalidRequest("'conversation' must be a conversation's id or {\"id\": ...}", param="conversation",
                                 code="invalid_value")
        if self.prompt is not None:
            raise unsupported("prompt", "a stored prompt template")
        if self.background:
            raise unsupported("background", "background: true (answers are streamed or returned at once)")
        unknown = next((key for key in self.reasoning or {} if key not in REASONING_SETTINGS), None)
        if unknown is not None:
            raise unsupported(f"reasoning.{unknown[:40]}", f"the reasoning setting {unknown[:40]!r}")
        effort = (self.reasoning or {}).get("effort")
        if effort is not None and effort not in get_args(ReasoningEffort):
            raise InvalidRequest(f"reasoning.effort must be one of {', '.join(get_args(ReasoningEffort))}",
                                 param="reasoning.effort", code="invalid_value")
        check_include(self.include or [])
        if self.top_logprobs:
            raise unsupported("top_logprobs", "log probabilities in the Responses API (use /v1/chat/completions)")
        if self.max_tool_calls is not None:
            raise unsupported("max_tool_calls", "a limit on tool calls")
        if self.truncation == "auto":
            raise unsupported("truncation", "truncation 'auto' (a prompt too long is a 400 with its length)")
        for i, tool in enumerate(self.tools or []):
            if tool.type != "function":
                raise unsupported(f"tools[{i}].type", f"the built-in tool {tool.type[:80]!r} (only function tools)")
        check_item_types(self.input, "input")
        if not (self.tool_choice in (None, "auto", "none", "required") or _is_named_function(self.tool_choice)):
            raise unsupported("tool_choice", f"tool_choice {json.dumps(self.tool_choice)[:100]}")

    @property
    def conversation_id(self) -> str | None:
        return self.conversation["id"] if isinstance(self.conversation, dict) else self.conversation

    def continuing(self, conversation: list[dict[str, Any]]) -> ResponsesRequest:
        """This request with a stored conversation (an earlier response's input and output items) before its input:
        what previous_response_id asks for. Items of other types than the input's (an output item this server
        does not read back) are left out, as the chat template would drop them."""
        earlier = [stored_item(item) for item in conversation if item["type"] in ITEM_TYPES]
        return self.model_copy(update={"input": [*earlier, *self.input]})

    def to_chat(self) -> ChatCompletionRequest:
        """The chat completions request that answers this one (a field chat refuses, text.format's as chat's
        response_format, named as the client sent it)."""
        messages = self._messages()
        try:
            return ChatCompletionRequest(
                model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens,
                temperature=self.temperature, top_p=self.top_p, stream=self.stream, user=self.user,
                tools=[tool.for_chat() for tool in self.tools] if self.tools else None,
                tool_choice=_chat_tool_choice(self.tool_choice, bool(self.tools)),
                parallel_tool_calls=self.parallel_tool_calls,
                response_format=self.text.response_format() if self.text else None,
                chat_template_kwargs=self.chat_template_kwargs,
                reasoning_effort=(self.reasoning or {}).get("effort"), include_reasoning=self.include_reasoning,
                priority=self.priority,
            )
        except ValidationError as exc:
            raise renamed_for_responses(validation_error(exc)) from None

    def _messages(self) -> list[ChatMessage]:
        return chat_messages(self.input, self.instructions, "input")

    def echo(self) -> dict[str, Any]:
        """The request's settings as a response repeats them (OpenAI's defaults where not given)."""
        tools = [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                  "strict": t.strict} for t in self.tools or []]
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "tools": tools, "tool_choice": self.tool_choice or "auto",
            "text": {"format": (self.text.format if self.text else None) or {"type": "text"}},
            "parallel_tool_calls": self.parallel_tool_calls is not False, "metadata": self.metadata or {},
            "store": self.store is not False, "previous_response_id": self.previous_response_id,
            "user": self.user, "truncation": self.truncation or "disabled", "background": False,
            "reasoning": self.reasoning,
            "conversation": None if self.conversation is None else {"id": self.conversation_id},
        }


def check_item_types(items: list[InputItem], field: str) -> None:
    """A 400 naming the first item of a type this server does not read."""
    for i, item in enumerate(items):
        if item.type not in (*ITEM_TYPES, REFERENCE):
            raise unsupported(f"{field}[{i}].type", f"an input item of type {item.type[:80]!r}")


def check_unique_ids(earlier_ids: Iterable[str], items: list[InputItem], field: str) -> None:
    """OpenAI's 400 for an item whose id an earlier item of its conversation (earlier_ids), or of `items`, has: kept
    twice, a listing of them could not page past it (`after` names one item), and a client paging forever."""
    seen = set(earlier_ids)
    for i, item in enumerate(items):
        if item.id is None:
            continue
        if item.id in seen:
            raise duplicate_item(item.id, f"{field}[{i}]")
        seen.add(item.id)


def duplicate_item(item_id: str, param: str) -> InvalidRequest:
    """OpenAI's 400 (its wording) for an item whose id its conversation, or the request, has already."""
    return InvalidRequest(f"Duplicate item found with id {item_id[:100]}. Remove duplicate items from your input and "
                          f"try again.", param=param, code="duplicate_item")


def chat_messages(items: list[InputItem], instructions: str | None, field: str) -> list[ChatMessage]:
    """instructions first (a system message), then the items; function calls join the assistant message just
    before them (the text the model wrote with them), as a chat assistant message holds its calls. Errors name
    an item by its place in `field`."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions is not None else []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        last = messages[-1] if messages else None
        thought = last if last is not None and last.role == "assistant" and last.reasoning is not None else None
        if item.type == "reasoning":  # the thinking of the assistant message that follows (vLLM's reading)
            messages.append(ChatMessage(role="assistant", content=None, reasoning=item.reasoning_text(where)))
        elif item.type == "message" and item.role == "assistant" and thought is not None and not thought.content:
            thought.content = _text_of(item.content, f"{where}.content")
        elif item.type == "message":
            messages.append(ChatMessage(role=item.role, content=_text_of(item.content, f"{where}.content")))
        elif item.type == "function_call":
            # The item's arguments were checked (a client's) or are the model's own as stored (stored_item).
            call = ToolCallIn(id=item.call_id, type="function",
                              function=FunctionCall.model_construct(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        else:
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                        content=_text_of(item.output, f"{where}.output")))
    return messages


def _is_named_function(choice: Any) -> bool:
    return isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str)


def _chat_tool_choice(choice: Any, has_tools: bool) -> Any:
    """Responses names a function at the top level ({"type": "function", "name": ...}), chat one level down.
    Without tools, "auto" and "none" (what a response echoes by default) ask for nothing: left out, as chat refuses
    "auto" without tools; a forced call is still chat's 400."""
    if _is_named_function(choice):
        return {"type": "function", "function": {"name": choice["name"]}}
    if not has_tools and choice in ("auto", "none"):
        return None
    return choice


def renamed_for_responses(exc: E) -> E:
    """A chat request's error about a field, naming the Responses field it came from."""
    new = responses_param(exc.param) if exc.param is not None else None
    if new != exc.param:
        exc.message = re.sub(rf"(?<!\w){re.escape(exc.param)}(?!\w)", lambda _: new, exc.message)
        exc.param = new
    return exc


def responses_param(param: str) -> str:
    """The Responses field a chat request's field (its param path) came from."""
    if param in PARAM_NAMES:
        return PARAM_NAMES[param]
    for chat, responses in PARAM_PATHS:
        renamed, found = re.subn(rf"^{chat}(?=$|[.\[])", responses, param)
        if found:
            return renamed
    return param


# What `include` may ask for: reasoning items come with their text (Codex asks for encrypted ones with store false).
# Nothing else it names (logprobs, images, built-in tools' outputs) is ever stored here.
INCLUDABLE = ("reasoning.encrypted_content",)


def check_include(names: list[str]) -> None:
    """A 400 naming `include` for additional data no response or item here carries (never silently left out)."""
    extra = next((name for name in names if name not in INCLUDABLE), None)
    if extra is not None:
        raise unsupported("include", f"include {extra[:80]!r}")


def check_include_query(args: MultiDict) -> None:
    """check_include on a GET's query: include=a&include=b, or include[]=a as the openai client sends arrays."""
    check_include([*args.getlist("include"), *args.getlist("include[]")])


class InputItemsQuery(OpenAIRequest):
    """GET /v1/responses/{id}/input_items' and GET /v1/conversations/{id}/items' query (OpenAI's): a page of `limit`
    items in `order`, after item `after`."""

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None

    def page(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """OpenAI's list object of the page."""
        ordered = items if self.order == "asc" else items[::-1]
        start = 0
        if self.after is not None:
            ids = [item["id"] for item in ordered]
            if self.after not in ids:
                raise unplaced_after(self.after, "item in this list", "an item deleted since no longer places a page")
            # After its last occurrence: items stored before repeated ids were refused (duplicate_item) may hold one
            # twice, and resuming after the first would page from there forever.
            start = len(ids) - ids[::-1].index(self.after)
        return ItemList.of([annotated(item) for item in ordered[start:start + self.limit]],
                           start + self.limit < len(ordered)).model_dump()


ItemList = ListPage[dict[str, Any]]  # OpenAI's list object of items (the JSON objects stored)


# ------------------------------------------------------------------------------------------------- the answer
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(OpenAIResponse):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(OpenAIResponse):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class ReasoningText(OpenAIResponse):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(OpenAIResponse):
    """A reasoning model's thinking (vLLM's item: the text in content, no summary)."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


class FunctionCallItem(OpenAIResponse):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "completed"

    @classmethod
    def of(cls, item_id: str, call: ToolCallOut) -> FunctionCallItem:
        return cls(id=item_id, call_id=call.id, name=call.function.name, arguments=call.function.arguments)


class InputTokensDetails(OpenAIResponse):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(OpenAIResponse):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIResponse):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)

    @classmethod
    def of(cls, usage: UsageInfo) -> ResponseUsage:
        thought = usage.completion_tokens_details.reasoning_tokens if isinstance(usage, ChatUsage) else 0
        return cls(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens, output_tokens_details=OutputTokensDetails(reasoning_tokens=thought))


class IncompleteDetails(OpenAIResponse):
    reason: Literal["max_output_tokens"]


ResponseStatus = Literal["in_progress", "completed", "incomplete"]


class ResponseObject(OpenAIResponse):
    """The `response` object; the request's settings (ResponsesRequest.echo) are added to it as OpenAI repeats
    them."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    status: ResponseStatus
    output: list[ReasoningItem | OutputMessage | FunctionCallItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: None = None

    def body(self, req: ResponsesRequest) -> dict[str, Any]:
        return {**self.model_dump(), **req.echo()}
