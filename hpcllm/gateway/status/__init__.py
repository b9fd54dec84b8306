"""The status page: GET /status (one static page, no data), its data from /v1/admin/status or /v1/status."""
