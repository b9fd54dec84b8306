"""OpenAI-compatible HTTP gateway (Flask on gunicorn): auth, limits, routing to workers, SSE, metrics.

Kept import-light on purpose: the CLI must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported.
Use `from hpcllm.gateway.app import create_app`.
"""
