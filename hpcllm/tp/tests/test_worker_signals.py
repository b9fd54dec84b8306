"""The signals a tensor-parallel rank handles: the drain signal (slurm.signal) it ignores and its stop signal."""

from __future__ import annotations

import signal

import pytest

from hpcllm.config import Config
from hpcllm.errors import ConfigError
from hpcllm.slurm.base import ignore_drain_signal


@pytest.fixture
def restore_usr1():
    saved = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, saved)


@pytest.mark.parametrize("setting", ["10", "SIGUSR1", "usr1"])
def test_every_rank_ignores_the_drain_signal_given_by_name_or_number(restore_usr1, setting):
    """slurm.signal = "10" (the sbatch script takes a number): a rank looking it up by name only kept SIGUSR1's
    default action, so Slurm's drain signal ended every rank instead of the agent draining the instance."""
    config = Config()
    config.slurm.signal = setting
    ignore_drain_signal(config)()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


@pytest.mark.parametrize("setting", ["KILL", "9", "STOP", "19"])
def test_a_drain_signal_no_rank_can_ignore_is_a_config_error(setting):
    config = Config()
    config.slurm.signal = setting
    with pytest.raises(ConfigError, match="no process can catch"):
        ignore_drain_signal(config)
