// Talaria's page: chat with streaming, comparisons, thumbs and labelling, all through the
// server's OpenAI-compatible API and POST /v1/feedback. Plain browser JavaScript, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function randomSeed() {
  return Math.floor(Math.random() * 2 ** 31);
}

function settings() {
  const temperature = Math.min(2, Math.max(0, Number($("#temperature").value) || 0));
  const max_tokens = Math.max(1, Math.floor(Number($("#max-tokens").value) || 128));
  return { temperature, max_tokens };
}

function systemMessages() {
  const s = $("#system").value.trim();
  return s ? [{ role: "system", content: s }] : [];
}

function setStatus(id, text, error) {
  const p = $(id);
  p.textContent = text;
  p.classList.toggle("error", !!error);
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return body.error.message;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

// Calls the API with the key this tab was given (kept in sessionStorage). On a 401 the page asks
// for the server's API key once and retries; the key then lasts as long as the tab.
async function api(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    const key = sessionStorage.getItem("talaria-api-key");
    const headers = { ...(init.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401 || attempt > 0) return response;
    const entered = window.prompt("This server needs its API key (ask whoever runs it):");
    if (!entered) return response;
    sessionStorage.setItem("talaria-api-key", entered.trim());
  }
}

// Posts a chat completion with stream: true and calls onDelta(index, text) for each piece.
// Resolves to the finish reasons by choice index.
async function streamChat(messages, extra, onDelta, signal) {
  const response = await api("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ messages, stream: true, ...settings(), ...extra }),
    signal,
  });
  if (!response.ok) throw new Error(await errorOf(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const finish = {};
  let buffer = "";
  for (;;) {
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
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices) {
          if (c.delta && c.delta.content) onDelta(c.index, c.delta.content);
          if (c.finish_reason) finish[c.index] = c.finish_reason;
        }
      }
    }
  }
  return finish;
}

