// Drives the page of a running `talaria serve` in headless Chromium: chat with streaming, stop,
// regenerate, edit, thumbs, a comparison and both labelling tasks, then screenshots.
// Usage: node page.mjs http://127.0.0.1:PORT SCREENSHOT.png [API_KEY]
// With API_KEY (a server started with --api-key), the page must ask for it exactly once.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, shot, apiKey] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "talaria-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1100, height: 900 },
});
context.setDefaultTimeout(60000);
const page = context.pages()[0] || await context.newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(e.message));
let asked = 0;
page.on("dialog", async (d) => {
  asked += 1;
  await d.accept(apiKey || "");
});
const streams = [];
page.on("response", (r) => {
  if (r.url().endsWith("/v1/chat/completions")) streams.push(r.headers()["content-type"]);
});

function check(ok, what) {
  if (!ok) throw new Error(`page check failed: ${what}`);
  console.log(`ok: ${what}`);
}

const idle = () => page.waitForFunction(() => !document.querySelector(".msg.streaming") && !document.querySelector("#send").disabled);

try {
  await page.goto(url);
  await page.waitForFunction(() => document.querySelector("#model").textContent.includes("context"));
  check(true, "page loaded and shows the model");

  // Count how often the answer's text changes while it streams.
  await page.evaluate(() => {
    window.__updates = 0;
    new MutationObserver((records) => { window.__updates += records.length; })
      .observe(document.querySelector("#messages"), { subtree: true, characterData: true, childList: true });
  });
  await page.click("#settings summary");
  await page.fill("#max-tokens", "200");
  await page.fill("#input", "Hello, model!");
  await page.click("#send");
  await idle();
  const answer = await page.textContent(".msg.assistant .content");
  const updates = await page.evaluate(() => window.__updates);
  check(answer.length > 0, `a streamed answer arrived (${answer.length} characters)`);
  check(streams[0] === "text/event-stream", `the page asked for a stream and got ${streams[0]}`);
  check(updates > 1, `the answer was shown piece by piece (${updates} updates of the page)`);

  await page.click(".msg.assistant .thumb-up");
  await page.waitForFunction(() => document.querySelector("#chat-status").textContent.includes("Saved thumbs up"));
  check(true, "thumbs up saved");

  await page.click("#regenerate");
  await idle();
  check(await page.locator(".msg.assistant").count() === 1, "regenerate replaced the answer");

  await page.fill("#max-tokens", "500");
  await page.fill("#input", "Tell me a long story.");
  // Press Stop while the answer is still on its way (the tiny test model is too quick to catch).
  await page.evaluate(() => { document.querySelector("#send").click(); document.querySelector("#stop").click(); });
  await idle();
  const note = await page.locator(".msg.assistant").last().textContent();
  check(await page.locator(".msg").count() === 4 && note.includes("(stopped)"), "stop ended the second answer and kept the turn");

  await page.fill("#max-tokens", "60");
  await page.locator(".msg.user .edit").first().click();
  await page.fill(".msg.user textarea", "Hello again, edited!");
  await page.click("text=Save & resend");
  await idle();
  const users = await page.locator(".msg.user .content").allTextContents();
  check(users.length === 1 && users[0] === "Hello again, edited!", "editing the first turn restarted the chat from it");
  await page.screenshot({ path: shot, fullPage: true });

  await page.click("button.tab[data-view=compare]");
  await page.fill("#cmp-prompt", "Which is better?");
  for (let attempt = 0; attempt < 10; attempt++) {
    await page.click("#cmp-run");
    await page.waitForFunction(() => !document.querySelector("#cmp-run").disabled);
    if (await page.isEnabled("#cmp-choose-a")) break;
  }
  const [a, b] = [await page.textContent("#cmp-a"), await page.textContent("#cmp-b")];
  const status = await page.textContent("#cmp-status");
  check(a.length > 0 && b.length > 0 && a !== b, `two different answers side by side ${JSON.stringify([a, b, status])}`);
  await page.click("#cmp-choose-a");
  await page.waitForFunction(() => document.querySelector("#cmp-status").textContent.includes("Saved comparison"));
  check(true, "comparison saved");
  await page.screenshot({ path: shot.replace(/\.png$/, "-compare.png"), fullPage: true });

  await page.click("button.tab[data-view=label]");
  await page.fill("#lab-prompt", "Name a colour.");
  await page.fill("#lab-ideal", "Blue.");
  await page.click("#lab-submit-demo");
  await page.waitForFunction(() => document.querySelector("#lab-status").textContent.includes("Saved demonstration"));
  check(true, "demonstration saved");
  await page.fill("#lab-k", "3");
  await page.click("#lab-sample");
  await page.waitForFunction(() => !document.querySelector("#lab-submit-rank").disabled);
  await page.locator("#lab-list li button", { hasText: "↓" }).first().click();
  await page.click("#lab-submit-rank");
  await page.waitForFunction(() => document.querySelector("#lab-status").textContent.includes("Saved ranking"));
  check(true, "ranking saved");

  check(errors.length === 0, `no JavaScript errors ${JSON.stringify(errors)}`);
  if (apiKey) check(asked === 1, `the page asked for the API key once (asked ${asked} times)`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
