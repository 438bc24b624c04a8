// latchkey's connections page. No framework, no build step, nothing loaded from elsewhere.
// The admin token is sent once, to /session, and never kept; the session is an HttpOnly cookie
// and the CSRF token lives only in this script's memory.
"use strict";

const state = { csrf: null, connections: [], catalog: null, connector: null };

const $ = (id) => document.getElementById(id);

function show(el, on) { el.hidden = !on; }

function text(tag, value, cls) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  el.textContent = value == null ? "" : String(value);
  return el;
}

// Every call the page makes. A write carries the CSRF token; the cookie goes by itself.
async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = state.csrf || "";
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    // latchkey stopped or restarting, or the network between: the request may or may not have
    // arrived, so the list is read again once it answers.
    return { status: 0, ok: false, data: { error: { message: UNREACHABLE } } };
  }
  let data = null;
  if (r.status !== 204) {
    try { data = await r.json(); } catch (_) { data = null; }
  }
  // Said once: the calls that follow the one refused (the list read again) say nothing more.
  if (r.status === 401 && state.csrf !== null) {
    signedOut(method === "GET" ? "Your session has ended. Sign in again." :
      "Your session has ended (it expired, or was signed out elsewhere), so the last change was not made. Sign in again.");
  }
  return { status: r.status, ok: r.ok, data };
}

const UNREACHABLE = "latchkey could not be reached (stopped, restarting, or the network is down). " +
  "Refresh the list once it is back to see whether the change was made.";

function errorText(res) {
  const e = res.data && res.data.error;
  return e && e.message ? e.message : "latchkey answered " + res.status;
}

function view(name) {
  show($("connections-view"), name === "list");
  show($("add-view"), name === "add");
}

function signedIn(session) {
  state.csrf = session.csrf;
  $("who-name").textContent = "Signed in as " + session.admin;
  show($("who"), true);
  show($("sign-in-view"), false);
  view("list");
  loadConnections();
}

function signedOut(note) {
  state.csrf = null;
  state.connections = [];
  $("connections-body").replaceChildren();
  show($("who"), false);
  view(null);
  clearSecrets();
  show($("rotate-form"), false);
  show($("action-status"), false);
  closeEdit();
  const err = $("sign-in-error");
  err.textContent = note || "";
  show(err, !!note);
  show($("sign-in-view"), true);
  $("token").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  const input = $("token");
  const form = new URLSearchParams();
  form.set("token", input.value);
  // The token is not kept: not in the page, not in storage.
  input.value = "";
  const err = $("sign-in-error");
  show(err, false);
  let r;
  try {
    r = await fetch("/session", {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
      body: form.toString(),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch (_) {
    err.textContent = UNREACHABLE;
    show(err, true);
    return;
  }
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.ok && data) {
    signedIn(data);
  } else {
    err.textContent = r.status === 401 ? "That is not an admin token." : errorText({ status: r.status, data });
    show(err, true);
    input.focus();
  }
}

async function signOut() {
  await api("DELETE", "/session");
  signedOut();
  $("token").focus();
}

const STATUS_WORDS = {
  active: "Active", failed: "Failed", unverified: "Unverified", expiring: "Expiring",
  expired: "Expired", invalid: "Invalid",
};

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

// The date part of an RFC 3339 time, as stored (UTC): what the date inputs hold too.
function day(iso) {
  return iso ? String(iso).slice(0, 10) : "";
}

function statusCell(c) {
  const td = document.createElement("td");
  td.dataset.label = "Status";
  const word = STATUS_WORDS[c.status] || c.status || "Unknown";
  td.append(text("span", word, "status status-" + (c.status || "unknown")));
  if (c.verified_at) td.append(text("span", "last verified " + when(c.verified_at), "detail verified"));
  // The expiry's own warning names the date; without one, the date alone.
  const warned = (c.warnings || []).some((w) => w.startsWith("the key expire"));
  if (c.expires_at && !warned) td.append(text("span", "key expires " + day(c.expires_at), "detail expires"));
  if (c.status === "failed" && c.last_error) {
    td.append(text("span", c.last_error, "detail reason"));
    if (c.last_error_hint) td.append(text("span", c.last_error_hint, "detail hint"));
    if (c.last_error_at) td.append(text("span", "failed " + when(c.last_error_at), "detail"));
  }
  if (c.problem && c.problem.message) td.append(text("span", c.problem.message, "detail reason"));
  for (const w of c.warnings || []) td.append(text("span", w, "detail warning"));
  return td;
}

function cell(label, value, code) {
  const td = document.createElement("td");
  td.dataset.label = label;
  td.append(code ? text("code", value) : document.createTextNode(value == null ? "" : String(value)));
  return td;
}

function matches(c, q) {
  if (!q) return true;
  const hay = [c.name, c.id, c.connector, c.environment, c.status, STATUS_WORDS[c.status]]
    .filter(Boolean).join(" ").toLowerCase();
  return q.toLowerCase().split(/\s+/).filter(Boolean).every((w) => hay.includes(w));
}

function render() {
  const q = $("filter").value.trim();
  const body = $("connections-body");
  const shown = state.connections.filter((c) => matches(c, q));
  body.replaceChildren(...shown.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.id = c.id;
    tr.append(cell("Name", c.name), cell("ID", c.id, true), cell("Connector", c.connector),
      cell("Environment", c.environment), statusCell(c), actionsCell(c));
    return tr;
  }));
  show($("list-empty"), state.connections.length === 0);
  $("list-count").textContent = state.connections.length === 0 ? "" :
    shown.length + " of " + state.connections.length + " connections";
}

