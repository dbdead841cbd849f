// The workspace page: ask before logging off everything (the forms work
// without this script too). No inline script: the CSP allows only this file.
"use strict";
(function () {
  const ask = {
    "logoff-all": "Log off every session, including this device's?",
    "logoff-others": "Log off every session except this device's?",
  };
  for (const id of Object.keys(ask)) {
    const b = document.getElementById(id);
    if (b && b.form) {
      b.addEventListener("click", (ev) => {
        if (b.dataset.confirmed === "1") return;
        if (!window.confirm(ask[id])) ev.preventDefault();
      });
    }
  }
})();
