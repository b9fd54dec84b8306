"""Inference worker: one model per process, token streaming over an internal HTTP API, migration hooks.

engine.py (scheduler + decode loop), sampling.py, detokenizer.py, metrics.py, server.py (Flask app, process entry),
protocol.py (wire types, imported by the gateway / node agent), client.py (httpx client), cli.py (`hpcllm worker`).
"""