async function loadConnections() {
  const err = $("list-error");
  show(err, false);
  const res = await api("GET", "/v1/connections");
  if (!res.ok) {
    if (res.status !== 401) { err.textContent = errorText(res); show(err, true); }
    return;
  }
  state.connections = (res.data && res.data.connections) || [];
  state.connections.sort((a, b) => String(a.name || a.id).localeCompare(String(b.name || b.id)));
  render();
}

// ----- Per connection: verify, rotate, delete -----

function actionsCell(c) {
  const td = document.createElement("td");
  td.dataset.label = "Actions";
  td.className = "actions-cell";
  const button = (label, what, fn) => {
    const b = text("button", label);
    b.type = "button";
    b.setAttribute("aria-label", what + " " + c.id);
    b.addEventListener("click", () => fn(c));
    td.append(b);
  };
  button("Verify", "Verify", verifyOne);
  button("Edit", "Edit", openEdit);
  button("Rotate", "Rotate", openRotate);
  button("Delete", "Delete", deleteOne);
  return td;
}

function actionStatus(kind, lines) {
  const s = $("action-status");
  s.className = kind;
  s.replaceChildren(...lines.filter(Boolean).map((l) => text("p", l)));
  show(s, true);
}

function refusal(what, res) {
  const e = (res.data && res.data.error) || {};
  const v = e.verification;
  return [
    what + ": " + (e.message || "latchkey answered " + res.status),
    e.field ? "Field: " + e.field : "",
    v && v.message && !(e.message || "").includes(v.message) ? v.message : "",
    v && v.hint,
  ];
}

async function verifyOne(c) {
  actionStatus("", ["Verifying " + c.id + " ..."]);
  const res = await api("POST", "/v1/connections/" + encodeURIComponent(c.id) + "/verify");
  if (res.ok) {
    const v = res.data.verification || {};
    const status = res.data.connection && res.data.connection.status;
    actionStatus(v.passed ? "passed" : "refused", [
      "Verified " + c.id + ": " + (STATUS_WORDS[status] || status) + ".", v.message, v.hint]);
  } else {
    actionStatus("refused", refusal("Not verified", res));
  }
  loadConnections();
}

async function loadCatalog() {
  if (!state.catalog) {
    const res = await api("GET", "/v1/connectors");
    if (!res.ok) return false;
    state.catalog = (res.data && res.data.connectors) || [];
    state.catalog.sort((a, b) => a.name.localeCompare(b.name));
  }
  return true;
}

