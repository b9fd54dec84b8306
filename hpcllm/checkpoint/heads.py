"""What a checkpoint's head is, from its config.json's `architectures` (or a model's class name): transformers'
*ForSequenceClassification classes (a reranker, a classifier) put a `score` linear where a causal LM has its LM
head. Read by the converter and loader (which class to build), the worker (what to pool) and the gateway (which
APIs the model answers). No torch import: the gateway reads it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

CLASSIFIER_SUFFIX = "ForSequenceClassification"
# A cross-encoder's score template (vLLM's --chat-template for scores): a jinja chat template that renders the
# messages [{"role": "query", ...}, {"role": "document", ...}] into the one text the model scores. `hpcllm convert
# --score-template` writes it into the checkpoint; the gateway renders each pair through it before tokenizing.
SCORE_TEMPLATE_FILE = "score_template.jinja"
QUERY_ROLE, DOCUMENT_ROLE = "query", "document"  # the roles of a pair's two messages (vLLM's)


def classifier_architecture(architectures: Iterable[object] | None) -> str | None:
    """The first *ForSequenceClassification architecture named, None if there is none (a causal LM)."""
    return next((a for a in architectures or [] if isinstance(a, str) and a.endswith(CLASSIFIER_SUFFIX)), None)


def is_classifier(config) -> bool:
    """config's (a transformers config's) architectures name a *ForSequenceClassification."""
    return classifier_architecture(getattr(config, "architectures", None)) is not None


def auto_class(classifier: bool):
    """The transformers auto class hpcllm builds a model with: sequence classification for a classifier, else the
    causal LM. transformers is imported here, not at module level (the gateway reads this module)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if classifier else AutoModelForCausalLM


def auto_model_class(config):
    """auto_class for config's head (is_classifier)."""
    return auto_class(is_classifier(config))


def render_score_template(tokenizer, template: str, query: str, document: str,
                          template_kwargs: dict[str, Any] | None = None) -> str:
    """One (query, document) pair through a score template, as vLLM renders it: the messages of roles query and
    document through apply_chat_template, no tools, not tokenized."""
    messages = [{"role": QUERY_ROLE, "content": query}, {"role": DOCUMENT_ROLE, "content": document}]
    return tokenizer.apply_chat_template(messages, chat_template=template, tools=None, tokenize=False,
                                         **(template_kwargs or {}))
