"""A lean LangChain chat model for any OpenAI-compatible Chat Completions endpoint (OpenAI,
llm-sim, Ollama, vLLM, …), spoken directly over pooled keep-alive HTTP (urllib3, which is
cooperative under gevent). It replaces langchain-openai's ``ChatOpenAI`` in the engine:
that client costs ~4.5 ms per call and ~300 µs per streamed token (client setup, httpx,
pydantic parsing of every chunk). It sends text messages and function tools; use
``ChatOpenAI`` instead when you need structured output, images or the Responses API.

Wire protocol (always streamed): ``POST {base_url}/chat/completions`` with ``"stream": true``
and ``"stream_options": {"include_usage": true}``; the answer is ``text/event-stream`` of
``data: {chat.completion.chunk}`` events, ending with ``data: [DONE]``. Each chunk's
``choices[0].delta.content`` becomes one ``ChatGenerationChunk`` (LangChain then fires
``on_llm_new_token``); ``finish_reason`` and the final ``usage`` chunk become one last
chunk carrying ``usage_metadata``. A stream that ends without ``[DONE]`` and without a
``finish_reason`` was cut off and is an error.

Tools (:meth:`OpenAICompatChatModel.bind_tools`): the request carries ``tools`` (and
``tool_choice``); each ``choices[0].delta.tool_calls`` entry of the stream becomes a
``tool_call_chunks`` entry of its chunk (keyed by ``index``: the id and name come first,
the JSON arguments in pieces), which LangChain joins into the message's ``tool_calls``.
Assistant messages with ``tool_calls`` and ``ToolMessage`` answers are sent back in
OpenAI's shape. A chunk without ``tool_calls`` costs one dict lookup more than before.

Errors, translated once here (``runs.runner.classify_error`` maps them to the error
contract)::

    ProviderError
    ├── ProviderStatusError       an HTTP status other than 200 (``status_code``)
    ├── ProviderConnectionError   could not connect, or the connection broke
    │   └── ProviderTimeout       connect or read timeout (also a ``TimeoutError``)
    └── ProviderResponseError     not an event stream, bad JSON, an ``error`` event

Retries (``max_retries``): only before the first token was yielded, and only connection
failures (refused, reset, a stream broken before its first token), connect timeouts and
HTTP 408/429/5xx. A read timeout is not retried (the provider may be working, and
billing, on it; and the caller has already waited ``timeout``). The delay is
``Retry-After`` when the provider sends one (at most ``RetryPolicy.max_retry_after_s``, or
no retry) and otherwise exponential backoff with jitter.

Cancellation: closing the generator (the engine raises from ``on_llm_new_token``) closes
the socket at once, so the provider sees the stream end; a connection is returned to the
pool only after its response was read to the end.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import certifi
import urllib3
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)

from flow_engine.egress import DEFAULT_BASE_URL
from flowgate.common.backoff import Backoff

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_ERROR_BODY = 65_536
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}

# One keep-alive pool per endpoint (scheme, host, port) for the whole worker process, shared
# by every compiled flow and never evicted (a handful of LLM endpoints). Sized for the
# engine's worker_connections so that a burst of concurrent streams keeps its connections
# (a full pool closes the extra ones and logs a warning for each). Looked up once per model
# rather than through a PoolManager on every call (which parses the URL twice).
_POOLS: dict[str, urllib3.HTTPConnectionPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool_for(url: str) -> urllib3.HTTPConnectionPool:
    origin = urllib3.util.parse_url(url)
    key = f"{origin.scheme}://{origin.host}:{origin.port or (443 if origin.scheme == 'https' else 80)}"
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            tls = {"ca_certs": certifi.where()} if origin.scheme == "https" else {}
            pool = _POOLS[key] = urllib3.connection_from_url(
                url, maxsize=1000, block=False, retries=False, **tls)
        return pool


class ProviderError(Exception):
    """The LLM provider could not give an answer. ``retryable``: nothing can have been
    generated, so sending the request again is safe."""

    status_code: int | None = None
    origin: str | None = None  # the endpoint asked (scheme://host[:port]: never a key or path)

    def __init__(self, message: str, *, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class ProviderStatusError(ProviderError):
    def __init__(self, status: int, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"Error code: {status}" + (f" - {message}" if message else ""),
                         retryable=status in _RETRY_STATUSES, retry_after=retry_after)
        self.status_code = status


class ProviderConnectionError(ProviderError):
    pass


class ProviderTimeout(ProviderConnectionError, TimeoutError):
    pass


class ProviderResponseError(ProviderError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a failed request again. ``sleep`` and
    ``jitter`` are injectable so tests never really wait."""

    max_retries: int = 1
    backoff_s: float = 0.25  # the first delay; doubles per retry
    max_backoff_s: float = 4.0
    max_retry_after_s: float = 20.0  # a longer Retry-After fails at once instead
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random  # in [0, 1): 50-100 % of the backoff

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 <= backoff_s <= max_backoff_s, got "
                             f"{self.backoff_s} and {self.max_backoff_s}")

    def delay(self, retry: int, error: ProviderError) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based), or None: give up."""
        if retry > self.max_retries or not error.retryable:
            return None
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after_s else None
        backoff = Backoff(self.backoff_s, self.max_backoff_s, "half",
                          uniform=lambda lo, hi: lo + (hi - lo) * self.jitter())
        return backoff.delay(retry)


class OpenAICompatChatModel(BaseChatModel):
    """Chat Completions over HTTP, always streamed (see the module docstring)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key: SecretStr | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timeout: float = 60.0  # connect, and then each read (so: the longest gap between tokens)
    max_retries: int = 1
    # Set, so that LangChain's invoke streams too and every token reaches the callbacks.
    streaming: bool = True
    retry_sleep: Callable[[float], None] = Field(default=time.sleep, exclude=True, repr=False)

    _headers: dict[str, str] = PrivateAttr()
    _url: str = PrivateAttr()
    _path: str = PrivateAttr()
    _pool: urllib3.HTTPConnectionPool | None = PrivateAttr(default=None)
    _origin: str = PrivateAttr()
    _timeout: urllib3.Timeout = PrivateAttr()
    _retry: RetryPolicy = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("streaming", True)  # must be in model_fields_set to count
        super().__init__(**kwargs)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "User-Agent": "flowgate"}
        if self.api_key is not None and self.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        self._headers = headers
        self._url = self.base_url.rstrip("/") + "/chat/completions"
        parsed = urllib3.util.parse_url(self._url)
        self._path = parsed.request_uri
        self._origin = f"{parsed.scheme}://{parsed.host}" + (f":{parsed.port}" if parsed.port else "")
        self._timeout = urllib3.Timeout(connect=self.timeout, read=self.timeout)
        self._retry = RetryPolicy(max_retries=self.max_retries, sleep=self.retry_sleep)

    @property
    def _llm_type(self) -> str:
        return "openai-compatible"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "openai"  # the API it speaks
        params["flowgate_endpoint"] = self._origin.split("://", 1)[1]  # whom: host[:port]
        return params

    def bind_tools(self, tools: list[Any], *, tool_choice: str | dict | None = None,
                   **kwargs: Any) -> Runnable:
        """This model with ``tools`` (LangChain tools, functions or OpenAI tool dicts) sent
        on every call; ``tool_choice``: ``"auto"``, ``"none"``, ``"required"``, a tool's name
        or OpenAI's object. (The engine's Agent passes ``tools=`` per call instead: a bound
        model merges callback managers through a set, which reorders their handlers.)"""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    def request_body(self, messages: list[BaseMessage], stop: list[str] | None = None,
                     **kwargs: Any) -> dict[str, Any]:
        """The JSON body posted for ``messages`` (``kwargs`` add or override fields)."""
        body: dict[str, Any] = {"model": self.model,
                                "messages": [_to_openai(m) for m in messages],
                                "stream": True, "stream_options": {"include_usage": True}}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if stop:
            body["stop"] = stop
        kwargs.pop("stream", None)  # LangChain's own switch, not a request field
        body.update(kwargs)
        return body

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, **kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # LangChain calls on_llm_new_token for every chunk yielded here.
        payload = json.dumps(self.request_body(messages, stop, **kwargs)).encode()
        retry = 0
        while True:
            yielded = False
            try:
                with closing(self._chunks(self._post(payload))) as chunks:
                    for chunk in chunks:
                        yielded = True
                        yield chunk
                return
            except ProviderError as exc:
                retry += 1
                delay = None if yielded else self._retry.delay(retry, exc)
                if delay is None:
                    exc.origin = self._origin
                    raise
            self._retry.sleep(delay)

    def _post(self, payload: bytes) -> urllib3.BaseHTTPResponse:
        """Send the request; the response of a 200 (unread), else raise ProviderError."""
        if self._pool is None:  # at the first call: building a model stays offline
            self._pool = _pool_for(self._url)
        try:
            response = self._pool.urlopen("POST", self._path, body=payload, headers=self._headers,
                                          timeout=self._timeout, retries=False, redirect=False,
                                          assert_same_host=False, preload_content=False)
        except HTTPError as exc:
            raise _translate(exc) from exc
        if response.status != 200:
            raise _status_error(response)
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            _discard(response)
            raise ProviderResponseError(
                f"expected an event stream (text/event-stream), got {content_type or 'no Content-Type'}")
        return response

    def _chunks(self, response: urllib3.BaseHTTPResponse) -> Iterator[ChatGenerationChunk]:
        """Read the event stream to its end; the connection goes back to the pool only then."""
        done = drained = False
        finish: dict[str, Any] = {}
        usage = None
        try:
            body = response.read_chunked() if response.chunked else _read1_all(response)
            for data in _sse_data(body):
                if done:
                    continue  # after [DONE]: read the body to its end, for keep-alive
                if data == b"[DONE]":
                    done = True
                    continue
                try:
                    event = json.loads(data)
                    choices = event.get("choices")
                except (ValueError, AttributeError) as exc:
                    raise ProviderResponseError(f"not a JSON object in the event stream: {exc}") from None
                if event.get("error"):
                    raise ProviderResponseError(_error_message(event) or "error event in the stream")
                if choices:
                    choice = choices[0]
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if content:
                        yield ChatGenerationChunk(message=AIMessageChunk(content=content))
                    calls = delta.get("tool_calls")
                    if calls:
                        yield ChatGenerationChunk(message=AIMessageChunk(
                            content="", tool_call_chunks=_tool_call_chunks(calls)))
                    if choice.get("finish_reason"):
                        finish = {"finish_reason": choice["finish_reason"],
                                  "model_name": event.get("model", self.model)}
                if event.get("usage"):
                    usage = _usage_metadata(event["usage"])
            drained = True
        except HTTPError as exc:
            if not done:  # after [DONE] the answer is whole: only the connection is lost
                raise _translate(exc) from exc
        finally:
            if not drained:
                response.close()  # the socket: the provider stops generating
            response.release_conn()
        if not done and not finish:
            raise ProviderResponseError("the event stream ended without [DONE] or a finish_reason")
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage, chunk_position="last"),
            generation_info=finish or None)


