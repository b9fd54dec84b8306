"""Property test: whatever a generate request's fields hold, the worker answers a 4xx naming what is wrong or
streams an answer that ends in a final line without an internal error; and its engine serves on after each (one bad
request must never stop the engine loop that every running request shares).

The gateway checks requests before they reach a worker, but a worker is also reached by other gateways' versions
and model pools' agents: it checks what it is sent itself. Values as in hpcllm.httpkit.tests.fuzzing.
"""

from __future__ import annotations

import json

import httpx
from hypothesis import given

from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.httpkit.tests.fuzzing import FUZZ, as_sent, field_paths, mutated_bodies, problem_in
from hpcllm.worker.protocol import GENERATE_PATH, GenerateRequest

from .conftest import SECRET

VALID = {"request_id": "fuzz", "prompt_token_ids": [5, 6, 7], "max_tokens": 3, "temperature": 0.5, "seed": 1,
         "stop": ["x"], "stop_token_ids": [2], "logit_bias": {"5": 1.0}, "logprobs": 1,
         "thinking": {"end_token_id": 9, "start_token_id": 8, "budget": 2}}
NESTED = [("thinking", key) for key in ("end_token_id", "start_token_id", "budget")] + [
    ("logit_bias", "5"), ("logit_bias", "-1"), ("prompt_token_ids", 0), ("resume_token_ids", 0)]


def final_problem(text: str) -> str | None:
    """A 200's NDJSON lines must end in a final line that is no internal error."""
    last = json.loads(text.strip().splitlines()[-1])
    error = last.get("error") or {}
    return f"ended with an internal error: {last}" if error.get("type") == "internal_error" else None


def test_the_valid_body_is_valid():
    GenerateRequest.model_validate(VALID)
    assert set(VALID) <= {path[0] for path in field_paths(GenerateRequest)}


def test_no_generate_request_stops_the_worker(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    headers = {SECRET_HEADER: SECRET, "Content-Type": "application/json"}
    plain = as_sent({**VALID, "request_id": "plain", "thinking": None})

    @FUZZ
    @given(body=mutated_bodies(VALID, field_paths(GenerateRequest) + NESTED))
    def served_or_refused(body):
        response = httpx.post(worker.url + GENERATE_PATH, content=as_sent(body), headers=headers, timeout=60)
        problem = problem_in(response.status_code, response.text)
        if problem is None and response.status_code == 200:
            problem = final_problem(response.text)
        assert problem is None, f"{as_sent(body)[:1500]}\n-> {problem}"
        after = httpx.post(worker.url + GENERATE_PATH, content=plain, headers=headers, timeout=60)
        assert after.status_code == 200 and final_problem(after.text) is None, \
            f"after {as_sent(body)[:1500]} a plain request got {after.status_code}: {after.text[-500:]}"

    served_or_refused()
