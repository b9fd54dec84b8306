"""Property test: whatever arguments a user types after an `hpcllm` command, it ends with an exit code and, when it
fails, one `error:` line saying what to fix; never a Python traceback.

Every command but the long-running servers (controller, gateway, node, worker) and the one that writes the host's
shared-memory pool (store dram put) is run in-process through `main`, with each of its options and arguments given
values a user mistypes: empty, negative, huge, NaN, paths that do not exist, a file that is no checkpoint or JSONL, a
folder, broken node expressions and dates. The controller and gateway URLs point at a port nothing listens on; the
working directory is a throwaway one (a command that writes writes there).
"""

from __future__ import annotations

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcllm.cli.main import cli, main
from hpcllm.httpkit.tests.fuzzing import FUZZ

SERVERS = {"controller", "gateway", "node", "worker"}
WRITES_THE_HOST = {"store dram put"}  # a /dev/shm pool entry: outside the throwaway folder
VALUES = ["", "x", "-1", "0", "2", "99999999999999999999", "nan", "inf", "1.5", "/nonexistent/folder", "junk.jsonl",
          "folder", "n[1-4]", "n[", "n[4-1]", "dram", "nvme", "sharedfs", "a=b", "=", "1d", "30d", "2026-13-45",
          "2026-12-01", ",", "..", "-", "--", "{}", "key", "group", "cuda:0", "cpu", "float16", "00:10:00", "24:00"]


def commands(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every leaf command, by its words (`cache warm`)."""
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found += commands(command, (*prefix, name))
        else:
            found.append(((*prefix, name), command))
    return found


FUZZED = [(words, command) for words, command in commands()
          if words[0] not in SERVERS and " ".join(words) not in WRITES_THE_HOST]


@st.composite
def typed(draw, command: click.Command) -> list[str]:
    """Arguments for command: some of its options (a flag alone, another with a value) and its positional
    arguments, each value one of VALUES, in a drawn order."""
    args = []
    for param in command.params:
        if isinstance(param, click.Argument):
            args += [draw(st.sampled_from(VALUES)) for _ in range(max(param.nargs, 1) if param.nargs > 0 else 1)]
        elif draw(st.booleans()):
            option = draw(st.sampled_from(param.opts + param.secondary_opts))
            args += [option] if param.is_flag else [option, draw(st.sampled_from(VALUES))]
    return draw(st.permutations(args)) if draw(st.booleans()) else args


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A throwaway working folder with a junk file and a folder to name, a config whose services are unreachable."""
    config = tmp_path / "hpcllm.toml"
    config.write_text('[paths]\nstate_dir = "state"\n[controller]\nport = 9\n[gateway]\nport = 9\n'
                      'admin_key = "admin-key"\n[[gateway.api_keys]]\nkey = "user-key"\nname = "u"\n')
    (tmp_path / "junk.jsonl").write_text('{"custom_id": 1}\nnot json\n')
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPCLLM_CONFIG", str(config))
    return tmp_path


def test_every_command_but_the_servers_is_fuzzed():
    assert {" ".join(words) for words, _ in FUZZED} >= {"convert", "deploy", "cache warm", "batch submit", "usage",
                                                         "slurm render model-pool", "tp plan", "status"}


@pytest.mark.parametrize("words, command", FUZZED, ids=[" ".join(words) for words, _ in FUZZED])
def test_no_arguments_make_a_command_print_a_traceback(user_folder, capfd, words, command):
    @FUZZ
    @given(args=typed(command))
    def ends_with_an_error_line_or_done(args):
        code = main([*words, *args])
        out, err = capfd.readouterr()
        assert isinstance(code, int), f"hpcllm {' '.join(words)} {args}: {code!r}"
        assert "Traceback" not in out + err, f"hpcllm {' '.join(words)} {args}:\n{err[-2000:]}"
        if code != 0:
            assert "error:" in err or "aborted" in err, f"hpcllm {' '.join(words)} {args} -> {code}:\n{err[-800:]}"

    ends_with_an_error_line_or_done()
