"""CLI: `hpcllm controller` runs the service; `hpcllm deploy/undeploy/status` talk to it over HTTP with the admin key."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import click
from pydantic import ValidationError

from hpcllm.config import (MODEL_NAME_PATTERN, Config, admin_key_of, check_service_credentials, load_config,
                           private_state_dir, read_toml)
from hpcllm.controller.errors import ControllerError, ControllerUnreachable, InvalidModelConfig
from hpcllm.controller.protocol import (ClusterStatus, CredentialInfo, CredentialList, DeployedModel, IssuedPoolToken,
                                       ModelSpec, UndeployResult, Wire, not_an_answer)
from hpcllm.httpkit.client import check_url, internal_client, request_json
from hpcllm.logs import setup_service_logging
from hpcllm.present import human_size, table_console

CONTROLLER_URL_ENV = "HPCLLM_CONTROLLER_URL"

config_option = click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                             help="hpcllm config file (default: $HPCLLM_CONFIG, else built-in defaults).")
url_option = click.option("--url", "controller_url", default=None,
                          help=f"Controller URL (default: ${CONTROLLER_URL_ENV}, else controller.host:port).")


@click.command("controller")
@config_option
@click.option("--host", default=None, help="Listen address (default: controller.host).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Listen port (default: controller.port; 0 picks a free one).")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None,
              help="Write the listening URL here once serving (for scripts).")
def controller(config_path: Path | None, host: str | None, port: int | None, ready_file: Path | None) -> None:
    """Run the controller: registry, placement, route API and autoscaler."""
    from hpcllm.controller.server import build_service, serve, slurm_backend_of

    config = load_config(config_path, private=True)
    check_service_credentials(config, "controller")
    private_state_dir(config)
    setup_service_logging()
    service = build_service(config, backend=slurm_backend_of(config),
                            config_path=str(config_path) if config_path else os.environ.get("HPCLLM_CONFIG"))
    serve(service, host or config.controller.host, config.controller.port if port is None else port, ready_file)


def read_model_file(path: Path) -> ModelSpec:
    """Parse and validate conf/models/NAME.toml; errors name the file and the field."""
    data = read_toml(path, "model config", InvalidModelConfig)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid model config {path}:"]
        for err in exc.errors():
            lines.append(f"  {'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}")
        raise InvalidModelConfig("\n".join(lines)) from None


class AdminClient:
    def __init__(self, config: Config, url: str | None):
        from hpcllm.controller.server import controller_url_of

        if url is None:  # an explicit --url "" is a mistake, not a request for the default
            url = os.environ.get(CONTROLLER_URL_ENV) or controller_url_of(config)
        self.url = check_url(url, f"the controller URL (--url or ${CONTROLLER_URL_ENV})")
        admin_key = admin_key_of(config)
        self._http = internal_client(config.internal_http, base_url=self.url, timeout=30.0,
                                     headers={"Authorization": f"Bearer {admin_key}"} if admin_key else {})

    def call(self, method: str, path: str, answer: type[Wire], **kwargs) -> dict:
        """The JSON answer, checked against its wire type `answer`: a URL that leads to another service (a web
        server, a proxy) is an error that says so, not a traceback or an empty listing."""
        body = request_json(
            self._http, method, path,
            unreachable=lambda exc: ControllerUnreachable(
                f"cannot reach the controller at {self.url} ({exc}); is `hpcllm controller` running? "
                f"(set --url or ${CONTROLLER_URL_ENV})"),
            refused=self._refused,
            unexpected=self._not_a_controller,
            **kwargs)
        problem = not_an_answer(answer, body)
        if problem:
            raise self._not_a_controller(problem)
        return body

    def _refused(self, status: int, error: dict, message: str, retry_after: float | None = None) -> ControllerError:
        if not error:  # the controller's errors are JSON {"error": {...}}: a bare page comes from something else
            return self._not_a_controller(f"HTTP {status}: {message[:60]!r}")
        return ControllerError(f"the controller refused ({status} {error.get('code', '')}): {message}")

    def _not_a_controller(self, what: str) -> ControllerError:
        return ControllerError(f"{self.url} did not answer like an hpcllm controller ({what}); check --url or "
                               f"${CONTROLLER_URL_ENV}")


DEPLOY_TIMEOUT_S = 600.0


@click.command("deploy")
@click.argument("model_file", type=click.Path(path_type=Path))
@config_option
@url_option
def deploy(model_file: Path, config_path: Path | None, controller_url: str | None) -> None:
    """Deploy (or update) the model described by MODEL_FILE (conf/models/NAME.toml)."""
    spec = read_model_file(model_file)
    client = AdminClient(load_config(config_path), controller_url)
    # A redeploy that changes lora_adapters answers once every running instance loaded them: not the default 30 s.
    model = client.call("POST", "/v1/admin/models", DeployedModel, json=spec.model_dump(), timeout=DEPLOY_TIMEOUT_S)
    click.echo(f"deployed {model['name']}: {model['source']} ({human_size(model['size_bytes'])}, "
               f"{model['gpus'] or 'no'} GPU{'s' if model['gpus'] != 1 else ''}, "
               f"instances {model['min_instances']}..{model['max_instances']}, "
               f"context {model['max_model_len']} tokens)")


@click.command("undeploy")
@click.argument("name")
@config_option
@url_option
def undeploy(name: str, config_path: Path | None, controller_url: str | None) -> None:
    """Remove model NAME and stop its instances."""
    if not re.fullmatch(MODEL_NAME_PATTERN, name):  # "m?x" or "m/x" in the URL would name another model, or none
        raise click.BadParameter(f"{name!r} is not a model name (letters, digits, '.', '_', '-'; `hpcllm status` "
                                 f"lists the deployed ones)", param_hint="NAME")
    client = AdminClient(load_config(config_path), controller_url)
    result = client.call("DELETE", f"/v1/admin/models/{name}", UndeployResult)
    click.echo(f"undeployed {result['undeployed']} ({result['stopped_instances']} instances stopped)")


@click.command("status")
@config_option
@url_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status JSON.")
def status(config_path: Path | None, controller_url: str | None, as_json: bool) -> None:
    """Show models, nodes, instances and allocations."""
    client = AdminClient(load_config(config_path), controller_url)
    body = client.call("GET", "/v1/admin/status", ClusterStatus)
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    print_status(ClusterStatus.model_validate(body))


@click.group("pool")
def pool() -> None:
    """Model pools run by groups (slurm/model-pool.sbatch) and their tokens."""


@pool.group("token")
def pool_token() -> None:
    """Pool tokens: each registers pools of one model that serve one group's API keys (docs/security.md)."""


