"""Registry: schema, atomic multi-row changes, heartbeat merging, what survives a node leaving - on SQLite and,
where a PostgreSQL server and psycopg are installed, on a throwaway PostgreSQL server (pg_server.py)."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.controller.errors import DatabaseError, UnknownNode
from hpcllm.controller.protocol import (
    CacheEntry,
    DeployedModel,
    Heartbeat,
    InstanceInfo,
    NodeRegistration,
    TierInfo,
    Tiers,
)
from hpcllm.controller.registry import Registry
from hpcllm.controller.registry import store as store_module
from hpcllm.controller.registry.databases import postgres_schema
from hpcllm.controller.registry.store import SCHEMA_VERSION, sqlite_path_from_url

NOW = 1_000_000.0


@pytest.fixture
def registry(database_url):
    reg = Registry(database_url)
    yield reg
    reg.close()


def model(name="m", size=100) -> DeployedModel:
    return DeployedModel(name=name, source=f"/models/{name}", size_bytes=size, deployed_at=NOW)


def registration(node_id="n1", job="77", scope="persistent", cached=()) -> NodeRegistration:
    return NodeRegistration(
        node_id=node_id, agent_url=f"http://{node_id}:9000", slurm_job_id=job, job_scoped=True, gpus=2,
        tiers=Tiers(dram=TierInfo(read_gbps=10), nvme=TierInfo(read_gbps=3, scope=scope),
                    sharedfs=TierInfo(read_gbps=1)),
        cached=[CacheEntry(model=m, tier=t, bytes=100, verified=True) for m, t in cached])


def inst(instance_id, state="ready", model_name="m", running=0, **kw) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, model=model_name, state=state, worker_url=f"http://w/{instance_id}",
                        gpu_ids=[0], running_requests=running, **kw)


def test_database_is_wal_with_a_schema_version(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    assert registry.schema_version() == SCHEMA_VERSION
    registry.close()
    raw = sqlite3.connect(tmp_path / "r.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_database_from_a_newer_hpcllm_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Registry(f"sqlite:///{path}").close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(DatabaseError, match="newer hpcllm"):
        Registry(f"sqlite:///{path}")


# A version-1 database (before model pools): version 1's DDL verbatim and rows its Registry wrote.
V1_DUMP = Path(__file__).with_name("registry_v1.sql")


def write_v1_database(database_url: str, tmp_path: Path) -> None:
    sql = V1_DUMP.read_text()
    if database_url.startswith("sqlite:///"):
        raw = sqlite3.connect(sqlite_path_from_url(database_url))
        raw.execute("PRAGMA journal_mode=WAL")  # as the version-1 Registry left it
        raw.executescript(sql)
        raw.close()
        return
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(postgres_schema(sql))
        conn.execute("SELECT setval(pg_get_serial_sequence('cold_starts', 'id'), 1)")  # as its inserts left it


def test_a_version_1_database_is_upgraded_in_place_keeping_its_data(database_url, tmp_path):
    write_v1_database(database_url, tmp_path)
    registry = Registry(database_url)
    try:
        assert SCHEMA_VERSION == 8 and registry.schema_version() == 8
        n1, n2 = registry.nodes()
        assert (n1.node_id, n1.agent_url, n1.slurm_job_id, n1.job_scoped, n1.gpus, n1.h2d_gbps, n1.state,
                n1.registered_at, n1.last_heartbeat, n1.pool_model) == \
            ("n1", "http://n1:9000", "4242", False, 2, 20.0, "up", 1700000010.0, 1700000020.0, None)
        assert n1.tiers.dram.read_gbps == 12.5 and n1.tiers.nvme.scope == "persistent" and n1.persistent_nvme
        assert (n2.node_id, n2.slurm_job_id, n2.gpus, n2.tiers.nvme, n2.pool_model) == ("n2", "4243", 0, None, None)
        # Nodes from before credentials registered with the cluster secret and serve every group.
        assert (n1.credential_id, n1.serves_group) == (None, None)
        assert n1.job_end is None  # version 6: no job end reported (no pool hand-over planned)
        assert n1.agent_process is None  # version 7: registered by an agent without process ids (any heartbeat counts)
        assert [m.name for m in registry.models()] == ["tiny-llama"]
        assert registry.get_model("tiny-llama").keep_alive_seconds == 300.0
        [entry] = registry.cache()
        assert (entry.node_id, entry.model, entry.tier, entry.bytes, entry.persistent) == \
            ("n1", "tiny-llama", "nvme", 123456789, True)
        [instance] = registry.instances()
        assert (instance.instance_id, instance.node_id, instance.state, instance.gpu_ids, instance.load_tier,
                instance.tensor_parallel, instance.rank_nodes) == ("inst-1", "n1", "ready", [0], "nvme", 1, [])
        [alloc] = registry.allocations()
        assert (alloc.job_id, alloc.state, alloc.nodes, alloc.time_limit_seconds) == ("4242", "running", ["n1"], 3600.0)
        [old_start] = registry.cold_starts()
        assert old_start.instance_id == "inst-1"
        # Cold starts from before version 5 do not say what placement estimated: never counted as a start cost.
        assert (old_start.placement_kind, old_start.tensor_parallel, old_start.start_overhead_seconds) == \
            (None, 1, None)
        assert registry.running_node_cold_starts() == []
        # Demand from before version 8 does not say whose it is: everyone's (served only by a public instance).
        old_demand = registry.demand()["tiny-llama"]
        assert (old_demand.since, old_demand.last, old_demand.groups) == (1700000030.0, 1700000040.0, {None})

        # The upgraded database takes the new field, and keeps working as before.
        registry.register_node(registration("n3", job="4244").model_copy(update={"pool_model": "tiny-llama"}),
                               NOW, credential_id="pool-0123456789ab", serves_group="physics")
        registry.add_credential("pool-0123456789ab", "pool", "hash", NOW, model="tiny-llama", group="physics")
        registry.heartbeat("n3", Heartbeat(instances=[inst("pool-1", model_name="tiny-llama", state="loading")]),
                           NOW + 1)
        registry.heartbeat("n3", Heartbeat(instances=[inst("pool-1", model_name="tiny-llama")], job_end=NOW + 3600),
                           NOW + 2)
        n3 = registry.get_node("n3")
        assert (n3.pool_model, n3.credential_id, n3.serves_group) == ("tiny-llama", "pool-0123456789ab", "physics")
        assert n3.job_end == NOW + 3600
        today = 1_765_000_123.0  # an added REAL column holds an epoch of today's size whole (float8 on PostgreSQL)
        registry.heartbeat("n3", Heartbeat(instances=[inst("pool-1", model_name="tiny-llama")], job_end=today),
                           NOW + 2)
        assert registry.get_node("n3").job_end == today
        assert [(c.credential_id, c.group) for c in registry.credentials()] == [("pool-0123456789ab", "physics")]
        registry.heartbeat("n3", Heartbeat(instances=[inst("pool-1", model_name="tiny-llama").model_copy(
            update={"tensor_parallel": 2, "rank_nodes": ["n3", "n3"]})]), NOW + 3)  # version 3: the ranks
        assert {i.instance_id: (i.tensor_parallel, i.rank_nodes) for i in registry.instances()}["pool-1"] == \
            (2, ["n3", "n3"])
        assert len(registry.cold_starts()) == 2
        registry.note_demand("tiny-llama", NOW, "physics")  # version 8: whose demand it is, added to the old row's
        assert registry.demand()["tiny-llama"].groups == {None, "physics"}
        registry.clear_demand("tiny-llama", frozenset({"physics"}))
        assert (registry.demand()["tiny-llama"].groups, registry.demand()["tiny-llama"].last) == ({None}, NOW)
        registry.clear_demand("tiny-llama", frozenset({None}))
        assert "tiny-llama" not in registry.demand()
    finally:
        registry.close()

    # Opening it again is a no-op: still version 8, nothing lost.
    registry = Registry(database_url)
    try:
        assert registry.schema_version() == 8
        assert registry.get_credential("pool-0123456789ab").model == "tiny-llama"
        assert [(n.node_id, n.pool_model) for n in registry.nodes()] == \
            [("n1", None), ("n2", None), ("n3", "tiny-llama")]
        assert len(registry.instances()) == 2
    finally:
        registry.close()


def test_the_upgrade_adds_the_column_to_the_file_itself(tmp_path):
    url = f"sqlite:///{tmp_path / 'v1.db'}"
    write_v1_database(url, tmp_path)
    raw = sqlite3.connect(tmp_path / "v1.db")
    assert "pool_model" not in {row[1] for row in raw.execute("PRAGMA table_info(nodes)")}
    raw.close()
    Registry(url).close()
    raw = sqlite3.connect(tmp_path / "v1.db")
    columns = {row[1] for row in raw.execute("PRAGMA table_info(nodes)")}
    assert {"pool_model", "credential_id", "serves_group", "job_end", "agent_process"} <= columns
    assert "ranks" in {row[1] for row in raw.execute("PRAGMA table_info(instances)")}
    assert {"placement_kind", "queue_wait_seconds", "migration_seconds", "tensor_parallel"} <= \
        {row[1] for row in raw.execute("PRAGMA table_info(cold_starts)")}
    assert "groups" in {row[1] for row in raw.execute("PRAGMA table_info(demand)")}
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(8,)]
    assert raw.execute("SELECT count(*) FROM credentials").fetchone() == (0,)
    assert raw.execute("SELECT count(*) FROM nodes").fetchone() == (2,)
    raw.close()


def test_pool_model_round_trips(registry):
    registry.register_node(registration("n1").model_copy(update={"pool_model": "m"}), NOW)
    registry.register_node(registration("n2"), NOW)
    assert [(n.node_id, n.pool_model, n.is_pool) for n in registry.nodes()] == [("n1", "m", True), ("n2", None, False)]


@pytest.mark.parametrize("url, path", [("sqlite:///rel/c.db", "rel/c.db"), ("sqlite:////abs/c.db", "/abs/c.db"),
                                       ("sqlite:///:memory:", ":memory:"), ("/plain/c.db", "/plain/c.db")])
def test_database_urls(url, path):
    assert sqlite_path_from_url(url) == path


def test_unsupported_database_url_names_the_fix():
    with pytest.raises(DatabaseError, match="'mysql' scheme is not supported; use sqlite.*or postgresql://"):
        Registry("mysql://db/hpcllm")


@pytest.mark.parametrize("url", ["mysql://hpcllm:s3cret@db/hpcllm", "postgress://hpcllm:s3cret@db/hpcllm"])
def test_an_unsupported_database_url_is_named_without_its_password(url):
    """The message reaches the terminal and the service's log: a typo in the scheme must not print the password."""
    with pytest.raises(DatabaseError) as refused:
        Registry(url)
    assert f"controller.database_url '{url.split(':')[0]}://hpcllm:***@db/hpcllm'" in str(refused.value)
    assert "s3cret" not in str(refused.value)


