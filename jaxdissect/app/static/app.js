// jaxdissect paint: the page's client. Every string from the server is inserted with textContent, never as HTML.
"use strict";
(function () {
  const DRAW = "#0bc6d4", ERASE = "#e1484a";
  const state = {
    info: null, source: null, stack: [], brush: null, erase: false, strength: null,
    seq: 0, busy: 0, controller: null, current: null,
  };
  window.ganpaint = state;  // read by the browser test and handy in the console
  const $ = (id) => document.getElementById(id);

  function setStatus(text) { $("status").textContent = text || ""; }
  function spinner(delta) { state.busy += delta; $("spinner").hidden = state.busy <= 0; }

  async function api(path, body, signal) {
    const init = body === undefined ? {signal} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal};
    const response = await fetch(path, init);
    let data;
    try { data = await response.json(); } catch (e) { throw new Error(`${path}: HTTP ${response.status}`); }
    if (!response.ok) throw new Error(data.error || `${path}: HTTP ${response.status}`);
    return data;
  }

  function strokesJSON() {
    return state.stack.map((s) => ({concept: s.concept, erase: s.erase, strength: s.strength, mask: s.mask}));
  }

  // Ask for the current source with the current stroke stack; a newer call aborts and supersedes an older one.
  async function refresh() {
    if (!state.source) return;
    const mine = ++state.seq;
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    spinner(+1);
    try {
      const reply = await api("/api/generate", Object.assign({strokes: strokesJSON(), request: mine}, state.source),
                              controller.signal);
      if (mine !== state.seq) return;  // superseded while in flight
      state.current = reply.image;
      $("result").src = reply.image;
      $("download").href = reply.image;
      setStatus("");
    } catch (e) {
      if (e.name !== "AbortError" && mine === state.seq) setStatus(e.message);
    } finally {
      spinner(-1);
      if (mine === state.seq) state.done = mine;
    }
  }

  function select(source, thumb) {
    state.source = source;
    state.stack = [];
    document.querySelectorAll("#thumbs img").forEach((t) => t.classList.toggle("selected", t === thumb));
    renderHistory();
    refresh();
  }

  function addThumb(source, url, label) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = label;
    img.title = label;
    img.dataset.source = JSON.stringify(source);
    img.addEventListener("click", () => select(source, img));
    $("thumbs").appendChild(img);
    return img;
  }

  function button(parent, text, onclick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.addEventListener("click", onclick);
    parent.appendChild(b);
    return b;
  }

  function chooseOne(container, chosen) {
    container.querySelectorAll("button").forEach((b) => b.classList.toggle("selected", b === chosen));
  }

  function renderHistory() {
    const list = $("history");
    list.textContent = "";
    state.stack.forEach((s, i) => {
      const li = document.createElement("li");
      const thumb = document.createElement("canvas");
      thumb.width = s.canvas.width;
      thumb.height = s.canvas.height;
      thumb.getContext("2d").drawImage(s.canvas, 0, 0);
      li.appendChild(thumb);
      li.appendChild(document.createTextNode(` ${s.concept} ${s.erase ? "erase" : "draw"} (${s.strength}) `));
      const remove = button(li, "\u00d7", () => { state.stack.splice(i, 1); renderHistory(); refresh(); });
      remove.className = "remove";
      remove.title = "remove this stroke";
      list.appendChild(li);
    });
  }

  // Painting: cells of the hidden mask grid within radius 1 of the pointer (the original's brush).
  const overlay = $("overlay");
  let stroke = null;
  function cellAt(event) {
    const r = overlay.getBoundingClientRect();
    const [h, w] = state.info.mask_size;
    return [Math.floor((event.clientY - r.top) / r.height * h), Math.floor((event.clientX - r.left) / r.width * w)];
  }
  function paintCell(cy, cx) {
    const [h, w] = state.info.mask_size;
    const mctx = stroke.canvas.getContext("2d"), octx = overlay.getContext("2d");
    const sy = overlay.height / h, sx = overlay.width / w;
    for (const [dy, dx] of [[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]]) {
      const y = cy + dy, x = cx + dx;
      if (y < 0 || x < 0 || y >= h || x >= w) continue;
      mctx.fillRect(x, y, 1, 1);
      octx.fillRect(x * sx, y * sy, sx, sy);
      stroke.painted = true;
    }
  }
  function paintTo(cell) {
    const [y0, x0] = stroke.last || cell, [y1, x1] = cell;
    const n = Math.max(Math.abs(y1 - y0), Math.abs(x1 - x0), 1);
    for (let i = 0; i <= n; i++) paintCell(Math.round(y0 + (y1 - y0) * i / n), Math.round(x0 + (x1 - x0) * i / n));
    stroke.last = cell;
  }
  overlay.addEventListener("mousedown", (event) => {
    if (!state.info || !state.brush || !state.source) { setStatus("pick an image and a brush first"); return; }
    const [h, w] = state.info.mask_size;
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").fillStyle = state.erase ? ERASE : DRAW;
    const octx = overlay.getContext("2d");
    octx.fillStyle = state.erase ? ERASE : DRAW;
    octx.globalAlpha = 0.7;
    stroke = {canvas, painted: false, last: null};
    paintTo(cellAt(event));
    event.preventDefault();
  });
  overlay.addEventListener("mousemove", (event) => { if (stroke) paintTo(cellAt(event)); });
  function finishStroke() {
    if (!stroke) return;
    const s = stroke;
    stroke = null;
    overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
    if (!s.painted) return;
    state.stack.push({concept: state.brush, erase: state.erase, strength: state.strength,
                      mask: s.canvas.toDataURL("image/png"), canvas: s.canvas});
    renderHistory();
    refresh();
  }
  window.addEventListener("mouseup", finishStroke);
  overlay.addEventListener("mouseleave", finishStroke);

  $("undo").addEventListener("click", () => { if (state.stack.length) { state.stack.pop(); renderHistory(); refresh(); } });
  $("reset").addEventListener("click", () => { state.stack = []; renderHistory(); refresh(); });
  document.querySelectorAll("#modes button").forEach((b) => b.addEventListener("click", () => {
    state.erase = b.dataset.mode === "erase";
    chooseOne($("modes"), b);
  }));

  // Uploads: send the photo, poll its inversion's progress, then paint on the reconstruction.
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = async () => {
      $("upload-progress").hidden = false;
      $("upload-bar").value = 0;
      $("upload-text").textContent = "uploading";
      try {
        let job = await api("/api/upload", {image: reader.result});
        while (job.status === "queued" || job.status === "running") {
          $("upload-bar").value = job.progress;
          $("upload-text").textContent = `${job.status} ${Math.round(job.progress * 100)}%`;
          await new Promise((r) => setTimeout(r, 250));
          job = await api(`/api/upload/${encodeURIComponent(job.id)}`);
        }
        if (job.status !== "done") throw new Error(job.message || `upload ${job.status}`);
        $("upload-bar").value = 1;
        $("upload-text").textContent = "done";
        const source = {upload: job.id};
        select(source, addThumb(source, job.image, "your photo"));
      } catch (e) {
        $("upload-text").textContent = "";
        $("upload-progress").hidden = true;
        setStatus(e.message);
      }
      $("upload").value = "";
    };
    reader.readAsDataURL(file);
  });

  async function start() {
    try {
      state.info = await api("/api/concepts");
      $("layer").textContent = `layer ${state.info.layer}`;
      state.info.concepts.forEach((name, i) => {
        const b = button($("brushes"), name, () => { state.brush = name; chooseOne($("brushes"), b); });
        b.dataset.concept = name;
        if (i === 0) { state.brush = name; chooseOne($("brushes"), b); }
      });
      Object.keys(state.info.strengths).forEach((name) => {
        const b = button($("strengths"), `${name} (${state.info.strengths[name]})`, () => {
          state.strength = name;
          chooseOne($("strengths"), b);
        });
        b.dataset.strength = name;
        if (name === state.info.default_strength) { state.strength = name; chooseOne($("strengths"), b); }
      });
      if (!state.info.uploads) $("upload-label").hidden = true;
      const ids = (await api("/api/images")).images;
      let first = null;
      for (const id of ids) {
        const source = {image: id};
        const reply = await api("/api/generate", Object.assign({strokes: []}, source));
        const thumb = addThumb(source, reply.image, `image ${id}`);
        if (first === null) { first = thumb; select(source, thumb); }
      }
      state.ready = true;
    } catch (e) {
      setStatus(e.message);
    }
  }
  start();
})();
