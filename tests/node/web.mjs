// Drives latchkey's web page in Debian's Chromium (headless) with playwright-core, for
// tests/e2e/web.rs. Environment: LATCHKEY_ADMIN (the admin listener's base URL), ADMIN_TOKEN,
// SECRETS (a JSON list of values the page must never hold or receive), FAILED_ID and OK_ID (the
// connections the test made). Prints one JSON line: what each step saw and found.
import { chromium } from "playwright-core";

const base = process.env.LATCHKEY_ADMIN;
const token = process.env.ADMIN_TOKEN;
const secrets = JSON.parse(process.env.SECRETS);
const okId = process.env.OK_ID;
const failedId = process.env.FAILED_ID;

// Each secret as typed and in base64 (a page could hold either).
const forms = secrets.flatMap((s) => {
  const b64 = Buffer.from(s).toString("base64");
  return [s, b64.replace(/=+$/, ""), Buffer.from(s).toString("base64url")];
});

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox"],
});
// Narrow first (a phone, 320 px), wide for the rest and for the screenshots.
const NARROW = { width: 320, height: 720 };
const WIDE = { width: 1100, height: 760 };
const context = await browser.newContext({ viewport: NARROW });
await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
const page = await context.newPage();
const shots = process.env.SCREENSHOTS;

const received = []; // every response the page received: url, status, headers, body
const pending = [];
const problems = []; // console errors (a CSP violation is one), page errors, outside requests
let started = 0; // requests the page made
let ended = 0; // of them, those whose answer was read (or that failed)
page.on("request", (r) => {
  started += 1;
  if (!r.url().startsWith(base)) problems.push("request outside latchkey: " + r.url());
});
// Bodies are read once a request has finished; one that cannot be read within 10 s is a
// problem (the check could not see it), not a hang.
const within = (p, ms, what) => Promise.race([p, new Promise((_, no) => setTimeout(() => no(new Error(what)), ms))]);
page.on("requestfinished", (req) => {
  pending.push((async () => {
    try {
      const r = await within(req.response(), 10_000, "no response");
      if (!r) return;
      // A 204 has no body to read (Chromium keeps none).
      const body = r.status() === 204 ? "" : await within(r.text(), 10_000, "body unread");
      const headers = JSON.stringify(await within(r.allHeaders(), 10_000, "headers unread"));
      received.push({ url: r.url(), status: r.status(), headers, body });
    } catch (e) {
      problems.push("could not read the answer to " + req.method() + " " + req.url() + ": " + e.message);
    }
    ended += 1;
  })());
});
page.on("requestfailed", (req) => {
  problems.push("request failed: " + req.url() + " " + (req.failure() || {}).errorText);
  ended += 1;
});
// An answer's HTTP status is logged as an error by Chromium; the test judges statuses itself.
page.on("console", (m) => {
  if (m.type() === "error" && !m.text().startsWith("Failed to load resource: the server responded with a status of")) {
    problems.push("console: " + m.text());
  }
});
page.on("pageerror", (e) => problems.push("page error: " + e.message));

const steps = [];
let failure = null;
let seen = 0;
// A step that hangs fails the run instead of holding the test forever.
const deadline = setTimeout(() => {
  console.error("web.mjs: no end after 120 s; steps so far: " + JSON.stringify(steps));
  process.exit(2);
}, 120_000);
const log = (m) => console.error("web.mjs: " + m);

// The page's DOM (with every input's current value), its storage, and every response so far.
// Waits until the page has no request in flight and every answer it got has been read: done
// before every check and every navigation (a body is gone once the page navigates away).
async function settle() {
  await page.waitForLoadState("networkidle");
  while (ended !== started) await new Promise((ok) => setTimeout(ok, 20));
}

