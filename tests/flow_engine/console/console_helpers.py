"""What the console's browser tests share: the keys of each role, a flow to push, signing in,
and starting a run with a recorder of what the page showed (``RECORDER``: each change of the
streamed answer's length and each state a node went through, with the time)."""

from __future__ import annotations

from support.keys import SECRETS

ADMIN, PUBLISHER, RUNNER = SECRETS["admin"], SECRETS["publisher"], SECRETS["runner"]

# Records, in the page, each change of the streamed answer's length and each state a node
# goes through, with the time; and when the run view reached an end state.
RECORDER = """() => {
  window.__seen = {tokens: [], nodes: {}, endedAt: null};
  const view = document.querySelector('.run-view');
  const tokens = view.querySelector('.tokens');
  new MutationObserver(() => window.__seen.tokens.push([performance.now(), tokens.textContent.length]))
    .observe(tokens, {childList: true, characterData: true, subtree: true});
  new MutationObserver((changes) => {
    for (const c of changes) {
      const el = c.target;
      if (el.classList && el.classList.contains('node')) {
        (window.__seen.nodes[el.dataset.node] ||= []).push(el.dataset.state);
      }
      if (el === view && ['finished', 'failed', 'cancelled'].includes(view.dataset.state)
          && window.__seen.endedAt === null) window.__seen.endedAt = performance.now();
    }
  }).observe(document.querySelector('main'),
             {attributes: true, attributeFilter: ['data-state'], subtree: true});
}"""


def flow_definition(flow_id: str, *, name: str | None = None, template: str = "Q: {question}",
                    **llm_params) -> dict:
    """ChatInput → PromptTemplate → ChatModel (llm-sim) → ChatOutput."""
    return {"id": flow_id, "name": name or flow_id, "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "prompt", "type": "PromptTemplate", "params": {"template": template}},
        {"id": "llm", "type": "ChatModel", "params": {"provider": "openai", "model": "gpt-4o-mini",
                                                      **llm_params}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "prompt"}, {"source": "prompt", "target": "llm"},
                  {"source": "llm", "target": "out"}]}


def signed_in(open_page, key: str = ADMIN, path: str = "/ui/", **size):
    page = open_page(**size)
    page.goto(path)
    page.sign_in(key)
    return page


def start_run(page, text: str) -> None:
    page.page.evaluate(RECORDER)
    page.page.fill("#run-input", text)
    page.page.click(".run-form button[type=submit]")
