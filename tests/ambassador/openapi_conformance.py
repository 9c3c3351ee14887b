"""Does an answer match the OpenAPI document? The status is documented for the operation,
the content type is one documented for that status, a JSON body — or each event of a
``text/event-stream`` — validates against its schema (JSON Schema 2020-12, ``$ref``s
resolved inside the document), and every header the document marks required is there: the
checks a fuzzer (schemathesis) makes, without one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

BASE = "urn:flowgate:ambassador:openapi"


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


class Document:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.registry = Registry().with_resource(
            BASE, Resource.from_contents(spec, default_specification=DRAFT202012))

    def _at(self, pointer: str) -> Any:
        node: Any = self.spec
        for token in pointer.lstrip("/").split("/"):
            node = node[token.replace("~1", "/").replace("~0", "~")]
        return node

    def _follow(self, pointer: str) -> tuple[Any, str]:
        """The node at ``pointer``, its ``$ref``s followed; and where it is."""
        node = self._at(pointer)
        while isinstance(node, dict) and "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            node = self._at(pointer)
        return node, pointer

    def problems(self, method: str, path: str, status: int, headers: Mapping[str, str],
                 body: bytes) -> list[str]:
        """What in this answer to ``method path`` (a path template of the document) does
        not match it; [] when it all does."""
        where = f"{method.upper()} {path} → {status}"
        operation = f"/paths/{_escape(path)}/{method.lower()}"
        responses = self._at(operation + "/responses")
        if str(status) not in responses:
            return [f"{where}: status not documented (documented: {sorted(responses)})"]
        response, pointer = self._follow(f"{operation}/responses/{status}")
        found = []
        lower = {k.lower(): v for k, v in headers.items()}
        for name in response.get("headers", {}):
            header, _ = self._follow(f"{pointer}/headers/{_escape(name)}")
            if header.get("required") and name.lower() not in lower:
                found.append(f"{where}: required header {name} missing")
        content = response.get("content")
        if not content:
            return found
        media = lower.get("content-type", "").split(";", 1)[0].strip().lower()
        if media not in content:
            return [*found, f"{where}: content type {media!r} not documented ({sorted(content)})"]
        schema = {"$ref": f"{BASE}#{pointer}/content/{_escape(media)}/schema"}
        validator = Draft202012Validator(schema, registry=self.registry)
        if media == "application/json":
            try:
                items = [json.loads(body)]
            except ValueError as exc:
                return [*found, f"{where}: not JSON ({exc})"]
        elif media == "text/event-stream":  # the schema is each event's (as schemathesis has it)
            items = sse_events(body.decode())
            if not items:
                found.append(f"{where}: no event in the stream")
        else:
            return found
        for n, item in enumerate(items):
            found += [f"{where}: #{n} {'/'.join(map(str, e.absolute_path)) or '(body)'}: "
                      f"{e.message}" for e in validator.iter_errors(item)]
        return found


def sse_events(text: str) -> list[dict[str, Any]]:
    """Server-Sent Events as objects {event, data, id, retry} (the HTML standard's fields;
    comments and events without data are skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event: dict[str, Any] = {}
        data = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name in ("event", "id"):
                event[name] = value
            elif name == "retry" and value.isdigit():
                event["retry"] = int(value)
        if data:
            events.append({**event, "data": "\n".join(data)})
    return events
