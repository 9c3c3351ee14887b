// A flow drawn as a picture: nodes in layers by data flow (a node sits one layer right of
// the furthest node feeding it), edges as curves labelled with the output or input they
// join. Each node is one <g class="node" data-node="id">, each edge one <g class="edge">;
// the run view colours nodes by their state through the data-state attribute.

import { h, s } from "./dom.js";

const W = 168;
const H = 48;
const GAP_X = 76;
const GAP_Y = 26;

function layers(nodes, edges) {
  const ids = nodes.map((n) => n.id);
  const incoming = new Map(ids.map((id) => [id, []]));
  for (const e of edges) if (incoming.has(e.target) && incoming.has(e.source)) incoming.get(e.target).push(e.source);
  const layer = new Map();
  const visiting = new Set();
  const depth = (id) => {
    if (layer.has(id)) return layer.get(id);
    if (visiting.has(id)) return 0; // a cycle (validation refuses them): draw it anyway
    visiting.add(id);
    const d = Math.max(-1, ...incoming.get(id).map(depth)) + 1;
    visiting.delete(id);
    layer.set(id, d);
    return d;
  };
  ids.forEach(depth);
  return layer;
}

function paramsText(node) {
  const params = node.params || {};
  const keys = Object.keys(params);
  if (!keys.length) return node.type;
  return `${node.type}\n${keys.map((k) => `${k}: ${JSON.stringify(params[k])}`).join("\n")}`.slice(0, 1500);
}

/** The SVG of ``definition``; ``onSelect(node)`` is called when a node is clicked or
 * activated with the keyboard. */
export function drawGraph(definition, { onSelect = () => {} } = {}) {
  const nodes = definition.nodes || [];
  const edges = definition.edges || [];
  const layer = layers(nodes, edges);
  const columns = new Map();
  const place = new Map();
  for (const node of nodes) {
    const column = layer.get(node.id) || 0;
    const row = columns.get(column) || 0;
    columns.set(column, row + 1);
    place.set(node.id, { x: 16 + column * (W + GAP_X), y: 16 + row * (H + GAP_Y) });
  }
  const width = 32 + Math.max(1, columns.size) * (W + GAP_X) - GAP_X;
  const height = 32 + Math.max(1, ...columns.values()) * (H + GAP_Y) - GAP_Y;

  const edgeEls = edges.filter((e) => place.has(e.source) && place.has(e.target)).map((e) => {
    const a = place.get(e.source);
    const b = place.get(e.target);
    const x1 = a.x + W;
    const y1 = a.y + H / 2;
    const x2 = b.x;
    const y2 = b.y + H / 2;
    const mid = (x1 + x2) / 2;
    const label = [e.source_output, e.target_input].filter(Boolean).join(" → ");
    return s("g", { class: "edge", dataset: { source: e.source, target: e.target } },
      s("path", { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" }),
      label ? s("text", { x: mid, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" }, label) : null);
  });

  const nodeEls = nodes.map((node) => {
    const { x, y } = place.get(node.id);
    const select = () => onSelect(node);
    return s("g", {
      class: "node", tabindex: "0", role: "button", "aria-label": `node ${node.id} (${node.type})`,
      transform: `translate(${x},${y})`, dataset: { node: node.id, state: "idle" },
      onclick: select,
      onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(); } },
    },
    s("title", {}, paramsText(node)),
    s("rect", { width: W, height: H, rx: 6 }),
    s("text", { x: 10, y: 19, class: "node-id" }, node.id.length > 22 ? `${node.id.slice(0, 21)}…` : node.id),
    s("text", { x: 10, y: 37, class: "node-type" }, node.type),
    s("text", { x: W - 8, y: 37, class: "node-time", "text-anchor": "end" }, ""));
  });

  return h("div", { class: "graph-wrap" },
    s("svg", { class: "graph", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
      "aria-label": `graph of ${nodes.length} nodes and ${edges.length} edges` },
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      s("path", { d: "M0,0 L10,5 L0,10 z" }))),
    edgeEls, nodeEls));
}

/** Set a node's state (idle, running, done, failed, skipped) and its duration label. */
export function markNode(root, nodeId, state, durationMs) {
  for (const el of root.querySelectorAll("g.node")) {
    if (el.dataset.node !== nodeId) continue;
    el.dataset.state = state;
    if (durationMs !== undefined) el.querySelector(".node-time").textContent = `${Math.round(durationMs)} ms`;
  }
}
