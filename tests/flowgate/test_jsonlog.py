"""JSON-lines log records: fields, trace ids, redaction, timestamps."""

from __future__ import annotations

import json
import logging

from flowgate.common import tracing
from flowgate.common.jsonlog import JsonFormatter


def record(created: float, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("ambassador.access", logging.INFO, __file__, 1, "request %s", ("x",),
                            None)
    rec.created, rec.msecs = created, (created - int(created)) * 1000
    rec.__dict__.update(extra)
    return rec


def test_fields_trace_ids_and_redaction() -> None:
    formatter = JsonFormatter()
    trace = tracing.from_headers(None, "req-7")
    token = tracing.current.set(trace)
    try:
        for _ in range(2):  # the second time from the remembered verdicts
            line = json.loads(formatter.format(record(
                1_700_000_000.25, flow_id="faq", status=200, api_key="k-123",
                Authorization="Bearer abc", refresh_token="t", _private=1)))
            assert line["msg"] == "request x" and line["level"] == "info"
            assert (line["flow_id"], line["status"]) == ("faq", 200)
            assert line["api_key"] == line["Authorization"] == line["refresh_token"] == "[redacted]"
            assert "_private" not in line
            assert (line["trace_id"], line["request_id"]) == (trace.trace_id, "req-7")
    finally:
        tracing.current.reset(token)


def test_timestamps_follow_the_record_across_seconds() -> None:
    formatter = JsonFormatter()
    stamps = [json.loads(formatter.format(record(t)))["ts"]
              for t in (1_700_000_000.75, 1_700_000_001.25, 1_700_000_000.5)]
    assert stamps == ["2023-11-14T22:13:20.750Z", "2023-11-14T22:13:21.250Z",
                      "2023-11-14T22:13:20.500Z"]


def test_a_lone_surrogate_in_a_field_still_makes_a_utf8_line() -> None:
    """``"caf\\ud800"`` from a client's JSON cannot be encoded as UTF-8: the line escapes it."""
    line = JsonFormatter().format(record(1_700_000_000.0, flow_id="caf\ud800", note="naïve"))

    decoded = json.loads(line.encode("utf-8"))
    assert (decoded["flow_id"], decoded["note"]) == ("caf\ud800", "naïve")
