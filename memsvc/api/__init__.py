"""The REST API: `memsvc.api.app.create_app(settings)`; `wire` and `schemas` are shared with the client."""
