import pytest

from hpcllm.config import load_config
from hpcllm.errors import ConfigError


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.slurm.backend == "cli"


def test_typo_in_key_names_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[slurm]\npartitoin = 'gpu'\n")
    with pytest.raises(ConfigError, match="slurm.partitoin"):
        load_config(path)


def test_invalid_toml_is_clear(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[slurm\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_the_prefill_chunk_is_smaller_on_cpu_unless_set(tmp_path):
    worker = load_config(None).worker
    assert worker.prefill_chunk_tokens == "auto"
    assert (worker.prefill_chunk_tokens_for("cpu"), worker.prefill_chunk_tokens_for("cuda:1")) == (256, 512)
    path = tmp_path / "hpcllm.toml"
    path.write_text("[worker]\nprefill_chunk_tokens = 1024\n")
    assert load_config(path).worker.prefill_chunk_tokens_for("cpu") == 1024
    path.write_text("[worker]\nprefill_chunk_tokens = 0\n")
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        load_config(path)


def test_model_process_auto_is_on_for_cpu_workers_of_hpcllms_engine_only(tmp_path):
    worker = load_config(None).worker
    assert worker.model_process == "auto"
    assert worker.model_process_for("cpu")
    assert not worker.model_process_for("cuda") and not worker.model_process_for("cuda:1")
    assert not worker.model_process_for("cpu", engine="vllm")  # vLLM has its own engine-core process
    assert not worker.model_process_for("cpu", tensor_parallel=True)  # the ranks are the processes
    path = tmp_path / "hpcllm.toml"
    path.write_text("[worker]\nmodel_process = false\n")
    assert not load_config(path).worker.model_process_for("cpu")
    path.write_text("[worker]\nmodel_process = true\n")
    assert load_config(path).worker.model_process_for("cuda")
    path.write_text('[worker]\nmodel_process = "yes"\n')
    with pytest.raises(ConfigError, match="model_process"):
        load_config(path)


@pytest.mark.parametrize("make, words", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00"), "is not UTF-8 text"),
], ids=["folder", "not-utf8"])
def test_a_config_path_that_is_no_text_file_is_one_clear_error(tmp_path, make, words):
    path = tmp_path / "hpcllm.toml"
    make(path)
    with pytest.raises(ConfigError, match=f"config file {path} {words}"):
        load_config(path)


def test_an_unreadable_config_file_says_so(tmp_path, monkeypatch):
    path = tmp_path / "hpcllm.toml"
    path.write_text("")
    monkeypatch.setenv("HPCLLM_CONFIG", str(path))

    def denied(self, *args, **kwargs):  # what another user meets (the tests may run as root, who reads anything)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_text", denied)
    with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\)"):
        load_config()


@pytest.mark.parametrize("value", ["", "state", "~/hpcllm"])
def test_paths_must_be_absolute(tmp_path, value):
    path = tmp_path / "hpcllm.toml"
    for key in ("state_dir", "models_dir"):
        path.write_text(f'[paths]\n{key} = "{value}"\n')
        with pytest.raises(ConfigError, match=f"paths.{key}: .*must be an absolute path, not '{value}'"):
            load_config(path)


def test_paths_naming_a_variable_are_refused(tmp_path, monkeypatch):
    """paths.state_dir = "/scratch/$USER/hpcllm": nothing expands variables in it, so the controller, the gateway and
    the node agent each used a folder literally named "$USER" (made 0700 at start), and the agent, which expanded it
    for its run folder alone, wrote its workers' logs elsewhere. Refused at load, saying so."""
    monkeypatch.setenv("USER", "alice")
    path = tmp_path / "hpcllm.toml"
    for key in ("state_dir", "models_dir"):
        for value in ("/scratch/$USER/hpcllm", "/scratch/${USER}/hpcllm"):
            path.write_text(f'[paths]\n{key} = "{value}"\n')
            with pytest.raises(ConfigError, match=rf"paths.{key}: .*\$VARIABLES are not expanded here"):
                load_config(path)


