"""health endpoint(s) of the gateway."""
