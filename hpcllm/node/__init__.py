"""hpcllm.node: the per-node agent (agent.py, app.py, workers.py, probes.py, gpus.py) and cache tiers (cache.py)."""
