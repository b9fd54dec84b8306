"""hpcllm's version, in a module of its own so any part may name it without importing the package's __init__."""

__version__ = "0.1.0"
