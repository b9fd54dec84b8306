import pytest

from hpcllm.config import load_config
from hpcllm.errors import ConfigError


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.slurm.backend == "cli"


def test_typo_in_key_names_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[slurm]\npartitoin = 'gpu'\n")
    with pytest.raises(ConfigError, match="slurm.partitoin"):
        load_config(path)


def test_invalid_toml_is_clear(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[slurm\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_the_prefill_chunk_is_smaller_on_cpu_unless_set(tmp_path):
    worker = load_config(None).worker
    assert worker.prefill_chunk_tokens == "auto"
    assert (worker.prefill_chunk_tokens_for("cpu"), worker.prefill_chunk_tokens_for("cuda:1")) == (256, 512)
    path = tmp_path / "hpcllm.toml"
    path.write_text("[worker]\nprefill_chunk_tokens = 1024\n")
    assert load_config(path).worker.prefill_chunk_tokens_for("cpu") == 1024
    path.write_text("[worker]\nprefill_chunk_tokens = 0\n")
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        load_config(path)


def test_model_process_auto_is_on_for_cpu_workers_of_hpcllms_engine_only(tmp_path):
    worker = load_config(None).worker
    assert worker.model_process == "auto"
    assert worker.model_process_for("cpu")
    assert not worker.model_process_for("cuda") and not worker.model_process_for("cuda:1")
    assert not worker.model_process_for("cpu", engine="vllm")  # vLLM has its own engine-core process
    assert not worker.model_process_for("cpu", tensor_parallel=True)  # the ranks are the processes
    path = tmp_path / "hpcllm.toml"
    path.write_text("[worker]\nmodel_process = false\n")
    assert not load_config(path).worker.model_process_for("cpu")
    path.write_text("[worker]\nmodel_process = true\n")
    assert load_config(path).worker.model_process_for("cuda")
    path.write_text('[worker]\nmodel_process = "yes"\n')
    with pytest.raises(ConfigError, match="model_process"):
        load_config(path)
