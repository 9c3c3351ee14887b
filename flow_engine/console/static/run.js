// A run as it happens: status, the graph's nodes lighting up, tokens as they arrive, tool
// calls as steps, the output and usage at the end, and a Cancel button.

import { fill, h, link, ms, runPath } from "./dom.js";
import { markNode } from "./graph.js";
import { RunStream } from "./stream.js";

export class RunView {
  /** ``graph``: the element drawGraph made (nodes to colour), or null. */
  constructor(graph) {
    this.graph = graph;
    this.status = h("p", { class: "run-status", role: "status", "aria-live": "polite" }, "");
    this.transport = h("span", { class: "transport" });
    this.link = h("span", { class: "run-link" });
    this.cancelButton = h("button", { type: "button", class: "danger", disabled: true,
      onclick: () => this.cancel() }, "Cancel");
    this.tokens = h("pre", { class: "tokens", "aria-label": "streamed answer" });
    this.steps = h("ol", { class: "steps", "aria-label": "steps" });
    this.result = h("div", { class: "result" });
    this.element = h("section", { class: "run-view", "aria-label": "run" },
      h("div", { class: "run-head" }, this.status, this.transport, this.link, this.cancelButton),
      h("h3", {}, "Answer"), this.tokens,
      h("details", { class: "steps-box", open: true }, h("summary", {}, "Steps"), this.steps),
      this.result);
    this.started = new Map(); // node → when this page saw it start (performance.now())
    this.tokenEvents = 0;
    this.stream = null;
  }

  reset() {
    this.tokens.replaceChildren();
    this.steps.replaceChildren();
    this.result.replaceChildren();
    this.link.replaceChildren();
    this.started.clear();
    this.tokenEvents = 0;
    if (this.graph) for (const el of this.graph.querySelectorAll("g.node")) markNode(this.graph, el.dataset.node, "idle");
    for (const el of this.graph ? this.graph.querySelectorAll(".node-time") : []) el.textContent = "";
  }

  follow(how) {
    if (this.stream) this.stream.close();
    this.reset();
    this.setStatus("connecting", "Connecting…");
    this.stream = new RunStream({
      onEvent: (event) => this.show(event),
      onTransport: (name) => { this.transport.textContent = `via ${name === "websocket" ? "WebSocket" : "Server-Sent Events"}`; this.element.dataset.transport = name; },
      onLost: () => this.lost(),
    });
    this.cancelButton.disabled = false;
    how(this.stream);
    return this.stream.done;
  }

  run({ flowId, input, sessionId }) {
    return this.follow((stream) => stream.start({ flowId, input, sessionId }));
  }

  watch(runId) {
    return this.follow((stream) => stream.watch(runId));
  }

  async cancel() {
    this.cancelButton.disabled = true;
    try {
      await this.stream?.cancel();
      this.setStatus("cancelling", "Cancelling…");
    } catch (err) {
      this.setStatus("failed", `Cancel refused: ${err.message}`);
    }
  }

  /** No connection could follow the run to its end: say so (it may still be going). */
  lost() {
    this.cancelButton.disabled = true;
    for (const el of this.graph ? this.graph.querySelectorAll("g.node[data-state='running']") : []) {
      el.dataset.state = "unknown";
    }
    this.setStatus("lost", this.element.dataset.runId
      ? "Connection lost: the run may still be going; open its watch link to follow it."
      : "Connection lost: the engine could not be reached.");
  }

  setStatus(state, text) {
    this.element.dataset.state = state;
    this.status.textContent = text;
  }

  step(kind, ...text) {
    this.steps.append(h("li", { class: `step step-${kind}` }, ...text));
  }

  show(event) {
    const node = event.node;
    switch (event.type) {
      case "run_started":
        this.setStatus("running", `Running ${event.flow_id} v${event.version}`);
        this.link.replaceChildren("Watch link: ", link(runPath(event.run_id), event.run_id));
        this.element.dataset.runId = event.run_id;
        break;
      case "node_started":
        this.started.set(node, performance.now());
        if (this.graph) markNode(this.graph, node, "running");
        this.step("node", `${node} (${event.node_type}) started`);
        break;
      case "node_finished":
        if (this.graph) markNode(this.graph, node, "done", event.duration_ms);
        this.step("node", `${node} finished in ${ms(event.duration_ms)}`);
        break;
      case "token":
        this.tokenEvents += 1;
        this.tokens.append(event.text ?? "");
        this.element.dataset.tokens = String(this.tokenEvents);
        break;
      case "tool_call":
        this.step("tool", `${node} calls ${event.tool}: ${JSON.stringify(event.args ?? "")}`.slice(0, 500));
        break;
      case "tool_result":
        this.step("tool", `${event.tool} answered (${event.status}): ${event.output ?? ""}`.slice(0, 500));
        break;
      case "error": {
        const cancelled = event.code === "run_cancelled";
        const took = this.failedAfter(event);
        if (node && this.graph) markNode(this.graph, node, cancelled ? "stopped" : "failed", took);
        if (node && !cancelled) this.step("node", `${node} failed after ${ms(took)}`);
        this.endNodes("not-run"); // after a failure, a node not reached was not skipped
        this.cancelButton.disabled = true;
        this.setStatus(cancelled ? "cancelled" : "failed", cancelled ? "Cancelled" : `Failed: ${event.code}`);
        this.result.replaceChildren(h("p", { class: "error" }, `${event.code}: ${event.message ?? ""}`,
          node ? ` (node ${node}${took === undefined ? "" : `, after ${ms(took)}`})` : ""));
        break;
      }
      case "run_finished":
        this.endNodes("skipped");
        this.cancelButton.disabled = true;
        this.setStatus("finished", `Finished in ${ms(event.duration_ms)}`);
        if (!this.tokenEvents && event.output !== undefined && event.output !== null) {
          this.tokens.textContent = typeof event.output === "string" ? event.output : JSON.stringify(event.output, null, 2);
        }
        fill(this.result,
          h("h3", {}, "Output"),
          h("pre", { class: "output" }, typeof event.output === "string" ? event.output : JSON.stringify(event.output, null, 2)),
          h("p", { class: "usage" }, `Usage: ${JSON.stringify(event.usage || {})}`),
          (event.warnings || []).map((w) => h("p", { class: "warning" }, `Warning: ${typeof w === "string" ? w : JSON.stringify(w)}`)));
        break;
      default:
        break;
    }
  }

  /** How long the failed node ran: the engine's figure when the event has one, else the time
   * between its start and the error as this page saw them (a replay shows them together). */
  failedAfter(event) {
    if (typeof event.duration_ms === "number") return event.duration_ms;
    const started = this.started.get(event.node);
    return started === undefined ? undefined : performance.now() - started;
  }

  /** At the run's end, nodes that never started become ``unstarted``: "skipped" (a branch
   * not taken) after a finished run, "not-run" after a failed or cancelled one; any still
   * running stop. */
  endNodes(unstarted) {
    if (!this.graph) return;
    for (const el of this.graph.querySelectorAll("g.node")) {
      if (el.dataset.state === "idle") {
        el.dataset.state = unstarted;
        el.querySelector(".node-time").textContent = unstarted === "skipped" ? "skipped" : "not run";
      } else if (el.dataset.state === "running") el.dataset.state = "stopped";
    }
  }
}
