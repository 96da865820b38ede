// The bearer token, when the server asks for one (AUTH_TOKENS_FILE): the pages ask for it
// in a form, keep it in sessionStorage (this tab only, gone when it closes) and send it in
// the Authorization header; it never goes into a URL, a cookie or localStorage.
"use strict";

const TOKEN_KEY = "mnist-digits-token";

function tokenHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? {Authorization: `Bearer ${token}`} : {};
}

// Shows the token form and resolves once a token has been entered.
function askForToken(why) {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  document.getElementById("token-why").textContent = why;
  form.hidden = false;
  input.focus();
  return new Promise((resolve) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      form.hidden = true;
      resolve();
    }, {once: true});
  });
}

// fetch() with the tab's token; a 401 asks for a (new) token and sends the request again.
async function authFetch(url, options = {}) {
  for (;;) {
    const response = await fetch(url, {
      ...options, headers: {...(options.headers || {}), ...tokenHeaders()}});
    if (response.status !== 401) return response;
    const had = sessionStorage.getItem(TOKEN_KEY);
    await askForToken(had ? "The server refused that token; enter another."
                          : "This server asks for an access token.");
  }
}
