// loraplex playground: send one prompt to up to three models at once and stream each answer into
// its own column through the OpenAI SSE endpoints. Plain JavaScript, no build step, no dependencies.
//
// Safety rule: every string that comes from the server or a model is put in the page with
// textContent / text nodes, never parsed as HTML. The API key lives in `state.apiKey` only (no
// localStorage, no cookies): a reload forgets it.
"use strict";

const MAX_COLUMNS = 3;
const STATUS_EVERY_MS = 3000;
const RETRY_LOADING_MS = 1000;
// The trained demo adapters `loraplex serve` ships: with two of them served, the page opens with the
// base model and those two ticked, so a first Run shows what an adapter does.
const DEMO_PICKS = ["demo-pirate", "demo-shout", "demo-json", "demo-terse"];

const state = {
  authRequired: false,
  apiKey: null,
  models: [], // model cards from /v1/models
  selected: [], // model ids, in the order they were picked
  resident: new Set(), // adapters in a device slot, from /v1/status
  controller: null, // AbortController of the comparison in flight
  statusTimer: null,
  preselected: false, // the demo preselection happens on the first model list only
};

const $ = (id) => document.getElementById(id);

// createElement with text children only: no HTML parsing anywhere.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

class AuthNeeded extends Error {}

// fetch with the key (when there is one); a 401 forgets the key and asks again.
async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (state.apiKey) headers.set("Authorization", `Bearer ${state.apiKey}`);
  const response = await fetch(path, { ...init, headers, cache: "no-store" });
  if (response.status === 401) {
    const message = await errorMessage(response);
    state.apiKey = null;
    askForKey(state.authRequired ? `The server refused the key: ${message}` : message);
    throw new AuthNeeded(message);
  }
  return response;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) {
    // not JSON: show the text as it is
  }
  return `${response.status}: ${text.slice(0, 300) || response.statusText}`;
}

// ---- API key ---------------------------------------------------------------------------------------
function askForKey(note = "") {
  stopStatusPolling();
  $("status").replaceChildren(el("span", { class: "chip down", id: "status-state" }, "API key needed"));
  $("key-note").textContent = note;
  $("key-panel").hidden = false;
  $("key-input").focus();
}

function onKeySubmit(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  state.apiKey = key;
  $("key-input").value = "";
  $("key-panel").hidden = true;
  connect();
}

// ---- models ----------------------------------------------------------------------------------------
async function loadModels() {
  $("models-note").textContent = "";
  for (;;) {
    const response = await api("/v1/models");
    if (response.status === 503) {
      $("models-note").textContent = "The model is still loading…";
      await sleep(RETRY_LOADING_MS);
      continue;
    }
    if (!response.ok) {
      $("models-note").textContent = await errorMessage(response);
      return;
    }
    const body = await response.json();
    state.models = body.data || [];
    break;
  }
  const known = new Set(state.models.map((m) => m.id));
  state.selected = state.selected.filter((id) => known.has(id));
  if (!state.preselected) preselectDemo(known);
  for (const m of state.models) if (m.resident) state.resident.add(m.id);
  if (!state.models.length) $("models-note").textContent = "No models for this key.";
  renderModels();
  renderColumns();
}

function preselectDemo(known) {
  state.preselected = true;
  const base = state.models.find((m) => !m.parent);
  const demos = DEMO_PICKS.filter((id) => known.has(id)).slice(0, MAX_COLUMNS - 1);
  if (state.selected.length || !base || demos.length < 2) return;
  state.selected = [base.id, ...demos];
}

function modelTier(model) {
  if (!model.parent) return "base";
  if (state.resident.has(model.id)) return "device";
  return model.tier === "device" ? "host" : model.tier; // it left its slot since the list was read
}

function renderModels() {
  const list = $("model-list");
  const full = state.selected.length >= MAX_COLUMNS;
  list.replaceChildren(
    ...state.models.map((model) => {
      const checked = state.selected.includes(model.id);
      const box = el("input", { type: "checkbox", value: model.id });
      box.checked = checked;
      box.disabled = full && !checked;
      box.addEventListener("change", () => toggleModel(model.id, box.checked));
      const tier = modelTier(model);
      const title = tier === "alias" ? aliasTitle(model) : tierTitle(tier);
      const badge = el("span", { class: `badge tier-${tier}`, title }, tier);
      const name = el("span", { class: "model-name", title: model.id }, model.id);
      const row = el("label", { class: "model-row" }, box, name, badge);
      return el("li", { class: checked ? "picked" : "" }, row);
    }),
  );
}

