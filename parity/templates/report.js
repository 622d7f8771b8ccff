// Sorting and filtering of the records table, and matrix cells and failures that filter it. The page reads
// fully without this script; it only hides and reorders rows that are already there.
(function () {
  "use strict";
  var table = document.getElementById("record-table");
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var selects = Array.prototype.slice.call(document.querySelectorAll("select[data-filter]"));
  var search = document.getElementById("record-search");
  var count = document.getElementById("record-count");
  var onlyTest = null;  // set by a failure's "show its records" button, cleared by any other filter

  function applyFilters() {
    var wanted = selects.map(function (s) { return [s.dataset.filter, s.value]; });
    var needle = search.value.trim().toLowerCase();
    var shown = 0;
    rows.forEach(function (row) {
      // a value matches a row's own field, or its group (the mesh filter's "drawn" matches every drawn mesh)
      var keep = wanted.every(function (w) {
                   return w[1] === "" || row.dataset[w[0]] === w[1] || row.dataset[w[0] + "Group"] === w[1];
                 }) && (onlyTest === null || row.dataset.test === onlyTest) &&
                 (needle === "" || row.textContent.toLowerCase().indexOf(needle) >= 0);
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " records shown" + (onlyTest === null ? "" : " (one test)");
  }

  function cellKey(row, index, numeric) {
    var cell = row.cells[index];
    if (numeric) {
      var value = parseFloat(cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent);
      return isNaN(value) ? -Infinity : value;
    }
    return cell.textContent.trim().toLowerCase();
  }

  function sortBy(header) {
    var index = header.cellIndex;
    var numeric = header.dataset.sort === "num";
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    table.tHead.querySelectorAll("th").forEach(function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var keyed = rows.map(function (row, order) { return [cellKey(row, index, numeric), order, row]; });
    keyed.sort(function (a, b) {
      if (a[0] < b[0]) { return ascending ? -1 : 1; }
      if (a[0] > b[0]) { return ascending ? 1 : -1; }
      return a[1] - b[1];
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
  }

  function showCell(cell) {
    selects.forEach(function (s) { s.value = cell.dataset[s.dataset.filter] || ""; });
    search.value = "";
    onlyTest = null;
    applyFilters();
    document.getElementById("records").scrollIntoView();
  }

  function showTest(button) {
    selects.forEach(function (s) { s.value = ""; });
    search.value = "";
    onlyTest = button.dataset.test;
    applyFilters();
    document.getElementById("records").scrollIntoView();
  }

  function refilter() { onlyTest = null; applyFilters(); }

  selects.forEach(function (s) { s.addEventListener("change", refilter); });
  search.addEventListener("input", refilter);
  document.getElementById("filters").addEventListener("reset", function (e) {
    e.preventDefault();  // clear here, so the table is refiltered before the click returns
    selects.forEach(function (s) { s.value = ""; });
    search.value = "";
    refilter();
  });
  table.tHead.querySelectorAll("th[data-sort]").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  document.querySelectorAll(".matrix td.cell").forEach(function (cell) {
    cell.addEventListener("click", function () { showCell(cell); });
    cell.addEventListener("keydown", function (e) { if (e.key === "Enter") { showCell(cell); } });
  });
  document.querySelectorAll("button.show-records").forEach(function (button) {
    button.addEventListener("click", function () { showTest(button); });
  });
  applyFilters();
}());
