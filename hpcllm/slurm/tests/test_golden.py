"""Rendered batch scripts against golden files (a failure shows a line diff).

Regenerate after an intended change with:  HPCLLM_UPDATE_GOLDEN=1 .venv/bin/pytest hpcllm/slurm -q
(and review `git diff hpcllm/slurm/tests/golden slurm/model-pool.sbatch`).
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.config import Config
from hpcllm.errors import ConfigError
from hpcllm.slurm.base import make_job_spec
from hpcllm.slurm.templates import (
    MODEL_POOL_SCRIPT,
    node_agent_job_spec,
    render_batch_script,
    render_model_pool,
    render_template,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("HPCLLM_UPDATE_GOLDEN") == "1"


def assert_matches_golden(rendered: str, golden: Path) -> None:
    if UPDATE:
        golden.write_text(rendered)
        return
    assert golden.exists(), f"{golden} is missing; create it with HPCLLM_UPDATE_GOLDEN=1"
    expected = golden.read_text()
    if rendered != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), rendered.splitlines(keepends=True),
                                            fromfile=f"{golden} (golden)", tofile="rendered"))
        pytest.fail(f"rendered script differs from {golden.name} (HPCLLM_UPDATE_GOLDEN=1 accepts it):\n{diff}",
                    pytrace=False)


def bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, f"bash -n rejects the script:\n{result.stderr}"


@pytest.fixture
def config(tmp_path) -> Config:
    return Config.model_validate({
        "paths": {"state_dir": "/srv/hpcllm"},
        "slurm": {"partition": "gpu", "account": "ml-lab", "time": "08:00:00", "gpus_per_node": 2,
                  "signal": "USR2", "signal_seconds": 120},
    })


def test_node_agent_job(config, monkeypatch):
    monkeypatch.setenv("HPCLLM_CONFIG", "/srv/hpcllm/hpcllm.toml")
    spec = node_agent_job_spec(config, nodes=2, hpcllm="/opt/hpcllm/.venv/bin/hpcllm",
                               agent_args=["--listen-host", "0.0.0.0"])
    assert spec.env == {"HPCLLM_CONFIG": "/srv/hpcllm/hpcllm.toml"}
    script = render_batch_script(spec)
    bash_syntax_ok(script)
    assert_matches_golden(script, GOLDEN / "node-agent.sbatch")


def test_node_agent_job_for_an_instance_spanning_nodes(config):
    """4 ranks over 2 nodes: one job of 2 nodes x 2 tasks x 2 GPUs per node, one agent on the first node under the
    batch shell (no srun for the agents: the agent starts the ranks as its own step)."""
    spec = node_agent_job_spec(config, nodes=2, tasks_per_node=2, gpus_per_node=2, spanning_instance=True,
                               hpcllm="/opt/hpcllm/.venv/bin/hpcllm")
    script = render_batch_script(spec)
    bash_syntax_ok(script)
    assert "\n/opt/hpcllm/.venv/bin/hpcllm node &\n" in script
    assert not [line for line in script.splitlines() if line.startswith(("srun", "    scancel"))]
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n#SBATCH --gres=gpu:2\n" in script
    assert_matches_golden(script, GOLDEN / "node-agent-spanning.sbatch")


def test_node_agent_job_with_term_signal_traps_it_once(config):
    config.slurm.signal = "SIGTERM"
    script = render_batch_script(node_agent_job_spec(config, hpcllm="hpcllm"))
    bash_syntax_ok(script)
    assert script.count("trap ") == 1 and "trap 'drain TERM' TERM" in script
    assert "#SBATCH --signal=B:TERM@120" in script


def test_single_node_agent_runs_without_srun(config):
    script = render_batch_script(node_agent_job_spec(config, nodes=1, hpcllm="hpcllm"))
    bash_syntax_ok(script)
    assert "srun --" not in script and "\nhpcllm node &\n" in script and 'kill -s "$1" "$agents_pid"' in script


def test_every_option(tmp_path):
    spec = make_job_spec(
        name="all-options", script="#!/bin/sh\necho hello\n", partition="gpu", account="acct", qos="high",
        time="1-02:03:04", nodes=3, ntasks=6, ntasks_per_node=2, cpus_per_task=4, gres="gpu:a100:2", mem="16G",
        nodelist=("n1", "n[2-3]"), exclude=("n9",), constraint="a100&ib", prefer="nvme", signal="SIGUSR1@90",
        requeue=True, output="/logs/%x-%j.out", error="/logs/%x-%j.err", chdir="/work", env={"A": "1"},
        comment="hpcllm:pool=llama",
    )
    script = render_batch_script(spec)
    assert script.startswith("#!/bin/sh\n")  # the body's own interpreter is kept
    assert_matches_golden(script, GOLDEN / "every-option.sbatch")


def test_minimal_job_says_no_requeue():
    script = render_batch_script(make_job_spec(name="m", script="sleep 1"))
    assert script.splitlines() == ["#!/bin/bash", "#SBATCH --job-name=m", "#SBATCH --nodes=1", "#SBATCH --no-requeue",
                                   "#SBATCH --open-mode=append", "#SBATCH --export=ALL", "sleep 1"]


def test_committed_model_pool_is_the_rendered_default():
    """slurm/model-pool.sbatch must be what its template renders (regenerate: HPCLLM_UPDATE_GOLDEN=1)."""
    script = render_model_pool()
    bash_syntax_ok(script)
    assert_matches_golden(script, MODEL_POOL_SCRIPT)
    assert os.access(MODEL_POOL_SCRIPT, os.X_OK), "slurm/model-pool.sbatch must be executable (it submits itself)"


def test_model_pool_custom_values():
    script = render_model_pool(model="llama-3-8b", gpus=4, time="12:00:00", nodes=2, partition="gpu",
                               signal="USR2", signal_seconds=300)
    bash_syntax_ok(script)
    assert_matches_golden(script, GOLDEN / "model-pool-custom.sbatch")


def test_model_pool_rejects_bad_settings():
    with pytest.raises(ConfigError, match="time"):
        render_model_pool(time="tomorrow")
    with pytest.raises(ConfigError, match="unknown model pool setting"):
        render_model_pool(gpu=2)


def run_model_pool(tmp_path: Path, script: Path, *args: str,
                   **env_vars: str | None) -> subprocess.CompletedProcess[str]:
    """The pool script run with stand-ins for sbatch and srun that print what they were asked, and no Slurm job
    around it unless env_vars sets one (None: a variable unset); each also says on stderr whether it got
    SLURM_EXPORT_ENV, Slurm's record of a job's --export (sbatch passes it on into a job it submits)."""
    for command in ("sbatch", "srun"):
        (tmp_path / command).write_text(f'#!/bin/bash\necho "{command} MODEL=$MODEL ARGS=$*"\n'
                                        f'echo "{command} SLURM_EXPORT_ENV=${{SLURM_EXPORT_ENV-unset}}" >&2\n')
        (tmp_path / command).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "HPCLLM_POOL_SUBMITTED"}
    settings = {"PATH": f"{tmp_path}:{env['PATH']}", "MODEL": "m1", "GPUS": "2", "TIME": "02:00:00", "NODES": "3",
                **env_vars}
    env.update({name: value for name, value in settings.items() if value is not None})
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=20)


# A shell inside another job: an salloc shell, or a workflow's batch script (or a Jupyter session's) running the pool
# script - Slurm's variables there are that job's.
ENCLOSING_JOBS = {"no job": {}, "salloc shell": {"SLURM_JOB_ID": "41", "SLURM_JOB_NODELIST": "n1"},
                  "another batch job": {"SLURM_JOB_ID": "41", "SLURM_JOB_NODELIST": "n1", "ENVIRONMENT": "BATCH"}}


@pytest.mark.parametrize("enclosing", ENCLOSING_JOBS)
def test_model_pool_submits_itself_with_the_settings(tmp_path, enclosing):
    """Run from a shell, also one inside another Slurm job, the pool script calls sbatch with GPUS/TIME/NODES and
    exports MODEL: a job of its own, not agents in that job (which would end with it)."""
    result = run_model_pool(tmp_path, MODEL_POOL_SCRIPT, "--partition=high", **ENCLOSING_JOBS[enclosing])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"sbatch MODEL=m1 ARGS=--export=ALL --gres=gpu:2 --time=02:00:00 --nodes=3 "
                                     f"--partition=high "
                                     f"{MODEL_POOL_SCRIPT}")
    if enclosing != "no job":
        assert "inside Slurm job 41: submitting the pool as a job of its own" in result.stderr


def test_model_pool_under_sbatch_export_none_exports_only_its_settings(tmp_path):
    """A site's SBATCH_EXPORT=NONE keeps the submitter's environment out of jobs (Slurm stores it): the pool's
    self-submission exports its settings that are set, by name, not the shell's tokens and keys."""
    result = run_model_pool(tmp_path, MODEL_POOL_SCRIPT, SBATCH_EXPORT="NONE", HF_TOKEN="hf_secret",
                            HPCLLM_CONFIG="/etc/hpcllm.toml", HPCLLM_NODE_TOKEN_FILE="/home/me/pool-token",
                            HPCLLM="/opt/hpcllm/bin/hpcllm", HPCLLM_NODE_TOKEN=None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"sbatch MODEL=m1 ARGS=--export=MODEL,HPCLLM,HPCLLM_CONFIG,HPCLLM_NODE_TOKEN_FILE,HPCLLM_POOL_SUBMITTED "
        f"--gres=gpu:2 --time=02:00:00 --nodes=3 {MODEL_POOL_SCRIPT}")


