"""`hpcllm cache` errors a user meets: an agent that is down, an unknown model, a bad node list, MPI + DRAM."""

from __future__ import annotations

import socket

from hpcllm.cli.main import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_agent_names_the_node_and_url(capsys):
    url = f"http://127.0.0.1:{_free_port()}"

    code = main(["cache", "ls", "--agent-url", url])

    err = capsys.readouterr().err
    assert code == 0  # ls lists what it can and warns about the rest
    assert f"agent at {url} is not reachable" in err

    code = main(["cache", "evict", "llama", "--agent-url", url])
    assert code != 0 and f"agent at {url} is not reachable" in capsys.readouterr().err


def test_unknown_model_without_controller_or_source_is_a_clear_error(capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    code = main(["cache", "warm", "llama", "--nodes", "n1", "--url", url])

    err = capsys.readouterr().err
    assert code != 0 and "no --source given" in err and "Traceback" not in err


def test_bad_node_list_and_mpi_dram_are_refused(capsys, tmp_path):
    assert main(["cache", "warm", "llama", "--nodes", "n[4-1]", "--source", str(tmp_path)]) != 0
    assert "goes backwards" in capsys.readouterr().err
    assert main(["cache", "warm", "llama", "--nodes", "n1", "--mpi", "--tier", "dram",
                 "--source", str(tmp_path)]) != 0
    assert "--mpi warms the NVMe tier" in capsys.readouterr().err


def test_mpi_warm_of_a_missing_origin_fails_before_submitting(capsys, tmp_path):
    code = main(["cache", "warm", "llama", "--nodes", "n[1-2]", "--mpi", "--source", str(tmp_path / "nowhere")])
    assert code != 0 and "does not exist" in capsys.readouterr().err


def test_mpi_warm_refuses_a_job_scoped_nvme_folder(capsys, tmp_path):
    code = main(["cache", "warm", "llama", "--nodes", "n[1-2]", "--mpi", "--source", str(tmp_path),
                 "--nvme-dir-template", "/scratch/%j/nvme"])
    err = capsys.readouterr().err
    assert code != 0 and "job-scoped" in err and "without --mpi" in err and "Traceback" not in err
