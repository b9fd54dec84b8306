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
