"""`hpcllm cache warm|ls|evict|verify`: the node caches of the cluster, from one admin command.

Targets: the node agents the controller knows (GET /v1/admin/status with the admin key gives every node's agent URL
and every deployed model's origin), or agents named directly with --agent-url. `warm --mpi` needs no agent: it
submits an MPI job (srun --mpi=pmix, one rank per node) running `python -m hpcllm.node.mpiwarm`, so the shared FS
is read once however many nodes are warmed, and waits for it.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import httpx

from hpcllm.config import Config, load_config
from hpcllm.controller.agents import AgentClient
from hpcllm.controller.protocol import not_an_answer
from hpcllm.credentials import worker_key
from hpcllm.errors import HpcllmError
from hpcllm.httpkit.auth import secret_headers
from hpcllm.httpkit.client import check_url, internal_client
from hpcllm.node.cache import CACHE_TIERS, CacheError, NotEnoughSpace, UnknownModel, check_model_name
from hpcllm.present import human_size, table_console
from hpcllm.slurm.hostlist import expand_nodes
from hpcllm.node.mpiwarm import RESULT_PREFIX
from hpcllm.node.protocol import CachedCopyInfo, CacheList, VerifyResults, Wire

LIVE_NODE_STATES = ("up", "draining")  # the controller's other states: lost (silent agent), gone (job ended)
# An agent's answer may take long (a warm copies a whole checkpoint, a verify re-reads every copy): cache warm's
# --timeout default, and the wait for every other call's answer. Connecting must not take long.
ANSWER_SECONDS = 3600.0
CONNECT_SECONDS = 10.0
config_option = click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                             help="hpcllm config file (default: $HPCLLM_CONFIG, else built-in defaults).")
url_option = click.option("--url", "controller_url", default=None,
                          help="Controller URL (default: $HPCLLM_CONTROLLER_URL, else controller.host:port).")
agent_option = click.option("--agent-url", "agent_urls", multiple=True,
                             help="Talk to this node agent directly instead of asking the controller (repeatable).")


class NodeUnreachable(CacheError):
    """A node agent did not answer."""


class CorruptCopiesFound(CacheError):
    """`cache verify` found corrupt copies (they were dropped, and refilled where the origin allowed): exit 1."""

    exit_code = 1


@dataclass(frozen=True)
class Agent:
    node: str
    url: str
    credential_id: str | None = None  # a token-registered agent accepts its node key, not the cluster secret


# ------------------------------------------------------------------------------------------------ talking to agents


class NodeCache:
    """One node's cache API, through the agent client, with failures in this command's words."""

    def __init__(self, agent: Agent, agents: AgentClient):
        self.agent = agent
        self._agents = agents

    def call(self, method: str, path: str, answer: type[Wire], *, on_timeout: str | None = None, **kwargs) -> dict:
        """The agent's JSON answer, checked against its wire type `answer`: a URL that leads to something else is an
        error that says so, not a KeyError traceback. `on_timeout`: what to say when the agent took the call's whole
        `timeout` to answer (it was reached, and may still be at work)."""
        def unreachable(exc: httpx.HTTPError) -> CacheError:
            if on_timeout is not None and isinstance(exc, httpx.ReadTimeout):
                return CacheError(f"node {self.agent.node}: {on_timeout}")
            return NodeUnreachable(f"node {self.agent.node}'s agent at {self.agent.url} is not reachable "
                                   f"({type(exc).__name__}: {exc}); is its `hpcllm node` job running?")

        body = self._agents.call(self.agent.url, method, path, unreachable=unreachable, refused=self._refused,
                                 **kwargs)
        problem = not_an_answer(answer, body)
        if problem:
            raise CacheError(f"node {self.agent.node}: {self.agent.url} did not answer like an hpcllm node agent "
                             f"({problem})")
        return body

    def _refused(self, status: int, error: dict, message: str, retry_after: float | None = None) -> Exception:
        kind = {"NotEnoughSpace": NotEnoughSpace, "UnknownModel": UnknownModel}.get(str(error.get("code") or ""),
                                                                                   CacheError)
        return kind(f"node {self.agent.node}: {message}")


class Cluster:
    """What the controller knows: agents by node, deployed models' origins. Asked lazily, once."""

    def __init__(self, config: Config, controller_url: str | None, agent_urls: tuple[str, ...]):
        self.config = config
        self.controller_url = controller_url
        self.agent_urls = tuple(check_url(url, "--agent-url") for url in agent_urls)  # a typo is no agent that is down
        self._status: dict | None = None

    def status(self) -> dict:
        if self._status is None:
            from hpcllm.controller.cli import AdminClient
            from hpcllm.controller.protocol import ClusterStatus

            self._status = AdminClient(self.config, self.controller_url).call("GET", "/v1/admin/status",
                                                                              ClusterStatus)
        return self._status

    def agents(self, nodes: list[str] | None) -> list[Agent]:
        if self.agent_urls:
            silent: dict[str, str] = {}  # url -> why its /health did not say its node
            found = [Agent(self._node_of(url, silent), url) for url in self.agent_urls]
            missing = [n for n in nodes or [] if n not in {a.node for a in found}]
            if missing:  # as for nodes the controller knows no agent of: never a silent partial run
                _no_agents(missing, [a for a in found if a.url not in silent], silent)
            return [a for a in found if nodes is None or a.node in nodes]
        known = {n["node_id"]: n for n in self.status().get("nodes", [])}
        if nodes is None:  # every node whose agent is alive; nodes that left are history, not errors
            return [Agent(name, n["agent_url"], n.get("credential_id")) for name, n in sorted(known.items())
                    if _live(n)]
        missing = [n for n in nodes if n not in known]
        if missing:
            raise CacheError(f"node(s) {', '.join(missing)} have no registered agent (the controller knows "
                             f"{', '.join(sorted(known)) or 'no nodes'}); start `hpcllm node` there or use --agent-url")
        down = [n for n in nodes if not _live(known[n])]
        if down:
            raise NodeUnreachable("; ".join(f"node {n}'s agent is down (the controller marks it "
                                            f"{known[n].get('state')}{_silent_for(known[n], self.status())})"
                                            for n in down) + "; start `hpcllm node` there")
        return [Agent(n, known[n]["agent_url"], known[n].get("credential_id")) for n in nodes]

    def _node_of(self, url: str, silent: dict[str, str]) -> str:
        """The node the agent at `url` says it is on; its url when it does not answer (why: into `silent`)."""
        try:
            with internal_client(self.config.internal_http, headers=secret_headers(self.config.cluster.shared_secret),
                                 timeout=10.0) as http:
                body = http.get(url.rstrip("/") + "/health").json()
            if body.get("node_id"):
                return str(body["node_id"])
            silent[url] = "its /health names no node"
        except httpx.HTTPError as exc:
            silent[url] = f"it did not answer ({exc or type(exc).__name__})"
        except (ValueError, AttributeError):
            silent[url] = "its /health is not an agent's answer"
        return url

    def source_of(self, model: str, given: Path | None) -> str:
        if given is not None:  # absolute: the agents read it from their own current folders (symlinks kept as named)
            return os.path.abspath(given)
        try:
            models = {m["name"]: m for m in self.status().get("models", [])}
        except HpcllmError as exc:
            raise CacheError(f"model {model!r}: no --source given and the controller cannot be asked for its "
                             f"origin ({exc})") from None
        if model not in models:
            raise UnknownModel(f"model {model!r} is not deployed (deployed: {', '.join(sorted(models)) or 'none'}); "
                               f"deploy it or pass --source PATH of its converted checkpoint")
        return models[model]["source"]


