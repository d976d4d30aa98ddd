// The tandem chat page: a client of the OpenAI API of the server that serves it (same origin, nothing else).
// Model text is only ever set as textContent: it is shown, never parsed as HTML.
"use strict";

const side = document.body.dataset.side === "cloud" ? "cloud" : "edge";
const $ = (id) => document.getElementById(id);
const IDLE_MS = 60000; // no byte from the server for this long: stop waiting rather than hang
const state = {key: "", model: null, history: [], controller: null};

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || "";
  }
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(message) {
  $("status").textContent = message;
}

function headers(extra) {
  const h = {"content-type": "application/json", ...extra};
  if (state.key) h.authorization = "Bearer " + state.key;
  return h;
}

async function errorOf(res) {
  let message = res.statusText || "error";
  let code = "";
  try {
    const body = await res.json();
    message = body.error.message;
    code = body.error.code;
  } catch (_) { /* not our JSON error */ }
  return new ApiError(res.status, message, code);
}

function explain(err) {
  if (err instanceof ApiError) {
    if (err.status === 401) return "The server refused the API key: " + err.message + ". Enter a valid key.";
    if (["unavailable", "deadline_exceeded"].includes(err.code) || [502, 503, 504].includes(err.status)) {
      return "The cloud is not answering: " + err.message;
    }
    return "The server answered " + (err.status ? err.status + " " : "") + "(" + (err.code || "error") + "): " +
      err.message;
  }
  if (err && err.name === "AbortError") return err.message || "Stopped.";
  if (err instanceof TypeError) return "Cannot reach the server at " + location.origin + ": is it running?";
  return String((err && err.message) || err);
}

// --- connecting: the model's name, and a key where the server wants one

async function connect() {
  let res;
  try {
    res = await fetch("/v1/models", {headers: headers()});
  } catch (e) {
    showError(explain(e));
    return false;
  }
  if (res.status === 401) {
    const err = await errorOf(res);
    $("key-panel").hidden = false;
    if (state.key) showError(explain(err));
    setStatus("This server requires an API key.");
    $("key-input").focus();
    return false;
  }
  if (!res.ok) {
    showError(explain(await errorOf(res)));
    return false;
  }
  const body = await res.json();
  state.model = body.data[0].id;
  const draft = body.data[0].draft;
  $("key-panel").hidden = true;
  clearError();
  setStatus("Connected: " + state.model + (side !== "edge" ? " (the cloud)."
    : draft ? " (the edge: " + draft.name + " drafts on " + draft.runtime + ")." : " (the edge)."));
  return true;
}

// --- one request, streamed

function requestBody(messages) {
  const number = (id, fallback) => {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v : fallback;
  };
  const body = {
    model: state.model, messages, stream: true, stream_options: {include_usage: true}, return_metrics: true,
    return_token_origins: true, temperature: number("temperature", 0), top_p: number("top-p", 1),
    max_tokens: Math.max(1, Math.round(number("max-tokens", 128))),
  };
  const schema = $("schema").value.trim();
  if (schema) {
    let parsed;
    try {
      parsed = JSON.parse(schema);
    } catch (e) {
      throw new Error("The JSON schema is not valid JSON: " + e.message);
    }
    body.response_format = {type: "json_schema", json_schema: {name: "answer", schema: parsed, strict: true}};
  }
  return body;
}

function speculationHeaders(mode) {
  if (side !== "edge") return {};
  const h = {};
  if (mode) h["x-tandem-mode"] = mode;
  const gamma = $("gamma").value.trim();
  if (gamma && mode !== "cloud") h["x-tandem-gamma"] = gamma;
  return h;
}

function newRun(container, title) {
  const article = el("article", "run");
  const heading = el("h3", "", title);
  const answer = el("p", "answer");
  const figures = el("dl", "figures");
  article.append(heading, answer, figures);
  article.dataset.state = "waiting";
  container.append(article);
  return {article, heading, answer, figures, text: "", counts: {d: 0, b: 0, p: 0, t: 0, e: 0}, marked: 0};
}