def test_unreachable_postgresql_is_a_clear_error_without_the_password(monkeypatch):
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver, extra 'postgres') is not installed")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DatabaseError, match=rf"cannot connect to the controller database "
                                            rf"postgresql://hpcllm:\*\*\*@127.0.0.1:{port}/hpcllm") as refused:
        Registry(f"postgresql://hpcllm:s3cret@127.0.0.1:{port}/hpcllm")
    assert "s3cret" not in str(refused.value)


def test_missing_driver_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psycopg(name, *args, **kwargs):
        if name.startswith("psycopg"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)  # what Python raises
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    with pytest.raises(DatabaseError, match=r"needs psycopg 3.*pip install 'hpcllm\[postgres\]'"):
        Registry("postgresql://db/hpcllm")


def _open_postgres_in_a_subprocess(prelude: str, env: dict[str, str]) -> str:
    """The error Registry gives for a PostgreSQL URL in a fresh interpreter (psycopg picks its driver at import)."""
    opened = (f"{prelude}\nfrom hpcllm.controller.registry import Registry\n"
              "try:\n    Registry('postgresql://db/hpcllm')\nexcept Exception as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", opened], env={**os.environ, **env},
                            cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_driver_that_cannot_load_its_libpq_says_why():
    """psycopg installed, but its pure-Python driver finds no system libpq (a host without libpq5): the error gives
    psycopg's reason and the package to install, not 'psycopg is not installed'. The host's libpq is hidden from
    psycopg's lookup (ctypes.util.find_library('pq')), which is how a host without it looks to psycopg."""
    pytest.importorskip("psycopg")
    hide_libpq = ("import ctypes.util\nfind = ctypes.util.find_library\n"
                  "ctypes.util.find_library = lambda name: None if name == 'pq' else find(name)")
    message = _open_postgres_in_a_subprocess(hide_libpq, {"PSYCOPG_IMPL": "python"})
    assert "libpq library not found" in message and "libpq5" in message, message