@pool_token.command("issue")
@click.option("--model", required=True, help="The deployed model the pool may serve (and nothing else).")
@click.option("--group", required=True, help="The group whose API keys (gateway.api_keys[].group) it serves.")
@click.option("--shared", is_flag=True, help="Serve every API key, not only the group's.")
@click.option("--note", default=None, help="A note kept with the token (who asked, a ticket number).")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the token to this new file (mode 0600) instead of printing it; hand it to the group, who "
                   "run the pool with HPCLLM_NODE_TOKEN_FILE=FILE.")
@config_option
@url_option
def issue_pool_token(model: str, group: str, shared: bool, note: str | None, output: Path | None,
                     config_path: Path | None, controller_url: str | None) -> None:
    """Issue a pool token for one model and one group (the token is shown once; only its hash is kept)."""
    client = AdminClient(load_config(config_path), controller_url)
    # The file is created before the token is issued: a live token must never be left without a place to go.
    fd = None if output is None else _create_private_file(output)
    try:
        issued = client.call("POST", "/v1/admin/pool-tokens", IssuedPoolToken,
                             json={"model": model, "group": group, "shared": shared, "note": note})
    except BaseException:
        if fd is not None:
            os.close(fd)
            output.unlink()
        raise
    if fd is None:
        click.echo(issued["token"])
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(issued["token"] + "\n")
    click.echo(f"issued {issued['credential_id']}: model {model}, group {group}"
               f"{' (shared with every API key)' if shared else ''}" + (f"; token in {output}" if output else ""),
               err=output is None)


