"""`hpcllm convert --classifier-from-token` and `--score-template`: a causal LM that answers with a token becomes
the one-label cross-encoder vLLM serves it as (score head lm_head[yes] - lm_head[no], or one token's row), loaded by
the store as its classifier; bad tokens and templates are one-line errors naming what to fix, and leave nothing."""

from __future__ import annotations

import json

import pytest
import torch

from hpcllm.checkpoint import CheckpointError, read_checkpoint
from hpcllm.checkpoint.converter import convert
from hpcllm.checkpoint.heads import SCORE_TEMPLATE_FILE
from hpcllm.checkpoint.tests.test_cli import assert_clean_error, hpcllm

NO, YES = "no", "the"  # single tokens of devmodels' vocabulary
TEMPLATE = "Q: {{ messages[0]['content'] }} D: {{ messages[1]['content'] }} A:"
TEXT = "is paris the capital of france"


def token_id(hf_dir, token: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir).get_vocab()[token]


def lm_last_logits(hf_dir, text: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(hf_dir).eval(), AutoTokenizer.from_pretrained(hf_dir)
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0, -1]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])  # gpt2's LM head is tied to its input embedding
def test_two_answer_tokens_make_a_one_label_classifier_whose_logit_is_yes_minus_no(arch, hf_models, tmp_path):
    from hpcllm.store.loader import load_model

    out = convert(hf_models[arch], tmp_path / "out", score_tokens=(NO, YES), progress=False).root
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [f"{'GPT2' if arch == 'gpt2' else 'Qwen2'}ForSequenceClassification"]
    assert (config["num_labels"], config["id2label"], config["use_sep_token"]) == (1, {"0": "LABEL_0"}, False)
    ckpt = read_checkpoint(out)
    assert "lm_head.weight" not in set(ckpt.tensors) | set(ckpt.aliases)
    assert ckpt.manifest["source"]["score_head"] == {"classifier_from_token": [NO, YES],
                                                     "method": "from_2_way_softmax"}

    loaded, tokenizer, _ = load_model(out)
    with torch.no_grad():
        logit = loaded(**tokenizer(TEXT, return_tensors="pt")).logits[0, 0].item()
    logits = lm_last_logits(hf_models[arch], TEXT)
    no, yes = token_id(hf_models[arch], NO), token_id(hf_models[arch], YES)
    assert logit == pytest.approx((logits[yes] - logits[no]).item(), abs=1e-4)
    # what the gateway answers: the sigmoid of that logit, which is the softmax over the two answers
    assert torch.sigmoid(torch.tensor(logit)).item() == pytest.approx(
        torch.softmax(logits[[no, yes]], dim=0)[1].item(), abs=1e-5)


def test_one_answer_token_makes_its_row_the_score_head(hf_models, tmp_path):
    from hpcllm.store.loader import load_model

    out = convert(hf_models["qwen2"], tmp_path / "out", score_tokens=(YES,), progress=False).root
    loaded, tokenizer, _ = load_model(out)
    with torch.no_grad():
        logit = loaded(**tokenizer(TEXT, return_tensors="pt")).logits[0, 0].item()
    assert logit == pytest.approx(lm_last_logits(hf_models["qwen2"], TEXT)[token_id(hf_models["qwen2"], YES)].item(),
                                  abs=1e-4)


def test_the_score_template_is_stored_as_a_checksummed_side_file(hf_models, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    reads = []
    read = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **kw: reads.append(a) or read(*a, **kw))
    out = convert(hf_models["qwen2"], tmp_path / "out", score_tokens=(NO, YES), score_template=template,
                  progress=False).root
    assert len(reads) == 1  # the head's tokens and the template checked with one tokenizer, read once
    assert (out / SCORE_TEMPLATE_FILE).read_text() == TEMPLATE
    ckpt = read_checkpoint(out)
    assert SCORE_TEMPLATE_FILE in {f.file for f in ckpt.side_files}
    ckpt.verify_files()


@pytest.mark.parametrize("tokens, template, fragments", [
    (("no", "yes"), None, ["'yes' is not one token of the vocabulary", "['y', 'es']"]),
    (("no", "the", "a"), None, ["given 3 times"]),
    (("no", "the"), "missing.jinja", ["--score-template", "missing.jinja: no such file"]),
    (("no", "the"), "{{ messages[0]['content'] }}", ["lacks the query or the document", "'document'"]),
    (("no", "the"), "{% if %}", ["fails to render a pair"]),
    ((), "{{ messages[0]['content'] }}{{ messages[1]['content'] }}", ["is for a cross-encoder",
                                                                     "--classifier-from-token"]),
])
def test_a_bad_token_or_template_is_an_error_naming_it_and_writes_nothing(hf_models, tmp_path, tokens, template,
                                                                          fragments):
    path = None
    if template is not None:
        path = tmp_path / ("missing.jinja" if template == "missing.jinja" else "t.jinja")
        if template != "missing.jinja":
            path.write_text(template)
    with pytest.raises(CheckpointError) as raised:
        convert(hf_models["qwen2"], tmp_path / "out", score_tokens=tokens, score_template=path, progress=False)
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_a_classifier_is_not_converted_again(tmp_path):
    from hpcllm.devmodels import make_model

    hf_dir = make_model("qwen2", tmp_path / "hf", num_labels=1)
    with pytest.raises(CheckpointError, match="already a classifier"):
        convert(hf_dir, tmp_path / "out", score_tokens=(NO, YES))


def test_the_cli_takes_the_tokens_and_template_and_prints_errors_as_one_line(hf_models, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    result = hpcllm("convert", hf_models["qwen2"], tmp_path / "out", "--classifier-from-token", NO,
                    "--classifier-from-token", YES, "--score-template", template, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_labels"] == 1
    assert (tmp_path / "out" / SCORE_TEMPLATE_FILE).is_file()
    assert_clean_error(hpcllm("convert", hf_models["qwen2"], tmp_path / "out2", "--classifier-from-token", "yes"),
                       "'yes' is not one token")