@pytest.mark.parametrize("own_step", ["Slurm's spool copy", "the job it submitted", "requeued"])
def test_model_pool_in_its_own_batch_step_runs_the_agents_and_never_submits_again(tmp_path, own_step):
    """Slurm runs a batch script from its spool copy (.../slurm_script); a job the script submitted itself carries
    HPCLLM_POOL_SUBMITTED (kept on requeue, as the rest of its environment): either runs the agents under srun."""
    spool_copy = tmp_path / "spool" / "job00042" / "slurm_script"
    spool_copy.parent.mkdir(parents=True)
    shutil.copy(MODEL_POOL_SCRIPT, spool_copy)
    step = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n2", "ENVIRONMENT": "BATCH"}
    script, marker = {"Slurm's spool copy": (spool_copy, {}),
                      "the job it submitted": (MODEL_POOL_SCRIPT, {"HPCLLM_POOL_SUBMITTED": "1"}),
                      "requeued": (spool_copy, {"HPCLLM_POOL_SUBMITTED": "1", "SLURM_RESTART_COUNT": "1"})}[own_step]
    result = run_model_pool(tmp_path, script, **step, **marker)
    assert result.returncode == 0, result.stderr
    assert "sbatch" not in result.stdout, result.stdout
    assert ("srun MODEL=m1 ARGS=--export=ALL --ntasks-per-node=1 --kill-on-bad-exit=0 hpcllm node --model m1"
            in result.stdout)


