"""Every causal-LM architecture of the installed transformers that a tiny config can build: save_pretrained ->
hpcllm convert -> hpcllm.load_model gives from_pretrained's logits bit for bit, in float32 and bfloat16.

One process, ~1-2 min on a 2-core machine (see archsweep.py). The summary (counts, every skip with its reason) is
printed; docs/checkpoint-format.md quotes it.
"""

from __future__ import annotations

import torch

from hpcllm.checkpoint.tests.archsweep import causal_lm_types, reason_kind, sweep

# Measured with transformers 5.24: a converter or loader change that loses an architecture fails here.
MIN_IDENTICAL = 166
SKIP_KINDS = {
    "config cannot be built from its defaults",  # transformers' own default config fails its validation
    "config cannot shrink",  # constraints among sizes the generic shrinking does not meet
    "tiny model cannot be built",  # the model class fails on the shrunk config (or needs a missing library)
    "needs inputs other than token ids or fails on them",  # audio / vision / language ids, or a forward bug
    "from_pretrained itself fails",  # transformers cannot reload what it saved: nothing to compare against
    "forward is not deterministic",
    "save_pretrained fails",
}


def test_every_causal_lm_architecture_converts_to_what_from_pretrained_builds(tmp_path, capsys):
    result = sweep(tmp_path, dtypes=(torch.float32, torch.bfloat16))
    with capsys.disabled():
        print("\n" + result.summary())
    assert not result.failed, result.summary()
    assert len(result.identical["float32"]) >= MIN_IDENTICAL, result.summary()
    assert len(result.identical["bfloat16"]) >= MIN_IDENTICAL, result.summary()
    assert {reason_kind(reason) for reason in result.skipped.values()} <= SKIP_KINDS, result.summary()
    swept = set(result.identical["float32"]) | set(result.skipped) | set(result.failed)
    assert swept == set(causal_lm_types())  # nothing dropped silently
