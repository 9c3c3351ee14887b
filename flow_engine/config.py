"""Engine settings: defaults < environment (``FLOW_ENGINE_*`` and the documented plain
names such as ``OPENAI_BASE_URL``) < an explicit mapping (tests)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from flow_engine.components.base import BuildContext, Limits


@dataclass(frozen=True)
class Settings:
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    max_nodes: int = Limits.max_nodes
    max_edges: int = Limits.max_edges
    max_template_chars: int = Limits.max_template_chars
    max_definition_bytes: int = Limits.max_definition_bytes
    compile_cache_size: int = 512

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"FLOW_ENGINE_{f.name.upper()}")
            if raw is None and f.name.startswith("openai_"):
                raw = env.get(f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, raw, f.default)
        settings = replace(cls(), **values)
        return replace(settings, **dict(overrides or {}))

    @property
    def limits(self) -> Limits:
        return Limits(self.max_nodes, self.max_edges, self.max_template_chars,
                      self.max_definition_bytes)

    @property
    def build_context(self) -> BuildContext:
        return BuildContext(openai_base_url=self.openai_base_url,
                            openai_api_key=self.openai_api_key)


def _convert(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"FLOW_ENGINE_{name.upper()} must be an integer, got {raw!r}") from None
    return raw