async function check(step, extra = {}) {
  log("checking after " + step);
  await settle();
  const dom = await page.evaluate(() => {
    const values = [...document.querySelectorAll("input, textarea")].map((i) => i.value);
    return document.documentElement.outerHTML + "\n" + values.join("\n");
  });
  const storage = await page.evaluate(() => {
    const dump = (s) => [...Array(s.length).keys()].map((i) => s.key(i) + "=" + s.getItem(s.key(i))).join("\n");
    return dump(localStorage) + "\n" + dump(sessionStorage);
  });
  const found = [];
  forms.forEach((f, i) => {
    const which = secrets[Math.floor(i / 3)].slice(0, 4) + "…";
    if (dom.includes(f)) found.push("DOM holds " + which);
    if (storage.includes(f)) found.push("storage holds " + which);
    for (const r of received) {
      if (r.body.includes(f) || r.headers.includes(f)) found.push(r.url + " answered with " + which);
    }
  });
  steps.push({ step, found, responses: received.length, new_responses: received.length - seen, dom_has_ok_id: dom.includes(okId), ...extra });
  seen = received.length;
}

const visible = (sel) => page.locator(sel).isVisible();

// Keyboard only: Tab until the focused element is named `name` (its aria-label, else its text);
// how many presses it took.
async function tabTo(name, max = 40) {
  for (let i = 1; i <= max; i++) {
    await page.keyboard.press("Tab");
    const now = await page.evaluate(() => {
      const a = document.activeElement;
      return a ? (a.getAttribute("aria-label") || a.textContent || "").trim() : "";
    });
    if (now === name) return i;
  }
  throw new Error("Tab never reached " + name);
}
const focused = () => page.evaluate(() => (document.activeElement || {}).id || "");

// What a narrow screen must not do: scroll sideways. And every visible input and select has a
// label (or an aria-label), every visible button a name.
const layout = () => page.evaluate(() => {
  const shown = (el) => el.offsetParent !== null;
  const unnamed = [...document.querySelectorAll("input, select, button")].filter(shown).filter((el) =>
    el.tagName === "BUTTON" ? !(el.getAttribute("aria-label") || el.textContent.trim()) :
      !(el.labels && el.labels.length) && !el.getAttribute("aria-label"));
  return {
    width: window.innerWidth,
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    unnamed: unnamed.map((el) => el.outerHTML.slice(0, 80)),
  };
});

// Pastes `value` into the focused input as a person does (the clipboard, then Ctrl+V).
async function paste(value) {
  await page.evaluate((t) => navigator.clipboard.writeText(t), value);
  await page.keyboard.press("Control+V");
}
async function shot(name) {
  if (shots) await page.screenshot({ path: shots + "/" + name + ".png", fullPage: true });
}
const rows = () => page.locator("#connections-body tr").evaluateAll((trs) =>
  trs.map((tr) => ({ id: tr.dataset.id, text: tr.innerText.replace(/\s+/g, " ").trim() })));

