"""ChatModel: an LLM call. Providers: ``openai`` (any OpenAI-compatible endpoint through
:class:`~flow_engine.components.openai_compat.OpenAICompatChatModel`, always streamed so
tokens can be relayed and a run can be cancelled between tokens) and ``echo`` (offline and
deterministic, for tests and demos).

API keys never come from a flow definition: ``api_key`` in params is a validation error;
the key comes from the engine's environment (``OPENAI_API_KEY``) via the BuildContext.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, Limits, Port
from flow_engine.components.openai_compat import DEFAULT_BASE_URL, OpenAICompatChatModel

_SECRET_PARAMS = ("api_key", "openai_api_key", "apikey", "key", "token", "secret")


class EchoChatModel(BaseChatModel):
    """Deterministic stand-in for an LLM: answers with the last message, prefixed so that
    nobody mistakes it for a model's answer. Streams one word per chunk when asked to
    (``invoke(..., stream=True)``, which the engine does for streamed runs)."""

    prefix: str = "[echo: not an LLM] "

    @property
    def _llm_type(self) -> str:
        return "flowgate-echo"

    def _reply(self, messages: list[BaseMessage]) -> tuple[str, dict[str, int]]:
        last = messages[-1].text if messages else ""
        text = self.prefix + last
        prompt_tokens = sum(len(m.text.split()) for m in messages)
        completion_tokens = len(text.split())
        usage = {
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return text, usage

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        text, usage = self._reply(messages)
        message = AIMessage(content=text, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        text, usage = self._reply(messages)
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            last = i == len(words) - 1
            yield ChatGenerationChunk(
                message=AIMessageChunk(content=piece, usage_metadata=usage if last else None)
            )


class ChatModel(Component):
    type_name = "ChatModel"
    display_name = "Chat Model"
    description = (
        "Calls an LLM. provider 'openai' = any OpenAI-compatible endpoint; 'echo' = offline stand-in."
    )
    outputs = ("message",)
    input_ports = (Port("prompt", coerce="prompt", description="text, prompt or messages"),)
    # a tweak pointing base_url elsewhere would send the engine's OPENAI_API_KEY there
    locked_params = frozenset({"provider", "base_url"})
    params_schema = {
        "type": "object",
        "properties": {
            "provider": {"enum": ["openai", "echo"], "default": "openai"},
            "model": {"type": "string", "minLength": 1, "maxLength": 200, "default": "gpt-4o-mini"},
            "base_url": {"type": "string", "pattern": "^https?://", "maxLength": 2000,
                         "description": "default: the engine's OPENAI_BASE_URL"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 60},
            "max_retries": {"type": "integer", "minimum": 0, "maximum": 5, "default": 1},
        },
    }

    def check_params(self, params: Mapping[str, Any], limits: Limits):
        secrets = [k for k in params if k.lower() in _SECRET_PARAMS]
        for key in secrets:
            yield f".{key}", (
                f"'{key}' must not be in a flow definition: flows are stored and listed in "
                "clear; set OPENAI_API_KEY in the engine's environment instead"
            )
        rest = {k: v for k, v in params.items() if k not in secrets}
        yield from super().check_params(rest, limits)

    def check_semantics(self, params: Mapping[str, Any], limits: Limits):
        base_url = params.get("base_url")
        if (limits.egress is not None and isinstance(base_url, str)
                and params.get("provider", "openai") == "openai"):
            problem = limits.egress.problem(base_url)
            if problem:
                yield ".base_url", problem

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        if params["provider"] == "echo":
            return EchoChatModel()
        base_url = params.get("base_url") or ctx.openai_base_url or DEFAULT_BASE_URL
        key = ctx.openai_api_key or None
        if ctx.egress is not None:  # validation refused other origins; this is the backstop
            if ctx.egress.problem(base_url):
                raise ValueError(f"node '{node_id}': {ctx.egress.problem(base_url)}")
            key = ctx.egress.key_for(base_url, key)
        # aliases name what the engine's endpoint serves: a node sent elsewhere keeps its name
        aliased = not params.get("base_url") or params["base_url"] == ctx.openai_base_url
        return OpenAICompatChatModel(
            model=ctx.model_aliases.get(params["model"], params["model"]) if aliased
            else params["model"],
            base_url=base_url,
            api_key=key,  # no key: no Authorization header
            timeout=params["timeout"],
            max_retries=params["max_retries"],
            temperature=params.get("temperature"),
            max_tokens=params.get("max_tokens"),
        )
