"""loraplex.server."""