async function openRotate(c) {
  if (!(await loadCatalog())) return;
  const connector = state.catalog.find((k) => k.id === c.connector);
  const secretFields = ((connector && connector.fields) || []).filter((f) => f.secret);
  closeEdit();
  state.rotating = c.id;
  $("rotate-title").textContent = "Rotate " + c.id;
  const box = $("rotate-fields");
  box.replaceChildren();
  for (const f of secretFields) box.append(...secretInput(f, "rotate-"));
  show($("rotate-form"), true);
  const first = box.querySelector("input");
  if (first) first.focus();
}

function closeRotate() {
  clearSecrets();
  show($("rotate-form"), false);
  state.rotating = null;
}

async function rotate(ev) {
  ev.preventDefault();
  const id = state.rotating;
  const fields = {};
  for (const i of document.querySelectorAll("#rotate-fields input")) {
    if (i.value !== "") fields[i.name] = fieldValue(i);
  }
  closeRotate();
  actionStatus("", ["Verifying the new key for " + id + " ..."]);
  const res = await api("PUT", "/v1/connections/" + encodeURIComponent(id) + "/secret", { fields });
  if (res.ok) {
    const v = res.data.verification;
    const conn = res.data.connection || {};
    actionStatus("passed", [
      "Rotated " + id + ": " + (STATUS_WORDS[conn.status] || conn.status) + ", version " + conn.version + ".",
      v && v.message, ...(res.data.notices || [])]);
  } else {
    actionStatus("refused", [...refusal("Not rotated; the old key stays in force", res)]);
  }
  loadConnections();
}

async function deleteOne(c) {
  if (!window.confirm("Delete the connection " + c.id + "? Its key is removed from Vault, every version.")) return;
  const res = await api("DELETE", "/v1/connections/" + encodeURIComponent(c.id));
  actionStatus(res.ok ? "passed" : "refused", res.ok ? ["Deleted " + c.id + "."] : refusal("Not deleted", res));
  loadConnections();
}

// ----- Edit: the non-secret fields and the expiry -----

// The environments a connector tells apart, by key pattern or by base URL pattern.
function environmentNames(connector) {
  const names = Object.keys((connector && connector.environments) || {})
    .concat(Object.keys((connector && connector.environment_urls) || {}));
  return [...new Set(names)].sort((a, b) => (a === "production" ? -1 : b === "production" ? 1 : a.localeCompare(b)));
}

// Options for an environment select: `names`, and "" (none set) where a connection may have none.
function environmentOptions(sel, names, withNone, selected) {
  const values = withNone || names.length === 0 ? [""].concat(names) : names;
  sel.replaceChildren(...values.map((e) => {
    const o = text("option", e === "" ? "(not set)" : e);
    o.value = e;
    o.selected = e === selected;
    return o;
  }));
}

// A date input's day as an RFC 3339 time: the last second of that day, UTC, so that a key that
// "expires on" a day still works on it.
function endOfDay(date) {
  return date ? date + "T23:59:59Z" : null;
}

// A connector field's label: its name in words, and whether it may be left empty.
function fieldLabel(f) {
  return (f.label || f.name) + (f.required ? "" : " (optional)");
}

function labelled(id, words, input) {
  const label = text("label", words);
  label.htmlFor = id;
  input.id = id;
  return [label, input];
}

function textInput(name, value) {
  const input = document.createElement("input");
  input.type = "text";
  input.name = name;
  input.spellcheck = false;
  input.autocomplete = "off";
  input.value = value == null ? "" : String(value);
  return input;
}

