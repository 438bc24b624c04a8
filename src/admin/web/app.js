// latchkey's connections page. No framework, no build step, nothing loaded from elsewhere.
// The admin token is sent once, to /session, and never kept; the session is an HttpOnly cookie
// and the CSRF token lives only in this script's memory.
"use strict";

const state = { csrf: null, connections: [] };

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
  const r = await fetch(path, init);
  let data = null;
  if (r.status !== 204) {
    try { data = await r.json(); } catch (_) { data = null; }
  }
  if (r.status === 401) signedOut();
  return { status: r.status, ok: r.ok, data };
}

function errorText(res) {
  const e = res.data && res.data.error;
  return e && e.message ? e.message : "latchkey answered " + res.status;
}

function signedIn(session) {
  state.csrf = session.csrf;
  $("who-name").textContent = "Signed in as " + session.admin;
  show($("who"), true);
  show($("sign-in-view"), false);
  show($("connections-view"), true);
  loadConnections();
}

function signedOut() {
  state.csrf = null;
  state.connections = [];
  $("connections-body").replaceChildren();
  show($("who"), false);
  show($("connections-view"), false);
  show($("sign-in-view"), true);
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
  const r = await fetch("/session", {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
    body: form.toString(),
    credentials: "same-origin",
    cache: "no-store",
  });
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

function statusCell(c) {
  const td = document.createElement("td");
  td.dataset.label = "Status";
  const word = STATUS_WORDS[c.status] || c.status || "Unknown";
  td.append(text("span", word, "status status-" + (c.status || "unknown")));
  if (c.verified_at) td.append(text("span", "last verified " + when(c.verified_at), "detail verified"));
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
      cell("Environment", c.environment), statusCell(c));
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

async function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("filter").addEventListener("input", render);
  $("refresh").addEventListener("click", loadConnections);
  const r = await fetch("/session", { headers: { Accept: "application/json" }, cache: "no-store" });
  let session = null;
  try { session = r.ok ? await r.json() : null; } catch (_) { session = null; }
  if (session && session.signed_in) signedIn(session); else signedOut();
}

document.addEventListener("DOMContentLoaded", start);