async function postFeedback(body) {
  const response = await api("/v1/feedback", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

// ---------------------------------------------------------------- chat

const chat = { messages: [], controller: null, editing: -1 };

function busy() {
  return chat.controller !== null;
}

function renderChat() {
  const list = $("#messages");
  list.replaceChildren();
  chat.messages.forEach((m, i) => {
    const div = el("div", `msg ${m.role}${m.streaming ? " streaming" : ""}`);
    div.append(el("div", "role", m.role));
    if (m.role === "user" && chat.editing === i) {
      const area = el("textarea");
      area.value = m.content;
      area.rows = 3;
      const save = el("button", "small", "Save & resend");
      save.onclick = () => saveEdit(i, area.value);
      const cancel = el("button", "small", "Cancel");
      cancel.onclick = () => { chat.editing = -1; renderChat(); };
      const tools = el("div", "tools");
      tools.append(save, cancel);
      div.append(area, tools);
    } else {
      div.append(el("div", "content", m.content));
    }
    if (m.note) div.append(el("div", m.error ? "error" : "muted", m.note));
    const tools = el("div", "tools");
    if (m.role === "user" && chat.editing !== i) {
      const edit = el("button", "small edit", "Edit");
      edit.disabled = busy();
      edit.onclick = () => { chat.editing = i; renderChat(); };
      tools.append(edit);
    }
    if (m.role === "assistant" && !m.streaming && m.content) {
      for (const [rating, label] of [["up", "Good"], ["down", "Bad"]]) {
        const b = el("button", `small thumb-${rating}${m.rated === rating ? " on" : ""}`, label);
        b.title = `Thumbs ${rating}`;
        b.onclick = () => rate(i, rating);
        tools.append(b);
      }
    }
    if (tools.childElementCount) div.append(tools);
    list.append(div);
  });
  $("#send").disabled = busy();
  $("#stop").disabled = !busy();
  const last = chat.messages[chat.messages.length - 1];
  $("#regenerate").disabled = busy() || !last;
  window.scrollTo(0, document.body.scrollHeight);
}

// Streams an answer to the conversation so far (which ends with a user message).
async function answer() {
  const history = systemMessages().concat(chat.messages.map(({ role, content }) => ({ role, content })));
  const msg = { role: "assistant", content: "", streaming: true };
  chat.messages.push(msg);
  chat.controller = new AbortController();
  renderChat();
  const contentEl = $("#messages").lastChild.querySelector(".content");
  setStatus("#chat-status", "");
  try {
    const finish = await streamChat(history, { seed: randomSeed() }, (_, text) => {
      msg.content += text;
      contentEl.textContent = msg.content;
    }, chat.controller.signal);
    if (finish[0] === "length") msg.note = "(stopped at the token limit)";
  } catch (e) {
    if (e.name === "AbortError") {
      msg.note = "(stopped)";
    } else {
      msg.note = e.message;
      msg.error = true;
    }
  }
  msg.streaming = false;
  chat.controller = null;
  if (!msg.content && !msg.note) msg.note = "(empty answer)";
  renderChat();
}

function send() {
  const text = $("#input").value;
  if (busy() || !text.trim()) return;
  const last = chat.messages[chat.messages.length - 1];
  if (last && last.role === "assistant" && !last.content) chat.messages.pop();
  $("#input").value = "";
  chat.messages.push({ role: "user", content: text });
  answer();
}

function regenerate() {
  if (busy()) return;
  const last = chat.messages[chat.messages.length - 1];
  if (last && last.role === "assistant") chat.messages.pop();
  if (chat.messages.length) answer();
}

function saveEdit(i, text) {
  if (busy() || !text.trim()) return;
  chat.editing = -1;
  chat.messages = chat.messages.slice(0, i);
  chat.messages.push({ role: "user", content: text });
  answer();
}

async function rate(i, rating) {
  const m = chat.messages[i];
  const prompt = systemMessages().concat(chat.messages.slice(0, i).map(({ role, content }) => ({ role, content })));
  try {
    const saved = await postFeedback({ kind: "thumbs", prompt, answer: m.content, rating });
    m.rated = rating;
    setStatus("#chat-status", `Saved thumbs ${rating} (#${saved.id}).`);
  } catch (e) {
    setStatus("#chat-status", e.message, true);
  }
  renderChat();
}

// ---------------------------------------------------------------- compare

const cmp = { prompt: null, answers: ["", ""] };

function promptFrom(id) {
  const text = $(id).value;
  return text.trim() ? systemMessages().concat([{ role: "user", content: text }]) : null;
}

async function runCompare() {
  const prompt = promptFrom("#cmp-prompt");
  if (!prompt) return setStatus("#cmp-status", "Write a prompt first.", true);
  cmp.prompt = prompt;
  cmp.answers = ["", ""];
  const cols = [$("#cmp-a"), $("#cmp-b")];
  cols.forEach((c) => { c.textContent = ""; });
  $("#cmp-run").disabled = true;
  $("#cmp-choose-a").disabled = $("#cmp-choose-b").disabled = true;
  setStatus("#cmp-status", "Sampling…");
  try {
    const temperature = Math.max(0.7, settings().temperature);
    await streamChat(prompt, { n: 2, temperature, seed: randomSeed() }, (i, text) => {
      cmp.answers[i] += text;
      cols[i].textContent = cmp.answers[i];
    });
    if (!cmp.answers[0].trim() || !cmp.answers[1].trim()) {
      setStatus("#cmp-status", "An answer came back empty; sample again.", true);
    } else if (cmp.answers[0] === cmp.answers[1]) {
      setStatus("#cmp-status", "Both answers are the same; sample again.", true);
    } else {
      setStatus("#cmp-status", "Which answer is better?");
      $("#cmp-choose-a").disabled = $("#cmp-choose-b").disabled = false;
    }
  } catch (e) {
    setStatus("#cmp-status", e.message, true);
  }
  $("#cmp-run").disabled = false;
}

async function choose(better) {
  const [chosen, rejected] = better === 0 ? cmp.answers : [cmp.answers[1], cmp.answers[0]];
  $("#cmp-choose-a").disabled = $("#cmp-choose-b").disabled = true;
  try {
    const saved = await postFeedback({ kind: "comparison", prompt: cmp.prompt, chosen, rejected });
    setStatus("#cmp-status", `Saved comparison #${saved.id}: ${better === 0 ? "A" : "B"} is better.`);
  } catch (e) {
    setStatus("#cmp-status", e.message, true);
  }
}

// ---------------------------------------------------------------- label

const lab = { prompt: null, answers: [] };

async function saveDemonstration() {
  const prompt = promptFrom("#lab-prompt");
  const ideal = $("#lab-ideal").value;
  if (!prompt || !ideal.trim()) return setStatus("#lab-status", "Write a prompt and its ideal answer.", true);
  try {
    const saved = await postFeedback({ kind: "demonstration", messages: prompt.concat([{ role: "assistant", content: ideal }]) });
    setStatus("#lab-status", `Saved demonstration #${saved.id}.`);
    $("#lab-ideal").value = "";
  } catch (e) {
    setStatus("#lab-status", e.message, true);
  }
}

function renderRanking() {
  const list = $("#lab-list");
  list.replaceChildren();
  lab.answers.forEach((a, i) => {
    const li = el("li");
    li.append(el("div", "answer", a));
    const up = el("button", "small", "↑");
    up.disabled = i === 0;
    up.onclick = () => { [lab.answers[i - 1], lab.answers[i]] = [lab.answers[i], lab.answers[i - 1]]; renderRanking(); };
    const down = el("button", "small", "↓");
    down.disabled = i === lab.answers.length - 1;
    down.onclick = () => { [lab.answers[i + 1], lab.answers[i]] = [lab.answers[i], lab.answers[i + 1]]; renderRanking(); };
    li.append(up, down);
    list.append(li);
  });
  $("#lab-submit-rank").disabled = lab.answers.length < 2;
}

async function sampleRanking() {
  const prompt = promptFrom("#lab-prompt");
  if (!prompt) return setStatus("#lab-status", "Write a prompt first.", true);
  const k = Math.min(6, Math.max(2, Math.floor(Number($("#lab-k").value) || 3)));
  lab.prompt = prompt;
  lab.answers = [];
  renderRanking();
  setStatus("#lab-status", `Sampling ${k} answers…`);
  try {
    const temperature = Math.max(0.7, settings().temperature);
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: prompt, n: k, max_tokens: settings().max_tokens, temperature, seed: randomSeed() }),
    });
    if (!response.ok) throw new Error(await errorOf(response));
    const body = await response.json();
    lab.answers = [...new Set(body.choices.map((c) => c.message.content).filter((a) => a.trim()))];
    setStatus("#lab-status", lab.answers.length < 2
      ? "Fewer than two different answers; sample again."
      : "Order the answers best first, then save.");
  } catch (e) {
    setStatus("#lab-status", e.message, true);
  }
  renderRanking();
}

