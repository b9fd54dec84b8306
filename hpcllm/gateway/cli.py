"""`hpcllm gateway --config FILE`: serve the OpenAI-compatible API under gunicorn (see hpcllm/gateway/server.py)."""

from __future__ import annotations

from pathlib import Path

import click

from hpcllm.config import load_config, parse_config


@click.command("gateway")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="hpcllm TOML config (default: $HPCLLM_CONFIG, else built-in defaults).")
@click.option("--host", default=None, help="Address to bind. Default: gateway.host.")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port to bind. Default: gateway.port.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="gunicorn worker processes.")
@click.option("--worker-class", type=click.Choice(["gthread", "gevent"]), default=None,
              help="gunicorn worker class. Default: gateway.worker_class (gthread).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Requests one worker serves at once (gthread: threads; gevent: connections).")
def gateway(config_path: Path | None, host: str | None, port: int | None, workers: int | None,
            worker_class: str | None, threads: int | None) -> None:
    """Serve /v1/completions, /v1/chat/completions, /v1/models, /health, /ready and /metrics."""
    config = load_config(config_path, private=True)
    overrides = {k: v for k, v in {"host": host, "port": port, "workers": workers, "worker_class": worker_class,
                                   "threads": threads}.items() if v is not None}
    if overrides:
        data = config.model_dump(mode="json")
        data["gateway"].update(overrides)
        config = parse_config(data, config_path or "<command line>")
    from hpcllm.gateway.server import run_gateway

    gw = config.gateway
    per_worker = "threads" if gw.worker_class == "gthread" else "connections"
    click.echo(f"hpcllm gateway on http://{gw.host}:{gw.port} ({gw.workers} {gw.worker_class} workers x "
               f"{gw.threads} {per_worker})", err=True)
    run_gateway(config)