async function openEdit(c) {
  if (!(await loadCatalog())) return;
  closeRotate();
  const connector = state.catalog.find((k) => k.id === c.connector) || {};
  state.editing = { c, connector };
  $("edit-title").textContent = "Edit " + c.id;
  const box = $("edit-fields");
  box.replaceChildren(...labelled("edit-name", "Name", textInput("name", c.name)));
  const envs = environmentNames(connector);
  if (c.environment && !envs.includes(c.environment)) envs.push(c.environment);
  const sel = document.createElement("select");
  sel.name = "environment";
  environmentOptions(sel, envs, !c.environment, c.environment || "");
  box.append(...labelled("edit-environment", "Environment", sel));
  box.append(...labelled("edit-base-url",
    connector.base_url ? "Base URL (empty: " + connector.base_url + ")" : "Base URL",
    textInput("base_url", connector.base_url && c.base_url === connector.base_url ? "" : c.base_url)));
  for (const f of (connector.fields || []).filter((f) => !f.secret)) {
    const v = c.fields && typeof c.fields[f.name] === "string" ? c.fields[f.name] : "";
    const input = textInput(f.name, v);
    input.dataset.field = "1";
    box.append(...labelled("edit-field-" + f.name, fieldLabel(f), input));
  }
  $("edit-expires").value = day(c.expires_at);
  show($("edit-form"), true);
  $("edit-name").focus();
}

function closeEdit() {
  show($("edit-form"), false);
  state.editing = null;
}

// Sends what changed, and only that: a PATCH names the keys it changes.
async function saveEdit(ev) {
  ev.preventDefault();
  const { c, connector } = state.editing;
  const patch = {};
  const name = $("edit-name").value.trim();
  if (name !== (c.name || "")) patch.name = name || null;
  const env = $("edit-environment").value;
  if (env !== (c.environment || "")) patch.environment = env || null;
  const base = $("edit-base-url");
  const was = (connector.base_url && c.base_url === connector.base_url ? "" : c.base_url) || "";
  if (base.value.trim() !== was) patch.base_url = base.value.trim() || null;
  for (const i of document.querySelectorAll("#edit-fields input[data-field]")) {
    const was = c.fields && typeof c.fields[i.name] === "string" ? c.fields[i.name] : "";
    if (i.value !== was) (patch.fields = patch.fields || {})[i.name] = i.value === "" ? null : i.value;
  }
  const exp = $("edit-expires").value;
  if (exp !== day(c.expires_at)) patch.expires_at = endOfDay(exp);
  if ("environment" in patch || "base_url" in patch) patch.verify = true;
  closeEdit();
  if (Object.keys(patch).length === 0) {
    actionStatus("", ["Nothing changed in " + c.id + "."]);
    return;
  }
  actionStatus("", ["Saving " + c.id + " ..."]);
  const res = await api("PATCH", "/v1/connections/" + encodeURIComponent(c.id), patch);
  if (res.ok) {
    const d = res.data || {};
    const conn = d.connection || {};
    const v = d.verification;
    actionStatus("passed", [
      "Saved " + c.id + ": " + (STATUS_WORDS[conn.status] || conn.status) + ", version " + conn.version + ".",
      v && v.message, ...(conn.warnings || []), ...(d.notices || [])]);
  } else {
    actionStatus("refused", refusal("Not saved", res));
  }
  loadConnections();
}

// ----- Add connection -----

async function openAdd() {
  view("add");
  show($("add-form"), false);
  show($("verdict"), false);
  if (!(await loadCatalog())) return;
  renderCatalog();
  $("catalog-search").focus();
}

function renderCatalog() {
  if (!state.catalog) return;
  const q = $("catalog-search").value.trim().toLowerCase();
  const list = $("catalog");
  const shown = state.catalog.filter((c) => !q || (c.name + " " + c.id).toLowerCase().includes(q));
  list.replaceChildren(...shown.map((c) => {
    const li = document.createElement("li");
    const b = text("button", c.name);
    b.type = "button";
    b.dataset.connector = c.id;
    b.addEventListener("click", () => pickConnector(c));
    li.append(b);
    return li;
  }));
}

function clearSecrets() {
  for (const i of document.querySelectorAll("input[data-secret]")) {
    i.value = "";
    i.type = "password";
    forgetPaste(i, document.getElementById(i.id + "-notice"));
  }
  for (const b of document.querySelectorAll(".field-row button[aria-pressed]")) {
    b.setAttribute("aria-pressed", "false");
    b.textContent = "Show";
    b.setAttribute("aria-label", b.getAttribute("aria-label").replace(/^Hide /, "Show "));
  }
}

