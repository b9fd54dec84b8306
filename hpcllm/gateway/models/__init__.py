"""models endpoint(s) of the gateway."""
