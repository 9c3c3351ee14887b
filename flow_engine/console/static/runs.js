// Recent runs (status, version, duration, caller) and one run followed live or replayed.

import { get } from "./api.js";
import { drawGraph } from "./graph.js";
import { fill, flowPath, h, link, ms, runPath, table, when } from "./dom.js";
import { RunView } from "./run.js";

export async function runsPage(main, params) {
  const flow = params.get("flow");
  main.replaceChildren(h("h1", {}, "Recent runs"), h("p", { class: "muted" }, "Loading…"));
  const query = flow ? `?limit=100&flow=${encodeURIComponent(flow)}` : "?limit=100";
  const { runs } = await get(`/runs${query}`);
  const rows = runs.map((r) => [
    link(runPath(r.run_id), r.run_id.slice(0, 12)),
    link(flowPath(r.flow_id), r.flow_id),
    `v${r.version}`,
    h("span", { class: `badge status-${r.status}` }, r.status),
    ms(r.duration_ms),
    r.tenant || "",
    when(r.created_at),
  ]);
  main.replaceChildren(
    h("h1", {}, flow ? `Recent runs of ${flow}` : "Recent runs"),
    runs.length ? table(`${runs.length} runs, newest first`, ["Run", "Flow", "Version", "Status", "Duration", "Caller", "Started"], rows, { class: "runs" })
      : h("p", {}, "No recorded runs yet."));
}

/** /ui/runs/{id}: the run from its first event, then live; anyone with the link and a key
 * that may see it watches the same events. */
export async function runPage(main, runId) {
  main.replaceChildren(h("h1", {}, "Run ", h("code", {}, runId)), h("p", { class: "muted" }, "Loading…"));
  const record = await get(`/runs/${encodeURIComponent(runId)}`).catch(() => null);
  let graph = null;
  if (record) {
    const version = await get(`/flows/${encodeURIComponent(record.flow_id)}/versions/${record.version}`).catch(() => null);
    if (version) graph = drawGraph(version.definition);
  }
  const view = new RunView(graph);
  fill(main,
    h("h1", {}, "Run ", h("code", {}, runId)),
    record ? h("p", {}, "Flow ", link(flowPath(record.flow_id), record.flow_id), ` v${record.version}, started ${when(record.created_at)}`) : null,
    graph, view.element);
  view.watch(runId);
  return () => view.stream?.close();
}
