"""Small real Hugging Face test models built offline (no network): seeded weights, a trained BPE tokenizer.

    from hpcllm.devmodels import make_model, ARCHITECTURES, make_tokenizer
    path = make_model("llama", tmp_path / "llama")            # tiny, float32, one safetensors file
    make_model("gpt2", d, shards=3, fmt="bin", seed=1)        # sharded legacy pytorch_model-*.bin + index

Importing this package is cheap: torch and transformers load on the first build.
"""

from hpcllm.devmodels.builder import (
    ARCHITECTURES,
    DTYPES,
    FORMATS,
    SIZES,
    DevModelError,
    make_model,
)
from hpcllm.devmodels.tokenizer import make_tokenizer

__all__ = ["ARCHITECTURES", "DTYPES", "FORMATS", "SIZES", "DevModelError", "make_model", "make_tokenizer"]