function addPiece(run, piece, origin, into) {
  // one span per token, even an empty one (half a character): the marks count the tokens
  const span = el("span", origin ? "tok tok-" + origin : "tok", piece);
  if (origin) {
    run.counts[origin] = (run.counts[origin] || 0) + 1;
    run.marked += 1;
  }
  run.text += piece;
  (into || run.answer).append(span);
}

function absorb(run, chunk) {
  if (chunk.metrics) run.metrics = chunk.metrics.speculative_decoding;
  if (chunk.usage) run.usage = chunk.usage;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  if (choice.finish_reason) run.finish = choice.finish_reason;
  const marks = choice.tandem;
  if (marks) {
    placePieces(run, marks); // rounds.js
  } else if (choice.delta && choice.delta.content) {
    addPiece(run, choice.delta.content, "");
  }
  if (run.marked) run.article.dataset.state = "streaming";
}

async function stream(run, body, extraHeaders, controller) {
  const t0 = performance.now();
  let idle = 0;
  const watch = () => {
    clearTimeout(idle);
    idle = setTimeout(() => controller.abort(new DOMException(
      "No answer from the server for " + IDLE_MS / 1000 + " s: stopped waiting.", "AbortError")), IDLE_MS);
  };
  watch();
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(extraHeaders), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw await errorOf(res);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    for (;;) {
      const {value, done: end} = await reader.read();
      if (end) break;
      watch();
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") {
            done = true;
            continue;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.code);
          absorb(run, chunk);
        }
      }
    }
    if (!done) throw new Error("The answer stopped before its end: the server stopped or the connection broke.");
    run.seconds = (performance.now() - t0) / 1000;
  } finally {
    clearTimeout(idle);
  }
}

// --- figures under an answer

function bars(m) {
  const per = (m && m.num_accepted_tokens_per_pos) || [];
  if (!m || !m.num_drafts || !per.length) return "–";
  const wrap = el("div", "bars-wrap");
  const box = el("div", "bars");
  const rates = per.slice(0, 16).map((n) => n / m.num_drafts);
  box.setAttribute("role", "img");
  box.setAttribute("aria-label", rates.map((r, i) => "position " + (i + 1) + ": " + Math.round(r * 100) + "%")
    .join(", "));
  rates.forEach((r, i) => {
    const bar = el("div", "bar");
    bar.style.height = Math.max(1, Math.round(r * 100)) + "%";
    bar.title = "position " + (i + 1) + ": " + (r * 100).toFixed(0) + "% of blocks";
    bar.append(el("span", "", String(i + 1)));
    box.append(bar);
  });
  wrap.append(box, el("span", "bar-values", rates.map((r) => Math.round(r * 100) + "%").join(" · ")));
  return wrap;
}

function showFigures(run) {
  const m = run.metrics || {};
  const edge = Array.isArray(m.edge) ? m.edge[0] : m.edge;
  const tokens = run.usage ? run.usage.completion_tokens : run.marked;
  run.rate = run.seconds ? tokens / run.seconds : 0;
  const passes = edge ? edge.target_passes : run.counts.t; // the target alone: a pass per token
  const c = run.counts;
  const mode = edge ? edge.mode + (edge.switched_to_cloud ? " (went on as cloud-only)" : "") +
    (edge.lossy ? " (lossy: not verified)" : "") : "the target alone (cloud)";
  const rows = [
    ["tokens/s", run.rate.toFixed(1)],
    ["tokens", tokens + " = " + c.d + " drafted + " + (c.b ? c.b + " sibling + " : "") + c.p + " pool + " + c.t +
      " target" + (c.e ? " + " + c.e + " draft alone" : "")],
    ["target passes per token", tokens ? (passes / tokens).toFixed(2) : "–"],
    ["acceptance per position", bars(m)],
    ["round trip", edge && edge.rtt_ms != null ? edge.rtt_ms.toFixed(1) + " ms" : "–"],
    ["mode", mode],
  ];
  run.figures.replaceChildren();
  for (const [name, value] of rows) {
    const dd = el("dd");
    if (typeof value === "string") dd.textContent = value;
    else if (value) dd.append(value);
    run.figures.append(el("dt", "", name), dd);
  }
  const d = run.article.dataset;
  d.tokens = String(tokens);
  d.rate = String(run.rate);
  d.targetPasses = String(passes);
  d.accepted = String(m.num_accepted_tokens || 0);
  d.drafts = String(m.num_drafts || 0);
  d.mode = edge ? edge.mode : "cloud";
  return edge;
}

