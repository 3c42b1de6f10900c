// Worklist and study pages: claim/release/complete buttons and auto-refresh. No build step, no framework.
(function () {
  "use strict";
  var script = document.currentScript;
  var csrfHeader = (script && script.dataset.csrfHeader) || "X-OmniCT-Request";

  function act(button) {
    var uid = button.dataset.uid, action = button.dataset.action;
    button.disabled = true;
    var headers = {};
    headers[csrfHeader] = "1";  // cookie-authenticated changes need it (a cross-site form cannot send it)
    fetch("/worklist/" + encodeURIComponent(uid) + "/" + action, {method: "POST", credentials: "same-origin", headers: headers})
      .then(function (r) {
        if (!r.ok) { return r.json().then(function (b) { throw new Error(b.detail || r.statusText); }); }
        return refresh();
      })
      .catch(function (e) { alert(action + " failed: " + e.message); button.disabled = false; });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.act");
    if (button) { event.preventDefault(); act(button); }
  });

  // Re-fetch this page and swap the table body (worklist) or the whole main (study page).
  function refresh() {
    return fetch(window.location.href, {credentials: "same-origin"}).then(function (r) {
      if (r.redirected && r.url.indexOf("/login") >= 0) { window.location = r.url; return; }
      return r.text().then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var body = document.getElementById("worklist-body"), fresh = doc.getElementById("worklist-body");
        if (body && fresh) { body.replaceWith(fresh); }
        else { var main = document.querySelector("main"), newMain = doc.querySelector("main"); if (main && newMain) main.replaceWith(newMain); }
        var updated = document.getElementById("updated");
        if (updated) { updated.textContent = "Updated " + new Date().toLocaleTimeString(); }
      });
    });
  }

  var auto = document.getElementById("auto-refresh");
  if (auto) {
    var seconds = parseInt(auto.dataset.seconds || "30", 10);
    setInterval(function () { if (auto.checked && !document.hidden) { refresh().catch(function () {}); } }, seconds * 1000);
  }
})();
