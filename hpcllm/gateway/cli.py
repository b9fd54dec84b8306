"""`hpcllm gateway --config FILE`: serve the OpenAI-compatible API under gunicorn (see hpcllm/gateway/server.py)."""

from __future__ import annotations

from pathlib import Path

import click

from hpcllm.config import load_config, parse_config
from hpcllm.errors import HpcllmError
from hpcllm.logs import setup_service_logging


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

    setup_service_logging()  # in the master, before gunicorn forks: every worker inherits its handler

    gw = config.gateway
    per_worker = "threads" if gw.worker_class == "gthread" else "connections"
    run_gateway(config, on_starting=lambda: click.echo(
        f"hpcllm gateway on http://{gw.host}:{gw.port} ({gw.workers} {gw.worker_class} workers x {gw.threads} "
        f"{per_worker})", err=True))


GATEWAY_URL_ENV = "HPCLLM_GATEWAY_URL"


class GatewayRefused(HpcllmError):
    """The gateway answered a call with an error status (a 4xx: it refused the request, which did nothing)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"the gateway refused ({status}): {message}")
        self.status = status
        self.retry_after = retry_after  # seconds: when to ask again (a 429, a 503 draining)


class GatewayUnreachable(HpcllmError):
    """The gateway could not be reached (down, restarting, or not at that address). `what` says so without the
    advice to check the URL, for a caller that reached it there before (a gateway gone since)."""

    def __init__(self, url: str, exc: Exception):
        self.what = f"cannot reach the gateway at {url} ({exc})"
        super().__init__(f"{self.what}; set --url or ${GATEWAY_URL_ENV}")


USAGE_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


@click.command("usage")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="hpcllm TOML config (default: $HPCLLM_CONFIG, else built-in defaults); gives the admin key.")
@click.option("--url", "gateway_url", default=None,
              help=f"Gateway URL (default: ${GATEWAY_URL_ENV}, else http://gateway.host:gateway.port).")
@click.option("--since", default=None, help="First UTC day, YYYY-MM-DD or Nd (the last N days; default 30d).")
@click.option("--until", default=None, help="Last UTC day, YYYY-MM-DD (default: today).")
@click.option("--by", default=None,  # checked by the gateway (its 400 names the choices): one list of them
              help="One row per key (the default), group, model, day or endpoint (batch:chat... apart).")
@click.option("--group", default=None, help="Only this group's keys.")
@click.option("--key", "key_name", default=None, help="Only this API key (by its name).")
@click.option("--model", default=None, help="Only this model (an adapter by its own name).")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              help="A table, CSV (for spreadsheets) or the API's JSON.")
def usage(config_path: Path | None, gateway_url: str | None, since: str | None, until: str | None, by: str | None,
          group: str | None, key_name: str | None, model: str | None, output_format: str) -> None:
    """Requests and tokens used per key, group, model or day (GET /v1/admin/usage, with the gateway's admin key)."""
    import json

    config = load_config(config_path)
    url = resolve_gateway_url(config, gateway_url)
    query = {name: value for name, value in {"since": since, "until": until, "by": by, "group": group,
                                             "key": key_name, "model": model}.items() if value is not None}
    report = _get_usage(config, url, query)
    if output_format == "json":
        click.echo(json.dumps(report, indent=2))
    elif output_format == "csv":
        _print_usage_csv(report)
    else:
        _print_usage_table(report)


def resolve_gateway_url(config, given: str | None) -> str:
    """--url, else $HPCLLM_GATEWAY_URL, else the config's gateway.host:port (a malformed URL is a clear error)."""
    import os

    from hpcllm.httpkit.client import check_url

    url = given if given is not None else (
        os.environ.get(GATEWAY_URL_ENV) or f"http://{config.gateway.host}:{config.gateway.port}")
    return check_url(url, f"the gateway URL (--url or ${GATEWAY_URL_ENV})")


def gateway_client(config, url: str, key: str | None, timeout_s: float = 60.0):
    """An HTTP client for the gateway at `url` sending `key` as the bearer key (none: an open dev gateway)."""
    from hpcllm.httpkit.client import internal_client

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return internal_client(config.internal_http, base_url=url, timeout=timeout_s, headers=headers)


def gateway_json(http, url: str, method: str, path: str, **kwargs):
    """One call's JSON answer; the gateway unreachable, refusing, or not a gateway is one clear HpcllmError."""
    from hpcllm.httpkit.client import request_json

    return request_json(
        http, method, path, **kwargs,
        unreachable=lambda exc: GatewayUnreachable(url, exc),
        refused=lambda status, error, message, retry_after=None: GatewayRefused(status, message, retry_after),
        unexpected=lambda what: HpcllmError(f"{url} did not answer like an hpcllm gateway ({what})"))


def _get_usage(config, url: str, query: dict[str, str]) -> dict:
    admin_key = config.gateway.admin_key
    if not admin_key:
        raise HpcllmError("gateway.admin_key is not set in the config: the usage report needs the gateway's admin key")
    with gateway_client(config, url, admin_key) as http:
        report = gateway_json(http, url, "GET", "/v1/admin/usage", params=query)
    if not isinstance(report, dict) or report.get("object") != "usage":
        raise HpcllmError(f"{url} did not answer like an hpcllm gateway (no usage report); check --url")
    return report


def _usage_rows(report: dict) -> list[list[str]]:
    by = report["by"]
    return [[item[by] or "-", *(str(item[column]) for column in USAGE_COLUMNS)] for item in report["data"]]


def _print_usage_csv(report: dict) -> None:
    import csv
    import sys

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([report["by"], *USAGE_COLUMNS])
    writer.writerows(_usage_rows(report))


def _print_usage_table(report: dict) -> None:
    from rich.table import Table

    from hpcllm.present import table_console

    table = Table(title=f"usage {report['since']} .. {report['until']} (UTC)")
    table.add_column(report["by"])
    for column in USAGE_COLUMNS:
        table.add_column(column.replace("_", " "), justify="right")
    for row in _usage_rows(report):
        table.add_row(*row)
    total = report["total"]
    table.add_row("total", *(str(total[column]) for column in USAGE_COLUMNS), style="bold")
    table_console().print(table)
