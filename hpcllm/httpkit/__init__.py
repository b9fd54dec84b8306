"""The HTTP floor every hpcllm service stands on (gateway, controller, node agent, worker) - docs/internal-http.md.

    errors.py  ServiceError and the one error body {"error": {"message", "type", "param", "code"}}; Flask handlers
    auth.py    Credential checks (shared secret, bearer key) for blueprints and views; SECRET_HEADER
    body.py    the one JSON body parser (nesting and size bounded) and pydantic validation as a 400
    client.py  httpx clients for internal calls (TLS verified against the site CA), JSON answers and errors
    app.py     a service's Flask app: error handlers, body size limit, its blueprints
    server.py  the internal services' production server (cheroot: bounded threads, read deadline, TLS)

It imports no service package: services import it, never the reverse.
"""