def _live(node: dict) -> bool:
    return node.get("state", "up") in LIVE_NODE_STATES


def _silent_for(node: dict, status: dict) -> str:
    last, now = node.get("last_heartbeat"), status.get("now")
    return f", no heartbeat for {now - last:.0f} s" if last and now else ""


def _no_agents(nodes, found, silent):
    """Refuse node(s) none of the --agent-url agents is on: those that answered are named by node, those that did
    not by URL and why (the agent of a node asked for may be one of them: NodeUnreachable)."""
    answered = f"those that answered are on {', '.join(a.node for a in found)}" if found else "none answered"
    if silent:
        raise NodeUnreachable(f"cannot tell which --agent-url is node(s) {', '.join(nodes)}'s: "
                              + "; ".join(f"the agent at {url}: {why}" for url, why in silent.items())
                              + f" ({answered}); start `hpcllm node` there or fix the URL")
    raise CacheError(f"none of the agents given with --agent-url is on node(s) {', '.join(nodes)} ({answered}); "
                     f"add an --agent-url for each node asked for")


def _distinct_nodes(node_expr: str) -> list[str]:
    """The nodes a --nodes hostlist names, in its order, each once: Slurm's expansion repeats a name given twice
    (`n[1-2],n2`), and a node has one cache (warmed twice at once, or asked for one MPI rank per name, the job
    would ask Slurm for more nodes than it names)."""
    return list(dict.fromkeys(expand_nodes(node_expr)))


