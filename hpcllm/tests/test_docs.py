"""The docs name what operators see: every Prometheus metric the gateway, a worker and the controller export is
described in docs/ (by its name, or a counter's `_total` sample name), so a dashboard's builder finds what it
means and a metric added without a word fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def exported_metrics(name: str, tmp_path: Path) -> list[str]:
    """The metric families one component registers (the gateway's batch gauges, read at scrape, included)."""
    if name == "gateway":
        from hpcllm.gateway.batches.metrics import BatchGauges
        from hpcllm.gateway.batches.store import BatchStore
        from hpcllm.gateway.files.store import FileStore
        from hpcllm.gateway.metrics import GatewayMetrics
        from hpcllm.gateway.shared_state import SharedState

        shared = SharedState(tmp_path / "limits.db")
        try:
            files = FileStore(shared, tmp_path / "files", max_bytes=1)
            gauges = [f.name for f in BatchGauges(files, BatchStore(files, lease_s=60)).collect()]
            assert gauges, "the batch gauges read nothing from the limits database"
            return [f.name for f in GatewayMetrics().registry.collect()] + gauges
        finally:
            shared.close()
    if name == "worker":
        from hpcllm.worker.metrics import WorkerMetrics

        return [f.name for f in WorkerMetrics("m").registry.collect()]
    from hpcllm.controller.app import Metrics

    return [f.name for f in Metrics().registry.collect()]


@pytest.mark.parametrize("component", ["gateway", "worker", "controller"])
def test_every_exported_metric_is_described_in_the_docs(component, tmp_path):
    text = "\n".join(path.read_text() for path in sorted(DOCS.glob("*.md")))
    names = exported_metrics(component, tmp_path)
    assert names
    missing = [n for n in names if n not in text]
    assert not missing, f"{component} metrics no docs/*.md describes: {missing}"


def test_every_config_key_is_named_in_the_docs_or_the_example_configs():
    """Each key of every config section appears in docs/*.md or conf/ (its meaning and default live in
    hpcllm/config.py's comments; the docs say where it acts), so an operator reading the docs finds every knob."""
    from pydantic import BaseModel

    from hpcllm.config import Config

    root = DOCS.parent
    text = "\n".join(path.read_text() for path in [*sorted(DOCS.glob("*.md")), *sorted(root.glob("conf/**/*.toml"))])
    keys = [f"{section}.{key}" for section, field in Config.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            for key in field.annotation.model_fields]
    assert len(keys) > 100
    missing = [key for key in keys if key.split(".")[1] not in text]
    assert not missing, f"config keys no docs/*.md or conf/ file names: {missing}"


# Where a shell command line ends and another program's words begin: a pipe, ||, &&, ;, a redirection.
SHELL_OPERATOR = re.compile(r"\s(?:\|\|?|&&|\d?>>?)(?:\s|$)|;")


def commands_in_code_block(block: str) -> list[str]:
    """The `hpcllm ...` command lines of a code block (after `$ ` or VAR=value prefixes): a line ending in a
    backslash goes on on the next one, and a command ends at a comment or a shell operator (`hpcllm status | grep
    -v x`: -v is grep's). `a|b` with no spaces is the docs' "a or b", not a pipe."""
    commands = []
    for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
        match = re.match(r"\s*(?:\$ )?(?:[A-Z_]+=\S+ )*(hpcllm \S.*?)(?:\s+#.*)?$", line)
        if match:
            commands.append(SHELL_OPERATOR.split(match.group(1), maxsplit=1)[0].strip())
    return commands


def test_a_documented_command_line_ends_at_shell_operators_and_goes_on_after_a_backslash():
    block = ("hpcllm worker --model M \\\n    [--port 0] | tee log --append\n"
             "$ HPCLLM_CONFIG=x hpcllm status --json > out.json 2>&1\n"
             "hpcllm cache ls && hpcllm cache verify; echo --done\n"
             "hpcllm convert IN OUT [--dtype float32|float16] --partitions 2   # a comment --not-an-option\n"
             "echo hpcllm --no\n")
    assert commands_in_code_block(block) == ["hpcllm worker --model M [--port 0]", "hpcllm status --json",
                                             "hpcllm cache ls",
                                             "hpcllm convert IN OUT [--dtype float32|float16] --partitions 2"]


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for each `hpcllm ...` the docs show: lines of fenced code blocks starting with it (after
    `$ ` or VAR=value prefixes) and inline code spans starting with it, in README.md, docs/*.md and the comments
    of slurm/ and conf/ (one-line spans there)."""
    root = DOCS.parent
    found = []
    for path in [root / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text()
        fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
        found += [(path.name, command) for block in fenced for command in commands_in_code_block(block)]
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
        found += [(path.name, " ".join(span.split())) for span in re.findall(r"`(hpcllm [^`]+)`", prose)]
    for path in sorted([*root.glob("slurm/**/*.sh"), *root.glob("slurm/**/*.sbatch*"), *root.glob("conf/**/*")]):
        if path.is_file():
            found += [(str(path.relative_to(root)), span)
                      for span in re.findall(r"`(hpcllm [^`\n]+)`", path.read_text())]
    return found


def test_every_documented_hpcllm_command_and_option_exists():
    """Each documented `hpcllm COMMAND [SUBCOMMAND...] [--option...]` names sub-commands and options the CLI has, so
    a user copying a line from the docs does not meet 'No such command' or 'No such option'. Spans whose first word
    is no command (bench labels such as `hpcllm disk -> cuda:0`) are prose, not commands."""
    import click

    from hpcllm.cli.main import cli

    commands = documented_commands()
    assert len(commands) > 50
    checked, wrong = 0, []
    for source, line in commands:
        words = line.split()[1:]
        if not words or words[0] not in cli.list_commands(click.Context(cli)):
            continue
        command, path = cli, ["hpcllm"]
        while words and isinstance(command, click.Group) and re.fullmatch(r"[a-z][a-z0-9-]*", words[0]):
            sub = command.get_command(click.Context(command), words[0])
            if sub is None:
                wrong.append(f"{source}: `{line}`: {' '.join(path)} has no command {words[0]!r}")
                break
            command, path = sub, [*path, words.pop(0)]
        options = {"--help", "-h"} | {opt for param in command.params
                                      for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]}
        for word in words:
            option = re.fullmatch(r"\[?(--?[A-Za-z][\w-]*)(?:=\S*)?\]?", word)
            if option and option.group(1) not in options:
                wrong.append(f"{source}: `{line}`: {' '.join(path)} has no option {option.group(1)}")
        checked += 1
    assert checked > 50
    assert not wrong, "\n".join(wrong)
