// The console's only script, served from the registry itself (no build step, no CDN).
// It refreshes what the server renders: an element with data-refresh="URL" has its content
// replaced by that URL's HTML every data-every seconds. The HTML is the server's, escaped
// there; the Content-Security-Policy allows no inline script, so nothing in it can run.
"use strict";

function keepFresh(element) {
  const every = Number(element.dataset.every || "3") * 1000;
  const tick = async () => {
    if (!document.hidden) {
      try {
        // From the origin, not the page's URL: a page opened as http://user:password@host/
        // resolves relative URLs with the credentials in them, which fetch() refuses.
        const url = new URL(element.dataset.refresh, window.location.origin);
        const response = await fetch(url, { credentials: "same-origin" });
        if (response.ok) {
          element.innerHTML = await response.text();
          element.removeAttribute("data-stale");
        } else {
          element.setAttribute("data-stale", `not refreshed: the registry answered ${response.status}`);
        }
      } catch (error) {
        element.setAttribute("data-stale", "not refreshed: the registry cannot be reached");
      }
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
}

// A checkbox with data-select-all="NAME" checks or clears every checkbox named NAME in its form.
function selectAll(box) {
  box.addEventListener("change", () => {
    for (const other of box.form.querySelectorAll(`input[type=checkbox][name="${box.dataset.selectAll}"]`)) {
      other.checked = box.checked;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(keepFresh);
  document.querySelectorAll("input[data-select-all]").forEach(selectAll);
});
