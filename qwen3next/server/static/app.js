// Chat page of the qwen3next server: talks to /v1/chat/completions with streaming (fetch + SSE parsing).
// No framework and no network but this server, so it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), system: $("system"), temperature: $("temperature"), topP: $("top-p"),
  maxTokens: $("max-tokens"), thinking: $("thinking"), apiKey: $("api-key"), newChat: $("new-chat"),
  status: $("status"), messages: $("messages"), empty: $("empty"), composer: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"),
  temperatureValue: $("temperature-value"), topPValue: $("top-p-value"),
};

let history = [];          // the conversation sent to the server: [{role, content}]
let controller = null;     // AbortController of the request in flight

// ---- settings, remembered in localStorage
const SAVED = ["system", "temperature", "top-p", "max-tokens", "api-key"];
for (const id of SAVED) {
  const el = $(id);
  const value = localStorage.getItem("qwen3next." + id);
  if (value !== null) el.value = value;
  el.addEventListener("input", () => localStorage.setItem("qwen3next." + id, el.value));
}
const savedThinking = localStorage.getItem("qwen3next.thinking");
if (savedThinking !== null) ui.thinking.checked = savedThinking === "true";
ui.thinking.addEventListener("change", () => localStorage.setItem("qwen3next.thinking", ui.thinking.checked));

function showSliderValues() {
  ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2);
  ui.topPValue.textContent = Number(ui.topP.value).toFixed(2);
}
ui.temperature.addEventListener("input", showSliderValues);
ui.topP.addEventListener("input", showSliderValues);
showSliderValues();

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { ui.status.textContent = text; }

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { setStatus(await errorMessage(r)); return; }
    const body = await r.json();
    const previous = ui.model.value;
    ui.model.replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    if (previous) ui.model.value = previous;
    setStatus("");
  } catch (e) {
    setStatus("server unreachable: " + e.message);
  }
}
ui.apiKey.addEventListener("change", loadModels);

// ---- rendering
function scrollDown() { ui.messages.scrollTop = ui.messages.scrollHeight; }

function addMessage(role, text) {
  ui.empty.hidden = true;
  const msg = document.createElement("div");
  msg.className = "msg " + role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text || "";
  msg.append(bubble);
  ui.messages.append(msg);
  scrollDown();
  return msg;
}

// The assistant's message: a collapsible "Thinking" block (shown once reasoning arrives) and the answer.
function addAssistant() {
  const msg = addMessage("assistant", "");
  msg.classList.add("streaming");
  const details = document.createElement("details");
  details.className = "thinking";
  details.hidden = true;
  details.open = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking…";
  const reasoning = document.createElement("div");
  reasoning.className = "reasoning";
  details.append(summary, reasoning);
  msg.prepend(details);
  const meta = document.createElement("div");
  meta.className = "meta";
  msg.append(meta);
  return { msg, details, summary, reasoning, bubble: msg.querySelector(".bubble"), meta };
}

// ---- server-sent events: yields the parsed JSON of each `data:` line until [DONE]
async function* sseEvents(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
  }
}

// ---- one turn
async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const view = addAssistant();
  const system = ui.system.value.trim();
  const body = {
    model: ui.model.value || undefined,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(ui.temperature.value),
    top_p: Number(ui.topP.value),
    chat_template_kwargs: { enable_thinking: ui.thinking.checked },
  };
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;

  controller = new AbortController();
  setBusy(true);
  let content = "", reasoning = "", finish = null, usage = null;
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseEvents(response, controller.signal)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const d = choice.delta || {};
        if (d.reasoning_content) {
          reasoning += d.reasoning_content;
          view.details.hidden = false;
          view.reasoning.textContent = reasoning;
        }
        if (d.content) {
          if (!content && reasoning) {               // the answer starts: fold the thinking away
            view.details.open = false;
            view.summary.textContent = "Thought for " + ((performance.now() - started) / 1000).toFixed(1) + " s";
          }
          content += d.content;
          view.bubble.textContent = content;
        }
        if (d.tool_calls) {
          content += d.tool_calls.map((c) => `\n[tool call] ${c.function.name}(${c.function.arguments})`).join("");
          view.bubble.textContent = content;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      scrollDown();
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      view.msg.classList.add("error");
      view.bubble.textContent = (content ? content + "\n\n" : "") + "Error: " + e.message;
      finish = "error";
    }
  } finally {
    controller = null;
    setBusy(false);
    view.msg.classList.remove("streaming");
    if (reasoning && !content) view.summary.textContent = "Thinking";
  }
  const parts = [];
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  parts.push(((performance.now() - started) / 1000).toFixed(1) + " s");
  if (finish) parts.push(finish);
  view.meta.textContent = parts.join(" · ");
  if (content) history.push({ role: "assistant", content });
  else history.pop();                               // nothing came back: let the user try that turn again
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.prompt.disabled = false;
}

// ---- events
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  autosize();
  send(text);
});

ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.composer.requestSubmit();
  }
});

function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 200) + "px";
}
ui.prompt.addEventListener("input", autosize);

ui.stop.addEventListener("click", () => { if (controller) controller.abort(); });

ui.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.prompt.focus();
});

loadModels();
