"""loraplex.engine."""