try {
  await page.goto(base + "/");
  await page.waitForSelector("#sign-in-view:not([hidden])");
  await check("opened", { sign_in_shown: await visible("#token") });

  // Signed in, on a 320 px screen, with the keyboard alone: the token input has the focus.
  const focusOnLoad = await focused();
  const signInLayout = await layout();
  await page.keyboard.type(token);
  await page.keyboard.press("Enter");
  await page.waitForSelector(`#connections-body tr[data-id="${okId}"]`);
  await page.waitForSelector(`#connections-body tr[data-id="${failedId}"]`);
  // The page's own script, writing without the CSRF token: refused.
  const csrfless = await page.evaluate(async (id) => {
    const r = await fetch("/v1/connections/" + id, { method: "DELETE", credentials: "same-origin" });
    return { status: r.status, body: await r.text() };
  }, okId);
  await check("signed in", {
    who: await page.locator("#who-name").innerText(), rows: await rows(), csrfless,
    focus_on_load: focusOnLoad, sign_in_layout: signInLayout, list_layout: await layout(),
  });

  // Add a connection, still by keyboard: Tab to "+ Add connection", search the catalog, pick.
  const tabsToAdd = await tabTo("+ Add connection");
  await page.keyboard.press("Enter");
  await page.waitForSelector("#add-view:not([hidden]) #catalog button");
  const addFocus = await focused();
  await page.keyboard.type("stripe");
  await tabTo("Stripe");
  await page.keyboard.press("Enter");
  await page.waitForSelector("#add-form:not([hidden])");
  const pickFocus = await focused();
  const addLayout = await layout();
  await page.setViewportSize(WIDE);
  const key = page.locator("#add-fields input[data-secret]").first();
  const notice = page.locator("#add-fields .notice").first();
  // A value with a line break inside is not pasted (the input would glue its lines together).
  await key.focus();
  await paste("sk_test_first_half\nsecond_half");
  const inner = { value: await key.inputValue(), notice: await notice.innerText() };
  // The key as a terminal copies it, with a newline: pasted without it, and the page says so.
  await paste(process.env.NEW_KEY + "\n");
  const pastedOk = (await key.inputValue()) === process.env.NEW_KEY;
  const pasteNotice = await notice.innerText();
  const typeBefore = await key.getAttribute("type");
  const before = started;
  await page.getByRole("button", { name: /^Show / }).click();
  const typeShown = await key.getAttribute("type");
  await page.getByRole("button", { name: /^Hide / }).click();
  const toggleRequests = started - before;
  await page.getByLabel("Environment", { exact: true }).selectOption("sandbox");
  await page.getByLabel("Name", { exact: true }).fill("Web added");
  await page.getByLabel("Connection ID").fill("web-added");
  await page.getByLabel("Base URL (optional)").fill(process.env.SIM_URL);
  await shot("add-form");
  await page.getByRole("button", { name: "Save" }).click();
  await page.waitForSelector("#verdict.passed, #verdict.refused");
  await check("added", {
    key_input_type: typeBefore, shown_type: typeShown, toggle_requests: toggleRequests,
    verdict: await page.locator("#verdict").innerText(),
    keyboard: { tabs_to_add: tabsToAdd, add_focus: addFocus, pick_focus: pickFocus },
    add_layout: addLayout, inner_newline: inner, pasted_ok: pastedOk, paste_notice: pasteNotice,
    notice_after_save: await notice.isVisible(),
  });

  await key.fill(process.env.REJECTED_KEY);
  await page.getByLabel("Connection ID").fill("web-rejected");
  await page.getByRole("button", { name: "Save" }).click();
  await page.waitForSelector("#verdict.passed, #verdict.refused");
  await shot("failed-verification");
  await check("rejected", { verdict: await page.locator("#verdict").innerText() });

  // The other verdicts, each in its own words: a key without the scope the verification needs,
  // a base URL that answers 404, a service that cannot be reached.
  const verdicts = {};
  for (const [what, k, url] of [
    ["scope", process.env.SCOPE_KEY, process.env.SIM_URL],
    ["wrong base URL", process.env.NEW_KEY, process.env.WRONG_URL],
    ["unreachable", process.env.NEW_KEY, process.env.CLOSED_URL],
  ]) {
    await key.fill(k);
    await page.getByLabel("Connection ID").fill(("web-" + what.replace(/ /g, "-")).toLowerCase());
    await page.getByLabel("Base URL (optional)").fill(url);
    await page.getByRole("button", { name: "Save" }).click();
    await page.waitForSelector("#verdict.passed, #verdict.refused");
    verdicts[what] = await page.locator("#verdict").innerText();
  }
  await page.getByLabel("Base URL (optional)").fill(process.env.SIM_URL);
  await check("other verdicts", { verdicts });

  // A sandbox key on a production connection.
  await key.fill(process.env.SANDBOX_KEY);
  await page.getByLabel("Environment", { exact: true }).selectOption("production");
  await page.getByLabel("Connection ID").fill("web-prod");
  await page.getByRole("button", { name: "Save" }).click();
  await page.waitForSelector("#verdict.passed, #verdict.refused");
  await check("sandbox on production", { verdict: await page.locator("#verdict").innerText() });
  await page.getByRole("button", { name: "Back to connections" }).click();
  await page.waitForSelector('#connections-body tr[data-id="web-added"]');

  // Per connection: verify again, rotate (a rejected key first), delete with a confirmation.
  const status = () => page.locator("#action-status").innerText();
  await page.getByRole("button", { name: "Verify " + okId, exact: true }).click();
  await page.waitForSelector("#action-status.passed, #action-status.refused");
  await check("verified", { status: await status() });

  // Edit the non-secret fields: a sandbox key moved to production is refused naming the field;
  // a new name and an expiry inside the warning window are saved, and the row says Expiring.
  await page.getByRole("button", { name: "Edit " + okId, exact: true }).click();
  const editFocus = await focused();
  const editLayout = await layout();
  await page.locator("#edit-form").getByLabel("Environment", { exact: true }).selectOption("production");
  await page.getByRole("button", { name: "Save changes" }).click();
  await page.waitForSelector("#action-status.passed, #action-status.refused");
  await check("edit refused", { status: await status(), edit_focus: editFocus, edit_layout: editLayout });
  await page.getByRole("button", { name: "Edit " + okId, exact: true }).click();
  const secretInputs = await page.locator("#edit-form input[type=password]").count();
  await page.locator("#edit-form").getByLabel("Name", { exact: true }).fill("Payments (sandbox)");
  await page.getByLabel("Key expires on (empty: no expiry)").fill(process.env.EXPIRES_ON);
  await page.getByRole("button", { name: "Save changes" }).click();
  await page.waitForSelector("#action-status.passed, #action-status.refused");
  await page.waitForSelector(`#connections-body tr[data-id="${okId}"] .status-expiring`);
  await check("edited", { status: await status(), rows: await rows(), secret_inputs: secretInputs });

  await page.getByRole("button", { name: "Rotate web-added", exact: true }).click();
  await page.locator("#rotate-fields input[data-secret]").first().fill(process.env.REJECTED_KEY);
  await page.locator("#rotate-form").getByRole("button", { name: "Rotate", exact: true }).click();
  await page.waitForSelector("#action-status.passed, #action-status.refused");
  await check("rotate refused", { status: await status() });

  await page.getByRole("button", { name: "Rotate web-added", exact: true }).click();
  await page.locator("#rotate-fields input[data-secret]").first().fill(process.env.ROTATE_KEY);
  await page.locator("#rotate-form").getByRole("button", { name: "Rotate", exact: true }).click();
  await page.waitForSelector("#action-status.passed, #action-status.refused");
  await shot("list");
  await check("rotated", { status: await status(), form_shown: await visible("#rotate-form") });

  let asked = "";
  page.once("dialog", (d) => { asked = d.message(); d.accept(); });
  await page.getByRole("button", { name: "Delete web-added", exact: true }).click();
  await page.waitForSelector('#connections-body tr[data-id="web-added"]', { state: "detached" });
  await check("deleted", { asked, status: await status() });

  await page.getByLabel("Filter").fill("failed");
  await check("filtered", { rows: await rows() });
  await page.getByLabel("Filter").fill("");

  await settle();
  await page.reload();
  await page.waitForSelector(`#connections-body tr[data-id="${okId}"]`);
  const cookies = await context.cookies();
  await check("reloaded", {
    rows: (await rows()).length,
    cookies: cookies.map((c) => ({ name: c.name, value: c.value, httpOnly: c.httpOnly, sameSite: c.sameSite, secure: c.secure, expires: c.expires, path: c.path })),
    script_sees_cookie: await page.evaluate(() => document.cookie),
  });

  await page.getByRole("button", { name: "Sign out" }).click();
  await page.waitForSelector("#sign-in-view:not([hidden])");
  await settle();
  await page.reload();
  await page.waitForSelector("#sign-in-view:not([hidden])");
  await check("signed out", { rows: (await rows()).length, list_shown: await visible("#connections-view") });
} catch (e) {
  // A step that did not come: the steps so far and what the page showed go to the test, which
  // fails with them in view.
  failure = e.message + "\nverdict: " + (await page.locator("#verdict").innerText().catch(() => "")) +
    "\naction status: " + (await page.locator("#action-status").innerText().catch(() => ""));
} finally {
  await browser.close();
}
clearTimeout(deadline);
console.log(JSON.stringify({ steps, problems, failure, urls: [...new Set(received.map((r) => r.url.slice(base.length)))] }));
