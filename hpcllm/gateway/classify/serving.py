"""POST /v1/classify: each input through a classifier's head at its last token, as vLLM answers it: the
probabilities (softmax; sigmoid for one label), the most probable label's name (config.json's id2label)."""

from __future__ import annotations

import time

from hpcllm.gateway.classify.protocol import ClassificationData, ClassificationRequest, ClassificationResponse
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.pooling import (Classifier, classifier_of, pool_on_a_worker, requested_pooling_model,
                                    tokenize_inputs)
from hpcllm.gateway.protocol import UsageInfo
from hpcllm.gateway.routing import ModelCard
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import RequestContext, new_response_id


def create_classification(gw: Gateway, ctx: RequestContext, req: ClassificationRequest) -> dict:
    card = requested_pooling_model(gw, req.model, "classifications", _classifiers)
    classifier = classifier_of(card)
    if classifier is None:
        raise InvalidRequest(f"model {card.name!r} is not a classification model (its config.json names no "
                             "*ForSequenceClassification architecture): /v1/classify needs one", param="model")
    activate = classifier.applies_activation(req.use_activation)
    encoder = gw.tokenizers.get(card)
    outputs, prompt_tokens = pool_on_a_worker(gw, ctx, card, tokenize_inputs(encoder, card, req), classifier)
    data = []
    for i, logits in enumerate(outputs):
        probs = classifier.probabilities(logits, activate)
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append(ClassificationData(index=i, label=classifier.labels.get(best), probs=probs,
                                       num_classes=len(probs)))
    return ClassificationResponse(id=new_response_id("classify"), created=int(time.time()), model=card.name,
                                  data=data, usage=UsageInfo(prompt_tokens=prompt_tokens,
                                                             total_tokens=prompt_tokens)).model_dump()


def _classifiers(served: list[tuple[ModelCard, Classifier | None]]) -> list[ModelCard]:
    """The models /v1/classify answers for: those with a classification head."""
    return [card for card, classifier in served if classifier is not None]
