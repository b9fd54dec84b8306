"""A small byte-level BPE tokenizer trained offline on the text shipped next to this file.

Training takes well under a second; the result is cached per process (as tokenizer.json text), so building many
test models pays for it once. Byte-level BPE covers any input text (every byte has a token), so tests can feed
unicode, emoji and code without unknown tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path

CORPUS_PATH = Path(__file__).with_name("corpus.txt")
# Requested size; the real vocabulary is smaller when the corpus has fewer useful merges (about 700 here).
TARGET_VOCAB_SIZE = 1024

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Trained first, so their ids are fixed: <unk>=0, <s>=1, </s>=2, <pad>=3.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# Role-tagged turns, each closed by the eos token so a model that learned the format would stop after its turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _hermes_tools_template(thinking: bool) -> str:
    """The plain template with OpenAI tools in the Hermes / Qwen2.5 format: the tools' JSON in a system turn inside
    <tools></tools>, an assistant's calls as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, a tool's
    answer in <tool_response>. The gateway reads "<tool_call>" in it as the hermes tool-call format.
    thinking: Qwen3's way of thinking, which the gateway reads from "<think>" in it: an assistant's earlier thinking
    (reasoning_content) rendered in a <think></think> block before its answer; with enable_thinking=false the
    generation prompt holds an empty block, so the model answers without thinking; its tokenizer has <think> and
    </think> as tokens (THINK_TOKENS)."""
    earlier_thinking = ("{% if message['reasoning_content'] %}<think>\n{{ message['reasoning_content'] }}\n</think>"
                        "\n\n{% endif %}") if thinking else ""
    no_thinking = ("{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
                   if thinking else "")
    return (
        "{{ bos_token }}"
        "{% if tools %}<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n"
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
        "XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
        "{{ eos_token }}\n{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}<|assistant|>\n" + earlier_thinking + "{{ message['content'] or '' }}"
        "{% for call in message['tool_calls'] or [] %}<tool_call>\n"
        "{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": {{ call['function']['arguments'] | tojson }}}"
        "\n</tool_call>{% endfor %}{{ eos_token }}\n"
        "{% elif message['role'] == 'tool' %}<|tool|>\n<tool_response>\n{{ message['content'] }}\n</tool_response>"
        "{{ eos_token }}\n"
        "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n" + no_thinking + "{% endif %}"
    )


# Qwen3-Coder's tool format (its chat template, cut down): the tools listed as XML in a system turn, the call format
# shown by example, an assistant's calls as <tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>...
# (objects and lists as JSON, everything else as its text), a tool's answer in <tool_response>. The gateway reads
# "<function=" in it as the qwen3_coder tool-call format.
QWEN3_CODER_TOOLS_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\n# Tools\n\nYou have access to the following functions:\n\n<tools>"
    "{% for tool in tools %}\n<function>\n<name>{{ tool['function']['name'] }}</name>"
    "\n<parameters>{{ tool['function']['parameters'] | tojson }}</parameters>\n</function>{% endfor %}\n</tools>"
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n"
    "</tool_call>{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}\n<tool_call>\n<function={{ call['function']['name'] }}>\n"
    "{% for key, value in call['function']['arguments'] | items %}<parameter={{ key }}>\n"
    "{{ value | tojson if value is mapping or (value is sequence and value is not string) else value | string }}"
    "\n</parameter>\n{% endfor %}</function>\n</tool_call>{% endfor %}{{ eos_token }}\n"
    "{% elif message['role'] == 'tool' %}<|tool|>\n<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{{ eos_token }}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Mistral's tool format (Mistral Small 3.2's template, cut down): the tools' JSON in [AVAILABLE_TOOLS] before the last
# user turn, an assistant's calls as [TOOL_CALLS]NAME[ARGS]{...}, a tool's answer and its call's id in
# [TOOL_RESULTS]; call ids other than 9 characters refused, as Mistral's v3 templates (7B v0.3, Nemo) refuse them. Its
# tokenizer has [TOOL_CALLS] and [ARGS] as special tokens (MISTRAL_TOOL_TOKENS), as Mistral's has: decoding skips
# them. The gateway reads "[TOOL_CALLS]" in it as the mistral tool-call format.
_MISTRAL_ID_CHECK = ("{% if {id} is not defined or {id} | length != 9 %}"
                     "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}")
MISTRAL_TOOLS_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if tools and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST]{{ message['content'] }}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}" + _MISTRAL_ID_CHECK.replace("{id}", "call['id']") +
    "[TOOL_CALLS]{{ call['function']['name'] }}[ARGS]{{ call['function']['arguments'] | tojson }}{% endfor %}"
    "{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}" + _MISTRAL_ID_CHECK.replace("{id}", "message['tool_call_id']") +
    "[TOOL_RESULTS]{\"content\": {{ message['content'] | tojson }}, \"call_id\": "
    "{{ message['tool_call_id'] | tojson }}}[/TOOL_RESULTS]"
    "{% else %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]{% endif %}"
    "{% endfor %}"
)
MISTRAL_TOOL_TOKENS = ("[TOOL_CALLS]", "[ARGS]")
HERMES_TOOLS_CHAT_TEMPLATE = _hermes_tools_template(thinking=False)
# The qwen3-think tokenizer's added tokens.
THINK_TOKENS = ("<think>", "</think>")
QWEN3_THINK_CHAT_TEMPLATE = _hermes_tools_template(thinking=True)
CHAT_TEMPLATES = {"plain": CHAT_TEMPLATE, "hermes-tools": HERMES_TOOLS_CHAT_TEMPLATE,
                  "qwen3-think": QWEN3_THINK_CHAT_TEMPLATE, "qwen3-coder-tools": QWEN3_CODER_TOOLS_CHAT_TEMPLATE,
                  "mistral-tools": MISTRAL_TOOLS_CHAT_TEMPLATE}

MODEL_MAX_LENGTH = 2048


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Trains the BPE once per process; returns the tokenizers-library JSON (deterministic for a given corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer.to_str()


def make_tokenizer(chat_template: str = "plain"):
    """Returns a fresh PreTrainedTokenizerFast (bos/eos/unk/pad and CHAT_TEMPLATES[chat_template]) over the cached
    trained BPE."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATES[chat_template]
    if chat_template == "qwen3-think":
        tokenizer.add_tokens(list(THINK_TOKENS))  # one token each, as in Qwen3's vocabulary (not special: decoded)
    if chat_template == "mistral-tools":
        tokenizer.add_tokens(list(MISTRAL_TOOL_TOKENS), special_tokens=True)
    return tokenizer
