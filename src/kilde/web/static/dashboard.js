// Kilde dashboard: small progressive enhancements. Every page works without this file.
(function () {
  "use strict";
  // Confirmation before destructive forms (export, erase, remove, replay all).
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form && form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);

  function csrf() { return document.body.getAttribute("data-csrf") || ""; }

  // Import uploads with progress: the file goes to POST /api/imports/uploads as the raw body,
  // then the import runs on the server and the page polls the run until it is finished.
  function setupUpload(form) {
    var bar = form.querySelector("progress");
    var status = form.querySelector("[data-status]");
    form.addEventListener("submit", function (event) {
      var file = form.querySelector("input[type=file]").files[0];
      if (!file) { return; }
      event.preventDefault();
      var say = function (text) { status.textContent = text; };
      var xhr = new XMLHttpRequest();
      xhr.open("POST", "/api/imports/uploads?filename=" + encodeURIComponent(file.name));
      xhr.setRequestHeader("X-CSRF-Token", csrf());
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.upload.onprogress = function (e) {
        if (e.lengthComputable) { bar.max = e.total; bar.value = e.loaded; }
        say("Uploading… " + Math.round(100 * e.loaded / Math.max(e.total, 1)) + " %");
      };
      xhr.onerror = function () { say("The upload failed; check the connection and try again."); };
      xhr.onload = function () {
        var body = {};
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = {}; }
        if (xhr.status >= 400) { say("Upload refused: " + (body.message || xhr.status)); return; }
        say("Uploaded; importing…");
        var run = {
          kind: form.elements.kind.value,
          source: form.elements.source.value,
          dry_run: form.elements.dry_run.checked
        };
        fetch("/api/imports/uploads/" + body.upload_id + "/run", {
          method: "POST",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
          body: JSON.stringify(run),
          credentials: "same-origin"
        }).then(function (r) { return r.json().then(function (b) { return [r, b]; }); })
          .then(function (pair) {
            var r = pair[0], b = pair[1];
            if (!r.ok) { say("Import refused: " + (b.message || r.status) + (b.fix ? " — " + b.fix : "")); return; }
            if (!b.run_id) { say("Dry run: " + JSON.stringify(b.summary || {})); return; }
            poll(b.run_id);
          });
      };
      xhr.send(file);

      function poll(id) {
        fetch("/api/imports/" + id, { credentials: "same-origin" })
          .then(function (r) { return r.json(); })
          .then(function (b) {
            var read = b.rows_read || 0;
            if (b.file_bytes && b.summary && b.summary.bytes_read) {
              bar.max = b.file_bytes; bar.value = b.summary.bytes_read;
            }
            if (b.status === "running") {
              say("Importing… " + read + " rows read");
              window.setTimeout(function () { poll(id); }, 700);
            } else {
              bar.max = 1; bar.value = 1;
              say("Import " + b.status + ": " + (b.stored || 0) + " stored, " + (b.duplicates || 0) +
                  " duplicates, " + (b.rejected || 0) + " rejected.");
              var list = document.getElementById("import-runs");
              if (list && window.htmx) { window.htmx.trigger(list, "refresh"); }
            }
          });
      }
    });
  }

  // A box that scrolls (a wide table on a phone, a long rule) must be reachable with
  // the keyboard, or its hidden part cannot be read without a mouse (WCAG 2.1.1): such boxes get
  // a tab stop and a name taken from their heading.
  function markScrollables() {
    var boxes = document.querySelectorAll("main .card, main pre, .top nav");
    for (var i = 0; i < boxes.length; i++) {
      var box = boxes[i];
      var scrolls = box.scrollWidth > box.clientWidth + 1 || box.scrollHeight > box.clientHeight + 1;
      if (scrolls && !box.hasAttribute("tabindex")) {
        box.setAttribute("tabindex", "0");
        box.setAttribute("data-scroll-stop", "");
        if (!box.hasAttribute("aria-label") && !box.hasAttribute("aria-labelledby")) {
          var heading = box.querySelector("h2, h3");
          var name = heading ? heading.textContent.trim() : "";
          box.setAttribute("aria-label", (name || "Wide content") + " (scrolls)");
          if (!box.hasAttribute("role") && box.tagName !== "SECTION" && box.tagName !== "NAV") {
            box.setAttribute("role", "region");
          }
        }
      } else if (!scrolls && box.hasAttribute("data-scroll-stop")) {
        box.removeAttribute("tabindex");
        box.removeAttribute("data-scroll-stop");
      }
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var forms = document.querySelectorAll("form[data-upload]");
    for (var i = 0; i < forms.length; i++) { setupUpload(forms[i]); }
    markScrollables();
  });
  document.addEventListener("htmx:afterSettle", markScrollables);
  var resizing = 0;
  window.addEventListener("resize", function () {
    window.clearTimeout(resizing);
    resizing = window.setTimeout(markScrollables, 150);
  });
})();
