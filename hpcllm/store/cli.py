"""`hpcllm store`: load a converted checkpoint once and print the load stats; manage the DRAM tier by hand.

    hpcllm store load CKPT [--device cuda:0] [--tier disk] [--no-verify] [--prompt TEXT]
    hpcllm store dram put CKPT [--id NAME] [--namespace NS] | list | rm NAME
"""

from __future__ import annotations

import json

import click

from hpcllm.present import human_size


@click.group()
def store() -> None:
    """Tiered checkpoint store and loader."""


@store.command("load")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N")
@click.option("--tier", type=click.Choice(["dram", "disk", "sharedfs"]), default=None,
              help="storage tier settings (default: from the filesystem type)")
@click.option("--verify/--no-verify", default=None, help="check chunk checksums (default: the tier's setting)")
@click.option("--prompt", default=None, help="also greedily generate 16 tokens from this prompt")
def load(checkpoint: str, device: str, tier: str | None, verify: bool | None, prompt: str | None) -> None:
    """Load CHECKPOINT into a ready model and print the load stats as JSON."""
    from hpcllm.store.loader import load_model

    loaded = load_model(checkpoint, device=device, tier=tier, verify=verify, tokenizer=prompt is not None)
    out = loaded.stats.as_dict()
    if prompt is not None:
        if loaded.tokenizer is None:
            raise click.UsageError(f"{checkpoint} has no tokenizer files: --prompt needs one")
        import torch

        inputs = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.model.device)
        with torch.no_grad():
            generated = loaded.model.generate(**inputs, max_new_tokens=16, do_sample=False)
        out["generated"] = loaded.tokenizer.decode(generated[0][inputs["input_ids"].shape[1]:])
    click.echo(json.dumps(out, indent=1))


@store.group()
def dram() -> None:
    """Checkpoints held in shared memory (/dev/shm), shared by every process on the node."""


_namespace = click.option("--namespace", default="default", show_default=True, help="DRAM tier namespace")


@dram.command("put")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--id", "model_id", default=None, help="model id (default: the folder name)")
@_namespace
def dram_put(checkpoint: str, model_id: str | None, namespace: str) -> None:
    """Copy CHECKPOINT into the DRAM tier, verifying every chunk."""
    from hpcllm.store.dram import DramTier

    entry = DramTier(namespace).put(checkpoint, model_id)
    click.echo(f"{entry.model_id}: {human_size(entry.bytes)} at {entry.path} ({entry.fill_seconds:.2f} s)")


@dram.command("list")
@_namespace
def dram_list(namespace: str) -> None:
    """List the models in the DRAM tier."""
    from hpcllm.store.dram import DramTier

    tier = DramTier(namespace)
    for entry in tier.list():
        click.echo(f"{entry.model_id}\t{human_size(entry.bytes)}\t{entry.path}")
    click.echo(f"total {tier.usage_bytes() / 1e9:.2f} GB in {tier.dir}")


@dram.command("rm")
@click.argument("model_id")
@_namespace
def dram_rm(model_id: str, namespace: str) -> None:
    """Remove MODEL_ID from the DRAM tier (processes that map it keep working)."""
    from hpcllm.store.dram import DramTier, DramTierError

    if not DramTier(namespace).remove(model_id):
        raise DramTierError(f"model {model_id!r} is not in the DRAM tier (namespace {namespace!r})")
    click.echo(f"removed {model_id}")
