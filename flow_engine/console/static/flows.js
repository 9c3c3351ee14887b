// Every flow: its live version, canary, latest version (flagged when it is not live), last
// change from the audit log, and the last hour's runs, failure rate and p95 per version.

import { get } from "./api.js";
import { flowPath, h, link, table, when } from "./dom.js";

function canaryText(routing) {
  const canary = routing && routing.canary;
  if (!canary) return "—";
  const steps = canary.steps ? ` (steps ${canary.steps.join("/")})` : "";
  return `v${canary.version} at ${canary.percent}%${steps}`;
}

function versionCell(flow) {
  const latest = [`v${flow.latest_version}`];
  if (flow.latest_version !== flow.live_version) {
    latest.push(" ", h("span", { class: "badge warn", title: "the latest version is not live" }, "not live"));
  }
  return h("span", {}, latest);
}

export async function flowsPage(main) {
  main.replaceChildren(h("h1", {}, "Flows"), h("p", { class: "muted" }, "Loading…"));
  const { flows } = await get("/flows?limit=200");
  const lastChange = (flow) => {
    const cell = h("span", { class: "muted" }, "…");
    get(`/flows/${encodeURIComponent(flow.id)}/audit?limit=1`).then(({ entries }) => {
      const e = entries[0];
      cell.replaceChildren(e ? `${e.action} by ${e.actor}, ${when(e.at)}${e.message ? ` — ${e.message}` : ""}` : "—");
      cell.className = "";
    }).catch(() => { cell.textContent = "—"; });
    return cell;
  };
  const stats = (flow) => {
    const cell = h("span", { class: "muted" }, "…");
    get(`/flows/${encodeURIComponent(flow.id)}/stats?window_s=3600`).then(({ versions }) => {
      const seen = versions.filter((v) => v.runs > 0);
      cell.className = "";
      cell.replaceChildren(seen.length ? h("ul", { class: "plain" }, seen.map((v) => h("li", {},
        `v${v.version}: ${v.runs} runs, ${(v.failure_rate * 100).toFixed(1)}% failed, p95 ${v.p95_ms ?? "—"} ms`))) : "no runs");
    }).catch(() => { cell.textContent = "—"; });
    return cell;
  };
  const STATS_FOR = 50; // figures are a read of the last hour per flow: the first 50 only
  const rows = flows.map((flow, i) => [
    h("span", { class: "flow-name" }, link(flowPath(flow.id), flow.name || flow.id), h("br"), h("code", {}, flow.id)),
    flow.live_version ? `v${flow.live_version}` : "—",
    versionCell(flow),
    canaryText(flow.routing),
    lastChange(flow),
    i < STATS_FOR ? stats(flow) : h("span", { class: "muted" }, "open the flow"),
  ]);
  main.replaceChildren(
    h("h1", {}, "Flows"),
    flows.length ? table(`${flows.length} flows`, ["Flow", "Live", "Latest", "Canary", "Last change", "Last hour"], rows, { class: "flows" })
      : h("p", {}, "No flows yet: push one with `flowgate flows push FILE --publish`."));
}
