// One flow: its graph, a run box, versions with a side-by-side diff, the changes a
// publisher may make (publish, roll back, canary — each with a message, showing the audit
// entry it made) and the flow's audit history.

import { api, get } from "./api.js";
import { sideBySide } from "./diff.js";
import { fill, h, link, table, when } from "./dom.js";
import { drawGraph } from "./graph.js";
import { RunView } from "./run.js";

const enc = encodeURIComponent;

// The outcome of the last change made on this page, kept across the reload that follows it
// (the page then shows the new live version, canary and history) and shown once.
let kept = null;

/** The audit entry a change's answer carries: that change's own, never the newest one. */
function outcomeText(entry) {
  if (!entry) return "Done (its audit entry is in the history below).";
  return [`Done. Audit #${entry.seq}: ${entry.action} by ${entry.actor}`,
    entry.to_version ? ` (v${entry.from_version ?? "—"} → v${entry.to_version})` : "",
    entry.message ? ` — ${entry.message}` : ""].join("");
}

function badges(flow) {
  const out = [h("span", { class: "badge ok" }, flow.live_version ? `live v${flow.live_version}` : "not live")];
  if (flow.latest_version !== flow.live_version) {
    out.push(h("span", { class: "badge warn", title: "an edit that has not been published" }, `latest v${flow.latest_version} not live`));
  }
  const canary = flow.routing && flow.routing.canary;
  if (canary) out.push(h("span", { class: "badge info" }, `canary v${canary.version} at ${canary.percent}%`));
  return h("p", { class: "badges" }, out);
}

function versionSelect(label, versions, selected) {
  const id = `select-${label.toLowerCase().replace(/\W+/g, "-")}`;
  const select = h("select", { id }, versions.map((v) =>
    h("option", { value: v.version, selected: v.version === selected }, `v${v.version}${v.live ? " (live)" : ""}`)));
  return { select, field: h("label", { for: id }, label, " ", select) };
}

/** Set the canary: PUT /routing replaces the whole routing, so the flow's current sticky key
 * (read now, not when the page loaded) goes with it. No ``live``: an absent one keeps the
 * live version, where the page's copy could undo a publish made since. */
async function setCanary(flowId, canary, message) {
  const current = await get(`/flows/${enc(flowId)}`);
  const sticky = (current.routing && current.routing.sticky_key) || null;
  return api("PUT", `/flows/${enc(flowId)}/routing`, { canary, sticky_key: sticky, message });
}

function auditRows(entries) {
  return entries.map((e) => [
    `#${e.seq}`, when(e.at), e.action, e.actor,
    [e.from_version && `v${e.from_version}`, e.to_version && `v${e.to_version}`].filter(Boolean).join(" → "),
    e.message || "", e.reason ? JSON.stringify(e.reason) : "",
  ]);
}

