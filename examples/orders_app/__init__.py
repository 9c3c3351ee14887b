"""A demo business app that calls Flowgate through its ambassador sidecar (see app.py)."""
