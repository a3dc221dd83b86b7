// Sign-in: POST the admin token in a JSON body (never in a URL); the server sets the session cookie.
// Then on to the page that sent here (`?next=/tasks/4`, a path of this server only), else the nodes.
"use strict";
(function () {
  const q = new URLSearchParams(location.search);
  /** `next` when it is a path on this server ("/x", never "//host" or "/\\host"), else /nodes. */
  function nextPage() {
    const n = q.get("next") || "";
    return /^\/(?![\/\\])/.test(n) ? n : "/nodes";
  }
  // A one-time link that was spent or expired comes here with ?link=spent (server/auth/router.py).
  document.getElementById("signin-link-spent").hidden = q.get("link") !== "spent";

  document.getElementById("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const err = document.getElementById("signin-error");
    const input = document.getElementById("token");
    err.hidden = true;
    try {
      await SLY.api("POST", "/api/v1/session", { token: input.value.trim() }, { noRedirect: true });
      input.value = "";
      location.assign(nextPage());
    } catch (e) {
      err.textContent = e.status === 401 || e.status === 403 ? "That token is not the admin token." : "Sign-in failed: " + e.message;
      err.hidden = false;
      input.focus();
    }
  });
})();
