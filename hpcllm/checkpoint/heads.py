"""What a checkpoint's head is, from its config.json's `architectures` (or a model's class name): transformers'
*ForSequenceClassification classes (a reranker, a classifier) put a `score` linear where a causal LM has its LM
head. Read by the converter and loader (which class to build), the worker (what to pool) and the gateway (which
APIs the model answers). No torch import: the gateway reads it."""

from __future__ import annotations

from collections.abc import Iterable

CLASSIFIER_SUFFIX = "ForSequenceClassification"


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