def _clients(config: Config, cluster: Cluster, node_expr: str | None) -> list[NodeCache]:
    nodes = _distinct_nodes(node_expr) if node_expr else None
    secret = config.cluster.shared_secret
    agents = AgentClient(secret, httpx.Timeout(ANSWER_SECONDS, connect=CONNECT_SECONDS), config.internal_http)
    found = cluster.agents(nodes)
    for a in found:  # a token-registered agent accepts its node key (derived from the secret), not the secret
        agents.set_key(a.url, worker_key(secret, a.credential_id, a.node))
    return [NodeCache(a, agents) for a in found]


# ------------------------------------------------------------------------------------------------------- commands


@click.group("cache")
def cache() -> None:
    """Node checkpoint caches (NVMe, DRAM): warm, list, evict, verify."""


@cache.command("warm")
@click.argument("model")
@click.option("--nodes", "node_expr", required=True, help="Slurm hostlist, e.g. n[1-4] or n1,n3.")
@click.option("--tier", type=click.Choice(CACHE_TIERS), default="nvme", show_default=True)
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="Converted checkpoint on the shared FS (default: the deployed model's source).")
@click.option("--mpi", is_flag=True, help="One MPI job broadcasts the checkpoint to all nodes (reads it once).")
@click.option("--nvme-dir-template", default=None,
              help="--mpi: each node's NVMe cache folder; {node} or %n = node name (default: [node] nvme_dir).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, min_open=True), default=ANSWER_SECONDS,
              show_default=True,
              help="Longest wait (seconds): for the --mpi job; through the agents, for each node's warm (each "
                   "rank's with --tensor-parallel).")
@click.option("--tensor-parallel", "degree", type=click.IntRange(2, 64), default=None,
              help="Keep on each node only the slices its ranks of a tensor_parallel = N instance read: the nodes, "
                   "in hostlist order, hold ranks in blocks of N / nodes (srun's block distribution).")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--mpi: the folder of the job's log, on a filesystem this host and the nodes share (default: the "
                   "current folder, as sbatch's slurm-%j.out).")