def test_a_driver_that_does_not_load_for_another_reason_says_why():
    """A reason that is not libpq (here the C driver PSYCOPG_IMPL asks for cannot be imported: hidden from the
    subprocess, so the case is the same whether or not psycopg_c is installed) gets no libpq advice."""
    pytest.importorskip("psycopg")
    hide_psycopg_c = "import sys\nsys.modules['psycopg_c'] = None"
    message = _open_postgres_in_a_subprocess(hide_psycopg_c, {"PSYCOPG_IMPL": "c"})
    assert "which is installed but does not load" in message and "psycopg_c" in message, message
    assert "libpq5" not in message, message


def test_big_numbers_and_timestamps_keep_their_precision(registry):
    """PostgreSQL's INTEGER is 32-bit and REAL single precision: the schema must widen both."""
    big = model("big", size=70 * 10**9)
    big_time = 1_800_000_000.123456
    registry.put_model(big.model_copy(update={"deployed_at": big_time}))
    registry.add_allocation("1", "big", [], None, 86400.0, big_time)
    assert registry.get_model("big").size_bytes == 70 * 10**9
    assert registry.get_allocation("1").submitted_at == big_time


def test_models_round_trip_and_undeploy_removes_instances_and_demand(registry):
    assert registry.put_model(model("a")) is True
    assert registry.put_model(model("a", size=200)) is False  # update
    assert registry.get_model("a").size_bytes == 200
    registry.register_node(registration(), NOW)
    registry.heartbeat("n1", Heartbeat(instances=[inst("i1", model_name="a")]), NOW)
    registry.note_demand("a", NOW)
    removed = registry.delete_model("a")
    assert [i.instance_id for i in removed] == ["i1"]
    assert registry.get_model("a") is None
    assert registry.instances() == []
    assert registry.demand() == {}
    assert registry.delete_model("a") is None


