// The API reference: /openapi.json as a page (the token, when one is needed, is the
// dashboard's, from #token=... or storage). No network beyond this server.
"use strict";

(async function () {
  const TOKEN_KEY = "s5a-api-token";
  const match = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (match) localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  const token = localStorage.getItem(TOKEN_KEY);
  const status = document.getElementById("status");
  const response = await fetch("/openapi.json", { headers: token ? { Authorization: `Bearer ${token}` } : {} });
  if (!response.ok) {
    status.className = "error";
    status.textContent = response.status === 401
      ? "This API needs a token: open the dashboard and enter it there, then reload."
      : `Cannot load /openapi.json: HTTP ${response.status}`;
    return;
  }
  const spec = await response.json();
  const article = document.getElementById("reference");
  const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
  const intro = el("p", spec.info.description || "");
  article.append(el("h2", `${spec.info.title} ${spec.info.version}`), intro);
  for (const path of Object.keys(spec.paths).sort()) {
    for (const [method, op] of Object.entries(spec.paths[path])) {
      const box = el("section", undefined, "op");
      const title = el("h2");
      title.append(el("span", method.toUpperCase(), "method"), el("code", path));
      box.append(title, el("p", op.summary || ""), el("p", op.description || ""));
      if (op.parameters && op.parameters.length) {
        const table = el("table");
        const head = table.createTHead().insertRow();
        for (const name of ["parameter", "type", "default", "description"]) head.append(el("th", name));
        const body = table.createTBody();
        for (const p of op.parameters) {
          const row = body.insertRow();
          const s = p.schema || {};
          row.insertCell().append(el("code", p.name));
          row.insertCell().textContent = s.enum ? s.enum.join(" | ") : [s.type, s.format].filter(Boolean).join(" ");
          row.insertCell().textContent = s.default === undefined ? "" : String(s.default);
          row.insertCell().textContent = p.description || "";
        }
        box.append(table);
      }
      for (const [code, answer] of Object.entries(op.responses || {})) {
        const details = el("details");
        details.append(el("summary", `${code} ${answer.description || ""}`));
        const content = answer.content && Object.values(answer.content)[0];
        if (content && content.schema) details.append(el("pre", JSON.stringify(content.schema, null, 2)));
        box.append(details);
      }
      article.append(box);
    }
  }
  status.textContent = "";
})();
