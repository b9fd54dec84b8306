"""completions endpoint(s) of the gateway."""