async function saveRanking() {
  try {
    const saved = await postFeedback({ kind: "ranking", prompt: lab.prompt, ranked: lab.answers });
    setStatus("#lab-status", `Saved ranking #${saved.id}.`);
    lab.answers = [];
    renderRanking();
  } catch (e) {
    setStatus("#lab-status", e.message, true);
  }
}

// ---------------------------------------------------------------- wiring

function showView(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === name));
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== `view-${name}`; });
}

document.querySelectorAll(".tab").forEach((t) => { t.onclick = () => showView(t.dataset.view); });
$("#send").onclick = send;
$("#stop").onclick = () => chat.controller && chat.controller.abort();
$("#regenerate").onclick = regenerate;
$("#clear").onclick = () => { if (!busy()) { chat.messages = []; chat.editing = -1; renderChat(); } };
$("#input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("#cmp-run").onclick = runCompare;
$("#cmp-choose-a").onclick = () => choose(0);
$("#cmp-choose-b").onclick = () => choose(1);
$("#lab-submit-demo").onclick = saveDemonstration;
$("#lab-sample").onclick = sampleRanking;
$("#lab-submit-rank").onclick = saveRanking;

api("/v1/models").then((r) => r.json()).then((b) => {
  const m = b.data[0];
  $("#model").textContent = `${m.id} · context ${m.context_length}`;
  $("#max-tokens").max = m.context_length;
}).catch(() => {});
renderChat();
