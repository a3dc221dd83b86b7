// Sign-in: POST the admin token in a JSON body (never in a URL); the server sets the session cookie.
"use strict";
document.getElementById("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const err = document.getElementById("signin-error");
  const input = document.getElementById("token");
  err.hidden = true;
  try {
    await SLY.api("POST", "/api/v1/session", { token: input.value.trim() }, { noRedirect: true });
    input.value = "";
    location.assign("/nodes");
  } catch (e) {
    err.textContent = e.status === 401 || e.status === 403 ? "That token is not the admin token." : "Sign-in failed: " + e.message;
    err.hidden = false;
    input.focus();
  }
});