// A secret field: a password input, never pre-filled, with a Show/Hide toggle that only changes
// how this page shows what was typed.
function secretInput(f, prefix) {
  const id = prefix + f.name;
  const [label, input] = labelled(id, fieldLabel(f), textInput(f.name, ""));
  input.type = "password";
  // "off" is not honoured for passwords; "new-password" keeps a browser from offering to save
  // the key as this site's password or from filling one in.
  input.autocomplete = "new-password";
  input.required = !!f.required;
  input.dataset.secret = "1";
  const t = text("button", "Show");
  t.type = "button";
  t.setAttribute("aria-pressed", "false");
  t.setAttribute("aria-controls", id);
  t.setAttribute("aria-label", "Show " + (f.label || f.name));
  t.addEventListener("click", () => {
    const on = input.type === "password";
    input.type = on ? "text" : "password";
    t.setAttribute("aria-pressed", String(on));
    t.textContent = on ? "Hide" : "Show";
    t.setAttribute("aria-label", (on ? "Hide " : "Show ") + (f.label || f.name));
  });
  const row = document.createElement("div");
  row.className = "field-row";
  row.append(input, t);
  const notice = text("p", "", "help notice");
  notice.id = id + "-notice";
  notice.setAttribute("role", "status");
  notice.hidden = true;
  input.setAttribute("aria-describedby", notice.id);
  input.addEventListener("paste", (ev) => pasted(ev, input, notice));
  input.addEventListener("input", () => {
    if (input.value === "") forgetPaste(input, notice);
  });
  return [label, row, notice];
}

// The whitespace that latchkey trims (connection.rs, clean_value): what a copy from a terminal
// or a file drags along.
const EDGES = /^[ \t\r\n]+|[ \t\r\n]+$/g;

// A one-line input drops line breaks from what is pasted into it without a word, so the page
// looks at the paste itself. Whitespace around the value: the value goes in without it, a notice
// says so, and the whitespace (never the value) is kept aside to be sent with it, so that
// latchkey trims it too and its verdict names the pitfall. A line break inside the value: nothing
// goes in, and the notice says why (a key is one line; gluing the parts together would save a
// different key).
function pasted(ev, input, notice) {
  const data = ev.clipboardData ? ev.clipboardData.getData("text/plain") : "";
  const clean = data.replace(EDGES, "");
  if (/[\r\n]/.test(clean)) {
    ev.preventDefault();
    notice.textContent = "Not pasted: the value has a line break inside it. A key is one line; copy it again.";
    notice.className = "help notice refused";
    show(notice, true);
    return;
  }
  if (clean === data) {
    forgetPaste(input, notice);
    return;
  }
  ev.preventDefault();
  const start = input.selectionStart ?? input.value.length;
  const end = input.selectionEnd ?? input.value.length;
  const whole = start === 0 && end === input.value.length;
  input.setRangeText(clean, start, end, "end");
  if (whole) {
    input.dataset.lead = data.slice(0, data.indexOf(clean));
    input.dataset.trail = data.slice(data.indexOf(clean) + clean.length);
  }
  const newline = /[\r\n]$/.test(data);
  const other = /^[ \t\r\n]/.test(data) || /[ \t][\r\n]*$/.test(data);
  const what = newline ? (other ? "whitespace and a trailing newline" : "a trailing newline") : "whitespace around it";
  notice.textContent = "Removed " + what + " from the pasted value; it is saved without it.";
  notice.className = "help notice";
  show(notice, true);
}

function forgetPaste(input, notice) {
  delete input.dataset.lead;
  delete input.dataset.trail;
  if (notice) show(notice, false);
}

// What a field sends: a secret pasted with whitespace around it is sent as pasted (see pasted()).
function fieldValue(input) {
  if (input.value === "") return "";
  return (input.dataset.lead || "") + input.value + (input.dataset.trail || "");
}

