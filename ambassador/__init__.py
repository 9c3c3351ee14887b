"""Flowgate ambassador: the sidecar every business app talks to on localhost:8080."""
