// The chat page: keeps the conversation, sends it to /v1/chat/completions with stream=true and
// appends the answer as its chunks arrive (server-sent events read from a fetch body).
"use strict";

const $ = (id) => document.getElementById(id);
const messages = [];
let modelId = null;
let pendingImage = null; // data URL of the picked image, sent with the next question

function headers() {
  const key = $("api-key").value.trim();
  localStorage.setItem("vlbridge-api-key", key);
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function addTurn(role, text, image) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return span;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = `model list: ${await errorText(response)}`;
    return;
  }
  const body = await response.json();
  modelId = body.data[0].id;
  $("model").textContent = `model: ${modelId}`;
}

// Yields the JSON payload of every `data:` event in a streamed response body.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  const content = [{ type: "text", text }];
  if (pendingImage) content.unshift({ type: "image_url", image_url: { url: pendingImage } });
  messages.push({ role: "user", content });
  addTurn("user", text, pendingImage);
  clearImage();
  $("prompt").value = "";
  $("send").disabled = true;
  $("status").textContent = "thinking…";
  const answer = addTurn("assistant", "");
  answer.parentElement.classList.add("streaming");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: modelId,
        messages,
        stream: true,
        temperature: Number($("temperature").value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) {
        answer.textContent += delta.content;
        answer.dataset.chunks = Number(answer.dataset.chunks || 0) + 1;
      }
    }
    messages.push({ role: "assistant", content: answer.textContent });
    $("status").textContent = "";
  } catch (err) {
    messages.pop();
    answer.parentElement.remove();
    addTurn("error", String(err.message || err));
    $("status").textContent = "";
  } finally {
    answer.parentElement.classList.remove("streaming");
    answer.parentElement.classList.add("done");
    $("send").disabled = false;
  }
}

function clearImage() {
  pendingImage = null;
  $("image").value = "";
  $("preview").hidden = true;
}

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return clearImage();
  const reader = new FileReader();
  reader.onload = () => {
    pendingImage = reader.result;
    $("preview").src = pendingImage;
    $("preview").hidden = false;
  };
  reader.readAsDataURL(file);
});
$("clear").addEventListener("click", () => {
  messages.length = 0;
  $("log").replaceChildren();
  clearImage();
});
$("ask").addEventListener("submit", ask);
$("api-key").value = localStorage.getItem("vlbridge-api-key") || "";
$("api-key").addEventListener("change", loadModel);
loadModel();
