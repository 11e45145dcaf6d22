// Drive Label Studio's labeling page like an annotator: headless Debian Chromium (never a
// downloaded browser) + playwright-core. Logs in, opens a task, switches on Auto-Annotation,
// picks the smart KeyPoint label, places one KeyPoint at an image pixel and waits for the ML
// backend's brush suggestion. Writes a screenshot and a JSON report; exits non-zero when a step
// fails (the report then names the step).
//
//   node click_keypoint.mjs '<json params>'
//
// params: url, email, password, project, task, label, x, y (pixel of the original image),
//   screenshot, result (paths), optional: chromium (/usr/bin/chromium), timeoutMs (per step,
//   60000), width/height (viewport, 1400x1000), clicksHeader ("Clicks": the Header text right
//   before the smart KeyPointLabels in the label config).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const p = JSON.parse(process.argv[2] || '{}');
for (const k of ['url', 'email', 'password', 'project', 'task', 'label', 'x', 'y', 'screenshot', 'result']) {
  if (p[k] === undefined) { console.error(`click_keypoint.mjs: missing parameter "${k}"`); process.exit(2); }
}
const T = p.timeoutMs ?? 60000;
const t0 = Date.now();
const report = { step: 'start', ok: false, timings_s: {}, log: [] };
const log = (...a) => {
  const line = `[${((Date.now() - t0) / 1000).toFixed(1)} s] ${a.join(' ')}`;
  report.log.push(line);
  console.log(line);
};
const step = (name) => { report.step = name; report.timings_s[name] = +((Date.now() - t0) / 1000).toFixed(2); log('step:', name); };
const save = () => fs.writeFileSync(p.result, JSON.stringify(report, null, 1));