def test_registration_replaces_the_node_and_its_cache_atomically(registry):
    registry.register_node(registration(cached=[("m", "nvme"), ("m", "dram")]), NOW)
    registry.heartbeat("n1", Heartbeat(cached=[CacheEntry(model="m", tier="nvme", bytes=1)],
                                       instances=[inst("i1")]), NOW + 1)
    # The agent restarts (new job): old instances are gone, cache is what it reports now.
    node = registry.register_node(registration(job="78", cached=[("x", "dram")]), NOW + 2)
    assert node.slurm_job_id == "78" and node.state == "up"
    assert [(c.model, c.tier) for c in registry.cache(node_id="n1")] == [("x", "dram")]
    assert registry.instances() == []


def test_failed_registration_changes_nothing(registry, monkeypatch):
    registry.register_node(registration(cached=[("m", "nvme")]), NOW)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full halfway through")

    monkeypatch.setattr(store_module, "_replace_cache", broken)
    with pytest.raises(RuntimeError):
        registry.register_node(registration(job="99", cached=[("other", "dram")]), NOW + 1)
    # The node row, written before the failure in the same transaction, was rolled back with it.
    assert registry.get_node("n1").slurm_job_id == "77"
    assert [(c.model, c.tier) for c in registry.cache()] == [("m", "nvme")]


