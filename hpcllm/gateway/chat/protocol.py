"""Wire types of POST /v1/chat/completions."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, SerializeAsAny, ValidationInfo, field_validator, model_validator

from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.protocol import (UNIMPLEMENTED_VLLM_PARAMETERS, Constraint, OpenAIRequest, OpenAIResponse,
                                     PromptLogprobs, SamplingRequest, UsageInfo, unsupported)

Role = Literal["system", "developer", "user", "assistant", "tool"]
# OpenAI's reasoning efforts (and vLLM's "max")
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class FunctionDefinition(OpenAIRequest):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; handed to the chat template as it is
    # Accepted either way (the openai Agents SDK sends true by default): a forced call (tool_choice "required" or
    # this function) always follows the schema, an "auto" one is read out of free text (vLLM's rule too).
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _openai_name(cls, value: str) -> str:
        return function_name(value)


def function_name(value: str) -> str:
    """A function's name as OpenAI allows it (also the Responses API's function tools')."""
    if not FUNCTION_NAME.fullmatch(value):
        raise ValueError(f"function names must be 1 to 64 letters, digits, '_' or '-', not {value[:80]!r}")
    return value


class ToolDefinition(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(OpenAIRequest):
    name: str
    arguments: str  # a JSON object, as the model's answer gave it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        return json_object_arguments(value)


def json_object_arguments(value: str) -> str:
    """A call's arguments as the model's answer gave them (also the Responses API's function_call items')."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return value
    raise ValueError("arguments must be a JSON object encoded as a string, like '{\"city\": \"Paris\"}'")


def _template_arguments(value: str) -> Any:
    """A call's arguments for the chat template: the JSON object, or the text as the model wrote it where it is
    none (a stored Responses call cut short or malformed, carried into the next turn: the templates that read
    string arguments write it as it was)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return parsed if isinstance(parsed, dict) else value


class ToolCallIn(OpenAIRequest):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(OpenAIRequest):
    role: Role
    # A string, or a list of content parts ({"type": "text", "text": ...}; other part types are rejected later).
    content: Any = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message's answer to that call
    # An assistant's thinking, as this server returns it (vLLM's `reasoning`; `reasoning_content` its older name):
    # templates that render earlier thinking (Qwen3's, within a tool-calling turn) read it.
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages may hold tool_calls, not {self.role} ones")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    @field_validator("content")
    @classmethod
    def _content_shape(cls, value: Any, info: ValidationInfo) -> str | list[dict] | None:
        if value is None:
            role = info.data.get("role")  # absent when the role itself was invalid: that error is the one to report
            if role is not None and role != "assistant":  # as OpenAI: only an assistant's (tool-calling) may be none
                raise ValueError(f"a {role} message needs content")
            return value
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in value):
            return value
        raise ValueError("content must be a string or a list of content parts like {\"type\": \"text\", \"text\": ...}")

    def text(self, where: str) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for i, part in enumerate(self.content):
            if part["type"] != "text":
                raise unsupported(f"{where}.content[{i}].type", f"content of type {part['type']!r}")
            if not isinstance(part.get("text"), str):
                raise unsupported(f"{where}.content[{i}].text", "a text part without a string 'text'")
            texts.append(part["text"])
        return "".join(texts)

    def for_template(self, where: str, called: dict[str, str]) -> dict[str, Any]:
        """The message as chat templates expect it: role and string content ('developer' is the newer 'system'),
        tool calls with their arguments as objects (templates write them with `tojson`, as vLLM hands them), a tool
        answer with the name of the function it answers (`called`: call id -> name; Hermes templates need it, and
        OpenAI clients do not send it)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text(where)}
        if self.tool_calls:
            out["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.function.name,
                                               "arguments": _template_arguments(call.function.arguments)}}
                                 for call in self.tool_calls]
        thinking = self.reasoning if self.reasoning is not None else self.reasoning_content
        if self.role == "assistant" and thinking is not None:
            out["reasoning"] = out["reasoning_content"] = thinking  # both names, as vLLM hands them on
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            name = self.name or called.get(self.tool_call_id)
            if name is not None:
                out["name"] = name
        return out


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # The newer name of max_tokens; wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    # "auto" (the default with tools), "none", or a forced call: "required" or {"type": "function", ...} (the answer
    # constrained to calls by a JSON schema: forced_calls_schema)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # false: only the first call is returned (as vLLM)
    functions: list[Any] | None = None  # the deprecated forms of tools and tool_choice: refused
    function_call: Any = None
    # vLLM's chat template fields: arguments the template reads (Qwen3's {"enable_thinking": false}), whether the
    # prompt ends with the assistant's turn opened, or continues the last (assistant) message, RAG documents.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: Any = None  # a template of the client's: refused (vLLM takes one only with a server flag)
    # OpenAI's: "none" turns a model's thinking off (enable_thinking=false for its template, as vLLM maps it), any
    # other effort leaves it on; the served models have no other levels of effort.
    reasoning_effort: ReasoningEffort | None = None
    # vLLM's: false leaves a reasoning model's thinking out of the answer (and its logprobs, which would show it)
    include_reasoning: bool = True
    # vLLM's: true starts the answer with the last message when it is the assistant's (declared to be refused)
    echo: Any = None
    # vLLM's: the rendered chat is tokenized without the tokenizer's special tokens (the template writes them)
    add_special_tokens: bool = False
    unimplemented_parameters: ClassVar[dict[str, tuple[Any, str, Any]]] = {
        **UNIMPLEMENTED_VLLM_PARAMETERS, "echo": (False, "echo (the last message repeated in the answer)", None)}

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [tool.function.name for tool in tools or []]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise ValueError(f"function {twice!r} is defined twice")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        if value in (None, "auto", "none", "required") or _is_named_function(value):
            return value
        raise ValueError("tool_choice must be 'auto', 'none', 'required' or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}")

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:  # 0 too, as OpenAI (vLLM ignores a 0)
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs",
                                 code="invalid_value")
        if self.tools == []:  # OpenAI's and vLLM's 400: an empty list is a client's mistake, not "no tools"
            raise InvalidRequest("'tools' is empty: send at least one function, or leave 'tools' out",
                                 param="tools", code="invalid_value")
        if not self.tools and self.tool_choice not in (None, "none"):  # "none" asks for what no tools gives (vLLM)
            raise InvalidRequest(f"tool_choice {json.dumps(self.tool_choice)[:100]} needs the functions in 'tools'",
                                 param="tool_choice", code="invalid_value")
        if self.functions or self.function_call is not None:
            raise unsupported("functions" if self.functions else "function_call",
                              "the deprecated 'functions' / 'function_call' (send 'tools' and 'tool_choice')")
        if self.chat_template is not None:
            raise unsupported("chat_template", "a chat template sent with the request (the model's own is used; "
                              "pass the values it reads in 'chat_template_kwargs')")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest("continue_final_message continues the last message instead of opening a new turn: "
                                 "send add_generation_prompt false with it", param="add_generation_prompt",
                                 code="invalid_value")
        self._check_forced_calls()

    def _check_forced_calls(self) -> None:
        """A forced call names a function in tools, constrains the answer alone, and its schema compiles."""
        if self.forced_function is None and self.tool_choice != "required":
            return
        if self.forced_function is not None and self.forced_function not in self.parameters_by_name():
            raise InvalidRequest(f"tool_choice names function {self.forced_function[:64]!r}, which is not in "
                                 f"'tools'", param="tool_choice", code="invalid_value")
        given = self.constraints_given()
        if given:
            raise InvalidRequest(f"'{given[0].field}' cannot be combined with tool_choice "
                                 f"{json.dumps(self.tool_choice)[:100]}: a forced call's answer is the call's JSON; "
                                 f"send one of them", param=given[0].field, code="invalid_value")
        self.constraint().grammar()

    @property
    def forced_function(self) -> str | None:
        """The function tool_choice names (None: "auto", "none" or "required")."""
        return self.tool_choice["function"]["name"] if _is_named_function(self.tool_choice) else None

    def parameters_by_name(self) -> dict[str, dict[str, Any]]:
        """Each function's parameters schema; one without any takes any object (vLLM's
        _params_or_empty_object)."""
        return {tool.function.name: tool.function.parameters or {"type": "object", "properties": {}}
                for tool in self.tools or []}

    def forced_calls_schema(self) -> dict[str, Any]:
        """The answer's JSON schema for a forced call (vLLM's get_json_schema_from_tools): the named function's
        parameters; for "required", a list of one or more {"name": <a function>, "parameters": <its parameters>}
        (one at most when parallel_tool_calls is false), each function's $defs moved to the top so that their
        "#/$defs/..." references still resolve. Unlike vLLM's, a call object holds no other keys: they would mean
        nothing, and a model could pad the answer with them until max_tokens."""
        parameters = self.parameters_by_name()
        if self.forced_function is not None:
            return parameters[self.forced_function]
        defs: dict[str, Any] = {}
        calls = []
        for i, (name, schema) in enumerate(parameters.items()):
            schema = dict(schema)
            own_defs = schema.pop("$defs", {})
            if not isinstance(own_defs, dict):
                raise InvalidRequest(f"'$defs' in the parameters of function {name!r} must be an object",
                                     param=f"tools[{i}].function.parameters", code="invalid_value")
            # A reference to the function's own root ("#", "#/properties/...") would mean the list of calls: the
            # schema goes to the top's $defs too, its references rebased there.
            own_root = f"{name}.parameters"
            rebased = _rebased_refs({own_root: schema, **own_defs}, f"#/$defs/{own_root}")
            if rebased != {own_root: schema, **own_defs}:
                own_defs, schema = rebased, {"$ref": f"#/$defs/{own_root}"}
            for def_name, definition in own_defs.items():
                if defs.setdefault(def_name, definition) != definition:
                    raise InvalidRequest(f"tools define '$defs/{def_name}' twice, differently; with tool_choice "
                                         f"'required' their definitions must agree", param=f"tools[{i}]",
                                         code="invalid_value")
            calls.append({"properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                          "required": ["name", "parameters"], "additionalProperties": False})
        schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
        if self.parallel_tool_calls is False:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return schema

    def constraint(self) -> Constraint | None:
        if self.forced_function is not None or (self.tool_choice == "required" and self.tools):
            return Constraint("tools", "json", self.forced_calls_schema())
        return super().constraint()

    @property
    def parses_tool_calls(self) -> bool:
        """Tool calls are read out of the answer in the model's own format: tools given and tool_choice "auto" (its
        default with tools)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates expect them (OpenAI's shape, fields not given left out)."""
        if not self.tools:
            return None
        return [{"type": "function", "function": _without_none(tool.function.model_dump())} for tool in self.tools]

    @property
    def worker_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field requested_max_tokens comes from (an error names it)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def template_arguments(self) -> dict[str, Any]:
        """How the chat template renders the prompt (PromptEncoder.render_chat's keyword arguments)."""
        template_kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            template_kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message, "documents": self.documents,
                "template_kwargs": template_kwargs, "add_special_tokens": self.add_special_tokens}

    @property
    def constrained(self) -> bool:
        """The answer is constrained from its first token (a schema, a forced call)."""
        return self.constraint() is not None

    def template_messages(self) -> list[dict[str, Any]]:
        called = {call.id: call.function.name for message in self.messages for call in message.tool_calls or []}
        return [message.for_template(f"messages[{i}]", called) for i, message in enumerate(self.messages)]


