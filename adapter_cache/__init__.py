"""loraplex.adapter_cache."""
