"""What a node type is: its params schema, its input and output ports, and how it builds
the LangChain Runnable that does its work.

A component never sees Flask, SQL or the request; it is given validated params and a
:class:`BuildContext` (engine-side settings such as the default LLM endpoint and the
secrets that must never appear in a flow definition).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from jsonschema import Draft202012Validator
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config, get_callback_manager_for_config

from flow_engine.egress import ProviderOrigins

Coerce = Literal["text", "prompt", "any"]
Kind = Literal["input", "output", "step"]


@dataclass(frozen=True, slots=True)
class Port:
    """A named input of a node. ``coerce`` says how the engine converts the upstream value
    before handing it over: ``text`` (documents, messages, lists → plain text), ``prompt``
    (strings, prompt values and message lists pass, anything else becomes text) or ``any``."""

    name: str
    required: bool = True
    coerce: Coerce = "text"
    description: str = ""


@dataclass(frozen=True)
class Limits:
    """What a flow definition must respect on this engine: sizes, and (``egress``) the
    provider origins its models may call. ``egress=None`` checks no origins (offline
    validation, where the engine's settings are unknown)."""

    max_nodes: int = 100
    max_edges: int = 400
    max_template_chars: int = 20_000
    max_definition_bytes: int = 2_000_000
    egress: ProviderOrigins | None = None
    # engine-side lookups validation may consult (e.g. {"knowledge": ...}: which knowledge
    # bases exist); empty offline, where such checks are skipped
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildContext:
    """Engine-side settings components may read while building (never from the flow JSON)."""

    openai_base_url: str | None = None
    openai_api_key: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    egress: ProviderOrigins | None = None  # None: the key goes wherever base_url points
    # model names flows use → the model the endpoint serves (FLOW_ENGINE_MODEL_ALIASES)
    model_aliases: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Routed:
    """Returned by a branching node: only edges leaving ``port`` carry ``value`` onwards;
    nodes fed only through the other ports are skipped for this run."""

    port: str
    value: Any


class NodeFunction(Runnable[Any, Any]):
    """A plain function as a Runnable, like ``RunnableLambda`` but lean: one chain run with
    start/end/error callbacks and nothing else (RunnableLambda inspects the function's
    signature on every call, which costs more than the engine's own small nodes)."""

    def __init__(self, func: Callable[[Any], Any], name: str) -> None:
        self.func = func
        self.name = name

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        run_manager = get_callback_manager_for_config(config).on_chain_start(
            None, input, name=config.get("run_name") or self.name, run_id=config.pop("run_id", None))
        try:
            output = self.func(input)
        except BaseException as exc:
            run_manager.on_chain_error(exc)
            raise
        run_manager.on_chain_end(output)
        return output


class Component:
    """Base class of every whitelisted node type. Subclasses set the class attributes and
    implement :meth:`build`; ports that depend on params override :meth:`inputs`."""

    type_name: ClassVar[str]
    display_name: ClassVar[str]
    description: ClassVar[str] = ""
    kind: ClassVar[Kind] = "step"
    params_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}}
    input_ports: ClassVar[tuple[Port, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ("output",)
    # True when the Runnable takes a dict of inputs even if only one is connected
    # (prompt templates); otherwise a single connected input is passed as the bare value.
    takes_mapping: ClassVar[bool] = False
    # True when the Runnable is given the run input ({input_value, session_id, ...}) instead
    # of edges (input nodes, chat history).
    reads_run_input: ClassVar[bool] = False
    # Params a run's tweaks may not change (e.g. where an LLM call, with the engine's key,
    # is sent): only a new flow version can.
    locked_params: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        schema = copy.deepcopy(dict(self.params_schema))
        schema.setdefault("additionalProperties", False)
        self._validator = Draft202012Validator(schema)
        self._defaults = {
            name: spec["default"]
            for name, spec in schema.get("properties", {}).items()
            if "default" in spec
        }

    def inputs(self, params: Mapping[str, Any]) -> tuple[Port, ...]:
        return self.input_ports

    def with_defaults(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {**self._defaults, **params}

    def check_params(self, params: Mapping[str, Any], limits: Limits) -> Iterator[tuple[str, str]]:
        """Yield ``(sub_path, message)`` for every problem in ``params``; sub_path is relative
        to the node's ``params`` (``""`` for the params object itself)."""
        known = self.params_schema.get("properties", {})
        for key in params:
            if key not in known:
                yield "", self._unknown_param_message(key, known)
        for error in self._validator.iter_errors(dict(params)):
            if error.validator == "additionalProperties" and not error.absolute_path:
                continue  # reported above with a suggestion
            sub = "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path
            )
            yield sub, error.message
        yield from self.check_semantics(params, limits)

    def check_semantics(
        self, params: Mapping[str, Any], limits: Limits
    ) -> Iterable[tuple[str, str]]:
        """Checks JSON Schema cannot express (template fields, regexes); params already
        passed the schema when this is called with valid types, but may be partial."""
        return ()

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The ``GET /components`` entry: params JSON Schema, inputs and outputs."""
        return {
            "type": self.type_name,
            "display_name": self.display_name,
            "description": self.description,
            "kind": self.kind,
            "params_schema": copy.deepcopy({**self.params_schema, "additionalProperties": False}),
            "inputs": [
                {"name": p.name, "required": p.required, "description": p.description}
                for p in self.input_ports
            ],
            "outputs": list(self.outputs),
        }

    def _unknown_param_message(self, key: str, known: Mapping[str, Any]) -> str:
        hint = difflib.get_close_matches(key, list(known), n=1)
        names = ", ".join(sorted(known)) or "none"
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"unknown param '{key}' for {self.type_name} (known params: {names}){suggestion}"


class ComponentRegistry:
    """The whitelist: node types are looked up here by name and nowhere else."""

    def __init__(self, components: Iterable[Component]) -> None:
        self._by_name: dict[str, Component] = {}
        for component in components:
            if component.type_name in self._by_name:
                raise ValueError(f"duplicate component type {component.type_name!r}")
            self._by_name[component.type_name] = component

    def get(self, type_name: str) -> Component | None:
        return self._by_name.get(type_name)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._by_name

    def __iter__(self) -> Iterator[Component]:
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def suggest(self, type_name: str) -> str | None:
        hits = difflib.get_close_matches(type_name, list(self._by_name), n=1)
        return hits[0] if hits else None
