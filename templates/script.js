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
