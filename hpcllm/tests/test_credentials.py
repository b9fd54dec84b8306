"""Services refuse to start with public or missing credentials outside a dev cluster (issue 15)."""

from __future__ import annotations


import pytest

from hpcllm.cli.main import main
from hpcllm.config import check_service_credentials, load_config, parse_config
from hpcllm.errors import ConfigError
from hpcllm.tests.ports import free_port

GOOD = {"cluster": {"shared_secret": "s3cret-for-tests"}, "controller": {"admin_key": "adm1n-key-for-tests"},
        "gateway": {"api_keys": [{"key": "sk-user-for-tests"}]}}


def config(**sections):
    data = {name: dict(values) for name, values in GOOD.items()}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data)


def refusal(cfg, service: str) -> str:
    with pytest.raises(ConfigError) as exc:
        check_service_credentials(cfg, service)
    return str(exc.value)


@pytest.mark.parametrize("service", ["controller", "gateway", "node"])
def test_own_credentials_start(service):
    check_service_credentials(config(), service)


@pytest.mark.parametrize("service", ["controller", "gateway", "node"])
def test_the_built_in_default_secret_is_refused(service):
    message = refusal(parse_config({k: v for k, v in GOOD.items() if k != "cluster"}), service)
    assert "cluster.shared_secret is 'dev-secret-change-me', a default published with hpcllm" in message
    assert "secrets.token_urlsafe" in message and "[cluster] dev = true" in message


def test_published_keys_are_refused():
    message = refusal(config(gateway={"admin_key": "change-me-admin", "api_keys": [{"key": "sk-change-me-bob"}]}),
                      "gateway")
    assert "gateway.api_keys[0].key is 'sk-change-me-bob'" in message
    message = refusal(config(controller={"admin_key": "dev-admin-key"}), "controller")
    assert "controller.admin_key is 'dev-admin-key'" in message
    # The gateway's own admin key counts for the gateway, whatever the controller's is.
    message = refusal(config(gateway={"admin_key": "dev-admin-key"}), "gateway")
    assert "gateway.admin_key is 'dev-admin-key'" in message


@pytest.mark.parametrize("where, section, values", [
    ("cluster.shared_secret", "cluster", {"shared_secret": ""}),
    ("gateway.admin_key", "gateway", {"admin_key": ""}),
    ("gateway.api_keys[0].key", "gateway", {"api_keys": [{"key": ""}]}),
], ids=["secret", "admin-key", "api-key"])
def test_empty_secrets_are_refused(where, section, values):
    service = "gateway" if section == "gateway" else "controller"
    assert f"{where} is empty: it would match a request that sends none" in refusal(config(**{section: values}),
                                                                                    service)


def test_short_secrets_are_warned_about(caplog):
    check_service_credentials(config(cluster={"shared_secret": "short"}), "node")
    assert "cluster.shared_secret shorter than 16 characters" in caplog.text


def test_an_empty_secret_opens_nothing():
    """An empty expected secret (a dev config with shared_secret = "") matched a request without the header."""
    from flask import Blueprint

    from hpcllm.httpkit.app import service_app
    from hpcllm.httpkit.auth import SharedSecret, guard

    bp = guard(Blueprint("internal", __name__), SharedSecret(""))
    bp.get("/v1/internal/x")(lambda: {"ok": True})
    client = service_app("t", [bp]).test_client()
    assert client.get("/v1/internal/x").status_code == 401
    assert client.get("/v1/internal/x", headers={"X-Hpcllm-Secret": ""}).status_code == 401


def test_a_grant_or_ticket_with_non_ascii_characters_is_refused_not_a_crash():
    from hpcllm.credentials import CredentialError, check_grant, check_ticket, issue_ticket

    with pytest.raises(CredentialError, match="not issued for this worker"):
        check_grant("nonce:1000.000:4:\u00e9\u00e9", key="k" * 20)
    ticket = issue_ticket(model="m", source_instance="m-1", source_key="s" * 20, destination_url="http://d:1",
                          destination_instance="m-2", destination_key="d" * 20)
    with pytest.raises(CredentialError, match="bad signature"):
        check_ticket(ticket.model_copy(update={"signature": "\u00e9"}), key="s" * 20, model="m",
                     destination_url="http://d:1")


