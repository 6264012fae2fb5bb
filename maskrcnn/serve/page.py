"""The web page served at `/`: drop an image, see the masks and boxes drawn, filter them by score."""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>maskrcnn</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 1.5rem; text-align: center; cursor: pointer; }
  #drop.over { background: #eef6ff; border-color: #3478f6; }
  #controls { margin: 1rem 0; display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
  #view { max-width: 100%; border: 1px solid #ccc; display: none; }
  #status { color: #555; }
  #status.error { color: #b00020; }
  table { border-collapse: collapse; margin-top: 1rem; }
  td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }
  .swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; }
</style>
</head>
<body>
<h1>maskrcnn</h1>
<p id="model">loading the model description...</p>
<div id="drop">Drop an image here, or click to choose one
  <input id="file" type="file" accept="image/*" hidden></div>
<div id="controls">
  <label>score &ge; <input id="score" type="range" min="0" max="1" step="0.01" value="0.5">
    <output id="score-value">0.50</output></label>
  <span id="status"></span>
</div>
<canvas id="view"></canvas>
<table id="detections"></table>
<script>
"use strict";
const palette = [[230,25,75],[60,180,75],[255,225,25],[0,130,200],[245,130,48],[145,30,180],
                 [70,240,240],[240,50,230],[210,245,60],[250,190,212],[0,128,128],[170,110,40]];
let picture = null, result = null;
const $ = (id) => document.getElementById(id);

// COCO compressed RLE (column-major run lengths, LEB128-like characters) to a Uint8Array of h*w.
function decodeRLE(rle) {
  const [h, w] = rle.size, s = rle.counts, counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1, c = 0;
    while (more) {
      c = s.charCodeAt(p) - 48; x |= (c & 0x1f) << (5 * k); more = c & 0x20; p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  const mask = new Uint8Array(h * w);
  let idx = 0, value = 0;
  for (const run of counts) {
    if (value) for (let i = idx; i < idx + run; i++) mask[(i % h) * w + Math.floor(i / h)] = 1;
    idx += run; value = 1 - value;
  }
  return mask;
}

function draw() {
  if (!picture || !result) return;
  const threshold = parseFloat($("score").value);
  $("score-value").textContent = threshold.toFixed(2);
  const canvas = $("view"), ctx = canvas.getContext("2d");
  canvas.width = picture.width; canvas.height = picture.height; canvas.style.display = "block";
  ctx.drawImage(picture, 0, 0);
  const shown = result.detections.filter((d) => d.score >= threshold);
  const frame = ctx.getImageData(0, 0, canvas.width, canvas.height), px = frame.data;
  shown.forEach((d, n) => {
    if (!d.mask) return;
    if (!d.decoded) d.decoded = decodeRLE(d.mask);
    const [r, g, b] = palette[(d.label - 1) % palette.length];
    for (let i = 0; i < d.decoded.length; i++) if (d.decoded[i]) {
      px[4*i] = 0.5*px[4*i] + 0.5*r; px[4*i+1] = 0.5*px[4*i+1] + 0.5*g; px[4*i+2] = 0.5*px[4*i+2] + 0.5*b;
    }
  });
  ctx.putImageData(frame, 0, 0);
  ctx.lineWidth = 2; ctx.font = "14px sans-serif";
  const rows = ["<tr><th></th><th>class</th><th>score</th><th>box (x1, y1, x2, y2)</th></tr>"];
  for (const d of shown) {
    const [r, g, b] = palette[(d.label - 1) % palette.length], color = `rgb(${r},${g},${b})`;
    const [x1, y1, x2, y2] = d.box;
    ctx.strokeStyle = color; ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.fillStyle = color; ctx.fillText(`${d.name} ${d.score.toFixed(2)}`, x1 + 2, Math.max(12, y1 - 3));
    rows.push(`<tr><td><span class="swatch" style="background:${color}"></span></td><td>${d.name}</td>` +
              `<td>${d.score.toFixed(3)}</td><td>${d.box.map((v) => v.toFixed(1)).join(", ")}</td></tr>`);
  }
  $("detections").innerHTML = rows.join("");
  canvas.dataset.shown = String(shown.length);
  $("status").className = "";
  $("status").textContent = `${shown.length} of ${result.detections.length} detections shown ` +
                            `(${result.inference_ms} ms inference)`;
}

async function upload(file) {
  $("status").className = ""; $("status").textContent = "running...";
  const body = new FormData(); body.append("file", file);
  try {
    const response = await fetch("predict?score_threshold=0", { method: "POST", body });
    const payload = await response.json();
    if (!response.ok) throw new Error(payload.detail || response.statusText);
    result = payload;
    picture = await createImageBitmap(file, { imageOrientation: "from-image" });
    if (picture.width !== result.width || picture.height !== result.height) {
      picture = await createImageBitmap(file);  // the server applied no rotation that this browser did
    }
    draw();
  } catch (error) {
    $("status").className = "error"; $("status").textContent = `error: ${error.message}`;
  }
}

$("drop").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault(); $("drop").classList.remove("over");
  if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
});
$("score").addEventListener("input", draw);
fetch("model").then((r) => r.json()).then((m) => {
  $("model").textContent = `${m.backend} model, classes: ${m.classes.map((c) => c.name).join(", ")}`;
  $("score").value = m.score_threshold; $("score-value").textContent = Number(m.score_threshold).toFixed(2);
}).catch(() => { $("model").textContent = "model description unavailable"; });
</script>
</body>
</html>
"""
