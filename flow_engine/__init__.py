"""Flowgate flow engine: stores, validates, compiles and runs LLM flows."""
