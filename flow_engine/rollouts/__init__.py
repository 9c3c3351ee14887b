"""Guarded rollouts: canary analysis, canary steps and automatic rollback."""