fs.mkdirSync(path.dirname(path.resolve(p.screenshot)), { recursive: true });
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'adclick-chromium-'));
let context;
let page;
try {
  step('launch');
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: p.chromium || '/usr/bin/chromium',
    headless: true, // playwright adds --headless
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: p.width || 1400, height: p.height || 1000 },
    timeout: T,
  });
  context.setDefaultTimeout(T);
  page = context.pages()[0] || await context.newPage();
  page.on('pageerror', (e) => log('page error:', String(e).slice(0, 300)));
  report.browser = context.browser()?.version() ?? null;

  step('login');
  await page.goto(`${p.url}/user/login`);
  await page.fill('input[name=email]', p.email);
  await page.fill('input[name=password]', p.password);
  await Promise.all([
    page.waitForURL((u) => !u.pathname.startsWith('/user/login')),
    page.click('button[type=submit], input[type=submit]'),
  ]);

  step('open task');
  await page.goto(`${p.url}/projects/${p.project}/data?task=${p.task}`);
  await page.waitForFunction(() => {
    const img = document.querySelector('img[alt=image]');
    const lsf = window.dataManager?.lsf;
    return img && img.complete && img.naturalWidth > 0 && lsf?.currentAnnotation && lsf?.task;
  });
  report.opened_task = await page.evaluate(() => window.dataManager.lsf.task.id);
  if (report.opened_task !== p.task) throw new Error(`the page shows task ${report.opened_task}, not ${p.task}`);

  step('auto-annotation');
  // The toggle exists only when the project has an ML backend with Interactive preannotations.
  const toggle = page.locator('.lsf-dynamic-preannotations input[type=checkbox]').first();
  await toggle.waitFor({ state: 'attached' });
  report.auto_annotation_was_on = await toggle.isChecked();
  if (!report.auto_annotation_was_on) await page.locator('.lsf-dynamic-preannotations label').first().click();
  await page.waitForFunction(() => window.dataManager.lsf.lsf?.autoAnnotation === true);
  report.auto_annotation = await toggle.isChecked();

  step('pick smart label');
  const header = p.clicksHeader ?? 'Clicks';
  const label = page.locator(`:text-is("${header}") + .lsf-labels .lsf-label:has(.lsf-label__text:text-is("${p.label}"))`);
  if (await label.count() !== 1) throw new Error(`no single label "${p.label}" after the header "${header}"`);
  await label.click();
  await page.waitForFunction((el) => el.classList.contains('lsf-label_selected'), await label.elementHandle());

  step('smart keypoint tool');
  // Auto-Annotation adds a toolbar group (tooltip "Auto-Detect", hotkey M) whose hover menu holds
  // the smart variants; picking the label selects the plain KeyPoint tool, whose points are not
  // sent to the backend.
  const smartGroup = page.locator('.lsf-toolbar__group > button.lsf-tool_smart').first();
  await smartGroup.hover();
  const smartKp = page.locator('.lsf-toolbar__smart button.lsf-tool_smart[aria-label="key-point-tool"]').first();
  await smartKp.click();
  await page.waitForFunction((el) => el.classList.contains('lsf-tool_active'), await smartKp.elementHandle());
  // The hover menu stays open over the image's right edge until the pointer leaves it.
  await page.mouse.move(5, (page.viewportSize().height / 2) | 0);
  await page.locator('.lsf-toolbar__smart').first().waitFor({ state: 'hidden' });

  step('click');
  const img = page.locator('img[alt=image]').first();
  await img.evaluate((e) => e.scrollIntoView({ block: 'center', inline: 'center' }));
  await page.waitForTimeout(300);
  const box = await img.boundingBox();
  const [nw, nh] = await img.evaluate((e) => [e.naturalWidth, e.naturalHeight]);
  const vp = page.viewportSize();
  // The image is shown scaled: pixel (x, y) -> its centre inside the element's box.
  const cx = box.x + ((p.x + 0.5) / nw) * box.width;
  const cy = box.y + ((p.y + 0.5) / nh) * box.height;
  report.click = { pixel: [p.x, p.y], natural: [nw, nh], box, page: [cx, cy], viewport: vp };
  if (!(cx > 0 && cy > 0 && cx < vp.width && cy < vp.height)) throw new Error(`click ${cx},${cy} is outside the viewport`);
  // What is under the pointer must be the image's drawing canvas, not a menu or a tooltip.
  const under = await page.evaluate(([x, y]) => {
    const el = document.elementFromPoint(x, y);
    return { tag: el?.tagName ?? null, inKonva: !!el?.closest('.konvajs-content') };
  }, [cx, cy]);
  report.click.under = under;
  if (!under.inKonva) throw new Error(`the point ${cx},${cy} is covered by <${under.tag}>, not the image canvas`);
  const regionsBefore = await page.evaluate(() => window.dataManager.lsf.currentAnnotation.regions.length);
  const answer = page.waitForResponse((r) => r.url().includes('/interactive-annotating') && r.request().method() === 'POST');
  await page.mouse.click(cx, cy);
  const resp = await answer;
  report.request = JSON.parse(resp.request().postData() || '{}');
  report.response_status = resp.status();
  const body = await resp.json();
  report.response_errors = body.errors ?? null;
  report.response_result = body.data?.result ?? null;
  log('interactive-annotating ->', resp.status(), `${(report.response_result || []).length} result(s)`);

  step('suggestion shown');
  // The answer becomes a suggestion of the current annotation (not yet a region); the bottom bar
  // shows "N suggestions" with accept / reject buttons.
  await page.waitForFunction(() => window.dataManager.lsf.currentAnnotation.suggestions.size > 0);
  report.suggestions = await page.evaluate(() => Array.from(window.dataManager.lsf.currentAnnotation.suggestions.values())
    .map((r) => ({ type: r.type, from_name: r.results?.[0]?.from_name?.name ?? null, labels: r.labels ?? null })));
  const bar = page.getByText(/^\d+ suggestions?$/).first();
  await bar.waitFor({ state: 'visible' });
  report.suggestion_bar = (await bar.textContent()).trim();
  report.regions = await page.evaluate(() => window.dataManager.lsf.currentAnnotation.regions.map((r) => ({
    type: r.type, dynamic: r.dynamic, labels: r.labels ?? null })));
  report.regions_before = regionsBefore;

  step('screenshot');
  await page.mouse.move(2, vp.height - 2); // no hover effects over the image
  await page.waitForTimeout(1500); // the brush layer is drawn on a canvas after the store update
  await page.screenshot({ path: p.screenshot });
  report.screenshot = p.screenshot;
  step('done');
  report.ok = true;
} catch (e) {
  report.error = String(e && e.stack ? e.stack : e).slice(0, 3000);
  log('FAILED at', report.step, ':', String(e).split('\n')[0]);
  if (page) {
    const failShot = p.screenshot.replace(/\.png$/, '') + '-failure.png';
    try { await page.screenshot({ path: failShot, timeout: 15000 }); report.failure_screenshot = failShot; } catch { /* ignore */ }
  }
} finally {
  report.seconds = +((Date.now() - t0) / 1000).toFixed(2);
  save();
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(report.ok ? 0 : 1);