@config_option
@url_option
@agent_option
def warm(model, node_expr, tier, source, mpi, nvme_dir_template, timeout_s, degree, log_dir, config_path,
         controller_url, agent_urls) -> None:
    """Copy MODEL into the TIER cache of every node in --nodes (verified, atomic)."""
    check_model_name(model)
    config = load_config(config_path)
    cluster = Cluster(config, controller_url, agent_urls)
    origin = cluster.source_of(model, source)
    if degree is not None:
        if mpi or tier != "nvme":
            raise CacheError("--tensor-parallel keeps slice copies on the NVMe tier through the agents; leave out "
                             "--mpi and --tier dram")
        order = _distinct_nodes(node_expr)  # ranks follow the hostlist's order, not the agents' answers
        clients = sorted(_clients(config, cluster, node_expr), key=lambda c: order.index(c.agent.node))
        warm_slices_through_agents(clients, model, origin, rank_blocks(degree, [c.agent.node for c in clients]),
                                   timeout_s)
        return
    if mpi:
        if tier != "nvme":
            raise CacheError("--mpi warms the NVMe tier; warm DRAM afterwards from the nodes' NVMe copies "
                             "(hpcllm cache warm MODEL --tier dram --nodes ...)")
        nodes = _distinct_nodes(node_expr)
        template = nvme_dir_template or str(config.node.nvme_dir)
        if "%j" in template:
            from hpcllm.node.mpiwarm import JOB_SCOPED_MESSAGE

            raise CacheError(JOB_SCOPED_MESSAGE.format(template=template))
        result = mpi_warm(config, model, Path(origin), nodes, template, timeout_s, log_dir=log_dir)
        for node, path in result["copies"]:
            click.echo(f"{node}: {model} verified in {path}")
        click.echo(result["summary"])
        return
    warm_through_agents(_clients(config, cluster, node_expr), model, origin, tier, timeout_s)


def _warm_call(client: NodeCache, body: dict, timeout_s: float) -> dict:
    """One warm through an agent, waited for up to the command's --timeout: each node's (rank's) warm has its own,
    as the nodes are warmed one after another (a node after one that timed out is still warmed)."""
    return client.call("POST", "/v1/internal/cache/warm", CachedCopyInfo, json=body,
                       timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_SECONDS)),
                       on_timeout=f"the warm did not finish within --timeout {timeout_s:g} s; its agent may still "
                                  f"be copying (`hpcllm cache ls` shows the copy once it is there)")


def rank_blocks(degree: int, nodes: list[str]) -> dict[str, list[int]]:
    """Which ranks of a degree-`degree` instance each node runs: blocks of degree / len(nodes) in node order
    (srun --ntasks-per-node's block distribution); a degree the nodes cannot share evenly is refused."""
    if degree % len(nodes):
        raise CacheError(f"--tensor-parallel {degree} cannot be spread evenly over {len(nodes)} node(s) "
                         f"({', '.join(nodes)}): give a number of nodes that divides {degree}")
    per_node = degree // len(nodes)
    return {node: list(range(i * per_node, (i + 1) * per_node)) for i, node in enumerate(nodes)}


def warm_slices_through_agents(clients: list[NodeCache], model: str, origin: str,
                               ranks: dict[str, list[int]], timeout_s: float) -> None:
    """Each node's agent keeps the slices of the ranks it will run (hpcllm.tp.slicecache), one rank at a time."""
    degree = sum(len(r) for r in ranks.values())
    failures = []
    for client in clients:
        for rank in ranks[client.agent.node]:
            try:
                copy = _warm_call(client, {"model": model, "source": origin, "tier": "nvme",
                                           "tensor_parallel": degree, "rank": rank}, timeout_s)
                click.echo(f"{client.agent.node}: {model} rank {rank} of {degree}: {human_size(copy['bytes'])} of slices "
                           f"verified in {copy['path']}")
            except HpcllmError as exc:
                click.echo(f"{client.agent.node}: {model} rank {rank} of {degree}: failed", err=True)
                failures.append(str(exc))
    if failures:
        raise CacheError("; ".join(failures))


