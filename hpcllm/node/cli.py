"""`hpcllm node`: the per-node agent daemon, normally started by a Slurm job (slurm/templates/node-agent.sbatch.in,
slurm/model-pool.sbatch). It finds the controller at --controller-url, else node.controller_url, else
$HPCLLM_CONTROLLER_URL, else http://controller.host:controller.port; the config comes from --config or
$HPCLLM_CONFIG. It drains on the configured signal (slurm.signal, default USR1) and on SIGTERM, then exits 0.
It authenticates with a node token when it has one ($HPCLLM_NODE_TOKEN: the controller's allocations; or the file
$HPCLLM_NODE_TOKEN_FILE names: a group's pool token) and then never uses cluster.shared_secret; without one, with the
cluster secret (an agent the operator runs by hand). docs/security.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from hpcllm.config import CONFIG_ENV, check_service_credentials, load_config, private_state_dir
from hpcllm.controller.protocol import MODEL_NAME_PATTERN
from hpcllm.logs import setup_service_logging


def _model_name(ctx, param, value: str | None) -> str | None:
    if value is not None and not re.fullmatch(MODEL_NAME_PATTERN, value):
        raise click.BadParameter(f"{value!r} is not a model name (letters, digits, '.', '_', '-'; the name it was "
                                 f"deployed under)")
    return value


@click.command("node")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help=f"hpcllm TOML config (default: ${CONFIG_ENV}, else built-in defaults).")
@click.option("--model", "model", default=None, callback=_model_name,
              help="Keep one instance of this deployed model running on this node (a model pool).")
@click.option("--controller-url", default=None, help="Controller to register with (see above for the default).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port of the agent API (default: node.port; 0 picks a free one).")
def node(config_path: Path | None, model: str | None, controller_url: str | None, port: int | None) -> None:
    """Run this node's agent: measure tiers, register, serve instances and cache until drained."""
    setup_service_logging()
    import os

    from hpcllm.credentials import CredentialError, read_token_from_environment
    from hpcllm.errors import ConfigError
    from hpcllm.node.agent import NodeAgent
    from hpcllm.node.app import create_app

    config = load_config(config_path, private=True)
    try:
        token = read_token_from_environment(os.environ)
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None
    if token is None:  # a token holder never uses (nor needs) the cluster secret
        check_service_credentials(config, "node")
    private_state_dir(config)
    if port is not None:
        config.node.port = port
    path = config_path or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    agent = NodeAgent(config, config_path=path, controller_url=controller_url, pinned_model=model, token=token)
    sys.exit(agent.run(create_app))
