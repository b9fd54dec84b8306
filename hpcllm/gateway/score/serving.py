"""Scores of text pairs as vLLM computes them. An embedding (bi-encoder) model: each query and document is embedded
on the model's worker (one call), a pair's score the cosine similarity of its two embeddings. A cross-encoder (a
*ForSequenceClassification with one label, a reranker): each pair tokenized together (the tokenizer's text pair, or
the texts joined where config.json sets use_sep_token false, or rendered through the checkpoint's score template),
its score the head's logit through a sigmoid. Pairs are 1:N (one query, each document) or N:N (the i-th of each),
as vLLM's."""

from __future__ import annotations

import math
import time
from dataclasses import replace

from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.pooling import (Classifier, check_input_count, classifier_of, embedding_models,
                                    pool_on_a_worker, requested_pooling_model, tokenize_input)
from hpcllm.gateway.protocol import UsageInfo
from hpcllm.gateway.routing import ModelCard
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.score.protocol import (RerankDocument, RerankRequest, RerankResponse, RerankResult, RerankUsage,
                                           ScoreData, ScoreRequest, ScoreResponse, ScoringRequest, Side)
from hpcllm.gateway.serving import RequestContext, new_response_id
from hpcllm.gateway.tokenization import PromptEncoder, Truncation

RESPONSE_ID_PREFIX = "score"  # vLLM's for both APIs


def create_score(gw: Gateway, ctx: RequestContext, req: ScoreRequest) -> dict:
    card, scores, prompt_tokens = score_pairs(gw, ctx, req, *req.sides())
    return ScoreResponse(
        id=new_response_id(RESPONSE_ID_PREFIX), created=int(time.time()), model=card.name,
        data=[ScoreData(index=i, score=score) for i, score in enumerate(scores)],
        usage=UsageInfo(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    ).model_dump()


def create_rerank(gw: Gateway, ctx: RequestContext, req: RerankRequest) -> dict:
    """The documents by relevance to the query, best first (ties in the documents' order), the first top_n."""
    query, documents = req.sides()
    card, scores, prompt_tokens = score_pairs(gw, ctx, req, query, documents)
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:req.top_n or None]
    results = [RerankResult(index=i, relevance_score=scores[i],
                            document=RerankDocument(text=documents.texts[i]) if req.return_documents else None)
               for i in ranked]
    answer = RerankResponse(id=new_response_id(RESPONSE_ID_PREFIX), model=card.name, results=results,
                            usage=RerankUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)).model_dump()
    if not req.return_documents:  # Cohere's answer then has no document at all
        for result in answer["results"]:
            del result["document"]
    return answer


def score_pairs(gw: Gateway, ctx: RequestContext, req: ScoringRequest, queries: Side,
                documents: Side) -> tuple[ModelCard, list[float], int]:
    """The model that scored, the score of each (query, document) pair, in the documents' order, and the prompt
    tokens it took; each query and document text cut as the request asks (max_tokens_per_query, max_tokens_per_doc),
    then each input truncated (a cross-encoder's pair as one input, an embedding model's texts each)."""
    _check_pairing(queries, documents)
    card = requested_pooling_model(gw, req.model, "scores", scoring_models)
    classifier = classifier_of(card)
    encoder = gw.tokenizers.get(card)
    truncation = encoder.truncation(req, card.max_model_len, generating=False)
    query_tokens, document_tokens = req.side_limits(card.max_model_len)
    pairs = len(documents.texts)
    check_input_count(pairs + len(queries.texts) if classifier is None else pairs, documents.name)
    queries, documents = queries.cut(encoder, query_tokens), documents.cut(encoder, document_tokens)
    if classifier is None:
        return card, *_bi_encoder_scores(gw, ctx, card, encoder, queries, documents, truncation)
    if classifier.num_labels != 1:
        raise InvalidRequest(f"model {card.name!r} is a classifier with {classifier.num_labels} labels "
                             f"({classifier.architecture}): a score needs a one-label head (a reranker's); "
                             "/v1/classify answers its labels", param="model")
    activate = classifier.applies_activation(req.use_activation)
    if document_tokens and truncation is not None:  # vLLM's: the pair's truncation then cuts the document only
        truncation = replace(truncation, second_only=True)
    inputs = _pair_inputs(encoder, card, classifier, req, queries, documents, truncation)
    logits, prompt_tokens = pool_on_a_worker(gw, ctx, card, inputs, classifier)
    return card, [classifier.probabilities(row, activate)[0] for row in logits], prompt_tokens


def scoring_models(served: list[tuple[ModelCard, Classifier | None]]) -> list[ModelCard]:
    """The models a score request naming none is for: the cross-encoders (one-label classifiers); with none, the
    models that score as bi-encoders (those without a classification head)."""
    return ([card for card, classifier in served if classifier is not None and classifier.num_labels == 1]
            or embedding_models(served))


def _pair_inputs(encoder: PromptEncoder, card: ModelCard, classifier: Classifier, req: ScoringRequest, queries: Side,
                 documents: Side, truncation: Truncation | None) -> list[list[int]]:
    """A cross-encoder's token ids of each (query, document) pair: rendered through its score template into one
    text (vLLM's --chat-template), else the tokenizer's text pair or the texts joined."""
    query_texts = queries.texts * len(documents.texts) if len(queries.texts) == 1 else queries.texts
    pairs = list(zip(query_texts, documents.texts))
    template = classifier.template()
    if template is not None:
        texts = encoder.render_scores(template, pairs, req.template_kwargs(), documents.param)
        return [tokenize_input(encoder, card, text, documents.param(i), truncation) for i, text in enumerate(texts)]
    return [tokenize_input(encoder, card, query, documents.param(i), truncation, pair=document,
                           join=not classifier.use_sep_token) for i, (query, document) in enumerate(pairs)]


def _bi_encoder_scores(gw: Gateway, ctx: RequestContext, card: ModelCard, encoder: PromptEncoder, queries: Side,
                       documents: Side, truncation: Truncation | None) -> tuple[list[float], int]:
    """Cosine similarities of the queries' and documents' embeddings; the tokens of every query and document once,
    as vLLM counts them."""
    inputs = [tokenize_input(encoder, card, text, side.param(i), truncation)
              for side in (queries, documents) for i, text in enumerate(side.texts)]
    embeddings, prompt_tokens = pool_on_a_worker(gw, ctx, card, inputs, None)
    query_embeddings = embeddings[:len(queries.texts)]
    if len(query_embeddings) == 1:
        query_embeddings *= len(documents.texts)
    scores = [_cosine(q, d) for q, d in zip(query_embeddings, embeddings[len(queries.texts):])]
    return scores, prompt_tokens


def _check_pairing(queries: Side, documents: Side) -> None:
    """vLLM's rules (and words) for the two sides' lengths (their texts are counted by check_input_count)."""
    if not queries.texts:
        raise InvalidRequest("At least one text element must be given", param=queries.name)
    if not documents.texts:
        raise InvalidRequest("At least one text_pair element must be given", param=documents.name)
    if len(queries.texts) > 1 and len(queries.texts) != len(documents.texts):
        raise InvalidRequest(f"Input lengths must be either 1:1, 1:N or N:N (got {len(queries.texts)} "
                             f"{queries.name} and {len(documents.texts)} {documents.name})", param=documents.name)


def _cosine(a: list[float], b: list[float]) -> float:
    """torch's cosine_similarity (what vLLM applies), in float64."""
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return dot / max(norms, 1e-8)
