"""LangFlow interop: ``translate`` turns a LangFlow export into a Flowgate definition and a
report (never executing anything in it); ``export_flow`` writes a Flowgate definition in
LangFlow's shape."""

from flow_engine.interop.langflow.translate import (
    SUPPORTED,
    LangFlowImportError,
    Translation,
    translate,
)

__all__ = ["SUPPORTED", "LangFlowImportError", "Translation", "translate"]
