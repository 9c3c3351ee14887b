"""The words both sides of the knowledge package use: search modes, document statuses and
the id pattern. A leaf (standard library only) on purpose: ``components/knowledge.py`` is
imported while the component registry loads, and flow validation imports that registry, so
anything it needs from here must not import the engine back (issue #16: importing
``knowledge.model`` first used to fail with a circular import).
"""

from __future__ import annotations

import re

MODES = ("vector", "keyword", "hybrid")
STATUSES = ("queued", "indexing", "ready", "failed")
# The same pattern as flow and node ids (flow_engine/flows/validate.py; a test keeps them equal).
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always with fullmatch
