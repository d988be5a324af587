// The chat page of serve_demo.py: a conversation streamed from POST /api/chat (server-sent events read from a
// fetch body; EventSource cannot POST). The history lives here and goes with every request, trimmed from the
// oldest turn when the prompt and the answer would not fit in the model (the server counts the tokens).
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), form = $("composer"), input = $("input");
const sendButton = $("send"), stopButton = $("stop");
const temperatureInput = $("temperature"), maxNewInput = $("max-new-tokens");
const systemInput = $("system-prompt");
const statusLine = $("status");
const TIBETAN = /[\u0F00-\u0FFF]/;

let limits = null;      // GET api/limits: context length, caps, the server's defaults
let history = [];       // [user, assistant] pairs, oldest first
let controller = null;  // the AbortController of the request in flight

class ServerError extends Error {}

async function request(path, body, signal) {
  const response = await fetch(path, body === undefined ? {signal} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal,
  });
  if (!response.ok) {  // the server's JSON error ({"error": {"message": ...}}), else the HTTP status
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch (e) { /* not JSON */ }
    throw new ServerError(message);
  }
  return response;
}

async function loadLimits() {
  limits = await (await request("api/limits")).json();
  $("model").textContent = limits.model;
  document.title = `Yak chat · ${limits.model}`;
  maxNewInput.max = limits.max_new_tokens_cap;
  maxNewInput.value = limits.max_new_tokens;
  temperatureInput.value = limits.temperature;
  if (limits.system_prompt !== null) systemInput.value = limits.system_prompt;
  status(`Context: ${limits.max_total_tokens} tokens.`);
}

function status(text) { statusLine.textContent = text; }

function setBusy(busy) {
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
}

function setText(element, text) {
  element.textContent = text;
  if (TIBETAN.test(text)) element.lang = "bo"; else element.removeAttribute("lang");
}

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  setText(body, text);
  const meta = document.createElement("div");
  meta.className = "meta";
  message.append(body, meta);
  log.append(message);
  scrollDown(true);
  return message;
}

function scrollDown(force) {  // follow the answer unless the reader scrolled up
  if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
}

function showError(text) {
  const message = addMessage("error", text);
  message.setAttribute("role", "alert");
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API (a page not served from localhost or https): the older way
    const area = Object.assign(document.createElement("textarea"), {value: text});
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function finish(message, text, note) {
  message.classList.remove("pending");
  const meta = message.querySelector(".meta");
  if (text) {
    const button = document.createElement("button");
    Object.assign(button, {type: "button", className: "copy", textContent: "Copy"});
    button.setAttribute("aria-label", "Copy answer");
    button.addEventListener("click", () => copy(text, button));
    meta.append(button);
  }
  if (note) meta.append(note);
}

function settings() {
  const number = (element, fallback) => (element.value === "" || isNaN(element.valueAsNumber)
    ? fallback : element.valueAsNumber);
  const body = {
    temperature: Math.max(0, number(temperatureInput, limits.temperature)),
    want: Math.max(1, Math.min(Math.round(number(maxNewInput, limits.max_new_tokens)),
                               limits.max_new_tokens_cap)),
  };
  if (systemInput.value !== "") body.system_prompt = systemInput.value;
  return body;
}

// The /api/chat body for `query`: as many recent turns as leave room for the wanted answer length, and
// max_new_tokens capped to the room left. A prompt that does not fit even alone is sent as it is: the
// server's error says by how much.
async function fit(query, signal) {
  const {want, ...sampling} = settings();
  const keep = Math.min(history.length, limits.max_history_turns);
  let turns = history.slice(history.length - keep);
  for (;;) {
    const body = {query, history: turns, ...sampling};
    const {prompt_tokens: prompt} = await (await request("api/count_tokens", body, signal)).json();
    const room = limits.max_total_tokens - prompt;
    if (want <= room || turns.length === 0) {
      const dropped = history.length - turns.length;
      body.max_new_tokens = Math.max(1, Math.min(want, room));
      const left = dropped ? `; ${dropped} oldest turn${dropped > 1 ? "s" : ""} left out to make room` : "";
      const context = limits.max_total_tokens;
      status(room < 1 ? `Prompt: ${prompt} tokens, over the context of ${context}${left}.`
        : `Prompt: ${prompt} tokens, answer: up to ${body.max_new_tokens}, context: ${context}${left}.`);
      return body;
    }
    turns = turns.slice(1);
  }
}

// The JSON objects of a server-sent event stream (comments such as ": keep-alive" carry no data).
async function* events(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
      buffer = buffer.slice(end + 2);
      if (data) yield JSON.parse(data);
    }
  }
}

async function send() {
  const query = input.value;
  if (controller || !limits || !query.trim()) return;
  input.value = "";
  addMessage("user", query);
  const message = addMessage("assistant pending", "");
  const text = message.querySelector(".text");
  let answer = "", note = "";
  const conversation = history;  // Clear starts a new one: a late answer must not land there
  controller = new AbortController();
  setBusy(true);
  try {
    const body = await fit(query, controller.signal);
    const response = await request("api/chat", {...body, stream: true}, controller.signal);
    for await (const event of events(response.body)) {
      if (event.error) throw new ServerError(event.error.message);
      if (event.delta !== undefined) answer += event.delta;
      else if (event.output !== undefined) {  // the last event: the whole answer
        answer = event.output;
        if (event.finish_reason === "length") note = "(stopped at the token limit)";
      }
      setText(text, answer);
      scrollDown(false);
    }
    conversation.push([query, answer]);
  } catch (e) {
    if (e.name === "AbortError") {  // Stop: keep what came, as the conversation so far
      note = "(stopped)";
      if (answer) conversation.push([query, answer]);
    } else {
      if (!answer) message.remove();
      showError(e instanceof ServerError ? e.message : `Could not reach the server: ${e.message}`);
    }
  } finally {
    if (message.isConnected) finish(message, answer, note);
    controller = null;
    setBusy(false);
    input.focus();
  }
}

function stop() {
  if (controller) controller.abort();
}

form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
// Enter sends, Shift+Enter adds a line; the Enter that confirms an input method's text is the method's own.
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
stopButton.addEventListener("click", stop);
$("clear").addEventListener("click", () => {
  stop();
  history = [];
  log.replaceChildren();
  status(limits ? `Context: ${limits.max_total_tokens} tokens.` : "");
  input.focus();
});

loadLimits().catch((e) => showError(`Could not read the server's limits: ${e.message}`));