def _to_openai(message: BaseMessage) -> dict[str, Any]:
    if isinstance(message, ChatMessage):
        role = message.role
    else:
        role = _ROLES.get(message.type)
        if role is None:
            raise ValueError(f"cannot send a {message.type!r} message to an OpenAI-compatible model")
    content = message.content if isinstance(message.content, str) else message.text
    out: dict[str, Any] = {"role": role, "content": content}
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    elif isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
        out["content"] = content or None  # OpenAI's own shape for a message of calls only
        out["tool_calls"] = [
            {"id": call["id"], "type": "function", "function": {
                "name": call["name"], "arguments": json.dumps(call["args"])}}
            for call in message.tool_calls] + [
            {"id": call["id"], "type": "function", "function": {
                "name": call["name"] or "", "arguments": call["args"] or ""}}
            for call in message.invalid_tool_calls]
    return out


def _tool_call_chunks(calls: Any) -> list[dict[str, Any]]:
    """OpenAI's ``delta.tool_calls`` as LangChain tool call chunks (merged by ``index``)."""
    if not isinstance(calls, list):
        raise ProviderResponseError("delta.tool_calls is not a list")
    out = []
    for position, call in enumerate(calls):
        function = call.get("function") or {} if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise ProviderResponseError("a delta.tool_calls entry is not an object")
        out.append({"name": function.get("name"), "args": function.get("arguments"),
                    "id": call.get("id"), "index": call.get("index", position),
                    "type": "tool_call_chunk"})
    return out


