// The dashboard: while a listed study is in work, reload every 5 s (not while the search is being typed in).
(function () {
  "use strict";
  const listing = document.getElementById("listing");
  if (!listing || listing.dataset.busy !== "yes") return;
  setTimeout(function again() {
    const active = document.activeElement;
    if (active && active.closest && active.closest("#search")) {
      setTimeout(again, 5000);
      return;
    }
    window.location.reload();
  }, 5000);
})();
