"""A causal LM that answers a relevance question with one token converted into the cross-encoder vLLM serves it as.

Qwen3-Reranker (and mxbai-rerank-v2) ship as *ForCausalLM checkpoints whose answer to "does the document meet the
query?" is "yes" or "no". vLLM serves them with hf_overrides (architectures *ForSequenceClassification,
classifier_from_token ["no", "yes"], is_original_qwen3_reranker: its from_2_way_softmax loading): a one-label score
head whose row is lm_head[yes] - lm_head[no], so the head's logit is logit_yes - logit_no and its sigmoid
softmax(logit_no, logit_yes)[yes]. One token (vLLM's no_post_processing, bge-reranker-v2-gemma's "Yes") is that
token's row. `hpcllm convert --classifier-from-token` writes that head into the checkpoint once, so the worker
loads a plain classifier. `--score-template` (vLLM's --chat-template for scores) is checked here and stored beside
it (heads.SCORE_TEMPLATE_FILE), for the gateway to render each pair through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcllm.checkpoint.errors import CheckpointError, InvalidSource, UnsupportedSource
from hpcllm.checkpoint.heads import (CLASSIFIER_SUFFIX, DOCUMENT_ROLE, QUERY_ROLE, classifier_architecture,
                                     render_score_template)

# What the convert-time check renders through a template, and looks for in what it renders.
_PROBE_QUERY, _PROBE_DOCUMENT = "hpcllm-probe-query-7f3e", "hpcllm-probe-document-9c1a"


@dataclass(frozen=True)
class ScoreHead:
    """The head to compute: the tokens (the "false" one first), their ids and the classifier's architecture."""

    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    architecture: str
    tokenizer: Any = field(default=None, compare=False, repr=False)  # the source's, read once: the template's check

    @property
    def method(self) -> str:
        """vLLM's name for how the head is made from the tokens' rows."""
        return "from_2_way_softmax" if len(self.tokens) == 2 else "no_post_processing"

    def row(self, lm_head: torch.Tensor) -> torch.Tensor:
        """The score head's weight, [1, hidden]: lm_head[true] - lm_head[false] (computed in float32, as vLLM does),
        or the one token's row."""
        rows = lm_head[list(self.token_ids)].to(torch.float32)
        head = rows[1:] - rows[:1] if len(rows) == 2 else rows
        return head.to(lm_head.dtype)

    def config_updates(self, config: dict[str, Any]) -> dict[str, Any]:
        """What config.json says of the converted model: a one-label classifier whose pair is the two texts joined
        (vLLM's default for an LLM as reranker: no separator token), unless the source says otherwise."""
        return {"architectures": [self.architecture], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                "num_labels": 1, "use_sep_token": bool(config.get("use_sep_token", False))}


def plan_score_head(source_dir: Path, config: dict[str, Any], tokens: tuple[str, ...]) -> ScoreHead:
    """The head --classifier-from-token asks for, or a CheckpointError saying what to fix: one or two tokens, each
    one token of the vocabulary, of a causal LM whose architecture has a *ForSequenceClassification class."""
    if len(tokens) not in (1, 2):
        raise CheckpointError(f"--classifier-from-token is given {len(tokens)} times: give it twice (the answer "
                              "meaning no, then the one meaning yes: Qwen3-Reranker's `no` and `yes`) or once (a "
                              "token whose logit is the score)")
    existing = classifier_architecture(config.get("architectures"))
    if existing is not None:
        raise CheckpointError(f"{source_dir}: is already a classifier ({existing}); "
                              "--classifier-from-token converts a causal LM: leave it out")
    tokenizer = _tokenizer(source_dir)
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token not in vocab:
            raise CheckpointError(f"--classifier-from-token {token!r} is not one token of the vocabulary of "
                                  f"{source_dir} (it tokenizes as {tokenizer.tokenize(token)}); give "
                                  "tokens as the vocabulary spells them (a leading space is `Ġ` in a byte-level BPE)")
    return ScoreHead(tokens, tuple(vocab[t] for t in tokens), _classifier_class(source_dir, config), tokenizer)


def _tokenizer(source_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source_dir))
    except Exception as exc:  # transformers raises many types for a folder without a readable tokenizer
        raise InvalidSource(f"{source_dir}: its tokenizer cannot be read ({str(exc).strip().splitlines()[0]}); "
                            "the score head and template need it") from None


def _classifier_class(source_dir: Path, config: dict[str, Any]) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.get("model_type"))
    if not name or not name.endswith(CLASSIFIER_SUFFIX):
        raise UnsupportedSource(f"{source_dir}: transformers has no *ForSequenceClassification class for model_type "
                                f"{config.get('model_type')!r}, so its score head cannot be built")
    return name


def check_head_fits(source_dir: Path, lm_model, classifier, head: ScoreHead, lm_names: list[str]) -> tuple[str, str]:
    """(the LM head's parameter name in the causal LM, the score head's in the classifier), after checking that the
    classifier holds the causal LM's other tensors under the same names and a bias-free `score` linear (the head
    hpcllm's worker pools through)."""
    output = lm_model.get_output_embeddings()
    lm_head = next((f"{name}.weight" for name, module in lm_model.named_modules() if module is output), None)
    score = getattr(classifier, "score", None)
    if lm_head is None or not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise UnsupportedSource(f"{source_dir}: {head.architecture} has no bias-free `score` linear, or the causal "
                                "LM no LM head, to build the score head from; this architecture is not supported")
    score_name = next(name for name, param in classifier.named_parameters() if param is score.weight)
    expected = set(classifier.state_dict())
    kept = (set(lm_names) - {lm_head}) | {score_name}
    if kept != expected:
        differ = sorted(kept ^ expected)
        raise UnsupportedSource(f"{source_dir}: {head.architecture} does not hold the causal LM's tensors under the "
                                f"same names (e.g. {', '.join(differ[:3])}); this architecture is not supported")
    return lm_head, score_name


def classifier_meta_model(source_dir: Path, config_updates: dict[str, Any]):
    """The classifier config_updates make of the causal LM's config, on the meta device (names and shapes only)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(source_dir, local_files_only=True)
    config.architectures = config_updates["architectures"]
    config.num_labels = config_updates["num_labels"]
    with torch.device("meta"), no_init_weights():
        return AutoModelForSequenceClassification.from_config(config)


def read_score_template(path: Path, source_dir: Path, tokenizer=None) -> str:
    """The template's text, once it renders a pair with both texts in it; a CheckpointError naming the file else.
    tokenizer: the source's, where the caller has read it (else read here)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"--score-template {path}: no such file; give the jinja template that renders a "
                              "(query, document) pair (docs/gateway.md, Score templates)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"--score-template {path}: cannot be read ({exc})") from None
    if tokenizer is None:
        tokenizer = _tokenizer(source_dir)
    try:
        rendered = render_score_template(tokenizer, text, _PROBE_QUERY, _PROBE_DOCUMENT)
    except CheckpointError:
        raise
    except Exception as exc:  # jinja's syntax and render errors, the template's own raise_exception
        raise CheckpointError(f"--score-template {path}: the template fails to render a pair ({exc})") from None
    if _PROBE_QUERY not in rendered or _PROBE_DOCUMENT not in rendered:
        raise CheckpointError(f"--score-template {path}: a rendered pair lacks the query or the document; the "
                              f"template must place the contents of the messages with roles {QUERY_ROLE!r} and "
                              f"{DOCUMENT_ROLE!r} (a model's chat template is not a score template)")
    return text