def _rebased_refs(schema: Any, root: str) -> Any:
    """The schema with its references to its root ("#", "#/properties/...", not "#/$defs/...", which stay valid
    where $defs moved, nor an anchor's "#name") made references to `root` instead."""
    if isinstance(schema, list):
        return [_rebased_refs(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: root + value[1:] if key == "$ref" and _points_into_root(value) else _rebased_refs(value, root)
            for key, value in schema.items()}


def _points_into_root(ref: Any) -> bool:
    return isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) and not ref.startswith("#/$defs/")


def _is_named_function(choice: Any) -> bool:
    return (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str))


def _without_none(fields: dict[str, Any]) -> dict[str, Any]:
    """Top-level fields that were given (a schema's own nulls, e.g. "default": null, are kept)."""
    return {key: value for key, value in fields.items() if value is not None}


class FunctionCallOut(OpenAIResponse):
    name: str
    arguments: str


class ToolCallOut(OpenAIResponse):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class DeltaFunctionCall(OpenAIResponse):
    name: str | None = None  # in the call's first chunk
    arguments: str


class DeltaToolCall(OpenAIResponse):
    """A streamed call's piece, as OpenAI and vLLM stream calls: the first with its id, type, name and arguments so
    far, the others more of its arguments as they are generated."""

    index: int  # the call's place among the choice's calls
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


