"""Issue 15's smaller controller findings: deeply nested JSON, and an admin key that fell back to the secret."""

from __future__ import annotations

import logging

from hpcllm.controller.app import create_app
from hpcllm.httpkit.auth import SECRET_HEADER

from .conftest import ADMIN_KEY, SECRET, Harness

DEEP = 100_000


def test_deeply_nested_json_is_a_400_without_a_traceback(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    client = create_app(Harness(tmp_path).controller).test_client()
    nested = b'{"node_id": "n1", "tiers": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    resp = client.post("/v1/internal/nodes/register", data=nested, headers={SECRET_HEADER: SECRET},
                       content_type="application/json")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert "nested deeper than 200 levels" in resp.get_json()["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_the_admin_key_never_falls_back_to_the_cluster_secret(tmp_path):
    without = Harness(tmp_path, admin_key=None)
    client = create_app(without.controller).test_client()
    resp = client.get("/v1/admin/status", headers={"Authorization": f"Bearer {SECRET}"})
    assert resp.status_code == 401
    assert "controller.admin_key is not set" in resp.get_json()["error"]["message"]

    with_key = create_app(Harness(tmp_path / "k").controller).test_client()
    assert with_key.get("/v1/admin/status", headers={"Authorization": f"Bearer {SECRET}"}).status_code == 401
    assert with_key.get("/v1/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
