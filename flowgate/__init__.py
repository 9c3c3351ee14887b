"""Flowgate: a Flask flow engine and ambassador sidecar for running LangChain LLM workflows."""
