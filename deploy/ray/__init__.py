"""Ray Serve scale-out (needs the `ray` extra: pip install "loraplex[ray]"); the app is in `app.py`."""