def _create_private_file(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise click.BadParameter(f"cannot create {path}: {exc.strerror} (give a new file in an existing folder); "
                                 f"no token was issued", param_hint="--output") from None


@pool_token.command("list")
@config_option
@url_option
def list_pool_tokens(config_path: Path | None, controller_url: str | None) -> None:
    """List the pool tokens and allocation tokens (ids, scopes, revocations; never the tokens)."""
    client = AdminClient(load_config(config_path), controller_url)
    for c in client.call("GET", "/v1/admin/credentials", CredentialList)["credentials"]:
        scope = f"model {c['model']} group {c['group']}{' shared' if c['shared'] else ''}" if c["kind"] == "pool" \
            else f"job {c['job_id'] or '(not submitted)'}"
        click.echo(f"{c['credential_id']}  {c['kind']:<10}  {scope}  "
                   f"{'revoked' if c['revoked_at'] else 'valid'}{'  ' + c['note'] if c['note'] else ''}")


@pool_token.command("revoke")
@click.argument("credential_id")
@config_option
@url_option
def revoke_pool_token(credential_id: str, config_path: Path | None, controller_url: str | None) -> None:
    """Revoke a token now: its pool's next heartbeat is refused (its agents drain and exit), and it cannot register
    again."""
    if not credential_id.strip():
        raise click.BadParameter("give the id of the token to revoke (`hpcllm pool token list` shows them)",
                                 param_hint="CREDENTIAL_ID")
    client = AdminClient(load_config(config_path), controller_url)
    # Quoted: a '?' or '#' in it would otherwise cut the URL and revoke the credential named by what comes before.
    client.call("DELETE", f"/v1/admin/credentials/{quote(credential_id, safe='')}", CredentialInfo)
    click.echo(f"revoked {credential_id}")


def print_status(st: ClusterStatus) -> None:
    from rich.table import Table

    console = table_console()
    models = Table(title="models")
    for col in ("name", "size", "gpus", "context", "instances", "keep-alive", "source"):
        models.add_column(col)
    counts: dict[str, int] = {}
    for inst in st.instances:
        counts[inst.model] = counts.get(inst.model, 0) + 1
    for m in st.models:
        context = "?" if m.max_model_len is None else str(m.max_model_len)
        models.add_row(m.name, human_size(m.size_bytes), str(m.gpus), context,
                       f"{counts.get(m.name, 0)} ({m.min_instances}..{m.max_instances})",
                       "default" if m.keep_alive_seconds is None else f"{m.keep_alive_seconds:g} s", m.source)
    nodes = Table(title="nodes")
    for col in ("node", "state", "job", "pool", "gpus free", "tiers GB/s", "cached", "heartbeat", "job ends"):
        nodes.add_column(col)
    for n in st.nodes:
        tiers = ", ".join(f"{t} {getattr(n.tiers, t).read_gbps:.3g}" for t in ("dram", "nvme", "sharedfs")
                          if getattr(n.tiers, t) is not None)
        cached = ", ".join(f"{c.model}@{c.tier}" + (f"[rank {c.rank}/{c.tensor_parallel}]" if c.tensor_parallel else "")
                           for c in n.cached)
        nodes.add_row(n.node_id, f"{n.state}, {n.phase}" if n.phase else n.state, n.slurm_job_id or "-",
                      n.pool_model or "-", f"{n.free_gpus}/{n.gpus}", tiers or "-", cached or "-",
                      _ago(st.now, n.last_heartbeat),
                      "-" if n.job_end is None else f"in {max(0.0, n.job_end - st.now):.0f} s")
    instances = Table(title="instances")
    for col in ("instance", "model", "node", "ranks", "state", "gpus", "running", "loaded from", "estimated",
                "move cost", "idle"):
        instances.add_column(col)
    for i in st.instances:
        loaded = f"{i.load_tier} {i.load_seconds:.2f} s" if i.load_tier and i.load_seconds is not None else "-"
        estimated = _estimate_cell(i.placement)
        instances.add_row(i.instance_id, i.model, i.node_id, _ranks_cell(i), i.state,
                          ",".join(map(str, i.gpu_ids)) or "cpu",
                          str(i.running_requests), loaded, estimated, _move_cost_cell(i), _ago(st.now, i.last_used))
    allocations = Table(title="allocations")
    for col in ("job", "state", "model", "nodes", "submitted", "agent in", "retires in", "reason"):
        allocations.add_column(col)
    for a in st.allocations:
        if a.state == "ended":
            continue
        retire = f"{a.retire_at - st.now:.0f} s" if a.retire_at else "-"
        if a.drain_deadline is not None:  # retiring: it drains once replacements are ready, by the deadline
            retire = f"drains within {max(0.0, a.drain_deadline - st.now):.0f} s"
        allocations.add_row(a.job_id, f"{a.state}, {a.phase}" if a.phase else a.state, a.model or "-",
                            ",".join(a.nodes) or
                            (f"prefer {','.join(a.preferred_nodes)}" if a.preferred_nodes else "-"),
                            _ago(st.now, a.submitted_at), _wait_cell(a.queue_wait_seconds, a.queue_wait_source),
                            retire, "; ".join(filter(None, [a.reason,
                                                            a.pending_reason and f"Slurm: {a.pending_reason}"])))
    tables = [models, nodes, instances, allocations]
    if st.migrations:
        migrations = Table(title="recent migrations")
        for col in ("when", "model", "from node", "instance", "trigger", "outcome", "to instance", "moved"):
            migrations.add_column(col)
        for m in st.migrations[:10]:
            migrations.add_row(_ago(st.now, m.at), m.model, m.node_id, m.instance_id or "-", m.trigger, m.outcome,
                               m.target_instance or "-", str(m.moved))
        tables.append(migrations)
    if st.failed_instances:
        failures = Table(title="failed instances (latest first)")
        for col in ("instance", "model", "node", "failed", "reason"):
            failures.add_column(col)
        for f in st.failed_instances:
            failures.add_row(f.instance_id, f.model, f.node_id, _ago(st.now, f.failed_at), f.error or "-")
        tables.append(failures)
    for table in tables:
        console.print(table)


def _ranks_cell(inst) -> str:
    """Tensor-parallel ranks, where they run and, once loaded, what each read: `2 (n1 nvme, n2 sharedfs)`; `1` for
    a one-process instance."""
    if inst.tensor_parallel == 1:
        return "1"
    if not inst.rank_nodes:
        return str(inst.tensor_parallel)
    tiers = inst.rank_tiers if len(inst.rank_tiers) == len(inst.rank_nodes) else [""] * len(inst.rank_nodes)
    return f"{inst.tensor_parallel} ({', '.join(f'{n} {t}'.strip() for n, t in zip(inst.rank_nodes, tiers))})"


def _wait_cell(seconds: float | None, source: str | None) -> str:
    """A queue wait and where it comes from, e.g. `42 s (slurm test-only)`."""
    return "-" if seconds is None else f"{seconds:.0f} s ({source or '?'})"


def _estimate_cell(placement) -> str:
    """The placement estimate: tier and total, the queue wait with its source when there was one, and the start's
    fixed cost (process start, srun/MPI) the total includes."""
    if placement is None:
        return "-"
    cell = f"{placement.tier} {placement.total_seconds:.2f} s"
    if placement.slowest_rank is not None:
        cell += f" (slowest rank {placement.slowest_rank})"
    if placement.queue_wait_seconds:
        cell += f", queue {_wait_cell(placement.queue_wait_seconds, placement.queue_wait_source)}"
    if placement.start_seconds:
        cell += f", start {placement.start_seconds:.1f} s"
    return cell



def _move_cost_cell(inst) -> str:
    """What placement counts for moving the instance, and from what: tokens to re-prefill at the measured rate."""
    if inst.move_seconds is None:
        return "-"
    if inst.tokens_in_flight and inst.prefill_tokens_per_second:
        return (f"{inst.move_seconds:.2f} s ({inst.tokens_in_flight} tok at "
                f"{inst.prefill_tokens_per_second:.0f} tok/s)")
    return f"{inst.move_seconds:.2f} s"


def _ago(now: float, then: float | None) -> str:
    return "-" if then is None else f"{max(0.0, now - then):.0f} s ago"


__all__ = ["controller", "deploy", "undeploy", "status", "read_model_file", "print_status"]
