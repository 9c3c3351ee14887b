"""Other tools' flow formats, in and out. ``langflow/``: LangFlow exports become Flowgate
definitions (validated like any other; nothing in an export is ever executed) and Flowgate
flows are written in LangFlow's shape. ``api.py`` serves both; ``service.py`` holds the
rules they share (roles, versions, publishing)."""