// An alias routes to weighted versions: its badge's title shows the split (and the shadow, if any).
function aliasTitle(model) {
  const split = Object.entries(model.split || {}).map(([version, pct]) => `${version} ${pct}%`);
  const shadow = model.shadow ? ` · shadow ${model.shadow.version} ${Math.round(model.shadow.fraction * 100)}%` : "";
  return `alias: ${split.join(", ")}${shadow}`;
}

function tierTitle(tier) {
  return {
    base: "the base model",
    device: "resident: in a device slot now",
    host: "in host memory (a device slot on first use)",
    loading: "loading",
    failed: "its last load failed",
    disk: "on disk (loaded on first use)",
  }[tier] || tier;
}

function toggleModel(id, on) {
  state.selected = state.selected.filter((x) => x !== id);
  if (on && state.selected.length < MAX_COLUMNS) state.selected.push(id);
  renderModels();
  if (!state.controller) renderColumns();
}

// ---- columns ---------------------------------------------------------------------------------------
const columns = new Map(); // model id -> Column

class Column {
  constructor(model) {
    this.model = model;
    this.output = el("pre", { class: "output" });
    this.stats = el("dl", { class: "stats" });
    this.error = el("p", { class: "note error" });
    this.root = el(
      "article",
      { class: "column", "data-model": model, "data-state": "idle" },
      el("header", {}, el("h3", { title: model }, model)),
      this.stats,
      this.output,
      this.error,
    );
    this.setStats({});
  }

  reset() {
    this.output.replaceChildren();
    this.error.textContent = "";
    this.setState("running");
    this.setStats({});
  }

  setState(value) {
    this.root.dataset.state = value;
  }

  append(text) {
    const follow = this.output.scrollTop + this.output.clientHeight >= this.output.scrollHeight - 4;
    this.output.append(document.createTextNode(text));
    if (follow) this.output.scrollTop = this.output.scrollHeight;
  }

  fail(message) {
    this.error.textContent = message;
    this.setState("error");
  }

  setStats(values) {
    const items = [
      ["TTFT", values.ttft],
      ["tok/s", values.rate],
      ["tokens", values.tokens],
      ["finish", values.finish],
      ["version", values.version],
    ];
    this.stats.replaceChildren(
      ...items.map(([name, value]) => el("div", {}, el("dt", {}, name), el("dd", {}, value ?? "–"))),
    );
  }
}

function renderColumns() {
  const box = $("columns");
  for (const id of [...columns.keys()]) if (!state.selected.includes(id)) columns.delete(id);
  for (const id of state.selected) if (!columns.has(id)) columns.set(id, new Column(id));
  box.replaceChildren(...state.selected.map((id) => columns.get(id).root));
  box.dataset.count = String(state.selected.length);
  if (!state.selected.length) box.append(el("p", { class: "empty" }, "Pick models on the left, write a prompt, press Run."));
}

// ---- running a comparison --------------------------------------------------------------------------
function buildRequest() {
  const mode = document.querySelector('input[name="mode"]:checked').value;
  const prompt = $("prompt").value;
  const body = {
    max_tokens: Number.parseInt($("max-tokens").value, 10),
    temperature: Number.parseFloat($("temperature").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number.parseInt(seed, 10);
  const format = responseFormat();
  if (format) body.response_format = format;
  if (mode === "chat") {
    const messages = [];
    const system = $("system").value;
    if (system.trim()) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: prompt });
    return { path: "/v1/chat/completions", body: { ...body, messages } };
  }
  return { path: "/v1/completions", body: { ...body, prompt } };
}

