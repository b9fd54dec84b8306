"""LoRA adapters are not served under tensor parallelism yet: the engine of a tensor-parallel lead refuses them
saying so, before it touches the ranks (the CLI and deploy refuse them earlier: test_worker_lora.py,
test_lora_adapters.py)."""

import pytest

from hpcllm.errors import ConfigError
from hpcllm.tp.serve import tensor_parallel_engine_class


def test_a_tensor_parallel_engine_refuses_lora_adapters():
    with pytest.raises(ConfigError, match="LoRA adapters are not supported with tensor parallelism"):
        tensor_parallel_engine_class()(lead=None, tokenizer=None, lora_adapters={"x": "/adapters/x"})
