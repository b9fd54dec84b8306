"""Batch scripts: `#SBATCH` headers from a JobSpec, bodies from templates in slurm/templates/.

A script is the header (one `#SBATCH` line per JobSpec field that is set, in a fixed order) followed by the body:
either JobSpec.script or a Jinja2 template rendered with StrictUndefined, so a missing variable is an error that
names it instead of an empty string in a shell script. The `sh` filter quotes a value for the shell.

Templates live in slurm/templates/ of the source tree (HPCLLM_SLURM_TEMPLATES overrides the folder):
- node-agent.sbatch.in: the allocation job that runs one `hpcllm node` per node for the job's life;
- model-pool.sbatch.in: the user-facing slurm/model-pool.sbatch (rendered with defaults and committed).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import jinja2

from hpcllm.config import CONFIG_ENV, MODEL_NAME_PATTERN, Config
from hpcllm.errors import ConfigError
from hpcllm.slurm.base import JobSpec, catchable_signal, make_job_spec

TEMPLATES_ENV = "HPCLLM_SLURM_TEMPLATES"
REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_SUFFIX = ".sbatch.in"
NODE_AGENT_TEMPLATE = "node-agent"
MODEL_POOL_TEMPLATE = "model-pool"
# The committed, ready-to-submit model pool script (the model-pool template rendered with its defaults).
MODEL_POOL_SCRIPT = REPO_ROOT / "slurm" / "model-pool.sbatch"

MODEL_POOL_DEFAULTS: dict[str, Any] = {
    "model": "tiny-llama",
    "gpus": 1,
    "time": "04:00:00",
    "nodes": 1,
    "job_name": "hpcllm-pool",
    "signal": "USR1",
    "signal_seconds": 60,
    "partition": None,
    "output": "hpcllm-pool-%j.out",
}


def templates_dir() -> Path:
    override = os.environ.get(TEMPLATES_ENV)
    return Path(override) if override else REPO_ROOT / "slurm" / "templates"


def _environment() -> jinja2.Environment:
    directory = templates_dir()
    if not directory.is_dir():
        raise ConfigError(f"the sbatch templates folder {directory} does not exist; run hpcllm from its source "
                          f"checkout or point {TEMPLATES_ENV} at a copy of slurm/templates")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    return env


def available_templates() -> list[str]:
    directory = templates_dir()
    return sorted(p.name.removesuffix(TEMPLATE_SUFFIX) for p in directory.glob(f"*{TEMPLATE_SUFFIX}"))


def render_template(name: str, variables: dict[str, Any]) -> str:
    """Render slurm/templates/<name>.sbatch.in; every variable it uses must be given."""
    env = _environment()
    try:
        template = env.get_template(f"{name}{TEMPLATE_SUFFIX}")
    except jinja2.TemplateNotFound:
        raise ConfigError(f"no sbatch template {name!r} in {templates_dir()} "
                          f"(known: {', '.join(available_templates()) or 'none'})") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"sbatch template {name!r} line {exc.lineno}: {exc.message}") from None
    try:
        return template.render(**variables)
    except jinja2.UndefinedError as exc:
        raise ConfigError(f"sbatch template {name!r} needs a variable that was not given: {exc.message}") from None


def script_body(spec: JobSpec) -> str:
    if spec.script is not None:
        return spec.script
    return render_template(spec.template, spec.template_vars)


def sbatch_directives(spec: JobSpec) -> list[str]:
    """The `#SBATCH` option values for a JobSpec, in a fixed order (golden files depend on it)."""
    options: list[str] = [f"--job-name={spec.name}"]
    optional = [
        ("partition", spec.partition),
        ("account", spec.account),
        ("qos", spec.qos),
        ("time", spec.time),
    ]
    options += [f"--{flag}={value}" for flag, value in optional if value is not None]
    options.append(f"--nodes={spec.nodes}")
    optional = [
        ("ntasks", spec.ntasks),
        ("ntasks-per-node", spec.ntasks_per_node),
        ("cpus-per-task", spec.cpus_per_task),
        ("gres", spec.gres_request),
        ("mem", spec.mem),
        ("nodelist", ",".join(spec.nodelist) or None),
        ("exclude", ",".join(spec.exclude) or None),
        ("constraint", spec.constraint),
        ("prefer", spec.prefer),
        ("signal", spec.batch_signal),
    ]
    options += [f"--{flag}={value}" for flag, value in optional if value is not None]
    options.append("--requeue" if spec.requeue else "--no-requeue")
    optional = [("output", spec.output), ("error", spec.error), ("chdir", spec.chdir), ("comment", spec.comment)]
    options += [f"--{flag}={value}" for flag, value in optional if value is not None]
    if spec.open_mode_append:
        options.append("--open-mode=append")
    # The submitter's environment (plus JobSpec.env, passed to sbatch) reaches the job.
    options.append("--export=ALL")
    return options


def render_batch_script(spec: JobSpec) -> str:
    """The complete batch script sbatch receives: shebang, `#SBATCH` header, body."""
    body = script_body(spec)
    shebang = "#!/bin/bash"
    if body.startswith("#!"):
        shebang, _, body = body.partition("\n")
    header = "\n".join(f"#SBATCH {option}" for option in sbatch_directives(spec))
    if not body.endswith("\n"):
        body += "\n"
    return f"{shebang}\n{header}\n{body}"


def ensure_log_dirs(spec: JobSpec) -> None:
    """Create the folders of the job's output/error files: Slurm does not, and a job whose log folder is missing
    fails before its first line runs, with nothing written anywhere."""
    base = Path(spec.chdir) if spec.chdir else Path.cwd()
    for path in (spec.output, spec.error):
        if not path:
            continue
        folder = (base / path).parent
        if "%" in str(folder):  # a per-job folder pattern: only Slurm knows its name
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the folder {folder} for the job's log {path}: {exc.strerror}; "
                              f"choose another output path") from None


# ------------------------------------------------------------------------------------------------ job kinds


def hpcllm_command() -> str:
    """Path of the `hpcllm` command of this installation (beside the running Python), else plain `hpcllm`."""
    beside_python = Path(sys.executable).parent / "hpcllm"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hpcllm") or "hpcllm"


# What a node agent's job takes from its submitter's environment (the controller's, or the shell of whoever renders
# the job): where programs, libraries and Python packages are, the locale and time zone, the home and scratch
# folders, environment modules, hpcllm's config and read tuning (hpcllm.store.tuning.TUNING_ENV). Nothing else - the
# cluster secret, SLURM_JWT, the controller's or gateway's own settings and credentials - reaches the jobs (Slurm
# logs and may store a job's environment); [slurm] export_variables adds what a site's nodes need.
AGENT_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR",
                   "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "CUDA_HOME",
                   "CUDA_PATH", "MODULEPATH", "MODULESHOME", "LOADEDMODULES", "_LMFILES_", CONFIG_ENV,
                   "HPCLLM_READ_TUNING", TEMPLATES_ENV) + (
    # The settings of the libraries the agent's workers run (threads, collectives, MPI, the engines, offline model
    # files) - a site that tunes them where the service starts expects its jobs to run with them. Not HF_TOKEN.
    "OMP_*", "KMP_*", "MKL_*", "OPENBLAS_*", "NCCL_*", "OMPI_*", "PMIX_*", "UCX_*", "VLLM_*", "TORCH_*",
    "PYTORCH_*", "TOKENIZERS_*", "TRANSFORMERS_*", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")


def node_agent_job_spec(
    config: Config,
    *,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    tasks_per_node: int = 1,
    spanning_instance: bool = False,
    time: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    name: str = "hpcllm-node",
    agent_args: tuple[str, ...] | list[str] = (),
    output: str | None = None,
    hpcllm: str | None = None,
    env: dict[str, str] | None = None,
) -> JobSpec:
    """The allocation job that runs one `hpcllm node` per node (trap the configured signal and SIGTERM to drain;
    requeue; append to one log). Unset arguments come from config.slurm.

    spanning_instance: the job holds one tensor-parallel instance whose ranks span its nodes (tasks_per_node ranks
    on each): one agent, on the job's first node, under the batch shell; it starts the ranks on every node with
    `srun --mpi=pmix` (docs/tensor-parallel.md, "Ranks across nodes")."""
    slurm = config.slurm
    job_env = dict(env or {})
    if os.environ.get(CONFIG_ENV) and CONFIG_ENV not in job_env:
        job_env[CONFIG_ENV] = os.environ[CONFIG_ENV]
    signal = catchable_signal(slurm.signal).name.removeprefix("SIG")  # a name: the script traps it
    return make_job_spec(
        name=name,
        template=NODE_AGENT_TEMPLATE,
        template_vars={
            "hpcllm": hpcllm or hpcllm_command(),
            "agent_args": list(agent_args),
            "signal": signal,
            "nodes": nodes,
            "agents_per_node": not spanning_instance,
        },
        partition=partition or slurm.partition,
        account=account or slurm.account,
        qos=qos or slurm.qos,
        time=time or slurm.time,
        nodes=nodes,
        ntasks_per_node=tasks_per_node,
        gpus_per_node=slurm.gpus_per_node if gpus_per_node is None else gpus_per_node,
        signal=f"{signal}@{slurm.signal_seconds}" if slurm.signal_seconds else None,
        requeue=True,
        output=output or str(config.paths.state_dir / "slurm" / "%x-%j.out"),
        open_mode_append=True,
        env=job_env,
        inherit=AGENT_VARIABLES + tuple(slurm.export_variables),
    )


def render_model_pool(**overrides: Any) -> str:
    """slurm/model-pool.sbatch with other defaults (model, gpus, time, nodes, partition, ...)."""
    unknown = set(overrides) - set(MODEL_POOL_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown model pool setting(s): {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(MODEL_POOL_DEFAULTS)})")
    variables = {**MODEL_POOL_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    # The name is written into the script (a comment, MODEL=...): only a deployable name, never a line of shell.
    if not re.fullmatch(MODEL_NAME_PATTERN, str(variables["model"])):
        raise ConfigError(f"model {variables['model']!r} is not a model name (a letter or digit, then letters, "
                          f"digits, '.', '_' or '-'; at most 128 characters): the name it was deployed under")
    spec_check = make_job_spec(name=variables["job_name"], script="true", time=str(variables["time"]),
                               gpus_per_node=int(variables["gpus"]), nodes=int(variables["nodes"]),
                               partition=variables["partition"], output=variables["output"],
                               signal=f"{variables['signal']}@{variables['signal_seconds']}")
    variables["signal"] = spec_check.signal_name
    # Only a script with the stock default refuses a job that MODEL did not reach (--export=NONE): a copy rendered
    # with a model of its own carries what to serve.
    variables["model_is_stock"] = variables["model"] == MODEL_POOL_DEFAULTS["model"]
    return render_template(MODEL_POOL_TEMPLATE, variables)
