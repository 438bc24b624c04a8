// The web page at its edges, in Debian's Chromium (headless), for tests/e2e/web.rs: a connector
// with no base URL of its own, environments known only by base URL, a name no screen is wide
// enough for, an edit of a connection that has no environment, latchkey out of reach, and a
// session that ends under a write. Environment: LATCHKEY_ADMIN, ADMIN_TOKEN, KEY (a key for the
// generic connection), BASE_URL (its upstream). Prints one JSON line.
import { chromium } from "playwright-core";

const base = process.env.LATCHKEY_ADMIN;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox"],
});
// Uncaught errors and rejections only: the aborted requests below are meant to fail.
const out = { page_errors: [], writes: [] };
const deadline = setTimeout(() => {
  console.error("web_edges.mjs: no end after 90 s: " + JSON.stringify(out));
  process.exit(2);
}, 90_000);
const LONG = "n".repeat(3000);
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  const page = await context.newPage();
  page.on("pageerror", (e) => out.page_errors.push(e.message));
  page.on("request", (r) => {
    if (["POST", "PATCH"].includes(r.method()) && r.url().includes("/v1/connections")) {
      out.writes.push({ method: r.method(), path: new URL(r.url()).pathname, body: r.postData() });
    }
  });
  const signIn = async () => {
    await page.getByLabel("Admin token").fill(process.env.ADMIN_TOKEN);
    await page.keyboard.press("Enter");
    await page.waitForSelector("#connections-view:not([hidden])");
  };
  const options = (sel) => page.locator(sel + " option").evaluateAll((os) => os.map((o) => [o.value, o.textContent]));
  const status = () => page.locator("#action-status").innerText();
  await page.goto(base + "/");
  await page.waitForSelector("#sign-in-view:not([hidden])");
  await signIn();

  // A generic connector: the connection gives the base URL, and there is no environment.
  await page.getByRole("button", { name: "+ Add connection" }).click();
  await page.getByLabel("Find a connector").fill("bearer token");
  await page.getByRole("button", { name: "Any API: bearer token" }).click();
  await page.waitForSelector("#add-form:not([hidden])");
  out.generic_form = {
    base_url_label: await page.locator("#add-base-url-label").innerText(),
    base_url_shown: await page.locator("#add-base-url").isVisible(),
    base_url_required: await page.locator("#add-base-url").evaluate((i) => i.required),
    environments: await options("#add-environment"),
    key_autocomplete: await page.locator("#add-fields input[data-secret]").first().getAttribute("autocomplete"),
  };
  // Pasted as a terminal and an indenting editor hand it over: spaces before, a newline after.
  const key = page.locator("#add-fields input[data-secret]").first();
  await key.focus();
  await page.evaluate((t) => navigator.clipboard.writeText(t), "  " + process.env.KEY + "\n");
  await page.keyboard.press("Control+V");
  out.paste = {
    trimmed: (await key.inputValue()) === process.env.KEY,
    notice: await page.locator("#add-fields .notice").first().innerText(),
  };
  await page.getByLabel("Name", { exact: true }).fill(LONG);
  await page.getByLabel("Connection ID").fill("edge-generic");
  await page.getByLabel("Base URL", { exact: true }).fill(process.env.BASE_URL);
  await page.getByRole("button", { name: "Save" }).click();
  await page.waitForSelector("#verdict.passed, #verdict.refused");
  out.generic_verdict = await page.locator("#verdict").innerText();

  // Square tells sandbox from production by base URL alone: both are offered.
  await page.getByLabel("Find a connector").fill("square");
  await page.getByRole("button", { name: /^Square/ }).click();
  out.square_environments = await options("#add-environment");

  // The list, with the 3,000-character name, on a 1280 px screen: no row is pushed off it.
  await page.getByRole("button", { name: "Back to connections" }).click();
  await page.waitForSelector('#connections-body tr[data-id="edge-generic"]');
  out.list = await page.evaluate(() => {
    const wrap = document.querySelector(".table-wrap");
    const verify = document.querySelector('button[aria-label="Verify edge-generic"]').getBoundingClientRect();
    return {
      wrap_overflow: wrap.scrollWidth - wrap.clientWidth,
      page_overflow: document.documentElement.scrollWidth - window.innerWidth,
      verify_right: verify.right,
      width: window.innerWidth,
    };
  });

  // An edit that changes the name alone sends the name alone.
  await page.getByRole("button", { name: "Edit edge-generic", exact: true }).click();
  out.edit_form = {
    environment: await page.locator("#edit-environment").inputValue(),
    environments: await options("#edit-environment"),
    base_url: await page.locator("#edit-base-url").inputValue(),
  };
  await page.locator("#edit-form").getByLabel("Name", { exact: true }).fill("Generic, renamed");
  await page.getByRole("button", { name: "Save changes" }).click();
  await page.waitForSelector("#action-status.passed, #action-status.refused");
  out.edit_status = await status();

  // latchkey out of reach: the verdict says so, in words, instead of waiting forever.
  await page.route("**/v1/connections/*/verify", (route) => route.abort("connectionrefused"));
  await page.getByRole("button", { name: "Verify edge-generic", exact: true }).click();
  await page.waitForSelector("#action-status.refused", { timeout: 10_000 });
  out.unreachable_status = await status();
  await page.unroute("**/v1/connections/*/verify");

  // The session ends (expired, or signed out elsewhere) before a write: back to the sign-in,
  // which says why.
  await context.clearCookies();
  await page.getByRole("button", { name: "Verify edge-generic", exact: true }).click();
  await page.waitForSelector("#sign-in-view:not([hidden])");
  out.session_ended = {
    note: await page.locator("#sign-in-error").innerText(),
    note_shown: await page.locator("#sign-in-error").isVisible(),
  };
  await signIn();
  out.signed_in_again_note_shown = await page.locator("#sign-in-error").isVisible();
} catch (e) {
  out.failure = e.message;
} finally {
  await browser.close();
}
clearTimeout(deadline);
console.log(JSON.stringify(out));
