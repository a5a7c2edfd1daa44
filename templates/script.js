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