def _sse_data(body: Iterable[bytes]) -> Iterator[bytes]:
    """The ``data`` of each Server-Sent Event in ``body`` (bytes as they arrive). Lines end
    with LF or CRLF; comments and other fields are skipped; several ``data:`` lines of one
    event are joined by LF, as the SSE spec says."""
    rest = b""
    data: list[bytes] = []
    for piece in body:
        lines = (rest + piece).split(b"\n") if rest else piece.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield data[0] if len(data) == 1 else b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
    if rest.startswith(b"data:"):  # the last event had no blank line after it
        data.append(rest[5:].lstrip(b" "))
    if data:
        yield b"\n".join(data)


def _read1_all(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """A body without chunked encoding, as it arrives."""
    while data := response.read1(65_536):
        yield data


def _usage_metadata(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``usage`` as LangChain's usage_metadata (what langchain-openai reports)."""
    inputs = usage.get("prompt_tokens") or 0
    outputs = usage.get("completion_tokens") or 0
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    input_details = {"audio": prompt.get("audio_tokens"), "cache_read": prompt.get("cached_tokens"),
                     "cache_creation": prompt.get("cache_write_tokens")}
    output_details = {"audio": completion.get("audio_tokens"),
                      "reasoning": completion.get("reasoning_tokens")}
    return {
        "input_tokens": inputs, "output_tokens": outputs,
        "total_tokens": usage.get("total_tokens") or inputs + outputs,
        "input_token_details": {k: v for k, v in input_details.items() if v is not None},
        "output_token_details": {k: v for k, v in output_details.items() if v is not None},
    }


def _status_error(response: urllib3.BaseHTTPResponse) -> ProviderStatusError:
    status = response.status
    try:
        raw = response.read(_MAX_ERROR_BODY + 1)
    except HTTPError:
        raw = b""
    finally:
        if not response.closed:  # not read to the end: do not reuse the connection
            response.close()
        response.release_conn()
    try:
        message = _error_message(json.loads(raw))
    except ValueError:
        message = ""
    return ProviderStatusError(status, message, retry_after=_retry_after(response))


def _error_message(body: Any) -> str:
    """``{"error": {"message": …}}`` (OpenAI), ``{"error": "…"}`` or ``{"message": "…"}``."""
    if not isinstance(body, dict):
        return ""
    error = body.get("error", body)
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else ""


def _retry_after(response: urllib3.BaseHTTPResponse) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: use the backoff instead


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    response.close()
    response.release_conn()


def _translate(exc: HTTPError) -> ProviderError:
    """urllib3's exception as ours (``_stream`` retries only before it yielded anything)."""
    reason = _reason(exc)
    if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError: it subclasses it
        return ProviderConnectionError(f"could not connect: {reason}", retryable=True)
    if isinstance(exc, ConnectTimeoutError):
        return ProviderTimeout(f"connect timed out: {reason}", retryable=True)
    if isinstance(exc, ReadTimeoutError):
        return ProviderTimeout("read timed out")
    if isinstance(exc, SSLError):
        return ProviderConnectionError(f"TLS failed: {reason}")
    return ProviderConnectionError(f"the connection broke: {reason}", retryable=True)


def _reason(exc: BaseException) -> str:
    """The OS's words for a socket failure (no host names or ports), else the class name."""
    seen = exc
    for _ in range(5):
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            for arg in getattr(seen, "args", ()):
                if isinstance(arg, OSError):
                    nxt = arg
                    break
        if nxt is None:
            break
        seen = nxt
    return type(seen).__name__