def warm_through_agents(clients: list[NodeCache], model: str, origin: str, tier: str, timeout_s: float) -> None:
    """Warm node by node through the agents (each reads the origin), each within `timeout_s`; a rich progress line
    per node."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    failures = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"),
                  TimeElapsedColumn(), transient=False) as progress:
        tasks = {c.agent.node: progress.add_task(f"{c.agent.node} {model} -> {tier}", total=1, state="warming")
                 for c in clients}
        for client in clients:
            task = tasks[client.agent.node]
            try:
                copy = _warm_call(client, {"model": model, "source": origin, "tier": tier}, timeout_s)
                progress.update(task, completed=1, state=f"{human_size(copy['bytes'])} verified")
            except HpcllmError as exc:
                progress.update(task, state="failed")
                failures.append(str(exc))
    if failures:
        raise CacheError("; ".join(failures))


@cache.command("ls")
@click.option("--node", "node_expr", default=None, help="Only these nodes (hostlist).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@config_option
@url_option
@agent_option
def ls(node_expr, as_json, config_path, controller_url, agent_urls) -> None:
    """List cached copies: node, model, tier, size, last use, verified."""
    import json

    config = load_config(config_path)
    rows, errors = [], []
    for client in _clients(config, Cluster(config, controller_url, agent_urls), node_expr):
        try:
            for copy in client.call("GET", "/v1/internal/cache", CacheList)["cached"]:
                rows.append({"node": client.agent.node, **copy})
        except HpcllmError as exc:  # unreachable, or an error answer: the other nodes are still listed
            errors.append(str(exc))
    if as_json:
        click.echo(json.dumps({"cached": rows, "errors": errors}, indent=1))
    elif rows or not errors:  # "no cached copies" is not known when a node did not answer
        _print_table(rows)
    if errors:  # the listing shows what could be asked; a node that did not list its copies still fails it
        raise CacheError("; ".join(errors))


def _print_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table("node", "model", "tier", "size", "last use", "verified", "in use")
    for r in rows:
        model = r["model"] if r.get("tensor_parallel") is None else \
            f"{r['model']} (slices: rank {r['rank']} of {r['tensor_parallel']})"
        table.add_row(r["node"], model, r["tier"], human_size(r["bytes"]),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_used"])),
                      "yes" if r["verified"] else "NO", str(r.get("in_use", 0)))
    table_console().print(table if rows else "no cached copies")




@cache.command("evict")
@click.argument("model")
@click.option("--node", "node_expr", default=None, help="Only these nodes (hostlist; default: all).")
@click.option("--tier", type=click.Choice(CACHE_TIERS), default=None, help="Only this tier (default: all).")
@config_option
@url_option
@agent_option
def evict(model, node_expr, tier, config_path, controller_url, agent_urls) -> None:
    """Remove MODEL's cached copies (copies in use by an instance are refused)."""
    check_model_name(model)
    config = load_config(config_path)
    removed, failures = 0, []
    for client in _clients(config, Cluster(config, controller_url, agent_urls), node_expr):
        try:
            gone = client.call("DELETE", f"/v1/internal/cache/{model}", CacheList, params={"tier": tier} if tier else None)
        except HpcllmError as exc:
            failures.append(str(exc))
            continue
        for copy in gone["cached"]:
            click.echo(f"{client.agent.node}: evicted {model} from {copy['tier']} ({human_size(copy['bytes'])})")
            removed += 1
    if failures:
        raise CacheError("; ".join(failures))
    if not removed:
        click.echo(f"{model} was not cached" + (f" on {node_expr}" if node_expr else ""))


@cache.command("verify")
@click.option("--node", "node_expr", default=None, help="Only these nodes (hostlist; default: all).")
@click.option("--model", default=None, help="Only this model.")
@config_option
@url_option
@agent_option
def verify(node_expr, model, config_path, controller_url, agent_urls) -> None:
    """Re-hash cached copies; corrupt ones are dropped and refilled from their origin. Exit 1 if any was corrupt, 4
    if one could not be checked (a slice copy whose origin cannot be read)."""
    if model is not None:
        check_model_name(model)
    config = load_config(config_path)
    checked, bad, unchecked, failures = 0, 0, 0, []
    for client in _clients(config, Cluster(config, controller_url, agent_urls), node_expr):
        try:
            results = client.call("POST", "/v1/internal/cache/verify", VerifyResults, json={"model": model})["results"]
        except UnknownModel:  # --model names a model this node does not hold: nothing to check there
            continue
        except HpcllmError as exc:
            failures.append(str(exc))
            continue
        for r in results:
            checked += 1
            unchecked += r["action"] == "unchecked"  # not ok, but not found corrupt either
            bad += not r["ok"] and r["action"] != "unchecked"
            click.echo(f"{client.agent.node}: {r['model']} {r['tier']}: {r['action']}"
                       + (f" ({r['message']})" if r["message"] else ""))
    if failures:
        raise CacheError("; ".join(failures))
    if not checked:  # say so: an empty output read as "all verified" for a model that was never cached
        what = f"{model} is not cached" if model else "no cached copies"
        click.echo(f"nothing to verify: {what}" + (f" on {node_expr}" if node_expr else ""))
    if bad:
        raise CorruptCopiesFound(f"{bad} corrupt cop{'y' if bad == 1 else 'ies'} found (see above)")
    if unchecked:
        raise CacheError(f"{unchecked} cop{'y' if unchecked == 1 else 'ies'} could not be checked (see above)")


