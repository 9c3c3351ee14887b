// Following a run's events: over the WebSocket API (opened with a one-time ticket), or over
// Server-Sent Events when the WebSocket cannot connect — refused, or not open within
// OPEN_TIMEOUT_MS (a proxy that holds the upgrade). A connection that drops mid-run is
// resumed over SSE from the last event seen (Last-Event-ID): no event is lost or repeated.
// When every SSE attempt fails, the stream ends as lost: the page says so, not "running".

import { api, headers } from "./api.js";

const TERMINAL = new Set(["run_finished", "error"]);
const OPEN_TIMEOUT_MS = 5000;
const SSE_ATTEMPTS = 5;

/** Parse an SSE byte stream into {id, event, data} objects. */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const message = { id: null, event: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "id") message.id = Number(text);
        else if (field === "event") message.event = text;
        else if (field === "data") message.data += text;
      }
      if (message.data) yield message;
    }
  }
}

/**
 * One run followed from start to end. ``onEvent(event)`` gets each event once, in order,
 * as {type, seq, ...data}; ``onTransport(name)`` says how ("websocket", "sse");
 * ``onLost()`` that no transport could follow the run to its end (it may still be going).
 * start({flowId, input, sessionId}) runs a flow; watch(runId) follows an existing run.
 */
export class RunStream {
  constructor({ onEvent, onTransport = () => {}, onLost = () => {}, preferWebSocket = true }) {
    this.onEvent = onEvent;
    this.onTransport = onTransport;
    this.onLost = onLost;
    this.preferWebSocket = preferWebSocket && typeof WebSocket === "function";
    this.runId = null;
    this.lastSeq = 0;
    this.ended = false;
    this.socket = null;
    this.abort = new AbortController();
    this.done = new Promise((resolve) => { this.resolveDone = resolve; });
  }

  deliver(event) {
    if (this.ended) return;
    if (event.seq !== null && event.seq !== undefined) {
      if (event.seq <= this.lastSeq) return; // already shown (a resumed stream)
      this.lastSeq = event.seq;
    }
    if (event.type === "run_started" && event.run_id) this.runId = event.run_id;
    this.onEvent(event);
    if (TERMINAL.has(event.type)) this.finish();
  }

  finish() {
    if (this.ended) return;
    this.ended = true;
    if (this.socket) this.socket.close(1000);
    this.abort.abort();
    this.resolveDone();
  }

  /** Every way to follow the run failed before its end. */
  lose() {
    if (this.ended) return;
    this.finish();
    this.onLost();
  }

  /** Run a flow. One idempotency key for both transports: if the socket dies before the
   * run is known, the SSE request that replaces it gets the same run, never a second one. */
  async start({ flowId, input, sessionId }) {
    const body = { input_value: input, on_disconnect: "continue" };
    if (sessionId) body.session_id = sessionId;
    const idempotencyKey = `console-${crypto.randomUUID()}`;
    this.fallback = () => this.sse(`/api/v1/run/${encodeURIComponent(flowId)}?stream=true`, {
      method: "POST",
      headers: headers({ "content-type": "application/json", "Idempotency-Key": idempotencyKey }),
      body: JSON.stringify(body),
    });
    if (this.preferWebSocket && await this.viaWebSocket({
      type: "run", flow_id: flowId, idempotency_key: idempotencyKey, ...body })) return;
    this.onTransport("sse");
    await this.fallback();
  }

  async watch(runId) {
    this.runId = runId;
    this.fallback = () => this.resume();
    if (this.preferWebSocket && await this.viaWebSocket({ type: "watch", run_id: runId, last_event_id: 0 })) return;
    this.onTransport("sse");
    await this.resume();
  }

  /** Open the socket and send ``message``; false when it could not connect (use SSE). */
  async viaWebSocket(message) {
    let ticket;
    try {
      ticket = (await api("POST", "/ws/ticket")).ticket;
    } catch {
      return false;
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/api/v1/ws/runs?ticket=${encodeURIComponent(ticket)}`;
    return new Promise((resolve) => {
      let opened = false;
      let abandoned = false;
      let socket;
      try {
        socket = new WebSocket(url);
      } catch {
        resolve(false);
        return;
      }
      this.socket = socket;
      const timer = setTimeout(() => { // neither open nor closed: give up on it, go over SSE
        abandoned = true;
        this.socket = null;
        socket.close();
        resolve(false);
      }, OPEN_TIMEOUT_MS);
      socket.addEventListener("open", () => {
        clearTimeout(timer);
        if (abandoned) return;
        opened = true;
        this.onTransport("websocket");
        socket.send(JSON.stringify(message));
        resolve(true);
      });
      socket.addEventListener("message", (e) => {
        if (abandoned) return;
        let event;
        try { event = JSON.parse(e.data); } catch { return; }
        this.deliver(event); // a refusal (unknown flow, bad input) is an error without seq
      });
      socket.addEventListener("close", () => {
        clearTimeout(timer);
        if (abandoned) return;
        this.socket = null;
        if (!opened) resolve(false); // never connected: the caller goes over SSE
        else if (this.ended) return;
        else if (this.lastSeq > 0) this.resume(); // dropped mid-run: go on over SSE
        else { this.onTransport("sse"); this.fallback(); } // closed before any event
      });
    });
  }

  /** Follow the run over SSE from the last event seen. */
  async resume() {
    if (this.ended || !this.runId) return;
    this.onTransport("sse");
    await this.sse(...this.resumeRequest());
  }

  resumeRequest() {
    return [`/api/v1/runs/${encodeURIComponent(this.runId)}/events`,
      { headers: headers({ "Last-Event-ID": String(this.lastSeq) }) }];
  }

  /** Read events from an SSE request; a stream that breaks before the run's end is
   * resumed (a few times, backing off) from the last event seen; then the run is lost. */
  async sse(url, init) {
    for (let attempt = 0; attempt < SSE_ATTEMPTS && !this.ended; attempt += 1) {
      if (attempt > 0) {
        await new Promise((r) => setTimeout(r, 300 * attempt));
        if (this.ended) return;
        if (!this.runId) break; // the run was never known: nothing to resume
        [url, init] = this.resumeRequest();
      }
      let response;
      try {
        response = await fetch(url, { ...init, signal: this.abort.signal });
      } catch {
        continue;
      }
      if (!response.ok) {
        let error = {};
        try { error = (await response.json()).error || {}; } catch { /* not JSON */ }
        this.deliver({ type: "error", seq: null, code: error.code || `http_${response.status}`,
          message: error.message || `HTTP ${response.status}` });
        return;
      }
      try {
        for await (const message of sseEvents(response)) {
          let data = {};
          try { data = JSON.parse(message.data); } catch { continue; }
          this.deliver({ ...data, type: message.event, seq: message.id });
        }
      } catch {
        /* broken stream: resumed below */
      }
    }
    this.lose();
  }

  async cancel() {
    if (this.ended) return;
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({ type: "cancel" }));
    } else if (this.runId) {
      await api("POST", `/runs/${encodeURIComponent(this.runId)}/cancel`);
    }
  }

  close() {
    this.finish();
  }
}