// The response-format selector: none, any JSON object, or a pasted JSON schema (sent as OpenAI's
// response_format; the server checks the schema and answers a 400 naming the problem).
function responseFormat() {
  const kind = document.querySelector('input[name="format"]:checked').value;
  if (kind === "json") return { type: "json_object" };
  if (kind !== "schema") return null;
  let schema;
  try {
    schema = JSON.parse($("schema").value);
  } catch {
    return { invalid: true };
  }
  return { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
}

function showSchemaField() {
  $("schema-field").hidden = document.querySelector('input[name="format"]:checked').value !== "schema";
}

function validate(request) {
  if (!state.selected.length) return "Pick at least one model.";
  if (!$("prompt").value.trim()) return "Write a prompt first.";
  if (request.body.response_format?.invalid) return "The JSON schema is not valid JSON.";
  const { max_tokens: maxTokens, temperature, seed } = request.body;
  if (!Number.isInteger(maxTokens) || maxTokens < 1) return "Max tokens must be a whole number ≥ 1.";
  if (!Number.isFinite(temperature) || temperature < 0) return "Temperature must be a number ≥ 0.";
  if (seed !== undefined && !Number.isInteger(seed)) return "Seed must be a whole number.";
  return "";
}

async function runComparison(event) {
  event.preventDefault();
  if (state.controller) return;
  const request = buildRequest();
  const problem = validate(request);
  $("run-note").textContent = problem;
  if (problem) return;
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  renderColumns();
  const targets = state.selected.map((id) => columns.get(id));
  setTimeout(refreshStatus, 300); // show the requests running, not only the next poll
  try {
    // Every request starts now; each column streams on its own.
    await Promise.all(targets.map((column) => streamInto(column, request, controller.signal)));
  } finally {
    state.controller = null;
    setRunning(false);
    refreshStatus();
  }
}

function setRunning(on) {
  $("run").disabled = on;
  $("stop").disabled = !on;
  for (const box of $("model-list").querySelectorAll("input")) box.disabled = on || box.disabled;
  if (!on) renderModels();
}

function stopComparison() {
  if (state.controller) state.controller.abort();
}

async function streamInto(column, request, signal) {
  column.reset();
  const started = performance.now();
  const run = { first: null, last: null, chunks: 0, usage: null, finish: null, started, version: null };
  let response;
  try {
    response = await api(request.path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...request.body, model: column.model }),
      signal,
    });
    if (!response.ok) {
      column.fail(await errorMessage(response));
      return;
    }
    // Which adapter version answered (an alias picks one of its versions per request).
    run.version = response.headers.get("X-Loraplex-Adapter-Version");
    for await (const data of sseEvents(response.body)) {
      if (data === "[DONE]") continue; // the server closes the stream right after
      handleEvent(column, run, JSON.parse(data));
      if (column.root.dataset.state === "error") break;
    }
    showStats(column, run);
    if (column.root.dataset.state !== "error") column.setState("done");
  } catch (err) {
    showStats(column, run);
    if (err.name === "AbortError") {
      column.error.textContent = "stopped";
      column.setState("stopped");
    } else if (!(err instanceof AuthNeeded)) {
      column.fail(String(err.message || err));
    } else {
      column.fail("needs an API key");
    }
  }
}

function handleEvent(column, run, event) {
  if (event.error) {
    column.fail(event.error.message || "generation failed");
    return;
  }
  if (event.usage) run.usage = event.usage;
  for (const choice of event.choices || []) {
    const text = choice.text ?? (choice.delta && choice.delta.content) ?? "";
    if (text) {
      const now = performance.now();
      if (run.first === null) run.first = now;
      run.last = now;
      run.chunks += 1;
      column.append(text);
    }
    if (choice.finish_reason) run.finish = choice.finish_reason;
  }
  showStats(column, run);
}

// The data of each server-sent event, as the bytes arrive (events end with a blank line).
async function* sseEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  const boundary = /\r\n\r\n|\n\n|\r\r/;
  let buffer = "";
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      finished = done;
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let match;
      while ((match = boundary.exec(buffer)) !== null) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = block
          .split(/\r\n|\n|\r/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
      if (done) return;
    }
  } finally {
    // Left early (an error event, [DONE] or Stop): close the connection, so the server aborts the rest.
    if (!finished) await reader.cancel().catch(() => {});
  }
}

function showStats(column, run) {
  const end = run.last ?? performance.now();
  const completion = run.usage ? run.usage.completion_tokens : run.chunks;
  const values = {};
  if (run.first !== null) values.ttft = `${Math.round(run.first - run.started)} ms`;
  if (run.first !== null && completion > 1 && end > run.first) {
    values.rate = ((completion - 1) / ((end - run.first) / 1000)).toFixed(1);
  }
  values.tokens = run.usage
    ? `${run.usage.prompt_tokens} in · ${run.usage.completion_tokens} out`
    : run.chunks
      ? `${run.chunks} out…`
      : undefined;
  if (run.finish) values.finish = run.finish;
  if (run.version) values.version = run.version;
  column.setStats(values);
}

