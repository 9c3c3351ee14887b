// The console's entry: sign in with a key, route /ui/... paths to pages, keep links in the
// page (history API), and show errors where they happened.

import { ApiError, get, key } from "./api.js";
import { h } from "./dom.js";
import { flowPage } from "./flow.js";
import { flowsPage } from "./flows.js";
import { runPage, runsPage } from "./runs.js";

const main = document.getElementById("main");
const notice = document.getElementById("notice");
const who = document.getElementById("who");
const signOut = document.getElementById("sign-out");
let leave = null; // what the current page closes when another one opens (its streams)

function say(text) {
  notice.hidden = !text;
  notice.textContent = text || "";
}

function loginPage(reason) {
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const error = h("p", { class: "error", role: "alert", id: "login-error" }, reason || "");
  const form = h("form", { class: "login", "aria-labelledby": "login-title", onsubmit: async (e) => {
    e.preventDefault();
    key.set(input.value.trim());
    try {
      await get("/flows?limit=1");
    } catch (err) {
      key.clear();
      error.textContent = err instanceof ApiError && err.status === 401
        ? "That key was refused (invalid API key)." : `Cannot reach the engine: ${err.message}`;
      input.focus();
      return;
    }
    route();
  } },
  h("h1", { id: "login-title" }, "Sign in"),
  h("p", {}, "Use an engine API key (FLOW_ENGINE_API_KEYS). It stays in this tab only and is sent as a header."),
  h("label", { for: "api-key" }, "API key"), input, error,
  h("button", { type: "submit" }, "Sign in"));
  main.replaceChildren(form);
  input.focus();
}

async function route() {
  say("");
  if (leave) { leave(); leave = null; }
  if (!key.get()) {
    who.textContent = "";
    signOut.hidden = true;
    loginPage();
    return;
  }
  signOut.hidden = false;
  who.textContent = "signed in";
  const path = location.pathname.replace(/\/+$/, "");
  const params = new URLSearchParams(location.search);
  const parts = path.split("/").slice(2).map(decodeURIComponent); // after /ui
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.toggleAttribute("aria-current", a.dataset.nav === (parts[0] || "flows"));
  }
  try {
    if (parts[0] === "flows" && parts[1]) leave = await flowPage(main, parts[1], params);
    else if (parts[0] === "runs" && parts[1]) leave = await runPage(main, parts[1]);
    else if (parts[0] === "runs") await runsPage(main, params);
    else await flowsPage(main);
    document.title = `${main.querySelector("h1")?.textContent || "Console"} · Flowgate`;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      key.clear();
      loginPage("Your key was refused; sign in again.");
      return;
    }
    main.replaceChildren(h("h1", {}, "Something went wrong"),
      h("p", { class: "error" }, err instanceof ApiError ? `${err.code}: ${err.message}` : String(err)));
  }
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[href]");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || a.target) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith("/ui")) return;
  e.preventDefault();
  history.pushState({}, "", url.pathname + url.search);
  route();
  main.focus();
});
addEventListener("popstate", route);
signOut.addEventListener("click", () => { key.clear(); history.pushState({}, "", "/ui/"); route(); });
addEventListener("unhandledrejection", (e) => say(`Error: ${e.reason?.message || e.reason}`));

route();
