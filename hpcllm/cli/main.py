"""The `hpcllm` command.

Sub-commands are imported lazily so `hpcllm --help` and light commands do not pay for importing torch and
transformers (about 2.5 s here). To add a command, add one line to LAZY_COMMANDS: name -> "module:attribute".
"""

from __future__ import annotations

import importlib
import sys

import click

from hpcllm.errors import HpcllmError

LAZY_COMMANDS: dict[str, str] = {
    "controller": "hpcllm.controller.cli:controller",
    "deploy": "hpcllm.controller.cli:deploy",
    "undeploy": "hpcllm.controller.cli:undeploy",
    "status": "hpcllm.controller.cli:status",
    "pool": "hpcllm.controller.cli:pool",
    "dev": "hpcllm.devmodels.cli:dev",
    "convert": "hpcllm.checkpoint.cli:convert",
    "checkpoint": "hpcllm.checkpoint.cli:checkpoint",
    "worker": "hpcllm.cli.worker:worker",
    "tp": "hpcllm.tp.cli:tp",
    "gateway": "hpcllm.gateway.cli:gateway",
    "usage": "hpcllm.gateway.cli:usage",
    "batch": "hpcllm.gateway.batches.cli:batch",
    "slurm": "hpcllm.slurm.cli:slurm",
    "cache": "hpcllm.node.cache_cli:cache",
    "node": "hpcllm.node.cli:node",
    "store": "hpcllm.store.cli:store",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module_name, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcllm")
def cli() -> None:
    """hpcllm: serve LLMs on a Slurm cluster behind one OpenAI-compatible URL."""


def click_error_line(exc: click.ClickException) -> str:
    """click's error as one line, like the CLI's other errors (click prints 'Usage:' and 'Error:' lines); a usage
    error says where the command's help is."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message = f"{message.rstrip('.')} (see '{ctx.command_path} --help')"
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one clear line on stderr and a non-zero exit code."""
    try:
        cli.main(args=argv, prog_name="hpcllm", standalone_mode=False)
    except HpcllmError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {click_error_line(exc)}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
