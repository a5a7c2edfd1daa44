// Sortable tables: click a header; numbers sort numerically (cells carry data-v with the raw value).
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var asc = !th.classList.contains("sorted-asc");
      table.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(asc ? "sorted-asc" : "sorted-desc");
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
// Depth filter of module trees.
document.querySelectorAll("select.depth-filter").forEach(function (select) {
  var table = document.getElementById(select.dataset.table);
  function apply() {
    var max = parseInt(select.value, 10);
    Array.from(table.tBodies[0].rows).forEach(function (r) {
      r.style.display = parseInt(r.dataset.depth, 10) <= max ? "" : "none";
    });
  }
  select.addEventListener("change", apply);
  apply();
});
// Graph viewers: the SVG is an <img> (nothing inside an image can run); zooming resizes it inside a scrolling box,
// so the browser redraws the vector crisply at every scale. Drag pans; Ctrl/Cmd + wheel zooms at the pointer.
document.querySelectorAll(".graph-view").forEach(function (view) {
  var img = view.querySelector("img"), tools = view.previousElementSibling;
  var level = tools.querySelector(".zoom-level");
  var w = parseFloat(img.dataset.w) || 0, h = parseFloat(img.dataset.h) || 0, scale = 1, drag = null;
  function zoom(next, cx, cy) {
    if (!w || !h) return;
    next = Math.min(4, Math.max(0.02, next));
    if (cx === undefined) { cx = view.clientWidth / 2; cy = view.clientHeight / 2; }
    var x = (view.scrollLeft + cx) / scale, y = (view.scrollTop + cy) / scale;
    scale = next;
    img.style.width = w * scale + "px";
    img.style.height = h * scale + "px";
    view.scrollLeft = x * scale - cx;
    view.scrollTop = y * scale - cy;
    level.textContent = Math.round(scale * 100) + "%";
  }
  function fit() { zoom(Math.min(1, view.clientWidth / w)); view.scrollLeft = 0; view.scrollTop = 0; }
  tools.querySelectorAll("button[data-zoom]").forEach(function (button) {
    button.addEventListener("click", function () {
      var how = button.dataset.zoom;
      if (how === "fit") { fit(); } else if (how === "actual") { zoom(1); } else { zoom(scale * (how === "in" ? 1.25 : 0.8)); }
    });
  });
  view.addEventListener("wheel", function (e) {
    if (!e.ctrlKey && !e.metaKey) { return; }  // a plain wheel scrolls the box (and the page), as everywhere else
    e.preventDefault();
    var r = view.getBoundingClientRect(), delta = e.deltaMode === 1 ? e.deltaY * 16 : e.deltaY;
    zoom(scale * Math.exp(-delta * 0.0015), e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  view.addEventListener("pointerdown", function (e) {
    if (e.button !== 0) { return; }
    drag = { x: e.clientX, y: e.clientY, left: view.scrollLeft, top: view.scrollTop };
    view.setPointerCapture(e.pointerId);
    view.classList.add("dragging");
  });
  view.addEventListener("pointermove", function (e) {
    if (!drag) { return; }
    view.scrollLeft = drag.left - (e.clientX - drag.x);
    view.scrollTop = drag.top - (e.clientY - drag.y);
  });
  function endDrag() { drag = null; view.classList.remove("dragging"); }
  view.addEventListener("pointerup", endDrag);
  view.addEventListener("pointercancel", endDrag);
  fit();
});
// Lightbox: a click on a gallery thumbnail shows the full-size image over the page (Esc or a click closes it).
// No navigation, so it also works in the single-file report, where images are data: URIs.
(function () {
  var box = null;
  function close() { if (box) { box.remove(); box = null; } }
  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a.zoom") : null;
    if (!link) { if (box && event.target === box) close(); return; }
    event.preventDefault();
    close();
    box = document.createElement("div");
    box.className = "lightbox";
    var img = document.createElement("img");
    img.src = link.getAttribute("href");
    img.alt = link.querySelector("img") ? link.querySelector("img").alt : "";
    var caption = document.createElement("div");
    caption.textContent = img.alt;
    box.appendChild(img);
    box.appendChild(caption);
    document.body.appendChild(box);
  });
  document.addEventListener("keydown", function (event) { if (event.key === "Escape") close(); });
})();
// Embedding explorer (templates/elements/scatter.html): points on a 2-D canvas. Everything it shows is in the page,
// a JSON block of base64 typed arrays plus sprite sheets as <img> elements, so it works from file:// with no request
// and in the single-file report. Drawing a file:// sheet taints the canvas; nothing here reads a canvas back, so
// that is allowed. Points are drawn a colour at a time (one path per colour), so 10,000s redraw within a frame.
(function () {
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                 "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"];
  var NONE = "rgba(140, 146, 153, 0.55)", THUMB = 30, THUMBS_AT = 250, TYPES = {
    f4: Float32Array, i1: Int8Array, i2: Int16Array, i4: Int32Array };
  function decode(text, type) {
    var bin = atob(text), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    return new TYPES[type](bytes.buffer);
  }
  function colourOf(colouring, code) {
    if (code < 0) { return NONE; }
    if (colouring.colours[code]) { return colouring.colours[code]; }
    return code < PALETTE.length ? PALETTE[code] : "hsl(" + (code * 137.508) % 360 + ", 62%, 48%)";
  }
  function explorer(root) {
    var data = JSON.parse(root.querySelector(".scatter-data").textContent);
    var x = decode(data.x, "f4"), y = decode(data.y, "f4"), n = x.length, names = data.names;
    var colourings = data.colourings.map(function (c) {
      return { name: c.name, categories: c.categories, colours: c.colours, codes: decode(c.codes, c.type) };
    });
    var values = data.values.map(function (v) {
      return { name: v.name, percent: v.percent, values: decode(v.values, "f4") };
    });
    var tiles = data.tiles ? decode(data.tiles, "i4") : null, tile = data.tile;
    var sheets = Array.from(root.querySelectorAll(".scatter-sheets img"));
    var view = root.querySelector(".scatter-view"), canvas = view.querySelector("canvas");
    var ctx = canvas.getContext("2d");
    var tip = root.querySelector(".scatter-tip"), tipCanvas = tip.querySelector("canvas");
    var tipText = tip.querySelector(".scatter-tip-text"), legend = root.querySelector(".scatter-legend");
    var select = root.querySelector(".scatter-colour");
    var current = 0, groups = null, hidden = null, hover = -1, pending = false, draws = 0;
    var width = 0, height = 0, cx = 0, cy = 0, k = 1, drag = null, radius = n > 20000 ? 1.5 : n > 4000 ? 2 : 3;
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (var i = 0; i < n; i++) {
      if (!isFinite(x[i]) || !isFinite(y[i])) { continue; }
      x0 = Math.min(x0, x[i]); x1 = Math.max(x1, x[i]); y0 = Math.min(y0, y[i]); y1 = Math.max(y1, y[i]);
    }
    function group() {  // the points in code order (counting sort): one path per colour when drawing
      var c = colourings[current], m = c.categories.length + 1, counts = new Int32Array(m + 1);
      for (var i = 0; i < n; i++) { counts[c.codes[i] + 2]++; }
      for (var b = 1; b <= m; b++) { counts[b] += counts[b - 1]; }
      var starts = counts.slice(0, m + 1), order = new Int32Array(n), at = counts.slice(0, m);
      for (i = 0; i < n; i++) { order[at[c.codes[i] + 1]++] = i; }
      groups = { order: order, starts: starts };
      hidden = new Uint8Array(m);
    }
    function sx(i) { return width / 2 + (x[i] - cx) * k; }
    function sy(i) { return height / 2 - (y[i] - cy) * k; }
    function fit() {
      if (!(x1 >= x0)) { cx = 0; cy = 0; k = 1; return; }
      cx = (x0 + x1) / 2; cy = (y0 + y1) / 2;
      k = Math.min((width - 40) / Math.max(x1 - x0, 1e-12), (height - 40) / Math.max(y1 - y0, 1e-12));
      if (!isFinite(k) || k <= 0) { k = 1; }
    }
    function resize() {
      var dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
      if (w === width && h === height) { return; }
      var first = !width;
      width = w; height = h;
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      if (first) { fit(); }
    }
    function visible(i) {
      var px = sx(i), py = sy(i);
      return px > -THUMB && px < width + THUMB && py > -THUMB && py < height + THUMB;
    }
    function drawTile(target, i, dx, dy, size) {
      var t = tiles ? tiles[i] : -1, sheet = t >= 0 ? sheets[Math.floor(t / data.perSheet)] : null;
      if (!sheet || !sheet.complete || !sheet.naturalWidth) { return false; }
      var s = t % data.perSheet;
      // half a pixel inside the tile, so smoothing never samples the neighbouring tile
      target.drawImage(sheet, (s % data.columns) * tile + 0.5, Math.floor(s / data.columns) * tile + 0.5, tile - 1,
                       tile - 1, dx, dy, size, size);
      return true;
    }
    function draw() {
      pending = false;
      var started = performance.now();
      resize();
      ctx.clearRect(0, 0, width, height);
      var c = colourings[current], order = groups.order, starts = groups.starts, thumbs = [];
      for (var b = 0; b < starts.length - 1; b++) {
        if (hidden[b] || starts[b] === starts[b + 1]) { continue; }
        ctx.fillStyle = colourOf(c, b - 1);
        ctx.beginPath();
        for (var j = starts[b]; j < starts[b + 1]; j++) {
          var i = order[j], px = width / 2 + (x[i] - cx) * k, py = height / 2 - (y[i] - cy) * k;
          if (px < -radius || px > width + radius || py < -radius || py > height + radius) { continue; }
          ctx.rect(px - radius, py - radius, 2 * radius, 2 * radius);
          if (tiles && tiles[i] >= 0 && thumbs.length <= THUMBS_AT) { thumbs.push(i); }
        }
        ctx.fill();
      }
      if (thumbs.length > THUMBS_AT) { thumbs = []; }
      if (thumbs.length) {  // zoomed in far enough: the images themselves
        thumbs.forEach(function (i) {
          var px = sx(i) - THUMB / 2, py = sy(i) - THUMB / 2;
          ctx.fillStyle = colourOf(c, c.codes[i]);
          ctx.fillRect(px - 2, py - 2, THUMB + 4, THUMB + 4);
          drawTile(ctx, i, px, py, THUMB);
        });
      }
      if (hover >= 0) {
        ctx.strokeStyle = "#111"; ctx.lineWidth = 2;
        ctx.strokeRect(sx(hover) - radius - 3, sy(hover) - radius - 3, 2 * radius + 6, 2 * radius + 6);
      }
      draws++;
      root.dataset.drawMs = (performance.now() - started).toFixed(2);
      root.dataset.draws = draws;
      root.dataset.thumbnails = thumbs.length;
    }
    function redraw() { if (!pending) { pending = true; requestAnimationFrame(draw); } }
    function zoom(factor, px, py) {
      if (px === undefined) { px = width / 2; py = height / 2; }
      var dx = cx + (px - width / 2) / k, dy = cy - (py - height / 2) / k;  // the data point under the pointer
      k = Math.min(Math.max(k * factor, 1e-9), 1e12);
      cx = dx - (px - width / 2) / k; cy = dy + (py - height / 2) / k;
      redraw();
    }
    function pan(dx, dy) { cx -= dx / k; cy += dy / k; redraw(); }
    function nearest(px, py) {  // the closest shown point within reach of the pointer, -1 for none
      var c = colourings[current], best = -1, reach = Math.max(radius + 4, 7), bestD = reach * reach;
      for (var i = 0; i < n; i++) {
        if (hidden[c.codes[i] + 1]) { continue; }
        var dx = width / 2 + (x[i] - cx) * k - px, dy = height / 2 - (y[i] - cy) * k - py, d = dx * dx + dy * dy;
        if (d <= bestD) { bestD = d; best = i; }
      }
      return best;
    }
    function lines(i) {
      var out = colourings.map(function (c) {
        return c.name + ": " + (c.codes[i] >= 0 ? c.categories[c.codes[i]] : "—");
      });
      values.forEach(function (v) {
        var value = v.values[i];
        if (isFinite(value)) {
          out.push(v.name + ": " + (v.percent ? (value * 100).toFixed(1) + "%" : value.toPrecision(4)));
        }
      });
      return out;
    }
    function showTip(i, px, py) {
      if (i < 0) { tip.hidden = true; return; }
      var g = tipCanvas.getContext("2d");
      g.clearRect(0, 0, tipCanvas.width, tipCanvas.height);
      tipCanvas.hidden = !drawTile(g, i, 0, 0, tipCanvas.width);
      tipText.textContent = "";
      var title = document.createElement("div");
      title.className = "mono";
      title.textContent = names[i];
      tipText.appendChild(title);
      lines(i).concat(tipCanvas.hidden ? ["(no thumbnail)"] : []).forEach(function (line) {
        var div = document.createElement("div");
        div.textContent = line;
        tipText.appendChild(div);
      });
      tip.hidden = false;
      var left = px + 14, top = py + 14;
      if (left + tip.offsetWidth > width) { left = Math.max(0, px - 14 - tip.offsetWidth); }
      if (top + tip.offsetHeight > height) { top = Math.max(0, py - 14 - tip.offsetHeight); }
      tip.style.left = left + "px"; tip.style.top = top + "px";
    }
    function enlarge(i) {  // the thumbnail drawn large with its facts, over the page (Esc or a click closes it)
      var box = document.createElement("div");
      box.className = "lightbox scatter-box";
      var big = document.createElement("canvas");
      big.width = big.height = 384;
      var g = big.getContext("2d");
      g.imageSmoothingQuality = "high";
      if (drawTile(g, i, 0, 0, 384)) { box.appendChild(big); }
      var caption = document.createElement("div");
      caption.textContent = names[i] + " · " + lines(i).join(" · ");
      box.appendChild(caption);
      function close() { box.remove(); document.removeEventListener("keydown", key); }
      function key(e) { if (e.key === "Escape") { close(); } }
      box.addEventListener("click", close);
      document.addEventListener("keydown", key);
      document.body.appendChild(box);
    }
    function fillLegend() {
      var c = colourings[current], starts = groups.starts;
      legend.textContent = "";
      for (var b = 0; b < starts.length - 1; b++) {
        var count = starts[b + 1] - starts[b];
        if (!count) { continue; }
        var li = document.createElement("li"), button = document.createElement("button");
        var swatch = document.createElement("span");
        button.type = "button";
        button.dataset.bucket = b;
        button.setAttribute("aria-pressed", "true");
        swatch.className = "swatch";
        swatch.style.background = colourOf(c, b - 1);
        button.appendChild(swatch);
        var text = (b ? c.categories[b - 1] : "none") + " (" + count.toLocaleString() + ")";
        button.appendChild(document.createTextNode(text));
        li.appendChild(button);
        legend.appendChild(li);
      }
    }
    function colourBy(index) { current = index; group(); fillLegend(); hover = -1; tip.hidden = true; redraw(); }
    legend.addEventListener("click", function (e) {
      var button = e.target.closest("button");
      if (!button) { return; }
      var b = parseInt(button.dataset.bucket, 10);
      hidden[b] = hidden[b] ? 0 : 1;
      button.setAttribute("aria-pressed", hidden[b] ? "false" : "true");
      redraw();
    });
    select.addEventListener("change", function () { colourBy(parseInt(select.value, 10)); });
    root.querySelectorAll("button[data-zoom]").forEach(function (button) {
      button.addEventListener("click", function () {
        var how = button.dataset.zoom;
        if (how === "fit") { fit(); redraw(); } else { zoom(how === "in" ? 1.5 : 1 / 1.5); }
      });
    });
    canvas.addEventListener("wheel", function (e) {
      if (!e.ctrlKey && !e.metaKey) { return; }  // a plain wheel scrolls the page, as everywhere else
      e.preventDefault();
      var r = canvas.getBoundingClientRect(), delta = e.deltaMode === 1 ? e.deltaY * 16 : e.deltaY;
      zoom(Math.exp(-delta * 0.002), e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    canvas.addEventListener("pointerdown", function (e) {
      if (e.button !== 0) { return; }
      drag = { x: e.clientX, y: e.clientY, moved: 0 };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener("pointermove", function (e) {
      var r = canvas.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
      if (drag) {
        drag.moved += Math.abs(e.clientX - drag.x) + Math.abs(e.clientY - drag.y);
        pan(e.clientX - drag.x, e.clientY - drag.y);
        drag.x = e.clientX; drag.y = e.clientY;
        if (drag.moved > 3) { canvas.classList.add("dragging"); tip.hidden = true; }
        return;
      }
      var found = nearest(px, py);
      if (found !== hover) { hover = found; redraw(); }
      showTip(found, px, py);
    });
    function endDrag(e) {
      if (drag && drag.moved <= 3 && e.type === "pointerup" && hover >= 0) { enlarge(hover); }
      drag = null;
      canvas.classList.remove("dragging");
    }
    canvas.addEventListener("pointerup", endDrag);
    canvas.addEventListener("pointercancel", endDrag);
    canvas.addEventListener("pointerleave", function () { if (!drag) { hover = -1; tip.hidden = true; redraw(); } });
    canvas.addEventListener("keydown", function (e) {
      var step = 40, keys = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
      if (keys[e.key]) { pan(keys[e.key][0], keys[e.key][1]); } else if (e.key === "+" || e.key === "=") { zoom(1.5); }
      else if (e.key === "-") { zoom(1 / 1.5); } else if (e.key === "0") { fit(); redraw(); } else { return; }
      e.preventDefault();
    });
    sheets.forEach(function (sheet) { if (!sheet.complete) { sheet.addEventListener("load", redraw); } });
    if (window.ResizeObserver) { new ResizeObserver(redraw).observe(canvas); }
    root.scatterScreen = function (i) {  // where point i is on the screen (client pixels), for tests and tools
      var r = canvas.getBoundingClientRect();
      return [r.left + sx(i), r.top + sy(i)];
    };
    colourBy(0);
    resize();
    draw();
  }
  document.querySelectorAll(".scatter").forEach(explorer);
})();
