"""hpcllm.worker.vllm_launch: starting workers for benchmarks and tests (bench/serve.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from hpcllm.errors import ConfigError
from hpcllm.worker.vllm_launch import start_vllm_openai_server, start_worker


def test_a_worker_started_with_a_log_folder_that_does_not_exist_yet_logs_there(tiny_llama_dir, tmp_path):
    """As hpcllm does with the log folders of Slurm jobs (ensure_log_dirs): the folder is made (it was a
    FileNotFoundError traceback before the worker even started)."""
    from hpcllm.checkpoint.converter import convert

    checkpoint = convert(tiny_llama_dir, tmp_path / "tiny-llama", progress=False).root
    log_dir = tmp_path / "logs" / "worker"
    worker = start_worker(checkpoint, secret="s", log_dir=log_dir)
    try:
        assert httpx.get(worker.url + "/ready", timeout=30).status_code == 200
        assert worker.log_path.parent == log_dir and worker.log_path.stat().st_size > 0
    finally:
        worker.stop()


def test_vllms_own_server_takes_a_fraction_of_a_gib_of_kv_cache(tiny_llama_dir, tmp_path):
    """The bench's vLLM-server baseline: a KV cache of 0.5 GiB did not start (vLLM's VLLM_CPU_KVCACHE_SPACE, which
    the launcher set to "0.5", takes whole GiB only). vLLM reports its cache's size in its metrics."""
    from hpcllm.checkpoint.converter import convert

    checkpoint = convert(tiny_llama_dir, tmp_path / "tiny-llama", progress=False).root
    server = start_vllm_openai_server(checkpoint, kv_cache_gb=0.5, max_num_seqs=2, log_dir=tmp_path / "logs")
    try:
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert f'kv_cache_memory_bytes="{2**29}"' in metrics, [line for line in metrics.splitlines()
                                                              if "cache_config_info" in line]
    finally:
        server.stop()


def test_a_log_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot create the log folder .*a-file/logs.*log_dir"):
        start_worker(tmp_path / "no-checkpoint", secret="s", log_dir=tmp_path / "a-file" / "logs")


@pytest.mark.parametrize("start", [start_worker, start_vllm_openai_server])
def test_a_log_folder_that_cannot_be_written_is_a_clear_error(start, tmp_path):
    """An existing folder the worker cannot write in (/sys, also for root) was a PermissionError traceback."""
    with pytest.raises(ConfigError, match=r"cannot write in the log folder /sys: Permission denied.*log_dir"):
        start(tmp_path / "no-checkpoint", log_dir=Path("/sys"))
