"""`hpcllm convert` and `hpcllm checkpoint inspect|verify|add-slice-hashes`.

Errors are CheckpointError (an HpcllmError): hpcllm.cli.main prints them as one "error: ..." line. torch and
transformers are imported only inside `convert`, so `hpcllm checkpoint inspect` stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hpcllm.checkpoint.errors import CheckpointError
from hpcllm.checkpoint.layout import (CONVERT_TARGET_DTYPES, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, SLICE_HASHES_FILE,
                                      read_checkpoint)
from hpcllm.present import human_size


@click.command("convert")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--partitions", type=click.IntRange(min=1), default=None,
              help="Number of data files (read in parallel by the loader). Default: one per GiB, 1 to 8.")
@click.option("--dtype", type=click.Choice(CONVERT_TARGET_DTYPES), default=None,
              help="Cast floating tensors to this dtype (recorded in the copied config.json). Default: keep.")
@click.option("--chunk-size-mib", type=click.IntRange(min=1, max=MAX_CHUNK_SIZE >> 20),
              default=DEFAULT_CHUNK_SIZE >> 20, show_default=True,
              help="Checksum chunk size in MiB (the loader verifies each chunk as it reads).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT_DIR if it is a converted checkpoint or an empty folder (once the new one is complete).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal, large models).")
@click.option("--classifier-from-token", "score_tokens", multiple=True, metavar="TOKEN",
              help="Make a causal LM that answers with a token a one-label cross-encoder, as vLLM's hf_overrides "
                   "classifier_from_token do: given twice (no, then yes: Qwen3-Reranker's `no` and `yes`), the "
                   "score head is lm_head[yes] - lm_head[no]; once, that token's row.")
@click.option("--score-template", type=click.Path(path_type=Path), default=None,
              help="A cross-encoder's score template (vLLM's --chat-template for scores: a jinja file rendering "
                   "the messages of roles query and document), stored in the checkpoint for the gateway.")
def convert(hf_dir: Path, out_dir: Path, partitions: int | None, dtype: str | None, chunk_size_mib: int,
            overwrite: bool, progress: bool | None, score_tokens: tuple[str, ...], score_template: Path | None) -> None:
    """Convert the Hugging Face model folder HF_DIR into the loading-optimized format in OUT_DIR.

    The tensors are stored as transformers' from_pretrained builds them (its renames and weight conversions
    applied). Quantized checkpoints, GGUF files and models that need remote code are refused.
    """
    from hpcllm.checkpoint.converter import convert as run_convert

    ckpt = run_convert(hf_dir, out_dir, partitions=partitions, dtype=dtype, chunk_size=chunk_size_mib << 20,
                       overwrite=overwrite, progress=progress, score_tokens=score_tokens,
                       score_template=score_template)
    click.echo(f"converted {hf_dir} -> {ckpt.root}: {len(ckpt.tensors)} tensors, {len(ckpt.aliases)} aliases, "
               f"{human_size(ckpt.total_bytes)} in {len(ckpt.partitions)} partition(s)")


@click.group("checkpoint")
def checkpoint() -> None:
    """Inspect and verify converted checkpoints."""


@checkpoint.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the tensors and aliases as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Validate PATH's manifest and index (no data read) and summarize it. Per-rank tensor-parallel reads:
    `hpcllm tp plan PATH --degree N`."""
    ckpt = read_checkpoint(path)
    if as_json:
        click.echo(json.dumps({
            "format_version": ckpt.format_version,
            "model": ckpt.model,
            "partitions": [{"file": p.file, "size": p.size, "chunks": p.num_chunks} for p in ckpt.partitions],
            "tensors": {name: entry.to_json() for name, entry in ckpt.tensors.items()},
            "aliases": ckpt.aliases,
        }, indent=1))
        return
    model = ckpt.model
    click.echo(f"{ckpt.root}: hpcllm checkpoint format {ckpt.format_version}, model_type "
               f"{model.get('model_type')}, dtype {model.get('dtype')}")
    click.echo(f"  {len(ckpt.tensors)} tensors, {len(ckpt.aliases)} aliases, {human_size(ckpt.total_bytes)}")
    for p in ckpt.partitions:
        count = sum(1 for e in ckpt.tensors.values() if e.partition == p.index)
        click.echo(f"  {p.file}: {human_size(p.size)}, {count} tensors, {p.num_chunks} chunk(s) of "
                   f"{human_size(p.chunk_size)}")
    for alias, target in sorted(ckpt.aliases.items()):
        click.echo(f"  alias {alias} -> {target}")


@checkpoint.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def verify(path: Path) -> None:
    """Read every file of PATH and check all checksums."""
    ckpt = read_checkpoint(path)
    ckpt.verify_files()
    chunks = sum(p.num_chunks for p in ckpt.partitions)
    slice_hashes = f" and {SLICE_HASHES_FILE}" if SLICE_HASHES_FILE in ckpt.metadata_files else ""
    click.echo(f"{ckpt.root}: ok ({chunks} chunk(s) in {len(ckpt.partitions)} data file(s), "
               f"{len(ckpt.side_files)} side file(s){slice_hashes} match their checksums)")


@checkpoint.command("add-slice-hashes")
@click.argument("path", type=click.Path(path_type=Path))
def add_slice_hashes(path: Path) -> None:
    """Verify PATH and add the strip hashes tensor-parallel ranks verify their slices with (checkpoints converted
    before hpcllm wrote them; new conversions have them)."""
    from hpcllm.checkpoint.slicehashes import write_slice_hashes

    try:
        written = write_slice_hashes(path)
    except OSError as exc:  # verified and hashed already (read errors are CheckpointErrors): a read-only or full FS
        raise CheckpointError(f"{path}: cannot write {SLICE_HASHES_FILE} there ({exc.strerror or exc})") from None
    click.echo(f"{written}: strip hashes of every tensor written and listed in the manifest")
