// The web page over HTTPS (admin.tls_cert), in Debian's Chromium, headless, for
// tests/e2e/admin_tls.rs: sign in, see the list, sign out. Environment: LATCHKEY_ADMIN (the
// https base URL), ADMIN_TOKEN. The test's certificate is from a CA of its own, which this
// browser is told to accept. Prints one JSON line.
import { chromium } from "playwright-core";

const base = process.env.LATCHKEY_ADMIN;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox"],
});
const out = { problems: [] };
const deadline = setTimeout(() => {
  console.error("web_tls.mjs: no end after 60 s: " + JSON.stringify(out));
  process.exit(2);
}, 60_000);
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error") out.problems.push("console: " + m.text());
  });
  page.on("pageerror", (e) => out.problems.push("page error: " + e.message));
  await page.goto(base + "/");
  await page.waitForSelector("#sign-in-view:not([hidden])");
  out.protocol = await page.evaluate(() => performance.getEntriesByType("navigation")[0].nextHopProtocol);
  await page.getByLabel("Admin token").fill(process.env.ADMIN_TOKEN);
  await page.keyboard.press("Enter");
  await page.waitForSelector("#connections-view:not([hidden])");
  await page.waitForLoadState("networkidle");
  out.who = await page.locator("#who-name").innerText();
  out.cookies = (await context.cookies()).map((c) => ({ name: c.name, secure: c.secure, httpOnly: c.httpOnly, sameSite: c.sameSite }));
  out.script_sees_cookie = await page.evaluate(() => document.cookie);
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.waitForSelector("#sign-in-view:not([hidden])");
  await page.reload();
  await page.waitForSelector("#sign-in-view:not([hidden])");
  out.signed_out = !(await page.locator("#connections-view").isVisible());
} catch (e) {
  out.failure = e.message;
} finally {
  await browser.close();
}
clearTimeout(deadline);
console.log(JSON.stringify(out));
