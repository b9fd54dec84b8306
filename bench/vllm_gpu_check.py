"""vLLM's CUDA path behind hpcllm (bench/gpu_check.sh step 3; docs/gpu-checks.md, docs/vllm.md).

Builds the small dev Llama, converts it, and starts hpcllm's vLLM engine on cuda with the weights read through
hpcllm's store (load_format hpcllm). Checks greedy tokens against transformers' generate on the same GPU and
prints vLLM's throughput for 1 and 16 prompts at once. Needs the CUDA `vllm` package in this interpreter; without
it the step says so and exits 0 (the device machine has no network to install it).

    python bench/vllm_gpu_check.py [--workdir /tmp/hpcllm-vllm-gpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["hello world", "the quick brown fox", "once upon a time", "in the beginning"]
MAX_TOKENS = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/hpcllm-vllm-gpu")
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:
        print("vllm_gpu_check: skipped: this interpreter has no vllm package (install the CUDA `vllm` wheel with "
              "hpcllm beside it and point worker.vllm_python at it)")
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.checkpoint.converter import convert
    from hpcllm.devmodels import make_model
    from hpcllm.worker.protocol import GenerateRequest
    from hpcllm.worker.vllm_engine import VllmSettings, load_with_vllm

    if not torch.cuda.is_available():
        print("vllm_gpu_check: skipped: CUDA is not available")
        return 0
    workdir = Path(args.workdir)
    hf_dir = make_model("llama", workdir / "hf-small", size="small")
    checkpoint = convert(hf_dir, workdir / "small-llama", overwrite=True, progress=False).root

    started = time.perf_counter()
    served = load_with_vllm(checkpoint, "small-llama", device="cuda",
                            settings=VllmSettings(extra={"gpu_memory_utilization": 0.3}))
    engine = served.engine.start()
    print(f"vLLM on cuda ready in {time.perf_counter() - started:.1f} s; weights from tier {served.tier}")

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval().to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    mismatches = 0
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to("cuda")
        with torch.inference_mode():
            expected = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        got = engine.generate(GenerateRequest(request_id=f"check-{i}", prompt=prompt, max_tokens=MAX_TOKENS,
                                              temperature=0, ignore_eos=True)).token_ids
        same = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        print(f"  {prompt!r}: {'equal' if same is None else f'differs from token {same}'} to generate on cuda")
        mismatches += same is not None

    for concurrent in (1, 16):
        began = time.perf_counter()
        streams = [engine.submit(GenerateRequest(request_id=f"tput-{concurrent}-{i}", prompt=PROMPTS[i % 4],
                                                 max_tokens=128, temperature=0, ignore_eos=True))
                   for i in range(concurrent)]
        tokens = sum(sum(1 for event in s.events() if event.type == "token") for s in streams)
        print(f"  {concurrent:>2} prompts at once: {tokens / (time.perf_counter() - began):.0f} output tokens/s")
    engine.shutdown()
    print(f"vllm_gpu_check: {'ok' if not mismatches else f'{mismatches} prompts differ'}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