def test_model_pool_submitted_with_export_none_stops_naming_what_to_pass(tmp_path):
    """`sbatch --export=NONE slurm/model-pool.sbatch` (or under SBATCH_EXPORT=NONE): MODEL set in the submitting
    shell never reaches the job (Slurm gives it SLURM_EXPORT_ENV=NONE and no other variable of the submitter's),
    so the job stops at once saying what to pass instead of serving the default model."""
    spool_copy = tmp_path / "spool" / "job00042" / "slurm_script"
    spool_copy.parent.mkdir(parents=True)
    shutil.copy(MODEL_POOL_SCRIPT, spool_copy)
    result = run_model_pool(tmp_path, spool_copy, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="n2", ENVIRONMENT="BATCH",
                            SLURM_EXPORT_ENV="NONE", MODEL=None, GPUS=None, TIME=None, NODES=None)
    assert result.returncode != 0 and "srun" not in result.stdout, result.stdout
    assert "submitted with --export=NONE" in result.stderr and "--export=ALL" in result.stderr, result.stderr
    assert "unset SLURM_EXPORT_ENV" in result.stderr, result.stderr


def test_model_pool_run_inside_a_job_submitted_with_export_none_submits_a_job_that_serves(tmp_path):
    """A workflow's batch script or an Open OnDemand/Jupyter session, itself submitted with --export=NONE, has
    SLURM_EXPORT_ENV=NONE, which sbatch passes on: the pool's job would take itself for one submitted with
    --export=NONE and refuse. The script submits without it."""
    enclosing = {"SLURM_JOB_ID": "41", "SLURM_JOB_NODELIST": "n1", "ENVIRONMENT": "BATCH", "SLURM_EXPORT_ENV": "NONE"}
    result = run_model_pool(tmp_path, MODEL_POOL_SCRIPT, **enclosing)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sbatch MODEL=m1 ARGS="), result.stdout
    assert "sbatch SLURM_EXPORT_ENV=unset" in result.stderr, result.stderr


