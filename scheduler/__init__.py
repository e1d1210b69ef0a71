"""loraplex.scheduler."""