def test_the_controller_needs_its_own_admin_key():
    message = refusal(config(controller={"admin_key": None}), "controller")
    assert "controller.admin_key is not set" in message
    message = refusal(config(controller={"admin_key": "s3cret-for-tests"}), "controller")
    assert "controller.admin_key is the cluster secret" in message


def test_a_gateway_without_api_keys_is_refused():
    assert "gateway.api_keys is empty" in refusal(config(gateway={"api_keys": []}), "gateway")


def test_a_dev_cluster_may_use_the_published_values():
    dev = parse_config({"cluster": {"dev": True}})
    for service in ("controller", "gateway", "node"):
        check_service_credentials(dev, service)


def test_the_shipped_configs(tmp_path):
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf"
    check_service_credentials(load_config(conf / "dev.toml"), "gateway")  # marked dev
    assert "sk-change-me-alice" in refusal(load_config(conf / "gateway.toml"), "gateway")


@pytest.mark.parametrize("service", ["controller", "gateway", "node"])
def test_the_commands_stop_with_the_message(tmp_path, capsys, service):
    path = tmp_path / "hpcllm.toml"
    path.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[gateway]\nport = {free_port()}\n')
    path.chmod(0o600)
    assert main([service, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"refusing to start the {service}" in err and "dev-secret-change-me" in err and "Traceback" not in err


def test_a_node_token_comes_from_the_environment_or_a_private_file(tmp_path):
    from hpcllm.credentials import CredentialError, read_token_from_environment

    assert read_token_from_environment({}) is None
    assert read_token_from_environment({"HPCLLM_NODE_TOKEN": " hpcllm_pool-0_x \n"}) == "hpcllm_pool-0_x"
    token_file = tmp_path / "pool-token"
    token_file.write_text("hpcllm_pool-1_y\n")
    token_file.chmod(0o644)
    with pytest.raises(CredentialError, match=f"may be read by other users .*chmod 600 {token_file}"):
        read_token_from_environment({"HPCLLM_NODE_TOKEN_FILE": str(token_file)})
    token_file.chmod(0o600)
    assert read_token_from_environment({"HPCLLM_NODE_TOKEN_FILE": str(token_file)}) == "hpcllm_pool-1_y"
    with pytest.raises(CredentialError, match="cannot read the node token file .*missing"):
        read_token_from_environment({"HPCLLM_NODE_TOKEN_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize("content", [b"hpcllm_pool-1_s3cret\nhpcllm_pool-1_s3cret\n",  # pasted twice
                                     b"hpcllm_pool-1_s3cret # from the admin\n", b"\xff\xfehpcllm_pool-1_s3cret"])
def test_a_node_token_file_holding_more_than_a_token_is_refused_without_showing_it(tmp_path, content):
    """A token travels in an HTTP header: one that cannot was sent anyway, and the agent logged 'controller
    unreachable (Illegal header value b'<the token>')' every 10 s, or (not UTF-8) stopped with a traceback.
    (`hpcllm node` answers a CredentialError here as one line: test_the_commands_stop_with_the_message's path.)"""
    from hpcllm.credentials import CredentialError, read_token_from_environment

    token_file = tmp_path / "pool-token"
    token_file.write_bytes(content)
    token_file.chmod(0o600)
    with pytest.raises(CredentialError) as refused:
        read_token_from_environment({"HPCLLM_NODE_TOKEN_FILE": str(token_file)})
    assert f"the node token file {token_file}" in str(refused.value) and "more than a token" in str(refused.value)
    assert "s3cret" not in str(refused.value)
    with pytest.raises(CredentialError, match="HPCLLM_NODE_TOKEN holds more than a token") as refused:
        read_token_from_environment({"HPCLLM_NODE_TOKEN": "hpcllm_pool-1_s3cret\thpcllm_pool-1_s3cret"})
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("expires_at", ["99999999999", float("inf"), True, -1.0, 1e12])
def test_a_migration_ticket_takes_real_types_only(expires_at):
    # A ticket reaches the source worker and the node agent inside JSON bodies: a string or a boolean for its expiry
    # is a refused body (400), not a time that pydantic reads for the caller.
    from pydantic import ValidationError

    from hpcllm.credentials import MigrationTicket, issue_ticket

    ticket = issue_ticket(model="m", source_instance="m-1", source_key="s" * 20, destination_url="http://d:1",
                          destination_instance="m-2", destination_key="d" * 20)
    MigrationTicket.model_validate(ticket.model_dump())  # as issued: taken
    with pytest.raises(ValidationError, match="expires_at"):
        MigrationTicket.model_validate(ticket.model_dump() | {"expires_at": expires_at})


def test_a_grant_with_an_unwritten_expiry_or_size_is_refused_and_one_lives_no_longer_than_a_ticket():
    """A grant's expiry was read with float(): "inf" or "nan" (never past) were taken as far as the MAC check; the
    grant's fields are what issue_ticket writes, and a grant (or ticket) good for longer than the controller makes
    them is refused even when its MAC is right."""
    import time

    from hpcllm.credentials import MAX_CLOCK_SKEW_SECONDS, TICKET_SECONDS, CredentialError, check_grant, \
        check_ticket, issue_ticket

    key = "d" * 20
    grant = issue_ticket(model="m", source_instance="m-1", source_key="s" * 20, destination_url="http://d:1",
                         destination_instance="m-2", destination_key=key, max_requests=3).grant
    checked = check_grant(grant, key=key)
    assert checked.max_requests == 3 and checked.nonce == grant.split(":")[0]
    nonce, expires, size, mac = grant.split(":")
    for bad in (f"{nonce}:inf:{size}:{mac}", f"{nonce}:nan:{size}:{mac}", f"{nonce}:-1.000:{size}:{mac}",
                f"{nonce}:{expires}:-3:{mac}", f"{nonce}:{expires}:{mac}", f"{nonce}:{expires}:1e3:{mac}"):
        with pytest.raises(CredentialError, match="malformed migration grant") as refused:
            check_grant(bad, key=key)
        assert refused.value.status == 401
    with pytest.raises(CredentialError, match="not issued for this worker"):  # the size is signed
        check_grant(f"{nonce}:{expires}:300:{mac}", key=key)

    # Checked a day and more before the controller issued it (or made to last that long): refused.
    ticket = issue_ticket(model="m", source_instance="m-1", source_key="s" * 20, destination_url="http://d:1",
                          destination_instance="m-2", destination_key=key)
    early = time.time() - MAX_CLOCK_SKEW_SECONDS - 60
    with pytest.raises(CredentialError, match=f"claims to be good for .* issues them for {TICKET_SECONDS:.0f} s"):
        check_grant(ticket.grant, key=key, now=early)
    with pytest.raises(CredentialError, match="claims to be good for"):
        check_ticket(ticket, key="s" * 20, model="m", destination_url="http://d:1", now=early)


def test_a_ticket_moves_only_the_requests_of_the_instance_it_names():
    """Where the caller knows the instance it moves (the node agent), a ticket issued for another one - or for none
    named - is refused; a worker, which does not know its instance id, checks the rest."""
    from hpcllm.credentials import CredentialError, check_ticket, issue_ticket

    fields = dict(source_key="s" * 20, destination_url="http://d:1", destination_instance="m-2",
                  destination_key="d" * 20)
    ticket = issue_ticket(model="m", source_instance="m-1", **fields)
    check = dict(key="s" * 20, model="m", destination_url="http://d:1")
    check_ticket(ticket, source_instance="m-1", **check)
    check_ticket(ticket, **check)
    for instance, issued_for in (("m-3", ticket), ("m-1", issue_ticket(model="m", source_instance="", **fields))):
        with pytest.raises(CredentialError, match="moves the requests of instance") as refused:
            check_ticket(issued_for, source_instance=instance, **check)
        assert refused.value.status == 403
    with pytest.raises(CredentialError, match="bad signature"):  # the instance is signed: renaming it breaks it
        check_ticket(ticket.model_copy(update={"source_instance": "m-3"}), source_instance="m-3", **check)
