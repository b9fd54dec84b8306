"""admin endpoint(s) of the gateway."""