def test_model_pool_job_with_export_none_but_given_model_serves_it(tmp_path):
    """`MODEL=m1 sbatch slurm/model-pool.sbatch` from inside a job submitted with --export=NONE: the pool's job
    has MODEL, and SLURM_EXPORT_ENV=NONE only from the enclosing job: it serves MODEL."""
    spool_copy = tmp_path / "spool" / "job00042" / "slurm_script"
    spool_copy.parent.mkdir(parents=True)
    shutil.copy(MODEL_POOL_SCRIPT, spool_copy)
    result = run_model_pool(tmp_path, spool_copy, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="n2", ENVIRONMENT="BATCH",
                            SLURM_EXPORT_ENV="NONE")
    assert result.returncode == 0, result.stderr
    assert "srun MODEL=m1 ARGS=--export=ALL --ntasks-per-node=1 --kill-on-bad-exit=0 hpcllm node --model m1" in (
        result.stdout)


def test_model_pool_copy_rendered_with_its_model_serves_it_also_submitted_with_export_none(tmp_path):
    """`hpcllm slurm render model-pool --model llama-3-8b -o FILE; sbatch FILE` at a site with SBATCH_EXPORT=NONE:
    the job has SLURM_EXPORT_ENV=NONE and no MODEL, but the copy carries its model: it serves that one."""
    spool_copy = tmp_path / "spool" / "job00042" / "slurm_script"
    spool_copy.parent.mkdir(parents=True)
    spool_copy.write_text(render_model_pool(model="llama-3-8b"))
    result = run_model_pool(tmp_path, spool_copy, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="n2", ENVIRONMENT="BATCH",
                            SLURM_EXPORT_ENV="NONE", MODEL=None, GPUS=None, TIME=None, NODES=None)
    assert result.returncode == 0, result.stderr
    assert ("ARGS=--export=ALL --ntasks-per-node=1 --kill-on-bad-exit=0 hpcllm node --model llama-3-8b"
            in result.stdout), result.stdout


def test_missing_template_variable_is_named():
    with pytest.raises(ConfigError, match="signal"):
        render_template("node-agent", {"hpcllm": "hpcllm", "agent_args": []})


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: .*node-agent"):
        render_template("no-such-template", {})


def test_a_changed_script_fails_with_a_line_diff(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "UPDATE", False)
    golden = tmp_path / "x.sbatch"
    golden.write_text("#!/bin/bash\n#SBATCH --nodes=1\necho hi\n")
    with pytest.raises(pytest.fail.Exception) as failure:
        assert_matches_golden("#!/bin/bash\n#SBATCH --nodes=2\necho hi\n", golden)
    assert "-#SBATCH --nodes=1\n+#SBATCH --nodes=2" in str(failure.value)


@pytest.mark.parametrize("setting", ["KILL", "9", "SIGSTOP"])
def test_node_agent_job_refuses_a_drain_signal_no_process_can_catch(config, setting):
    """The agents would be killed at the signal instead of draining (and `trap ... KILL` does nothing)."""
    config.slurm.signal = setting
    with pytest.raises(ConfigError, match=r"slurm.signal = .* no process can catch"):
        node_agent_job_spec(config, hpcllm="hpcllm")


def test_node_agent_job_with_a_drain_signal_by_number_traps_it_by_name(config):
    config.slurm.signal = "10"
    script = render_batch_script(node_agent_job_spec(config, hpcllm="hpcllm"))
    bash_syntax_ok(script)
    assert "trap 'drain USR1' USR1" in script and "#SBATCH --signal=B:USR1@" in script
