// The upload result page: while the study is being graded, poll its state and reload when it ends.
(function () {
  "use strict";
  const progress = document.getElementById("progress");
  if (!progress || progress.dataset.final === "yes") return;
  const study = progress.dataset.study;
  async function poll() {
    try {
      const response = await fetch("/studies/" + encodeURIComponent(study) + "/status", { headers: { Accept: "application/json" } });
      const status = await response.json();
      if (status.final) {
        window.location.reload();
        return;
      }
      const waiting = document.getElementById("waiting");
      if (waiting) waiting.textContent = "Grading… (" + status.state + ") this page updates by itself.";
    } catch (e) { /* the node restarting: try again */ }
    setTimeout(poll, 700);
  }
  setTimeout(poll, 700);
})();
