// The upload page: check what was chosen (DICOM Part 10 files or zips), enable Upload, send it.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  const inputs = [document.getElementById("files"), document.getElementById("folder")];
  const button = document.getElementById("upload");
  const chosen = document.getElementById("chosen");
  const error = document.getElementById("upload-error");
  const progress = document.getElementById("upload-progress");
  const expected = form.dataset.expected;
  const maxBytes = Number(form.dataset.maxBytes);
  let files = [];

  function showError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  function ignored(file) {
    const name = file.name;
    return name.startsWith(".") || name.toUpperCase() === "DICOMDIR";
  }

  async function kind(file) {
    const head = new Uint8Array(await file.slice(0, 132).arrayBuffer());
    if (head.length >= 4 && head[0] === 0x50 && head[1] === 0x4b && head[2] === 0x03 && head[3] === 0x04) return "zip";
    if (head.length === 132 && String.fromCharCode(head[128], head[129], head[130], head[131]) === "DICM") return "dicom";
    return null;
  }

  async function choose(list) {
    button.disabled = true;
    showError("");
    files = [];
    const picked = Array.from(list).filter((f) => !ignored(f));
    if (!picked.length) {
      chosen.textContent = "Nothing chosen.";
      return;
    }
    let bytes = 0, zips = 0;
    for (const file of picked) {
      const k = await kind(file);
      if (k === null) {
        chosen.textContent = picked.length + " file(s) chosen.";
        showError("Wrong format: " + (file.webkitRelativePath || file.name) + " is not a DICOM file; expected " + expected + ".");
        return;
      }
      if (k === "zip") zips += 1;
      bytes += file.size;
    }
    if (bytes > maxBytes) {
      showError("Too large: " + (bytes / 1048576).toFixed(1) + " MiB chosen, the limit is " + (maxBytes / 1048576).toFixed(0) + " MiB.");
      return;
    }
    files = picked;
    const dicoms = picked.length - zips;
    chosen.textContent = [dicoms ? dicoms + " DICOM file" + (dicoms > 1 ? "s" : "") : "", zips ? zips + " zip" + (zips > 1 ? "s" : "") : ""]
      .filter(Boolean).join(" and ") + " chosen (" + (bytes / 1048576).toFixed(1) + " MiB).";
    button.disabled = false;
  }

  inputs.forEach((input) => input.addEventListener("change", () => choose(input.files)));

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!files.length) return;
    button.disabled = true;
    showError("");
    const data = new FormData();
    data.append("csrf", form.querySelector("input[name=csrf]").value);
    files.forEach((f) => data.append("files", f, f.webkitRelativePath || f.name));
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/upload");
    xhr.setRequestHeader("Accept", "application/json");
    progress.hidden = false;
    progress.value = 0;
    xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) progress.value = (100 * e.loaded) / e.total; });
    xhr.addEventListener("load", () => {
      let answer = {};
      try { answer = JSON.parse(xhr.responseText); } catch (e) { answer = { error: "The node answered " + xhr.status }; }
      if (xhr.status === 200 && answer.url) {
        window.location.assign(answer.url);
        return;
      }
      progress.hidden = true;
      showError(answer.error || "The upload failed (" + xhr.status + ").");
      button.disabled = false;
    });
    xhr.addEventListener("error", () => {
      progress.hidden = true;
      showError("The upload failed: the node could not be reached.");
      button.disabled = false;
    });
    xhr.send(data);
  });
})();
