"""Pytest fixtures with tiny real test models, registered for the whole suite by the root conftest.py.

Each model is built once per test session (about 0.1-0.3 s each after the first; the tokenizer trains once per
process). Tests must not modify these directories: copy them (shutil.copytree) first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcllm.devmodels.builder import ARCHITECTURES, make_model


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devmodels")


@pytest.fixture(scope="session")
def tiny_models(tiny_models_root: Path) -> dict[str, Path]:
    """{arch: directory} for every architecture in ARCHITECTURES: tiny, float32, one safetensors file, seed 0."""
    return {arch: make_model(arch, tiny_models_root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_models: dict[str, Path]) -> Path:
    """GPT-2 with tied input/output embeddings (the checkpoint holds only transformer.wte.weight)."""
    return tiny_models["gpt2"]


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["qwen2"]


@pytest.fixture(scope="session")
def tiny_opt_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["opt"]


@pytest.fixture(scope="session")
def tiny_sharded_dir(tiny_models_root: Path) -> Path:
    """Tiny Llama in 3 safetensors shards with model.safetensors.index.json (seed 0: same weights as tiny_llama)."""
    return make_model("llama", tiny_models_root / "llama-3-shards", shards=3)


@pytest.fixture(scope="session")
def tiny_bin_dir(tiny_models_root: Path) -> Path:
    """Tiny GPT-2 as a legacy pytorch_model.bin (seed 0: same weights as tiny_gpt2)."""
    return make_model("gpt2", tiny_models_root / "gpt2-bin", fmt="bin")


@pytest.fixture(scope="session")
def small_llama_dir(tiny_models_root: Path) -> Path:
    """The "small" Llama (41 MB, float32, seed 0, 1024 positions): a token takes it 5-20 ms on this 2-core host, the
    tiny one ~2-5 ms, too little for a stream to be still running when a drain or move comes in end-to-end tests."""
    return make_model("llama", tiny_models_root / "llama-small", size="small")
