// Two versions side by side: their definitions as indented JSON (keys sorted), lines lined
// up by a longest-common-subsequence diff, removed lines on the left and added ones on the
// right marked. Definitions are small (a few hundred lines): O(n·m) is fine.

import { h } from "./dom.js";

function sorted(value) {
  if (Array.isArray(value)) return value.map(sorted);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, sorted(value[k])]));
  }
  return value;
}

export function lines(definition) {
  return JSON.stringify(sorted(definition), null, 2).split("\n");
}

/** [[left line | null, right line | null, kind]] with kind same | removed | added | changed. */
export function align(a, b) {
  const n = a.length;
  const m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i -= 1) {
    for (let j = m - 1; j >= 0; j -= 1) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const rows = [];
  let i = 0;
  let j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] === b[j]) { rows.push([a[i], b[j], "same"]); i += 1; j += 1; }
    else if (i < n && (j === m || lcs[i + 1][j] >= lcs[i][j + 1])) { rows.push([a[i], null, "removed"]); i += 1; }
    else { rows.push([null, b[j], "added"]); j += 1; }
  }
  // a removed line followed by an added one is one changed line
  const merged = [];
  for (let k = 0; k < rows.length; k += 1) {
    const [left, , kind] = rows[k];
    if (kind === "removed" && rows[k + 1] && rows[k + 1][2] === "added") {
      merged.push([left, rows[k + 1][1], "changed"]);
      k += 1;
    } else merged.push(rows[k]);
  }
  return merged;
}

export function sideBySide(before, after, labels) {
  const rows = align(lines(before), lines(after));
  const changed = rows.filter((r) => r[2] !== "same").length;
  return h("div", { class: "diff" },
    h("p", { class: "muted" }, changed ? `${changed} lines differ` : "The definitions are the same."),
    h("div", { class: "table-wrap" }, h("table", { class: "diff-table" },
      h("caption", {}, `${labels[0]} ↔ ${labels[1]}`),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, labels[0]), h("th", { scope: "col" }, labels[1]))),
      h("tbody", {}, rows.map(([left, right, kind]) => h("tr", { class: `diff-${kind}` },
        h("td", { class: left === null ? "empty" : "" }, h("code", {}, left ?? "")),
        h("td", { class: right === null ? "empty" : "" }, h("code", {}, right ?? ""))))))));
}
