"""chat endpoint(s) of the gateway."""
