"""A token agent whose credential the controller no longer takes (a pool token revoked with `hpcllm pool token
revoke`): it drains and exits instead of holding its Slurm job's GPUs for nothing."""

from __future__ import annotations

import logging

from hpcllm.controller.protocol import ModelSpec, PoolTokenRequest
from hpcllm.controller.tests.doubles import checkpoint_folder
from hpcllm.credentials import TOKEN_HEADER
from hpcllm.node.tests.test_agent import make_agent
from hpcllm.node.tests.test_agent_controller import controllers  # noqa: F401 (fixture)


def test_a_pool_agent_whose_token_is_revoked_drains_and_stops_beating(tmp_path, controllers, monkeypatch,  # noqa: F811
                                                                      caplog):
    (first, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    monkeypatch.setenv("SLURM_JOB_ID", "71")
    first.controller.allocator.backend.run_job("71", "n7")  # the group's pool job, as squeue lists it
    source = checkpoint_folder(tmp_path / "models" / "m")
    agent = make_agent(tmp_path)
    try:
        first.controller.deploy(ModelSpec(name="m", source=str(source), size_bytes=1))
        issued = first.controller.issue_pool_token(PoolTokenRequest(model="m", group="physics"))
        agent.pinned_model = "m"
        agent.token = issued.token
        agent._http.headers.pop("X-Hpcllm-Secret", None)  # a token agent never sends the cluster secret
        agent._http.headers[TOKEN_HEADER] = issued.token
        agent.controller_url = url
        agent.agent_url = "http://127.0.0.1:1"
        assert agent.register()
        assert agent.heartbeat()

        first.controller.revoke_credential(issued.credential_id)  # the admin ends the pool
        caplog.set_level(logging.INFO)
        assert not agent.heartbeat()
        assert agent._drain_requested.is_set(), "the agent went on beating with a revoked token"
        assert not agent.registered
        assert "revoked" in caplog.text
    finally:
        agent.shutdown()


def test_an_agent_on_the_cluster_secret_refused_keeps_its_instances_and_beats_on(tmp_path, controllers,  # noqa: F811
                                                                                 monkeypatch, caplog):
    """The controller restarted with a mistyped (or rotated) cluster.shared_secret: an operator node's agent says
    what to check and keeps its instances; once the secret matches again its heartbeats count again."""
    (first, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n9")
    agent = make_agent(tmp_path)
    agent.controller_url = url
    agent.agent_url = "http://127.0.0.1:1"
    try:
        assert agent.register()
        assert agent.heartbeat()

        secret = agent._http.headers["X-Hpcllm-Secret"]
        agent._http.headers["X-Hpcllm-Secret"] = "not-the-secret"  # as a controller with another secret sees it
        caplog.set_level(logging.INFO)
        assert not agent.heartbeat()
        assert not agent._drain_requested.is_set(), "a refused cluster secret drained the agent"
        assert "cluster.shared_secret" in caplog.text

        agent._http.headers["X-Hpcllm-Secret"] = secret  # the controller's config is fixed
        assert agent.heartbeat()
        assert [n.node_id for n in first.controller.status().nodes] == ["n9"]
    finally:
        agent.shutdown()
