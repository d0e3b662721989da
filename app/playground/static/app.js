// The imagegen playground: plain JavaScript over the public API, no framework, no build step.
// Every URL is relative, so the page works wherever the gateway is mounted. The API key (when
// the service wants one) lives in localStorage and travels only in the Authorization header:
// the event stream is read with fetch, not EventSource, so the key never goes in a URL.
"use strict";

(() => {
  const KEY_STORAGE = "imagegen.apiKey";
  const FIELDS = [
    "prompt", "negative_prompt", "model", "scheduler", "width", "height",
    "steps", "guidance_scale", "seed", "n",
  ];
  const NUMBER_FIELDS = ["width", "height", "steps", "guidance_scale", "seed", "n"];
  // Fields of images in and control: their errors show beside these inputs.
  const INPUT_FIELDS = ["image", "strength", "mask", "controls"];
  const INPUT_OF = { controls: "control-id" };
  const inputOf = (field) => $(INPUT_OF[field] || field);
  const JOB_EVENTS = new Set(["queued", "running", "progress", "succeeded", "failed", "canceled"]);
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const GALLERY_LIMIT = 32;
  const SEED_MODULUS = 2 ** 32;

  const $ = (id) => document.getElementById(id);
  const state = { keysRequired: false, models: [], job: null, abort: null, samplers: new Map() };

  // ---- API access -------------------------------------------------------------------------

  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  class ApiError extends Error {
    constructor(status, error, retryAfter) {
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.code = error.code || "";
      this.details = Array.isArray(error.details) ? error.details : [];
      this.retryAfter = retryAfter;
    }
  }

  function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = storedKey();
    // An open service gets no key at all: it has no use for one.
    if (state.keysRequired && key) headers.set("Authorization", `Bearer ${key}`);
    return fetch(path, { ...options, headers, cache: "no-store" });
  }

  async function apiError(response) {
    let error = {};
    try {
      const body = await response.json();
      if (body && typeof body.error === "object" && body.error) error = body.error;
    } catch {
      // Not the envelope (a proxy's page, say): the status is all there is.
    }
    return new ApiError(response.status, error, response.headers.get("Retry-After"));
  }

  async function apiJson(path, options) {
    const response = await api(path, options);
    if (!response.ok) throw await apiError(response);
    return response.json();
  }

  // The API names URLs from the root ("/v1/..."); relative keeps a path prefix working.
  const relative = (url) => url.replace(/^\/+/, "");

  // ---- Errors beside their fields ---------------------------------------------------------

  function clearErrors() {
    for (const field of [...FIELDS, ...INPUT_FIELDS]) {
      $(`${field}-error`).textContent = "";
      inputOf(field).removeAttribute("aria-invalid");
    }
    $("form-error").textContent = "";
  }

  function showError(error) {
    if (error instanceof ApiError && error.status === 401) {
      showKeySection();
      $("api-key-error").textContent = `This service needs a valid API key: ${error.message}`;
      $("api-key").setAttribute("aria-invalid", "true");
      $("api-key").focus();
      return;
    }
    if (!(error instanceof ApiError)) {
      $("form-error").textContent = `The service could not be reached: ${error.message}`;
      return;
    }
    const byField = new Map();
    const known = [...FIELDS, ...INPUT_FIELDS];
    for (const detail of error.details) {
      // "controls[0].image" shows beside the control inputs.
      const field = String(detail.field || "").split(".")[0].replace(/\[.*$/, "");
      if (!known.includes(field)) continue;
      const message = `${detail.field}: ${detail.message || error.message}`;
      byField.set(field, [...(byField.get(field) || []), message]);
    }
    for (const [field, messages] of byField) {
      $(`${field}-error`).textContent = messages.join("; ");
      inputOf(field).setAttribute("aria-invalid", "true");
    }
    const first = known.find((field) => byField.has(field));
    if (first) {
      if (INPUT_FIELDS.includes(first)) $("inputs").open = true;
      $("form-error").textContent = "The service refused a field; see the message beside it.";
      inputOf(first).focus();
    } else {
      const wait = error.retryAfter ? ` (retry in ${error.retryAfter} s)` : "";
      $("form-error").textContent = `${error.message}${wait}`;
    }
  }

  // ---- API key ----------------------------------------------------------------------------

  function showKeySection() {
    state.keysRequired = true;
    $("key-section").hidden = false;
  }

  async function saveKey() {
    const key = $("api-key").value.trim();
    $("api-key-error").textContent = "";
    $("api-key").removeAttribute("aria-invalid");
    try {
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
    } catch {
      $("api-key-error").textContent = "This browser refuses local storage; the key cannot be kept.";
      return;
    }
    await loadModels();
  }

  function forgetKey() {
    try {
      localStorage.removeItem(KEY_STORAGE);
    } catch {
      // Nothing stored, nothing to forget.
    }
    $("api-key").value = "";
    $("api-key-error").textContent = "The key is forgotten. Enter a key to use this service.";
  }

  // ---- Models and their defaults ----------------------------------------------------------

  async function start() {
    $("generate-form").addEventListener("submit", submit);
    $("cancel").addEventListener("click", cancel);
    $("defaults").addEventListener("click", () => applyDefaults(currentModel()));
    $("model").addEventListener("change", () => {
      fillSchedulers(currentModel());
      fillControls(currentModel());
      applyDefaults(currentModel());
    });
    $("key-save").addEventListener("click", saveKey);
    $("key-forget").addEventListener("click", forgetKey);
    $("api-key").addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        saveKey();
      }
    });

    // Ask once without a key: a 401 is how the page learns that this service wants one.
    let probe;
    try {
      probe = await fetch("v1/models", { cache: "no-store" });
    } catch (error) {
      showError(error);
      return;
    }
    if (probe.status === 401) {
      showKeySection();
      $("api-key").value = storedKey();
      if (storedKey()) {
        await loadModels();
      } else {
        $("api-key-error").textContent = "Enter an API key to use this service.";
      }
      return;
    }
    if (!probe.ok) {
      showError(await apiError(probe));
      return;
    }
    showModels(await probe.json());
  }

  async function loadModels() {
    try {
      showModels(await apiJson("v1/models"));
      $("api-key-error").textContent = "";
      $("api-key").removeAttribute("aria-invalid");
    } catch (error) {
      showError(error);
    }
  }

  function showModels(list) {
    state.models = list.data || [];
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(
      ...state.models.map((model) => {
        const workers = `${model.workers} worker${model.workers === 1 ? "" : "s"}`;
        const label = `${model.id}${model.default ? " (default)" : ""} · ${workers}`;
        return new Option(label, model.id);
      }),
    );
    const keep = state.models.find((model) => model.id === chosen);
    const fallback = state.models.find((model) => model.default) || state.models[0];
    const model = keep || fallback;
    if (!model) {
      $("form-error").textContent = "No model is served yet: start a worker, then reload.";
      return;
    }
    select.value = model.id;
    fillSchedulers(model);
    fillControls(model);
    if (!keep) applyDefaults(model);
  }

  function currentModel() {
    return state.models.find((model) => model.id === $("model").value);
  }

  function fillSchedulers(model) {
    if (!model) return;
    const select = $("scheduler");
    const chosen = select.value;
    select.replaceChildren(...model.schedulers.map((name) => new Option(name, name)));
    select.value = model.schedulers.includes(chosen) ? chosen : model.scheduler;
  }

  function applyDefaults(model) {
    if (!model) return;
    $("width").value = model.width;
    $("height").value = model.height;
    $("steps").value = model.steps;
    $("guidance_scale").value = model.guidance_scale;
    $("scheduler").value = model.scheduler;
    showSnippet();
  }

  // ---- Submitting and following a job -----------------------------------------------------

  function readForm() {
    const body = { prompt: $("prompt").value };
    if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
    if ($("model").value) body.model = $("model").value;
    if ($("scheduler").value) body.scheduler = $("scheduler").value;
    for (const field of NUMBER_FIELDS) {
      const raw = $(field).value.trim();
      // Empty means "the model's default" (for the seed: a random one chosen by the service).
      if (raw !== "") body[field] = Number(raw);
    }
    if (inputs.imageData) {
      body.image = inputs.imageData;
      const strength = $("strength").value.trim();
      if (strength !== "") body.strength = Number(strength);
      if (inputs.painted) body.mask = maskDataUrl();
    }
    const control = $("control-id").value;
    if (control && inputs.controlData) {
      body.controls = [
        {
          id: control,
          image: inputs.controlData,
          preprocess: $("control-preprocess").value,
          scale: Number($("control-scale").value || "1"),
        },
      ];
    }
    return body;
  }

  // ---- Images in, the mask painter and control ------------------------------------------
  // Pictures are read as data URLs for the JSON body and shown from blob: URLs (the page's
  // Content-Security-Policy allows no data: images).

  const inputs = { imageData: null, picture: null, mask: null, painted: false, controlData: null };

  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function chooseImage() {
    const file = $("image").files[0];
    inputs.imageData = null;
    inputs.picture = null;
    inputs.mask = null;
    inputs.painted = false;
    if (file) {
      const picture = new Image();
      picture.src = URL.createObjectURL(file);
      try {
        await picture.decode();
      } catch {
        $("image-error").textContent = "This browser cannot show that file as an image.";
      }
      inputs.imageData = await readDataUrl(file);
      inputs.picture = picture;
      const canvas = $("mask");
      canvas.width = picture.naturalWidth || 64;
      canvas.height = picture.naturalHeight || 64;
      inputs.mask = document.createElement("canvas");
      inputs.mask.width = canvas.width;
      inputs.mask.height = canvas.height;
    }
    drawMask();
    showSnippet();
  }

  function drawMask() {
    const canvas = $("mask");
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (inputs.picture) context.drawImage(inputs.picture, 0, 0);
    if (inputs.mask) {
      context.globalAlpha = 0.6;
      context.drawImage(inputs.mask, 0, 0);
      context.globalAlpha = 1;
    }
  }

  function paintAt(event) {
    if (!inputs.mask) return;
    const canvas = $("mask");
    const box = canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) * canvas.width) / box.width;
    const y = ((event.clientY - box.top) * canvas.height) / box.height;
    const radius = Math.max(1, Number($("brush").value) || 12) / 2;
    const context = inputs.mask.getContext("2d");
    context.fillStyle = "#fff";
    context.beginPath();
    context.arc(x, y, radius, 0, 2 * Math.PI);
    context.fill();
    inputs.painted = true;
    drawMask();
  }

  function maskDataUrl() {
    // The API's convention: white repaints, black keeps; the image's size.
    const out = document.createElement("canvas");
    out.width = inputs.mask.width;
    out.height = inputs.mask.height;
    const context = out.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, out.width, out.height);
    context.drawImage(inputs.mask, 0, 0);
    return out.toDataURL("image/png");
  }

  function clearMask() {
    if (inputs.mask) inputs.mask.getContext("2d").clearRect(0, 0, inputs.mask.width, inputs.mask.height);
    inputs.painted = false;
    drawMask();
    showSnippet();
  }

  function fillControls(model) {
    if (!model) return;
    const ids = $("control-id");
    const chosen = ids.value;
    ids.replaceChildren(new Option("none", ""), ...model.controls.map((c) => new Option(c.id, c.id)));
    ids.value = model.controls.some((c) => c.id === chosen) ? chosen : "";
    const pre = $("control-preprocess");
    const picked = pre.value;
    const names = ["none", ...(model.preprocessors || [])];
    pre.replaceChildren(...names.map((n) => new Option(n === "none" ? "none (the picture is the map)" : n, n)));
    pre.value = names.includes(picked) ? picked : "none";
  }

  async function chooseControlImage() {
    const file = $("control-image").files[0];
    inputs.controlData = file ? await readDataUrl(file) : null;
    showSnippet();
  }

  async function previewMap() {
    clearErrors();
    if (!inputs.controlData) {
      $("controls-error").textContent = "Choose a control picture first.";
      return;
    }
    const body = { image: inputs.controlData, preprocess: $("control-preprocess").value };
    if ($("model").value) body.model = $("model").value;
    for (const field of ["width", "height"]) {
      const raw = $(field).value.trim();
      if (raw !== "") body[field] = Number(raw);
    }
    try {
      const response = await api("v1/control/preprocess", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!response.ok) throw await apiError(response);
      const map = $("control-map");
      if (map.src) URL.revokeObjectURL(map.src);
      map.src = URL.createObjectURL(await response.blob());
      map.hidden = false;
    } catch (error) {
      if (error instanceof ApiError && error.details.length) {
        $("controls-error").textContent = error.details.map((d) => `${d.field}: ${d.message}`).join("; ");
      } else {
        showError(error);
      }
    }
  }

  let painting = false;
  $("mask").addEventListener("pointerdown", (event) => {
    painting = true;
    $("mask").setPointerCapture(event.pointerId);
    paintAt(event);
  });
  $("mask").addEventListener("pointermove", (event) => {
    if (painting) paintAt(event);
  });
  const stopPainting = () => {
    if (painting) showSnippet();
    painting = false;
  };
  $("mask").addEventListener("pointerup", stopPainting);
  $("mask").addEventListener("pointercancel", stopPainting);
  $("image").addEventListener("change", chooseImage);
  $("mask-clear").addEventListener("click", clearMask);
  $("control-image").addEventListener("change", chooseControlImage);
  $("control-preview").addEventListener("click", previewMap);

  function setBusy(busy) {
    $("generate").disabled = busy;
    $("cancel").disabled = !busy;
  }

  async function submit(event) {
    event.preventDefault();
    if ($("generate").disabled) return;
    clearErrors();
    $("form-note").textContent = "";
    setBusy(true);
    let job;
    try {
      job = await apiJson("v1/generations", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(readForm()),
      });
    } catch (error) {
      setBusy(false);
      showError(error);
      return;
    }
    await follow(job);
  }

  async function follow(job) {
    state.job = job;
    const controller = new AbortController();
    state.abort = controller;
    render(job);
    let last = job;
    // A dropped stream is reopened: a late reader first gets the current state.
    for (let attempt = 0; attempt < 5 && !TERMINAL.has(last.status); attempt += 1) {
      try {
        last = await readEvents(job.id, controller.signal, (doc) => render(doc)) || last;
      } catch (error) {
        if (error instanceof ApiError) {
          showError(error);
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, 500 * (attempt + 1)));
      }
    }
    if (!TERMINAL.has(last.status)) {
      try {
        last = await apiJson(`v1/generations/${encodeURIComponent(job.id)}`);
        render(last);
      } catch (error) {
        showError(error);
      }
    }
    state.abort = null;
    setBusy(false);
    if (last.status === "succeeded") await showImages(last);
  }

  // Reads the job's Server-Sent Events; resolves with the terminal document, or null when
  // the stream ended early.
  async function readEvents(id, signal, onDocument) {
    const response = await api(`v1/generations/${encodeURIComponent(id)}/events`, {
      signal,
      headers: { Accept: "text/event-stream" },
    });
    if (!response.ok) throw await apiError(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let name = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (data.length && JOB_EVENTS.has(name)) {
            const doc = JSON.parse(data.join("\n"));
            onDocument(doc);
            if (TERMINAL.has(doc.status)) {
              reader.cancel().catch(() => {});
              return doc;
            }
          }
          name = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") name = text;
          else if (field === "data") data.push(text);
        }
      }
    }
  }

  const STATUS_TEXT = {
    queued: (doc) => `Queued${doc.queue_position == null ? "" : `, position ${doc.queue_position}`}.`,
    running: () => "Running.",
    succeeded: (doc) => `Succeeded${doc.timings && doc.timings.run_s != null ? ` in ${doc.timings.run_s.toFixed(1)} s` : ""}.`,
    failed: (doc) => `Failed: ${doc.error ? doc.error.message : "unknown error"}.`,
    canceled: () => "Canceled.",
  };

  function render(doc) {
    $("job").dataset.status = doc.status;
    $("job-id").textContent = doc.id;
    // Only transitions go to the live region; every step would flood a screen reader.
    const text = (STATUS_TEXT[doc.status] || (() => doc.status))(doc);
    if ($("job-status").textContent !== text) $("job-status").textContent = text;
    $("job-queue").textContent = doc.queue_position == null ? "–" : String(doc.queue_position);
    const { step, total_steps: total, eta_s: eta } = doc.progress;
    $("job-step").textContent = `${step} of ${total}`;
    $("job-eta").textContent = eta == null || TERMINAL.has(doc.status) ? "–" : formatSeconds(eta);
    $("job-progress").value = doc.status === "succeeded" ? 1 : total ? step / total : 0;
  }

  function formatSeconds(seconds) {
    if (seconds < 60) return `about ${Math.max(1, Math.round(seconds))} s`;
    return `about ${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  }

  async function cancel() {
    if (!state.job) return;
    $("cancel").disabled = true;
    try {
      render(await apiJson(`v1/generations/${encodeURIComponent(state.job.id)}`, { method: "DELETE" }));
    } catch (error) {
      showError(error);
      $("cancel").disabled = !state.abort;
    }
  }

  // ---- The gallery ------------------------------------------------------------------------

  async function showImages(doc) {
    const cards = [];
    for (const image of [...doc.images].sort((a, b) => a.index - b.index)) {
      try {
        const response = await api(relative(image.url));
        if (!response.ok) throw await apiError(response);
        cards.push(card(doc, image, await response.blob()));
      } catch (error) {
        showError(error);
      }
    }
    const gallery = $("gallery");
    gallery.prepend(...cards);
    while (gallery.children.length > GALLERY_LIMIT) {
      const old = gallery.lastElementChild;
      for (const element of old.querySelectorAll("[src], [href]")) {
        URL.revokeObjectURL(element.src || element.href);
      }
      old.remove();
    }
  }

  function card(doc, image, blob) {
    const url = URL.createObjectURL(blob);
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.job = doc.id;
    item.dataset.index = String(image.index);
    item.dataset.seed = String(image.seed);

    const img = document.createElement("img");
    img.src = url;
    img.width = image.width;
    img.height = image.height;
    img.alt = `Image ${image.index + 1} of ${doc.images.length}: ${doc.request.prompt}`;

    const caption = document.createElement("p");
    caption.textContent = `Seed ${image.seed} · ${image.width}×${image.height}`;

    const download = document.createElement("a");
    download.className = "button secondary download";
    download.href = url;
    download.download = `${doc.id}-${image.index}.png`;
    download.textContent = "Download PNG";
    download.setAttribute("aria-label", `Download PNG of image ${image.index + 1} (seed ${image.seed})`);

    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "secondary reuse";
    reuse.textContent = "Reuse these parameters";
    reuse.setAttribute("aria-label", `Reuse these parameters (image ${image.index + 1}, seed ${image.seed})`);
    reuse.addEventListener("click", () => reuseParameters(doc, image, blob));

    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(download, reuse);
    item.append(img, caption, actions);
    return item;
  }

  async function reuseParameters(doc, image, blob) {
    // The PNG's own `parameters` chunk is the record of how it was made; the job's request
    // (with this image's seed) stands in should the chunk be missing.
    let params = null;
    try {
      params = pngParameters(new Uint8Array(await blob.arrayBuffer()));
    } catch {
      params = null;
    }
    if (!params) {
      params = { ...doc.request, seed: (doc.request.seed + image.index) % SEED_MODULUS };
      delete params.n;
    }
    fillForm(params);
    $("form-note").textContent =
      `The form holds the parameters of image ${image.index + 1} (seed ${params.seed}).`;
    $("prompt").focus();
  }

  function fillForm(params) {
    clearErrors();
    if (params.model && state.models.some((model) => model.id === params.model)) {
      $("model").value = params.model;
      fillSchedulers(currentModel());
    }
    for (const field of FIELDS) {
      if (field === "model" || !(field in params) || params[field] == null) continue;
      $(field).value = String(params[field]);
    }
    showSnippet();
  }

  // The text of a PNG's `parameters` chunk (tEXt, or uncompressed iTXt), parsed; or null.
  function pngParameters(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const ascii = (from, to) => String.fromCharCode(...bytes.subarray(from, to));
    let pos = 8; // after the signature
    while (pos + 8 <= bytes.length) {
      const length = view.getUint32(pos);
      const type = ascii(pos + 4, pos + 8);
      const data = bytes.subarray(pos + 8, pos + 8 + length);
      if (type === "tEXt" || type === "iTXt") {
        const nul = data.indexOf(0);
        if (nul > 0 && ascii(pos + 8, pos + 8 + nul) === "parameters") {
          if (type === "tEXt") return JSON.parse(new TextDecoder("latin1").decode(data.subarray(nul + 1)));
          if (data[nul + 1] !== 0) return null; // compressed iTXt
          let at = data.indexOf(0, nul + 3) + 1; // after the language tag
          at = data.indexOf(0, at) + 1; // after the translated keyword
          return JSON.parse(new TextDecoder("utf-8").decode(data.subarray(at)));
        }
      }
      if (type === "IEND") break;
      pos += 12 + length;
    }
    return null;
  }

  // ---- The current form as code -----------------------------------------------------------
  // Never the key itself: the snippets read it from $IMAGEGEN_API_KEY.

  const shellQuote = (text) => `'${text.replace(/'/g, "'\\''")}'`;
  const serviceUrl = () => new URL(".", document.baseURI).href.replace(/\/$/, "");

  async function loadSamplers() {
    // AUTOMATIC1111's sampler names, each with this service's scheduler name as its alias.
    try {
      const samplers = await apiJson("sdapi/v1/samplers");
      state.samplers = new Map(samplers.map((s) => [s.aliases[0], s.name]));
    } catch {
      state.samplers = new Map(); // the snippet then leaves the sampler to the model
    }
    showSnippet();
  }

  function a1111Body(body) {
    const out = { prompt: body.prompt };
    if (body.negative_prompt) out.negative_prompt = body.negative_prompt;
    if (body.steps !== undefined) out.steps = body.steps;
    if (body.guidance_scale !== undefined) out.cfg_scale = body.guidance_scale;
    if (body.width !== undefined) out.width = body.width;
    if (body.height !== undefined) out.height = body.height;
    out.seed = body.seed ?? -1;
    out.batch_size = body.n ?? 1;
    const sampler = state.samplers.get(body.scheduler);
    if (sampler) out.sampler_name = sampler;
    if (body.model) out.override_settings = { sd_model_checkpoint: body.model };
    return out;
  }

  function openaiSnippet(body) {
    const { prompt, model, n, width, height, ...rest } = body;
    const lines = [
      "import os",
      "",
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${JSON.stringify(`${serviceUrl()}/v1`)}, ` +
        `api_key=os.environ.get("IMAGEGEN_API_KEY", "unused"))`,
      "result = client.images.generate(",
      `    prompt=${JSON.stringify(prompt)},`,
    ];
    if (model) lines.push(`    model=${JSON.stringify(model)},`);
    lines.push(`    n=${n ?? 1},`);
    if (width !== undefined && height !== undefined) lines.push(`    size="${width}x${height}",`);
    lines.push(`    extra_body=${JSON.stringify(rest)},`, ")");
    return lines.join("\n");
  }

  // Pictures in a snippet: a placeholder, not kilobytes of base64.
  function withPlaceholders(body) {
    const out = { ...body };
    if (out.image) out.image = "<your image as base64>";
    if (out.mask) out.mask = "<your mask as base64>";
    if (out.controls) out.controls = out.controls.map((c) => ({ ...c, image: "<your control picture as base64>" }));
    return out;
  }

  function snippet(kind) {
    const body = withPlaceholders(readForm());
    const keyed = state.keysRequired;
    if (kind === "openai") return openaiSnippet(body);
    if (kind === "a1111") {
      return [
        `curl -sS ${shellQuote(`${serviceUrl()}/sdapi/v1/txt2img`)} \\`,
        ...(keyed ? ['  -u "user:$IMAGEGEN_API_KEY" \\'] : []),
        "  -H 'Content-Type: application/json' \\",
        `  -d ${shellQuote(JSON.stringify(a1111Body(body)))}`,
      ].join("\n");
    }
    return [
      `curl -sS ${shellQuote(`${serviceUrl()}/v1/generations`)} \\`,
      ...(keyed ? ['  -H "Authorization: Bearer $IMAGEGEN_API_KEY" \\'] : []),
      "  -H 'Content-Type: application/json' \\",
      `  -d ${shellQuote(JSON.stringify(body))}`,
    ].join("\n");
  }

  function showSnippet() {
    $("snippet").textContent = snippet($("snippet-kind").value);
  }

  $("generate-form").addEventListener("input", showSnippet);
  $("generate-form").addEventListener("change", showSnippet);
  $("snippet-kind").addEventListener("change", showSnippet);

  start().then(loadSamplers);
})();
