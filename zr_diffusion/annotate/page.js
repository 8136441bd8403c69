// The `zr annotate` page: a person scores each image on each rubric dimension.
// The page data (items, dimensions, bins) is the JSON in <script id="zr-page">; progress is kept in
// localStorage under the page id; the download is JSONL in the data schema (README "Data").
"use strict";

// The scores as JSONL records, one per scored (image, dimension), in page order; unscored ones are
// left out. page: {items: [{id, prompt, image}], dimensions: [{name}], bins: [1, 1.5, ...]};
// scores: {itemId: {dimensionName: bin}}. A value that is not a bin is an error, never written.
function exportJSONL(page, scores) {
  const lines = [];
  for (const item of page.items) {
    const given = scores[item.id] || {};
    for (const dim of page.dimensions) {
      const score = given[dim.name];
      if (score === undefined || score === null) continue;
      if (!page.bins.includes(score)) {
        throw new Error("score " + JSON.stringify(score) + " of " + item.id + " / " + dim.name + " is not a bin");
      }
      lines.push(JSON.stringify({id: item.id + "-" + dim.name, prompt: item.prompt, image: item.image,
                                 dimension: dim.name, score: score}));
    }
  }
  return lines.length ? lines.join("\n") + "\n" : "";
}

// How many (image, dimension) pairs have a score.
function countScored(page, scores) {
  let n = 0;
  for (const item of page.items) {
    for (const dim of page.dimensions) {
      const s = (scores[item.id] || {})[dim.name];
      if (s !== undefined && s !== null) n += 1;
    }
  }
  return n;
}

if (typeof module !== "undefined") module.exports = {exportJSONL, countScored};

if (typeof document !== "undefined") {
  const PAGE = JSON.parse(document.getElementById("zr-page").textContent);
  const STORE = "zr-annotate-" + PAGE.page_id;
  const $ = (id) => document.getElementById(id);
  let state = {rater: "", scores: {}, pos: 0, dim: 0};
  try { state = Object.assign(state, JSON.parse(localStorage.getItem(STORE)) || {}); } catch (e) {}
  state.pos = Math.min(Math.max(state.pos | 0, 0), PAGE.items.length - 1);
  state.dim = Math.min(Math.max(state.dim | 0, 0), PAGE.dimensions.length - 1);

  function save() { localStorage.setItem(STORE, JSON.stringify(state)); }

  function render() {
    const item = PAGE.items[state.pos];
    const img = $("image");
    img.src = item.src;
    img.style.width = item.display + "px";
    $("prompt").textContent = item.prompt;
    $("where").textContent = "image " + (state.pos + 1) + " of " + PAGE.items.length + " (" + item.id + ")";
    const given = state.scores[item.id] || {};
    PAGE.dimensions.forEach((dim, d) => {
      $("dim-" + d).classList.toggle("active", d === state.dim);
      for (const cell of document.querySelectorAll("#dim-" + d + " .bin")) {
        cell.classList.toggle("chosen", Number(cell.dataset.bin) === given[dim.name]);
      }
      $("value-" + d).textContent = given[dim.name] === undefined ? "–" : given[dim.name];
    });
    const done = countScored(PAGE, state.scores), total = PAGE.items.length * PAGE.dimensions.length;
    $("progress").textContent = done + " of " + total + " scores given";
    $("bar-fill").style.width = (100 * done / total) + "%";
    $("rater").value = state.rater;
  }

  function go(pos) { state.pos = Math.min(Math.max(pos, 0), PAGE.items.length - 1); state.dim = 0; save(); render(); }

  function nextOpen() {  // the next image with a dimension left to score, after the current one
    for (let k = 1; k <= PAGE.items.length; k++) {
      const p = (state.pos + k) % PAGE.items.length, given = state.scores[PAGE.items[p].id] || {};
      if (PAGE.dimensions.some((dim) => given[dim.name] === undefined)) return go(p);
    }
  }

  function score(d, bin) {
    const id = PAGE.items[state.pos].id;
    state.scores[id] = state.scores[id] || {};
    if (bin === null) delete state.scores[id][PAGE.dimensions[d].name];
    else state.scores[id][PAGE.dimensions[d].name] = bin;
    state.dim = d;
    if (bin !== null) {
      if (d < PAGE.dimensions.length - 1) state.dim = d + 1;
      else if (state.pos < PAGE.items.length - 1) { state.pos += 1; state.dim = 0; }
    }
    save(); render();
  }

  function download() {
    const text = exportJSONL(PAGE, state.scores);
    const blob = new Blob([text], {type: "application/x-ndjson"});
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "annotations-" + PAGE.page_id + "-" + (state.rater.trim().replace(/[^\w.-]+/g, "_") || "anonymous") + ".jsonl";
    document.body.appendChild(link); link.click(); link.remove();
  }

  document.addEventListener("click", (e) => {
    const cell = e.target.closest(".bin");
    if (cell) score(Number(cell.dataset.dim), Number(cell.dataset.bin));
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key;
    if (k >= "1" && k <= "9" && Number(k) <= PAGE.bins.length) score(state.dim, PAGE.bins[Number(k) - 1]);
    else if (k === "0" || k === "Backspace" || k === "Delete") score(state.dim, null);
    else if (k === "ArrowDown") { state.dim = Math.min(state.dim + 1, PAGE.dimensions.length - 1); save(); render(); }
    else if (k === "ArrowUp") { state.dim = Math.max(state.dim - 1, 0); save(); render(); }
    else if (k === "ArrowRight") go(state.pos + 1);
    else if (k === "ArrowLeft") go(state.pos - 1);
    else if (k === "n") nextOpen();
    else return;
    e.preventDefault();
  });
  $("rater").addEventListener("input", (e) => { state.rater = e.target.value; save(); });
  $("download").addEventListener("click", download);
  $("prev").addEventListener("click", () => go(state.pos - 1));
  $("next").addEventListener("click", () => go(state.pos + 1));
  $("next-open").addEventListener("click", nextOpen);
  render();
}
