// Refreshes every element with data-live="URL" from that URL every data-every ms, in place:
// the page is never reloaded. A response with the header X-Live-Final: 1 is the last one.
"use strict";
(function () {
  function follow(el) {
    const every = Number(el.dataset.every) || 2000;
    async function tick() {
      try {
        const response = await fetch(el.dataset.live, { credentials: "same-origin", cache: "no-store" });
        if (response.ok) {
          const open = new Set(Array.from(el.querySelectorAll("details[open]"), (d) => d.id).filter(Boolean));
          el.innerHTML = await response.text();
          open.forEach((id) => { const d = document.getElementById(id); if (d) d.open = true; });
          if (response.headers.get("X-Live-Final") === "1") {
            el.removeAttribute("data-live");
            return;
          }
        }
      } catch (err) {
        // The server restarting or the network dropping: try again next tick.
      }
      setTimeout(tick, every);
    }
    setTimeout(tick, every);
  }
  document.querySelectorAll("[data-live]").forEach(follow);
})();