# ------------------------------------------------------------------------------------------------ MPI warm job


def mpi_warm_spec(config: Config, model: str, source: Path, nodes: list[str], nvme_dir_template: str,
                  log_dir: Path):
    """The Slurm job: one MPI rank per node, srun --mpi=pmix, rank 0 reads the origin and broadcasts it. It gets of
    the submitter's environment what a node agent's job gets (Python, MPI and library settings; [slurm]
    export_variables), not the whole of it: no secret (HPCLLM_* keys, tokens) goes along into the job."""
    from hpcllm.slurm import make_job_spec
    from hpcllm.slurm.templates import AGENT_VARIABLES

    command = [sys.executable, "-m", "hpcllm.node.mpiwarm", "--source", str(source), "--model", model,
               "--tier", "nvme", "--nvme-dir-template", nvme_dir_template,
               "--nvme-capacity-gb", repr(config.node.nvme_capacity_gb), "--progress"]
    # --kill-on-bad-exit: a rank that dies outside Python's control (SIGKILL, OOM, segfault) must not leave the
    # others waiting in a collective until the time limit; Slurm then kills the whole step at once.
    script = (f"srun --mpi=pmix --kill-on-bad-exit=1 --nodes={len(nodes)} --ntasks={len(nodes)} --ntasks-per-node=1 "
              f"{shlex.join(command)}\n")
    stamp = f"{model}-{int(time.time() * 1000)}"
    return make_job_spec(name=f"hpcllm-warm-{model}"[:128], script=script, nodes=len(nodes), ntasks=len(nodes),
                         ntasks_per_node=1, nodelist=tuple(nodes), partition=config.slurm.partition,
                         account=config.slurm.account, qos=config.slurm.qos, time=config.slurm.time,
                         output=str(log_dir / f"hpcllm-warm-{stamp}.out"),
                         error=str(log_dir / f"hpcllm-warm-{stamp}.err"),
                         open_mode_append=False, inherit=AGENT_VARIABLES + tuple(config.slurm.export_variables))


