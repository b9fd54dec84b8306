"""The admin proxy reaches the controller's admin routes only (issue 15: the admin path trick).

`/v1/admin/../internal/models` (and its `%2e%2e` spelling) once became a controller URL that httpx normalised to
/v1/internal/models, sent with the cluster secret: the admin key read the controller's internal API. Paths are
sent raw here (http.client, as `curl --path-as-is` does) to the real gateway app in front of the real controller.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from .conftest import ADMIN_KEY
from .test_controller_router import agents, controller_server, controller_url, routed_gateway  # noqa: F401 (fixtures)


def raw_request(base_url: str, method: str, path: str, key: str = ADMIN_KEY) -> tuple[int, dict]:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("path", [
    "/v1/admin/../internal/models",
    "/v1/admin/%2e%2e/internal/models",
    "/v1/admin/%2E%2E/internal/route?model=tiny-llama",
    "/v1/admin/models/../../internal/models",
    "/v1/admin/./status/../../internal/models",
])
def test_dot_segments_never_reach_the_internal_api(routed_gateway, path):
    status, body = raw_request(routed_gateway.url, "GET", path)
    assert status == 404, body
    assert body["error"]["code"] == "unknown_url"
    assert "models" not in body  # not the controller's internal model list


def test_only_the_controller_admin_routes_are_proxied(routed_gateway):
    assert raw_request(routed_gateway.url, "GET", "/v1/admin/status")[0] == 200
    assert raw_request(routed_gateway.url, "GET", "/v1/admin/nodes")[0] == 404
    status, body = raw_request(routed_gateway.url, "PUT", "/v1/admin/status")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    # A model name is one path segment of the allowed characters; anything else never leaves the gateway.
    assert raw_request(routed_gateway.url, "DELETE", "/v1/admin/models/a%2Fb")[0] == 404


def test_the_admin_proxy_does_not_send_the_cluster_secret(routed_gateway):
    """The controller admits /v1/admin with the admin key alone; the secret stays off the admin path."""
    from hpcllm.httpkit.auth import SECRET_HEADER

    seen = {}
    http = routed_gateway.state.http
    original_send = http.send

    def recording_send(request, **kwargs):
        seen.update(request.headers)
        return original_send(request, **kwargs)

    http.send = recording_send
    try:
        assert raw_request(routed_gateway.url, "GET", "/v1/admin/status")[0] == 200
    finally:
        http.send = original_send
    assert seen and SECRET_HEADER.lower() not in {k.lower() for k in seen}
    assert seen["authorization"] == f"Bearer {ADMIN_KEY}"


def test_vllms_lora_endpoints_take_the_admin_key_and_redeploy_through_the_controller(routed_gateway, tmp_path):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter: the controller's admin routes of the same names (a
    redeploy of the base model, inferred here: the only one deployed); an API key is not enough."""
    import httpx

    from hpcllm.controller.agents import ONE_ADAPTER_REDEPLOY_SECONDS
    from hpcllm.controller.tests.test_lora_adapters import adapter_folder

    from .conftest import MODEL, USER_KEY

    folder = adapter_folder(tmp_path / "legal")
    body = {"lora_name": "tiny-legal", "lora_path": folder}
    as_user = httpx.post(f"{routed_gateway.url}/v1/load_lora_adapter", json=body,
                         headers={"Authorization": f"Bearer {USER_KEY}"})
    assert as_user.status_code == 401 and as_user.json()["error"]["code"] == "invalid_admin_key"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    waits = []
    http = routed_gateway.state.http
    original_send = http.send

    def recording_send(request, **kwargs):
        waits.append(request.extensions["timeout"]["read"])
        return original_send(request, **kwargs)

    http.send = recording_send
    try:
        loaded = httpx.post(f"{routed_gateway.url}/v1/load_lora_adapter", json=body, headers=admin)
    finally:
        http.send = original_send
    assert loaded.status_code == 200, loaded.text
    # the proxy waits as long as the controller may push the adapter to the model's instances (and back)
    assert waits == [ONE_ADAPTER_REDEPLOY_SECONDS]
    assert loaded.json()["name"] == MODEL and loaded.json()["lora_adapters"] == {"tiny-legal": folder}
    unloaded = httpx.post(f"{routed_gateway.url}/v1/unload_lora_adapter", json={"lora_name": "tiny-legal"},
                          headers=admin)
    assert unloaded.status_code == 200 and unloaded.json()["lora_adapters"] == {}
    assert httpx.get(f"{routed_gateway.url}/v1/load_lora_adapter", headers=admin).status_code == 405