@pytest.mark.parametrize("text, match", [
    *((f"[node]\nread_sweep_max_age_seconds = {value}\n",
       "read_sweep_max_age_seconds: Input should be a finite number") for value in ("inf", "-inf", "nan")),
    ('[slurm]\nsignal = "USR1\\ntouch /tmp/x"\nsignal_seconds = 0\n', "slurm.signal"),  # it goes into scripts
    ('[slurm]\ntime = "1h"\n', "slurm.time"),  # not Slurm's: every deploy's walltime check read it (a 500)
    # What sbatch refuses at every allocation ("Invalid --signal specification"): refused at load instead.
    ('[slurm]\nsignal_seconds = 70000\n', "slurm.signal_seconds: .*less than or equal to 65535"),
    ('[slurm]\nsignal = "USR3"\n', "slurm.signal: .*'USR3' is not a known signal name"),
    ('[slurm]\nsignal = "99"\n', "slurm.signal: .*signal number 99 is not a known signal"),
], ids=["inf", "-inf", "nan", "signal-with-shell", "walltime-not-slurms", "signal-seconds-over-16-bits",
        "no-such-signal", "no-such-signal-number"])
def test_values_that_are_no_numbers_or_names_are_refused(tmp_path, text, match):
    path = tmp_path / "hpcllm.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    path.write_text('[slurm]\nsignal = "SIGUSR2"\n[node]\nread_sweep_max_age_seconds = 3600\n')
    assert load_config(path).slurm.signal == "SIGUSR2"


@pytest.mark.parametrize("text, match", [
    ('[[gateway.api_keys]]\nkey = "sk-a"\nmin_priority = 1\n',
     r"gateway.api_keys.0.min_priority: .*less than or equal to 0"),
    ("[gateway]\nbatch_lease_seconds = 0.1\n", r"gateway.batch_lease_seconds: .*greater than or equal to 3"),
], ids=["min_priority-above-0", "batch-lease-too-short"])
def test_batch_and_priority_settings_out_of_bounds_are_refused_naming_the_key(tmp_path, text, match):
    path = tmp_path / "hpcllm.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_the_worker_step_timeout_is_its_own_setting(tmp_path):
    # How long a model step may run before the worker counts its engine as hung (not the gateway's read timeout:
    # a site that lets silent streams live long must not let a hung GPU hold them as long).
    path = tmp_path / "hpcllm.toml"
    path.write_text("[gateway]\nupstream_read_timeout_seconds = 900\n")
    assert load_config(path).worker.step_timeout_seconds == 300.0
    path.write_text("[worker]\nstep_timeout_seconds = 0\n")
    with pytest.raises(ConfigError, match="step_timeout_seconds"):
        load_config(path)


@pytest.mark.parametrize("text, where", [
    ('[controller]\nadmin_key = "clé-admin"\n', "controller.admin_key"),
    ('[gateway]\nadmin_key = "admin\\tkey"\n', "gateway.admin_key"),
    ('[[gateway.api_keys]]\nkey = "sk-clé-du-labo"\n', "gateway.api_keys.0.key"),
    ('[cluster]\nshared_secret = "sécret"\n', "cluster.shared_secret"),
])
def test_a_key_that_no_http_header_can_carry_is_refused(tmp_path, text, where):
    """An HTTP client cannot send it (the CLI died in httpx with a UnicodeEncodeError traceback) and a server reads
    its UTF-8 bytes as Latin-1, so it could never match: the config names it instead."""
    path = tmp_path / "hpcllm.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{where}: .*must be printable ASCII"):
        load_config(path)


def test_a_cli_with_a_non_ascii_admin_key_in_its_config_says_so_in_one_line(tmp_path, capsys):
    from hpcllm.cli.main import main

    path = tmp_path / "hpcllm.toml"
    path.write_text('[controller]\nadmin_key = "clé-admin"\n', encoding="utf-8")
    assert main(["status", "--config", str(path), "--url", "http://127.0.0.1:9"]) != 0
    err = capsys.readouterr().err
    assert "controller.admin_key" in err and "printable ASCII" in err and "Traceback" not in err
