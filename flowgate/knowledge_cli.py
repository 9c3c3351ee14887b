"""``flowgate knowledge``: knowledge bases from a shell (the engine's /api/v1/knowledge).

    flowgate knowledge create NAME [--id ID] [--model M] [--dimensions N] [--base-url URL]
                                   [--chunk-size N] [--chunk-overlap N]
    flowgate knowledge upload KB FILE... [--metadata JSON] [--wait]
    flowgate knowledge list [KB]          bases, or the documents of one base
    flowgate knowledge search KB QUERY [-k N] [--mode vector|keyword|hybrid] [--filter K=V ...]

Engine URL and key as for ``flowgate flows`` (--engine-url / FLOWGATE_ENGINE_URL, --api-key /
FLOWGATE_API_KEY / .flowgate/engine.key). Exit codes: 0 ok; 1 the engine refused, or a
document failed to index (``--wait``); 2 usage or an unreadable file; 3 the engine is
unreachable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mimetypes
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "text-embedding-3-small"
SIM_MODEL = "flowgate-sim-embedding"  # llm-sim's (any name works there)


def add_commands(knowledge: argparse.ArgumentParser) -> None:
    knowledge.add_argument("--engine-url", default=None, help="default: FLOWGATE_ENGINE_URL or :8000")
    knowledge.add_argument("--api-key", default=None, help="default: FLOWGATE_API_KEY, ...")
    sub = knowledge.add_subparsers(title="knowledge commands", metavar="COMMAND")
    create = sub.add_parser("create", help="create a knowledge base")
    create.add_argument("name")
    create.add_argument("--id", default=None, help="default: derived from the name")
    create.add_argument("--model", default=DEFAULT_MODEL, help="embedding model (%(default)s)")
    create.add_argument("--dimensions", type=int, default=None)
    create.add_argument("--base-url", default=None, help="default: the engine's OPENAI_BASE_URL")
    create.add_argument("--chunk-size", type=int, default=1000)
    create.add_argument("--chunk-overlap", type=int, default=200)
    create.set_defaults(handler=_create)
    upload = sub.add_parser("upload", help="upload documents (.txt, .md, .html, .pdf)")
    upload.add_argument("kb")
    upload.add_argument("files", nargs="+", type=Path)
    upload.add_argument("--metadata", default=None, help='JSON object, e.g. {"team": "support"}')
    upload.add_argument("--wait", action="store_true", help="wait until they are indexed")
    upload.set_defaults(handler=_upload)
    listing = sub.add_parser("list", help="list knowledge bases, or the documents of one")
    listing.add_argument("kb", nargs="?", default=None)
    listing.set_defaults(handler=_list)
    search = sub.add_parser("search", help="search a knowledge base")
    search.add_argument("kb")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=4)
    search.add_argument("--mode", choices=("vector", "keyword", "hybrid"), default="hybrid")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="only documents whose metadata has KEY=VALUE (repeatable)")
    search.set_defaults(handler=_search)


def main(argv: list[str] | None = None) -> int:
    """``flowgate knowledge ...`` on its own (what cli.py's subcommand runs)."""
    from flowgate import flows_cli

    parser = argparse.ArgumentParser(prog="flowgate knowledge")
    add_commands(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return flows_cli.dispatch(args)


def _client(args: argparse.Namespace):
    from flowgate.flows_cli import _client as client

    return client(args)


def _create(args) -> int:
    embedding: dict[str, Any] = {"provider": "openai", "model": args.model}
    if args.dimensions:
        embedding["dimensions"] = args.dimensions
    if args.base_url:
        embedding["base_url"] = args.base_url
    body: dict[str, Any] = {"name": args.name, "embedding": embedding,
                            "chunking": {"size": args.chunk_size, "overlap": args.chunk_overlap}}
    if args.id:
        body["id"] = args.id
    kb = _client(args).call("POST", "/knowledge", body)
    print(f"knowledge base '{kb['id']}' created ({kb['embedding']['model']})")
    return 0


def _upload(args) -> int:
    metadata = _metadata(args.metadata)
    client = _client(args)
    docs = []
    for path in args.files:
        doc = upload_file(client, args.kb, path, metadata)
        docs.append(doc)
        print(f"{path}: document '{doc['name']}' {doc['status']}")
    if not args.wait:
        return 0
    status = 0
    for doc in wait_indexed(client, args.kb, [d["id"] for d in docs]):
        shown = f"{doc['chunks']} chunks" if doc["status"] == "ready" else doc.get("error", "")
        print(f"{doc['name']}: {doc['status']} ({shown})")
        status |= doc["status"] != "ready"
    return status


def upload_file(client, kb: str, path: Path, metadata: dict[str, Any] | None = None) -> dict:
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"flowgate: cannot read {path}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    form = {"metadata": json.dumps(metadata)} if metadata else {}
    return client.call("POST", f"/knowledge/{kb}/documents", files={"file": (path.name, data, ctype)},
                       data=form)


def wait_indexed(client, kb: str, doc_ids: list[str], timeout_s: float = 600.0) -> list[dict]:
    """The documents once none is queued or indexing (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        docs = [client.call("GET", f"/knowledge/{kb}/documents/{d}") for d in doc_ids]
        if all(d["status"] in ("ready", "failed") for d in docs) or time.monotonic() > deadline:
            return docs
        time.sleep(0.2)


def _list(args) -> int:
    client = _client(args)
    if args.kb is None:
        bases = client.call("GET", "/knowledge")["knowledge"]
        if not bases:
            print("no knowledge bases")
        for kb in bases:
            print(f"{kb['id']:<24} {kb['status']:<9} {kb['documents']['total']:>4} docs "
                  f"{kb['chunks']:>7} chunks  {kb['embedding']['model']}  {kb['name']}")
        return 0
    docs = client.call("GET", f"/knowledge/{args.kb}/documents")["documents"]
    if not docs:
        print("no documents")
    for doc in docs:
        error = f"  {doc['error']}" if doc.get("error") else ""
        print(f"{doc['name']:<32} {doc['status']:<9} {doc['chunks']:>5} chunks{error}")
    return 0


def _search(args) -> int:
    metadata = {}
    for item in args.filter:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"flowgate: --filter {item!r}: write KEY=VALUE", file=sys.stderr)
            return 2
        metadata[key] = value
    body: dict[str, Any] = {"query": args.query, "k": args.k, "mode": args.mode}
    if metadata:
        body["filter"] = {"metadata": metadata}
    hits = _client(args).call("POST", f"/knowledge/{args.kb}/search", body)["hits"]
    if not hits:
        print("no hits")
    for i, hit in enumerate(hits, 1):
        text = " ".join(hit["text"].split())
        print(f"{i}. {hit['document']} #{hit['chunk']}  score {hit['score']:.4f}\n   "
              f"{text[:200]}{'…' if len(text) > 200 else ''}")
    return 0


def _metadata(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        print(f"flowgate: --metadata is not JSON: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not isinstance(value, dict):
        print("flowgate: --metadata must be a JSON object", file=sys.stderr)
        raise SystemExit(2)
    return value


def ensure_demo(client, folder: Path, *, kb_id: str = "handbook", model: str = SIM_MODEL,
                dimensions: int | None = 256, wait_s: float = 60.0) -> list[str]:
    """``flowgate up``'s demo base: create ``kb_id`` if missing and upload the files of
    ``folder`` whose content changed (by sha256); wait for them. Returns the document names."""
    from flowgate.client import ApiError

    try:
        client.call("GET", f"/knowledge/{kb_id}")
    except ApiError as exc:
        if exc.status != 404:
            raise
        embedding: dict[str, Any] = {"provider": "openai", "model": model}
        if dimensions:
            embedding["dimensions"] = dimensions
        client.call("POST", "/knowledge", {"id": kb_id, "name": kb_id, "embedding": embedding,
                                           "chunking": {"size": 800, "overlap": 100}})
    have = {d["name"]: d for d in client.call("GET", f"/knowledge/{kb_id}/documents")["documents"]}
    uploaded = []
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".md", ".txt", ".html", ".pdf")):
        known = have.get(path.name)
        if known and known["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() \
                and known["status"] == "ready":
            continue
        uploaded.append(upload_file(client, kb_id, path)["id"])
    wait_indexed(client, kb_id, uploaded, timeout_s=wait_s)
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".md", ".txt", ".html", ".pdf"))


if __name__ == "__main__":
    sys.exit(main())