def test_heartbeat_from_unknown_or_lost_node_asks_for_registration(registry):
    with pytest.raises(UnknownNode, match="register again"):
        registry.heartbeat("ghost", Heartbeat(), NOW)
    registry.register_node(registration(), NOW)
    registry.node_left("n1", "lost")
    with pytest.raises(UnknownNode):
        registry.heartbeat("n1", Heartbeat(), NOW)


def test_heartbeat_merges_instances_and_records_cold_starts(registry):
    registry.put_model(model())
    registry.register_node(registration(), NOW)
    reservation = registry.reserve_instance("m", "n1", [0], NOW, {"total_seconds": 3.0})
    registry.confirm_instance(reservation, "i1", "http://w/i1")
    outcome = registry.heartbeat("n1", Heartbeat(instances=[inst("i1", state="loading")]), NOW + 1)
    assert outcome.became_ready == []
    outcome = registry.heartbeat("n1", Heartbeat(instances=[inst("i1", load_tier="nvme", load_seconds=2.5)]),
                                 NOW + 4)
    [cold] = outcome.became_ready
    assert (cold.instance_id, cold.tier, cold.load_seconds, cold.estimate_seconds) == ("i1", "nvme", 2.5, 3.0)
    assert cold.ready_at - cold.requested_at == 4.0
    assert registry.cold_starts()[0] == cold
    # A later heartbeat without it: the instance is gone.
    outcome = registry.heartbeat("n1", Heartbeat(instances=[]), NOW + 5)
    assert outcome.vanished == ["i1"]
    assert registry.instances() == []


def test_a_heartbeat_with_tiers_measured_again_replaces_the_nodes_rates_and_keeps_its_instances(registry):
    registry.register_node(registration(), NOW)
    reservation = registry.reserve_instance("m", "n1", [1], NOW, None)
    registry.heartbeat("n1", Heartbeat(instances=[inst("i1")]), NOW + 1)
    remeasured = Tiers(dram=TierInfo(read_gbps=12), nvme=TierInfo(read_gbps=5.5, scope="persistent"))
    registry.heartbeat("n1", Heartbeat(instances=[inst("i1")], tiers=remeasured, h2d_gbps=20.0), NOW + 2)
    node = registry.get_node("n1")
    assert (node.tiers, node.h2d_gbps) == (remeasured, 20.0)
    assert sorted(i.instance_id for i in registry.instances()) == sorted(["i1", reservation])
    registry.heartbeat("n1", Heartbeat(instances=[inst("i1")]), NOW + 3)  # no tiers: the rates stay
    assert registry.get_node("n1").tiers == remeasured


def test_heartbeat_keeps_unconfirmed_reservations_and_drops_failed_instances(registry):
    registry.register_node(registration(), NOW)
    reservation = registry.reserve_instance("m", "n1", [1], NOW, None)
    outcome = registry.heartbeat("n1", Heartbeat(instances=[inst("bad", state="failed", error="CUDA OOM")]), NOW)
    assert [f.error for f in outcome.failed] == ["CUDA OOM"]
    assert [i.instance_id for i in registry.instances()] == [reservation]


