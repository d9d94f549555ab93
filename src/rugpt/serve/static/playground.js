// The playground: streams /v1/completions over server-sent events; Stop cancels the request by its id.
// Text is always inserted with textContent, never as HTML, so model output cannot run script here.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // {id, controller} of the running request

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function numberField(body, name, parse) {
  const raw = $(name).value.trim();
  if (raw !== "") body[name] = parse(raw);
}

function requestBody() {
  const body = { prompt: $("prompt").value, stream: true, preset: $("preset").value };
  numberField(body, "max_tokens", (v) => parseInt(v, 10));
  numberField(body, "temperature", parseFloat);
  numberField(body, "top_p", parseFloat);
  numberField(body, "top_k", (v) => parseInt(v, 10));
  numberField(body, "repetition_penalty", parseFloat);
  numberField(body, "seed", (v) => parseInt(v, 10));
  const stop = $("stop_text").value.replace(/\\n/g, "\n");
  if (stop) body.stop = [stop];
  if ($("trained_prompt").value) body.trained_prompt = $("trained_prompt").value;
  return body;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

// One SSE event block: comment lines (queue position) or a data line (a chunk, an error or [DONE]).
function handleEvent(block, out) {
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) {
      const note = line.slice(1).trim();
      if (note.startsWith("queue")) setStatus("waiting: " + note);
      else if (note === "started") setStatus("generating… (request " + current.id + ")");
    } else if (line.startsWith("data: ")) {
      const data = line.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.text) out.append(document.createTextNode(choice.text));
        if (choice.finish_reason) setStatus("finished: " + choice.finish_reason);
      }
    }
  }
}

async function generate() {
  const out = $("output");
  out.textContent = "";
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt";
  promptSpan.textContent = $("prompt").value;
  out.append(promptSpan);
  setRunning(true);
  setStatus("sending…");
  const controller = new AbortController();
  current = { id: null, controller };
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    current.id = response.headers.get("x-request-id");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handleEvent(buffer.slice(0, end), out);
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") setStatus("error: " + err.message, true);
  } finally {
    setRunning(false);
    current = null;
  }
}

async function stop() {
  if (!current) return;
  const { id, controller } = current;
  if (id) {
    // Cancel by id: the server ends the stream with finish_reason "cancelled" and what was generated so far.
    const r = await fetch("/v1/requests/" + encodeURIComponent(id), { method: "DELETE", headers: headers() });
    if (r.ok) return;
  }
  controller.abort(); // not started yet, or the id is gone: hanging up drops the request too
  setStatus("stopped");
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) return;
    const card = (await r.json()).data[0];
    $("model").textContent = "— " + card.id + " (context " + card.context_length + ")";
    for (const name of card.trained_prompts || []) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      $("trained_prompt").append(option);
    }
  } catch (err) {
    setStatus("cannot reach the server: " + err.message, true);
  }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stop);
$("api_key").addEventListener("change", loadModel);
loadModel();
