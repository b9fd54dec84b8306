"""`hpcllm dev`: build small real test models offline."""

from __future__ import annotations

from pathlib import Path

import click

from hpcllm.devmodels.builder import ARCHITECTURES, DTYPES, FORMATS, MAX_SHARDS, SIZES, make_model
from hpcllm.devmodels.tokenizer import CHAT_TEMPLATES


@click.group()
def dev() -> None:
    """Developer tools: offline test models."""


@dev.command("make-model", short_help="Build a test model (seeded weights + tokenizer) in OUT_DIR.")
@click.argument("arch", type=click.Choice(ARCHITECTURES))
@click.argument("out_dir", type=click.Path(file_okay=True, dir_okay=True, path_type=Path))
@click.option("--size", type=click.Choice(SIZES), default="tiny", show_default=True,
              help="tiny (~1 MB), small (tens of MB) or bench (~1B parameters, ~2 GB in bf16).")
@click.option("--shards", type=click.IntRange(1, MAX_SHARDS), default=1, show_default=True,
              help="Number of weight files; more than one adds an index file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Weight dtype [default: float32, bfloat16 for --size bench].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="safetensors", show_default=True,
              help="safetensors, or legacy torch pytorch_model*.bin files.")
@click.option("--chat-template", type=click.Choice(list(CHAT_TEMPLATES)), default="plain", show_default=True,
              help="plain; hermes-tools: OpenAI tools rendered in the Hermes/Qwen2.5 tool-call format; "
                   "qwen3-think: hermes-tools with Qwen3's <think> blocks and enable_thinking.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT_DIR if it is an earlier build or an empty folder.")
def make_model_command(arch: str, out_dir: Path, size: str, shards: int, seed: int, dtype: str | None, fmt: str,
                       chat_template: str, overwrite: bool) -> None:
    """Build a Hugging Face checkpoint of architecture ARCH (seeded weights + tokenizer) in OUT_DIR."""
    path = make_model(arch, out_dir, size=size, shards=shards, seed=seed, dtype=dtype, overwrite=overwrite, fmt=fmt,
                      chat_template=chat_template)
    click.echo(str(path))


@dev.command("list-archs")
def list_archs() -> None:
    """Print the architectures make-model can build, one per line."""
    for arch in ARCHITECTURES:
        click.echo(arch)