def mpi_warm(config: Config, model: str, source: Path, nodes: list[str], nvme_dir_template: str,
             timeout_s: float, log_dir: Path | None = None, show_progress: bool = True) -> dict:
    """Submit the MPI warm job, follow its progress, wait for it; returns {copies, summary, job_id}. Its log goes to
    `log_dir`, by default the current folder (where sbatch puts slurm-%j.out, and where the admin looks): the job's
    first node writes it and this process reads the copies from it, so it must be a folder both see, which a
    node-local paths.state_dir (/var/tmp/hpcllm) is not."""
    from hpcllm.node.cache import open_origin
    from hpcllm.slurm import StatusWatcher, get_backend

    ckpt = open_origin(model, source)  # a clear error here beats a failed job
    log_dir = (log_dir or Path.cwd()).absolute()
    # Slurm cannot open an output file it may not write: the job would fail with no log, the command saying only
    # that it sees none.
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(log_dir, os.W_OK)
    except OSError as exc:
        raise CacheError(f"cannot make the MPI warm job's log folder {log_dir} ({exc.strerror}): give --log-dir a "
                         f"folder you can write that the nodes share") from None
    if not writable:
        raise CacheError(f"cannot write the MPI warm job's log to {log_dir}: give --log-dir a folder you can write "
                         f"that the nodes share")
    spec = mpi_warm_spec(config, model, source.resolve(), nodes, nvme_dir_template, log_dir)
    watcher = StatusWatcher(get_backend(config.slurm), min_interval=0.5, max_interval=2.0)
    try:
        job = watcher.submit(spec)
    except HpcllmError as exc:  # e.g. sbatch's "Invalid node name specified" names no node: say which we asked for
        raise CacheError(f"cannot submit the MPI warm job of {model!r} for node(s) {','.join(nodes)}: {exc}") \
            from None
    out, err = Path(spec.output), Path(spec.error)
    if show_progress:  # a caller without progress (bench/warm.py) keeps its own output
        click.echo(f"{model}: MPI warm job {job.job_id}, log: {out} (errors and progress: {err})")
    deadline = time.monotonic() + timeout_s
    try:
        status = _follow(job, err, ckpt.total_bytes, deadline, show_progress, f"{model} -> {len(nodes)} nodes")
    except BaseException:
        job.cancel(check=False)
        raise
    if not out.exists() and not err.exists():
        raise CacheError(f"MPI warm job {job.job_id} of {model!r} ended {status.state.value}, but its log {out} is not "
                         f"visible from this host (the job's first node writes it): give --log-dir a folder this "
                         f"host and the nodes share")
    stdout = out.read_text() if out.exists() else ""
    stderr = err.read_text() if err.exists() else ""
    errors = [line.removeprefix("error: ") for line in stderr.splitlines() if line.startswith("error: ")]
    if status.state.value != "COMPLETED" or (status.exit_code not in (0, None)) or errors:
        why = "; ".join(dict.fromkeys(errors)) or _tail(stderr) or f"job ended {status.state.value}"
        raise CacheError(f"MPI warm of {model!r} on {','.join(nodes)} (job {job.job_id}) failed: {why}; "
                         f"log: {err}")
    copies = []
    for line in stdout.splitlines():
        match = re.match(rf"^{RESULT_PREFIX} rank \d+ node (\S+) (verified|already-cached) (.+)$", line)
        if match:
            copies.append((match.group(1), match.group(3)))
    summary = next((line.removeprefix(f"{RESULT_PREFIX} ") for line in stdout.splitlines()
                    if line.startswith(f"{RESULT_PREFIX} ok ")), "")
    if len(copies) != len(nodes):
        raise CacheError(f"MPI warm job {job.job_id} reported {len(copies)} copies for {len(nodes)} nodes; log: {out}")
    return {"copies": copies, "summary": f"job {job.job_id}: {summary}", "job_id": job.job_id}


def _follow(job, err_path: Path, total: int, deadline: float, show_progress: bool, label: str):
    """Wait for the job, turning rank 0's progress lines into a progress bar. The watcher's wait rides out Slurm
    being unreachable for a while (a squeue timeout, slurmctld restarting): the job runs on, and is not cancelled
    for it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  disable=not show_progress) as progress:
        task = progress.add_task(f"{label} (queued)", total=total)

        def done(status) -> bool:  # asked after every poll (at most max_interval apart): the bar moves on
            if status.state.value == "RUNNING":
                progress.update(task, description=label, completed=_last_progress(err_path))
            return status.is_terminal

        try:
            status = job.wait_until(done, timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError as exc:
            raise CacheError(f"MPI warm job {job.job_id}: {exc}; cancelled it") from None
        progress.update(task, description=label)
        return status


def _last_progress(path: Path) -> int:
    """The bytes rank 0's last progress line says are done. Only whole lines count: the log is read while the job
    writes it, and its last line may be cut short."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0
    whole = text[:text.rfind("\n") + 1]
    lines = [line for line in whole.splitlines() if line.startswith(f"{RESULT_PREFIX} progress ")]
    return int(lines[-1].split()[2]) if lines else 0


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])