// --- a turn: the question, its answer, and on the edge a cloud-only rerun beside it

async function execute(run, body, extraHeaders) {
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  setStatus("Waiting for the first token…");
  try {
    await stream(run, body, extraHeaders, controller);
    showFigures(run);
    run.article.dataset.state = "done";
    setStatus("Done: " + run.marked + " tokens in " + run.seconds.toFixed(2) + " s.");
    return true;
  } catch (err) {
    const message = explain(err);
    run.article.dataset.state = err && err.name === "AbortError" ? "stopped" : "error";
    run.article.append(el("p", "run-error", message));
    showError(message);
    setStatus("");
    if (err instanceof ApiError && err.status === 401) {
      $("key-panel").hidden = false;
      $("key-input").focus();
    }
    return false;
  } finally {
    state.controller = null;
    busy(false);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  for (const b of document.querySelectorAll("button.compare")) b.disabled = on;
}

async function compare(li, main, messages, body) {
  li.querySelector(".runs").classList.add("compared");
  main.heading.textContent = "speculative (" + (main.article.dataset.mode || "edge") + ")";
  const cloud = newRun(li.querySelector(".runs"), "cloud-only");
  const ok = await execute(cloud, body, speculationHeaders("cloud"));
  const out = li.querySelector(".speedup");
  if (!ok || !cloud.rate) {
    out.textContent = "";
    return;
  }
  const x = main.rate / cloud.rate;
  out.dataset.speedup = String(x);
  out.textContent = "Speedup: " + x.toFixed(2) + "x cloud-only (" + main.rate.toFixed(1) + " vs " +
    cloud.rate.toFixed(1) + " tok/s)" + (cloud.text === main.text ? ", same answer." : ".");
}

async function send(text) {
  clearError();
  if (!state.model && !(await connect())) return;
  const messages = [...state.history, {role: "user", content: text}];
  let body;
  try {
    body = requestBody(messages);
  } catch (e) {
    showError(e.message);
    return;
  }
  $("log").append(el("li", "msg user", text));
  const li = el("li", "msg assistant");
  const runs = el("div", "runs");
  li.append(runs);
  $("log").append(li);
  const mode = side === "edge" ? $("mode").value : "";
  const main = newRun(runs, side === "edge" ? "answer (the edge)" : "answer (the cloud: the target alone)");
  $("prompt").value = "";
  const ok = await execute(main, body, speculationHeaders(mode));
  if (!ok) return;
  state.history.push({role: "user", content: text}, {role: "assistant", content: main.text});
  const edge = main.metrics && main.metrics.edge;
  if (side === "edge" && edge && edge.mode !== "cloud") {
    const row = el("div", "row");
    const button = el("button", "compare", "Rerun cloud-only and compare");
    button.type = "button";
    const out = el("p", "speedup");
    out.setAttribute("aria-live", "polite");
    button.addEventListener("click", () => {
      button.remove();
      compare(li, main, messages, body);
    });
    row.append(button, out);
    li.append(row);
  }
  $("prompt").focus();
}

// --- wiring

function start() {
  $("side-note").textContent = side === "edge"
    ? "The edge: a draft model here proposes tokens, the cloud's target verifies them."
    : "The cloud: the target model alone (cloud-only).";
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (text && !state.controller) send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    if (state.controller) state.controller.abort(new DOMException("Stopped.", "AbortError"));
  });
  $("clear").addEventListener("click", () => {
    if (state.controller) return;
    state.history = [];
    $("log").replaceChildren();
    clearError();
    $("prompt").focus();
  });
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    state.key = $("key-input").value.trim();
    if (await connect()) $("prompt").focus();
  });
  connect();
}

start();