FinishReason = Literal["stop", "length", "tool_calls"]


class AssistantMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)
    reasoning: str | None = None  # vLLM's field: a reasoning model's thinking (hpcllm.gateway.chat.reasoning)


class ChatTopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIResponse):
    content: list[ChatTokenLogprob] | None = None
    refusal: None = None


class ChatChoice(OpenAIResponse):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason
    # vLLM's: the stop string (or stop token id) that ended the choice; null otherwise (an end of sequence, length)
    stop_reason: str | int | None = None
    # Not sent: the last of message.tool_calls stops before its end, its arguments not whole (a Responses API
    # function_call item "incomplete"); a "length" answer's calls may all be whole (a forced list cut between two).
    last_call_cut: bool = Field(False, exclude=True)


class CompletionTokensDetails(OpenAIResponse):
    reasoning_tokens: int


class ChatUsage(UsageInfo):
    """A reasoning model's usage, as vLLM's with a reasoning parser: how many completion tokens were thinking."""

    completion_tokens_details: CompletionTokensDetails


class ChatCompletionResponse(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: SerializeAsAny[UsageInfo]  # a ChatUsage for a reasoning model
    system_fingerprint: str | None = None
    # vLLM's extension: the prompt's (the rendered messages') prompt_logprobs, when they were asked for.
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(OpenAIResponse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(OpenAIResponse):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # as ChatChoice's, on the chunk with finish_reason
    last_call_cut: bool = Field(False, exclude=True)  # as ChatChoice's (not sent), on the chunk with finish_reason


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    system_fingerprint: str | None = None
    usage: SerializeAsAny[UsageInfo] | None = None

    def to_sse_json(self, include_usage: bool) -> str:
        """OpenAI's chunk shape: delta carries only the fields that are set; usage is there only when asked."""
        body = self.model_dump(exclude=None if include_usage else {"usage"})
        for choice, model in zip(body["choices"], self.choices):
            choice["delta"] = model.delta.model_dump(exclude_none=True)
        return json.dumps(body, separators=(",", ":"))