def test_routing_counts_load_until_the_next_heartbeat(registry):
    registry.register_node(registration(), NOW)
    registry.heartbeat("n1", Heartbeat(instances=[inst("i1", running=2)]), NOW)
    registry.note_routed("i1", NOW + 1)
    registry.note_routed("i1", NOW + 2)
    record = registry.get_instance("i1")
    assert (record.load, record.last_used) == (4, NOW + 2)
    registry.heartbeat("n1", Heartbeat(instances=[inst("i1", running=3)]), NOW + 3)
    assert registry.get_instance("i1").load == 3


def test_node_leaving_keeps_only_persistent_nvme_cache(registry):
    registry.register_node(registration("n1", scope="persistent", cached=[("m", "nvme"), ("m", "dram")]), NOW)
    registry.register_node(registration("n2", job="78", scope="job", cached=[("m", "nvme")]), NOW)
    registry.heartbeat("n1", Heartbeat(cached=[CacheEntry(model="m", tier="nvme", bytes=1),
                                               CacheEntry(model="m", tier="dram", bytes=1)],
                                       instances=[inst("i1")]), NOW)
    removed = registry.node_left("n1", "gone")
    registry.node_left("n2", "gone")
    assert [i.instance_id for i in removed] == ["i1"]
    assert [(c.node_id, c.tier) for c in registry.cache()] == [("n1", "nvme")]
    assert registry.get_node("n1").state == "gone"


def test_allocation_lifecycle_and_registration_attaches_nodes(registry):
    registry.add_allocation("500", "m", ["n1"], "debug", 3600.0, NOW)
    [alloc] = registry.allocations(active_only=True)
    assert (alloc.state, alloc.preferred_nodes, alloc.nodes) == ("pending", ["n1"], [])
    registry.register_node(registration("n1", job="500"), NOW + 10)
    alloc = registry.get_allocation("500")
    assert (alloc.state, alloc.nodes, alloc.started_at) == ("running", ["n1"], NOW + 10)
    registry.update_allocation("500", state="ended", ended_at=NOW + 20)
    assert registry.allocations(active_only=True) == []
    with pytest.raises(ValueError, match="unknown allocation fields"):
        registry.update_allocation("500", bogus=1)


def test_an_ended_allocation_whose_job_was_requeued_comes_back(registry):
    registry.add_allocation("500", "m", [], "debug", 3600.0, NOW)
    registry.update_allocation("500", state="ended", ended_at=NOW + 5, reason="preempted")
    registry.register_node(registration("n3", job="500"), NOW + 100)
    alloc = registry.get_allocation("500")
    assert (alloc.state, alloc.nodes, alloc.reason) == ("running", ["n3"], "requeued")


def test_state_survives_reopening(database_url):
    url = database_url
    reg = Registry(url)
    reg.put_model(model("keep"))
    reg.register_node(registration(), NOW)
    reg.add_allocation("9", "keep", [], None, None, NOW)
    reg.close()
    reg = Registry(url)
    assert [m.name for m in reg.models()] == ["keep"]
    assert reg.get_node("n1").agent_url == "http://n1:9000"
    assert reg.get_allocation("9").state == "pending"
    reg.close()


def test_allocation_intent_becomes_the_allocation_or_nothing(registry):
    registry.add_allocation_intent("hpcllm-alloc-a", "m", ["n3"], "batch", 600.0, NOW)
    registry.add_allocation_intent("hpcllm-alloc-b", "m", [], None, None, NOW + 1)
    assert [(i.tag, i.preferred_nodes) for i in registry.allocation_intents()] == [
        ("hpcllm-alloc-a", ["n3"]), ("hpcllm-alloc-b", [])]
    assert registry.settle_allocation_intent("hpcllm-alloc-a", "41") is True
    assert registry.settle_allocation_intent("hpcllm-alloc-b", None) is False
    assert registry.allocation_intents() == []
    [alloc] = registry.allocations()
    assert (alloc.job_id, alloc.state, alloc.preferred_nodes, alloc.partition, alloc.submitted_at) == (
        "41", "pending", ["n3"], "batch", NOW)