export async function flowPage(main, flowId, params) {
  main.replaceChildren(h("h1", {}, flowId), h("p", { class: "muted" }, "Loading…"));
  const [flow, { versions }] = await Promise.all([get(`/flows/${enc(flowId)}`), get(`/flows/${enc(flowId)}/versions`)]);
  const shown = Number(params.get("version")) || flow.live_version || flow.latest_version;
  const definition = shown === (flow.live_version || flow.latest_version) ? flow.definition
    : (await get(`/flows/${enc(flow.id)}/versions/${shown}`)).definition;

  // -- graph and node details ---------------------------------------------------------------
  const details = h("div", { class: "node-details", "aria-live": "polite" }, h("p", { class: "muted" }, "Select a node to see its params."));
  const graph = drawGraph(definition, {
    onSelect: (node) => details.replaceChildren(
      h("h3", {}, `${node.id} `, h("small", {}, node.type)),
      h("pre", {}, JSON.stringify(node.params || {}, null, 2))),
  });
  const graphVersion = versionSelect("Version shown", versions, shown);
  graphVersion.select.addEventListener("change", () => {
    history.pushState({}, "", `?version=${graphVersion.select.value}`);
    dispatchEvent(new PopStateEvent("popstate"));
  });

  // -- run it ---------------------------------------------------------------------------------
  const view = new RunView(graph);
  const input = h("textarea", { id: "run-input", rows: 3, required: true, placeholder: "Ask the flow something" });
  const session = h("input", { id: "run-session", type: "text", maxlength: 200, autocomplete: "off" });
  const runForm = h("form", { class: "run-form", onsubmit: (e) => {
    e.preventDefault();
    view.run({ flowId: flow.id, input: input.value, sessionId: session.value.trim() || undefined });
  } },
  h("label", { for: "run-input" }, "Input"), input,
  h("label", { for: "run-session" }, "Session id (optional)"), session,
  h("button", { type: "submit" }, "Run"));

  // -- versions and diff --------------------------------------------------------------------
  const from = versionSelect("From", versions, versions.length > 1 ? versions[versions.length - 2].version : shown);
  const to = versionSelect("To", versions, flow.latest_version);
  const diffOut = h("div", { class: "diff-out" });
  const diffForm = h("form", { class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    const [a, b] = [from.select.value, to.select.value];
    const [va, vb] = await Promise.all([get(`/flows/${enc(flow.id)}/versions/${a}`), get(`/flows/${enc(flow.id)}/versions/${b}`)]);
    diffOut.replaceChildren(sideBySide(va.definition, vb.definition, [`v${a}`, `v${b}`]));
  } }, from.field, to.field, h("button", { type: "submit" }, "Compare"));

  // -- changes (publisher role) -------------------------------------------------------------
  const outcome = h("p", { class: "change-outcome", role: "status" });
  if (kept && kept.flowId === flow.id) {
    outcome.textContent = outcomeText(kept.entry);
    outcome.dataset.seq = kept.entry ? kept.entry.seq : "";
  }
  kept = null;
  const message = h("input", { id: "change-message", type: "text", maxlength: 500, required: true, placeholder: "why (kept in the audit log)" });
  const publishVersion = versionSelect("Version", versions, flow.latest_version);
  const canaryVersion = versionSelect("Canary version", versions, flow.latest_version);
  const percent = h("input", { id: "canary-percent", type: "number", min: 1, max: 99, value: 10 });
  const change = async (what, call) => {
    if (!message.reportValidity()) return;
    outcome.textContent = `${what}…`;
    try {
      const answer = await call(message.value.trim());
      kept = { flowId: flow.id, entry: answer && answer.audit };
      outcome.textContent = outcomeText(kept.entry);
      outcome.dataset.seq = kept.entry ? kept.entry.seq : "";
      message.value = "";
      dispatchEvent(new PopStateEvent("popstate")); // the new state; the outcome stays
    } catch (err) {
      outcome.textContent = `${what} refused: ${err.code}: ${err.message}`;
      outcome.dataset.seq = "";
    }
  };
  const actions = h("div", { class: "actions" },
    h("label", { for: "change-message" }, "Message"), message,
    h("div", { class: "inline" }, publishVersion.field,
      h("button", { type: "button", onclick: () => change("Publish", (m) =>
        api("POST", `/flows/${enc(flow.id)}/publish`, { version: Number(publishVersion.select.value), message: m })) }, "Publish")),
    h("div", { class: "inline" },
      h("button", { type: "button", disabled: !(flow.previous_live_versions || []).length, onclick: () => change("Roll back", (m) =>
        api("POST", `/flows/${enc(flow.id)}/rollback`, { message: m })) }, "Roll back"),
      h("span", { class: "muted" }, (flow.previous_live_versions || []).length
        ? ` to v${flow.previous_live_versions[flow.previous_live_versions.length - 1]}` : " (no earlier live version)")),
    h("div", { class: "inline" }, canaryVersion.field, h("label", { for: "canary-percent" }, "Percent"), percent,
      h("button", { type: "button", onclick: () => change("Canary", (m) => setCanary(flow.id,
        { version: Number(canaryVersion.select.value), percent: Number(percent.value) }, m)) }, "Start canary"),
      flow.routing && flow.routing.canary ? h("button", { type: "button", onclick: () => change("Stop canary", (m) =>
        setCanary(flow.id, null, m)) }, "Stop canary") : null),
    outcome);

  // -- history --------------------------------------------------------------------------------
  const history_ = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  get(`/flows/${enc(flow.id)}/audit?limit=50`).then(({ entries }) => history_.replaceChildren(
    table("Newest first", ["#", "When", "Action", "Who", "Versions", "Message", "Figures"], auditRows(entries), { class: "audit" })))
    .catch((err) => history_.replaceChildren(h("p", { class: "error" }, err.message)));

  const figures = h("p", { class: "figures muted" }, "Last hour: …");
  get(`/flows/${enc(flow.id)}/stats?window_s=3600`).then(({ versions: seen }) => {
    figures.textContent = `Last hour: ${seen.map((v) => `v${v.version}${v.live ? " (live)" : v.canary ? " (canary)" : ""}: `
      + `${v.runs} runs, ${(v.failure_rate * 100).toFixed(1)}% failed, p95 ${v.p95_ms ?? "—"} ms`).join("; ")}`;
  }).catch((err) => { figures.textContent = `Last hour: ${err.message}`; });

  fill(main,
    h("h1", {}, flow.name || flow.id, " ", h("small", {}, h("code", {}, flow.id))),
    flow.description ? h("p", {}, flow.description) : null,
    badges(flow), figures,
    h("p", {}, link(`/ui/runs?flow=${enc(flow.id)}`, "Recent runs of this flow")),
    h("section", { class: "panel", "aria-labelledby": "graph-title" },
      h("h2", { id: "graph-title" }, "Graph"), graphVersion.field, h("div", { class: "graph-row" }, graph, details)),
    h("section", { class: "panel", "aria-labelledby": "run-title" },
      h("h2", { id: "run-title" }, "Run it"), runForm, view.element),
    h("section", { class: "panel", "aria-labelledby": "changes-title" },
      h("h2", { id: "changes-title" }, "Change what is live"), actions),
    h("section", { class: "panel", "aria-labelledby": "versions-title" },
      h("h2", { id: "versions-title" }, "Versions"),
      table(`${versions.length} versions`, ["Version", "Created", "Live"],
        versions.slice().reverse().map((v) => [link(`?version=${v.version}`, `v${v.version}`), when(v.created_at), v.live ? "live" : ""])),
      diffForm, diffOut),
    h("section", { class: "panel", "aria-labelledby": "history-title" },
      h("h2", { id: "history-title" }, "History"), history_));
  return () => view.stream?.close();
}