// ---- status strip ----------------------------------------------------------------------------------
async function refreshStatus() {
  let body;
  try {
    const response = await api("/v1/status");
    if (!response.ok) throw new Error(await errorMessage(response));
    body = await response.json();
  } catch (err) {
    if (!(err instanceof AuthNeeded)) renderStatus(null, String(err.message || err));
    return;
  }
  renderStatus(body, "");
  const resident = new Set((body.adapters && body.adapters.resident) || []);
  const changed = resident.size !== state.resident.size || [...resident].some((x) => !state.resident.has(x));
  state.resident = resident;
  if (changed && !state.controller) renderModels();
}

function chip(label, value, title = "") {
  return el("span", { class: "chip", title }, el("b", {}, label), ` ${value}`);
}

function renderStatus(body, problem) {
  const strip = $("status");
  if (!body) {
    strip.replaceChildren(el("span", { class: "chip down" }, `offline: ${problem}`));
    return;
  }
  const phase = body.draining ? "draining" : body.ready ? "ready" : "loading";
  const items = [el("span", { class: `chip ${body.ready ? "up" : "down"}`, id: "status-state" }, phase)];
  if (body.model) items.push(chip("model", body.model));
  if (body.requests) {
    items.push(chip("running", body.requests.running), chip("waiting", body.requests.waiting));
  }
  if (body.kv_cache && body.kv_cache.blocks_total) {
    const pct = Math.round((100 * body.kv_cache.blocks_used) / body.kv_cache.blocks_total);
    items.push(chip("KV", `${pct}%`, `${body.kv_cache.blocks_used} of ${body.kv_cache.blocks_total} blocks`));
  }
  if (body.adapters) {
    const a = body.adapters;
    const names = a.resident.length ? a.resident.join(", ") : "none";
    items.push(chip("resident", `${a.device_resident}/${a.device_slots}`, `in device slots: ${names}`));
  }
  if (body.adapter_cache) {
    const c = body.adapter_cache;
    items.push(
      chip("cache hits", `${c.device_hits + c.host_hits}`, `device ${c.device_hits}, host ${c.host_hits}`),
      chip("loads", `${c.loads}`, `failed: ${c.load_failures}, evictions: ${c.evictions}`),
    );
  }
  strip.replaceChildren(...items);
}

function startStatusPolling() {
  stopStatusPolling();
  const tick = async () => {
    await refreshStatus();
    if (state.statusTimer !== null) state.statusTimer = setTimeout(tick, STATUS_EVERY_MS);
  };
  state.statusTimer = setTimeout(tick, 0);
}

function stopStatusPolling() {
  if (state.statusTimer !== null) clearTimeout(state.statusTimer);
  state.statusTimer = null;
}

// ---- start -----------------------------------------------------------------------------------------
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function connect() {
  try {
    await loadModels();
    startStatusPolling();
  } catch (err) {
    if (!(err instanceof AuthNeeded)) $("models-note").textContent = String(err.message || err);
  }
}

function onModeChange() {
  const chat = document.querySelector('input[name="mode"]:checked').value === "chat";
  $("system-field").hidden = !chat;
}

async function main() {
  $("key-form").addEventListener("submit", onKeySubmit);
  $("run-form").addEventListener("submit", runComparison);
  $("stop").addEventListener("click", stopComparison);
  $("refresh-models").addEventListener("click", () => connect());
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", onModeChange);
  for (const radio of document.querySelectorAll('input[name="format"]')) radio.addEventListener("change", showSchemaField);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("run-form").requestSubmit();
  });
  renderColumns();
  try {
    const response = await fetch("/playground/config.json", { cache: "no-store" });
    state.authRequired = (await response.json()).auth_required;
  } catch (err) {
    renderStatus(null, String(err.message || err));
    return;
  }
  if (state.authRequired && !state.apiKey) askForKey();
  else connect();
}

document.addEventListener("DOMContentLoaded", main);
