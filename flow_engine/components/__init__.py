"""The whitelisted node types. :func:`default_registry` is the only way a type name in a
flow definition becomes code."""

from __future__ import annotations

from functools import cache

from flow_engine.components.agent import Agent
from flow_engine.components.base import (
    BuildContext,
    Component,
    ComponentRegistry,
    Limits,
    Port,
    Routed,
)
from flow_engine.components.io import ChatInput, ChatOutput, TextInput, TextOutput
from flow_engine.components.knowledge import KnowledgeRetriever
from flow_engine.components.memory import ChatHistory
from flow_engine.components.models import ChatModel, EchoChatModel
from flow_engine.components.parsers import JsonOutputParser, StrOutputParser
from flow_engine.components.prompts import ChatPromptTemplate, PromptTemplate
from flow_engine.components.retrievers import BM25Retriever
from flow_engine.components.routers import ConditionalRouter
from flow_engine.components.template_parser import Parser
from flow_engine.components.text import TextSplitter
from flow_engine.components.tools import (
    BM25SearchTool,
    Calculator,
    FlowTool,
    KnowledgeSearchTool,
)

ALL_COMPONENTS = (
    ChatInput, TextInput, PromptTemplate, ChatPromptTemplate, ChatModel, StrOutputParser,
    JsonOutputParser, TextSplitter, BM25Retriever, KnowledgeRetriever, ConditionalRouter,
    ChatHistory, ChatOutput, TextOutput, Parser, Agent, Calculator, FlowTool, BM25SearchTool,
    KnowledgeSearchTool,
)


@cache
def default_registry() -> ComponentRegistry:
    return ComponentRegistry(cls() for cls in ALL_COMPONENTS)


__all__ = [
    "ALL_COMPONENTS", "BuildContext", "Component", "ComponentRegistry", "EchoChatModel",
    "Limits", "Port", "Routed", "default_registry",
]
