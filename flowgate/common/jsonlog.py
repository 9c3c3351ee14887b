"""JSON-lines logging: one object per line with the current trace and request ids."""

from __future__ import annotations

import json
import logging
import sys
import time

from flowgate.common import tracing

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_SECRET_WORDS = ("authorization", "api_key", "apikey", "password", "secret", "token")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def level_name(value: str) -> str:
    """``value`` as a logging level name (any case); ValueError naming the choices if it is
    not one."""
    name = str(value).strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)} (any case), got {value!r}")
    return name


def _secret(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_WORDS)


class JsonFormatter(logging.Formatter):
    """One JSON object per record. It runs once per request, so the per-second timestamp
    prefix and the per-field-name redaction verdict are computed once and remembered."""

    def __init__(self) -> None:
        super().__init__()
        self._second = (-1, "")
        self._redact: dict[str, bool] = {}

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        entry = {
            "ts": f"{self._second[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace = tracing.current.get()
        if trace is not None:
            entry["trace_id"] = trace.trace_id
            entry["request_id"] = trace.request_id
        redact = self._redact
        for key, value in vars(record).items():
            if key not in _STANDARD and key[0] != "_":
                secret = redact.get(key)
                if secret is None:
                    secret = _secret(key)
                    if len(redact) < 1000:  # field names are few; callers' strings are not
                        redact[key] = secret
                entry[key] = "[redacted]" if secret else value
        if record.exc_info:
            entry["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        if not line.isascii():
            try:  # a lone surrogate (from a client's JSON) cannot be written as UTF-8:
                line.encode()
            except UnicodeEncodeError:  # the same JSON, escaped (\ud800), still one line
                line = json.dumps(entry, default=str)
        return line


def configure(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON lines (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_flowgate", False):
            root.setLevel(level)
            return
    # The JSON lines carry no caller file/line, thread or process fields, so logging need
    # not collect them: finding the caller walks the stack on every record (about a third of
    # an access line's cost). See "Optimization" in the logging HOWTO.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._flowgate = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
