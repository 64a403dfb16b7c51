// Progressive enhancement for Kilde's hosted forms: hide questions whose condition is not met.
// Without this script every question shows and the server ignores answers that do not apply.
(function () {
  "use strict";
  var form = document.querySelector("form");
  if (!form) return;
  var conditional = form.querySelectorAll("[data-show-if]");
  function answers(name) {
    var out = [];
    form.querySelectorAll('[name="' + name + '"]').forEach(function (el) {
      if ((el.type === "radio" || el.type === "checkbox") && !el.checked) return;
      if (el.value) out.push(el.value);
    });
    return out;
  }
  function update() {
    conditional.forEach(function (box) {
      var wanted = box.getAttribute("data-equals").split("|");
      var shown = answers(box.getAttribute("data-show-if")).some(function (v) {
        return wanted.indexOf(v) >= 0;
      });
      box.hidden = !shown;
    });
  }
  form.addEventListener("change", update);
  update();
  var summary = document.getElementById("error-summary");
  if (summary) summary.focus();
})();