function pickConnector(c) {
  state.connector = c;
  $("add-connector").textContent = c.name;
  const fields = $("add-fields");
  fields.replaceChildren();
  for (const f of c.fields || []) {
    if (f.secret) {
      fields.append(...secretInput(f, "field-"));
    } else {
      const [label, input] = labelled("field-" + f.name, fieldLabel(f), textInput(f.name, f.default));
      input.required = !!f.required;
      fields.append(label, input);
    }
    if (f.description) fields.append(text("p", f.description, "help"));
  }
  const envs = environmentNames(c);
  environmentOptions($("add-environment"), envs, false, envs[0] || "");
  // A connector without a base URL of its own (the generic ones) takes the connection's.
  $("add-base-url-label").textContent = c.base_url ? "Base URL (optional)" : "Base URL";
  $("add-base-url").required = !c.base_url;
  $("add-base-url").value = "";
  $("add-base-url").placeholder = c.base_url || "the service's URL, with https";
  $("add-name").value = "";
  $("add-id").value = "";
  $("add-expires").value = "";
  show($("verdict"), false);
  show($("add-form"), true);
  const first = fields.querySelector("input");
  if (first) first.focus();
}

function verdict(kind, lines) {
  const v = $("verdict");
  v.className = kind;
  v.replaceChildren(...lines.filter(Boolean).map((l) => text("p", l)));
  show(v, true);
}

async function save(ev) {
  ev.preventDefault();
  const c = state.connector;
  const fields = {};
  for (const i of document.querySelectorAll("#add-fields input")) {
    if (i.value !== "") fields[i.name] = i.dataset.secret ? fieldValue(i) : i.value;
  }
  const body = {
    id: $("add-id").value.trim(),
    name: $("add-name").value.trim(),
    connector: c.id,
    fields,
    verify: true,
  };
  const env = $("add-environment").value;
  if (env) body.environment = env;
  const base = $("add-base-url").value.trim();
  if (base) body.base_url = base;
  const exp = $("add-expires").value;
  if (exp) body.expires_at = endOfDay(exp);
  // What was typed in a secret field leaves the page with this request and nowhere else.
  clearSecrets();
  verdict("", ["Saving and verifying ..."]);
  const res = await api("POST", "/v1/connections", body);
  if (res.ok) {
    const d = res.data || {};
    const v = d.verification;
    const status = d.connection && d.connection.status;
    verdict("passed", [
      "Saved " + body.id + ": " + (STATUS_WORDS[status] || status || "saved") + ".",
      v && v.message, v && v.hint,
      ...((d.connection && d.connection.warnings) || []),
      ...(d.notices || []),
    ]);
    loadConnections();
  } else {
    const e = (res.data && res.data.error) || {};
    const v = e.verification;
    verdict("refused", [
      "Not saved: " + (e.message || "latchkey answered " + res.status),
      e.field ? "Field: " + e.field : "",
      v && v.message && !(e.message || "").includes(v.message) ? v.message : "",
      v && v.hint,
    ]);
  }
}

async function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("filter").addEventListener("input", render);
  $("refresh").addEventListener("click", loadConnections);
  $("add").addEventListener("click", openAdd);
  $("catalog-search").addEventListener("input", renderCatalog);
  $("add-form").addEventListener("submit", save);
  $("rotate-form").addEventListener("submit", rotate);
  $("rotate-cancel").addEventListener("click", closeRotate);
  $("edit-form").addEventListener("submit", saveEdit);
  $("edit-cancel").addEventListener("click", closeEdit);
  $("add-cancel").addEventListener("click", () => { clearSecrets(); view("list"); loadConnections(); });
  let session = null;
  try {
    const r = await fetch("/session", { headers: { Accept: "application/json" }, cache: "no-store" });
    session = r.ok ? await r.json() : null;
  } catch (_) {
    session = null;
  }
  if (session && session.signed_in) signedIn(session); else signedOut();
}

document.addEventListener("DOMContentLoaded", start);
