// Open a study in OHIF (served by tests/support/ohif.py) in the system's headless Chromium, open its
// SR, step through its findings with the viewport's arrows, then open the Grad-CAM series and the
// PDF; print one JSON line with what was shown, and write screenshots. Nothing here downloads a
// browser.
//
//   node ohif_check.mjs '{"baseUrl": ..., "studyUid": ..., "srDescription": ..., "scDescription": ...,
//                         "scSeriesUid": ..., "points": {trackingUid: [column, row]},
//                         "pdfDescription": ..., "maxFindings": N,
//                         "screenshots": DIR, "chromium": "/usr/bin/chromium", "userDataDir": DIR}'
import { chromium } from 'playwright-core';
import path from 'node:path';

const args = JSON.parse(process.argv[2]);
const shot = name => path.join(args.screenshots, name);
const report = { pageErrors: [], consoleErrors: [], notifications: [], findings: [], timings: {} };
const started = Date.now();
const mark = name => { report.timings[name] = (Date.now() - started) / 1000; console.error(`${report.timings[name]} s: ${name}`); };

const context = await chromium.launchPersistentContext(args.userDataDir, {
  executablePath: args.chromium,
  headless: true,
  viewport: { width: 1440, height: 900 },
  args: ['--no-sandbox', '--disable-gpu', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
});
const page = context.pages()[0] ?? await context.newPage();
page.on('pageerror', error => report.pageErrors.push(String(error.stack || error).slice(0, 2000)));
page.on('console', message => {
  if (message.type() === 'error' && report.consoleErrors.length < 20) report.consoleErrors.push(message.text().slice(0, 500));
});

/** What the active viewport shows: its image, the SR annotations' text boxes, the ellipses drawn
 *  (canvas pixels), and where each expected point (image pixels, args.points) falls on the canvas. */
const viewportState = () => page.evaluate(points => {
  const { getRenderingEngines, utilities } = window.cornerstone;
  const viewport = getRenderingEngines()[0]?.getViewports()[0];
  const imageId = viewport?.getCurrentImageId?.() ?? null;
  const drawn = [...document.querySelectorAll('svg.svg-layer [data-annotation-uid]')].map(group => ({
    uid: group.getAttribute('data-annotation-uid'),
    text: [...group.querySelectorAll('tspan')].map(t => t.textContent).filter(Boolean),
  }));
  const ellipses = [...document.querySelectorAll('svg.svg-layer ellipse')].map(e => ({
    cx: Number(e.getAttribute('cx')), cy: Number(e.getAttribute('cy')), rx: Number(e.getAttribute('rx')),
  }));
  const expected = {};
  for (const { uid } of drawn) {
    if (imageId && points[uid]) expected[uid] = viewport.worldToCanvas(utilities.imageToWorldCoords(imageId, points[uid]));
  }
  const presentation = viewport?.getViewPresentation?.() ?? {};
  return {
    imageId, drawn, ellipses, expected,
    rotation: presentation.rotation ?? null,
    flipHorizontal: presentation.flipHorizontal ?? null,
    flipVertical: presentation.flipVertical ?? null,
  };
}, args.points ?? {});

const notifications = () => page.evaluate(() => ({
  toasts: [...document.querySelectorAll('[data-sonner-toast]')].map(t => ({ type: t.getAttribute('data-type'), text: t.innerText })),
  wentWrong: document.body.innerText.includes('Something went wrong'),
}));

const thumbnail = description => page.locator('[data-cy="series-description-label"]', { hasText: description }).first();

try {
  await page.goto(`${args.baseUrl}/viewer?StudyInstanceUIDs=${args.studyUid}`);
  await thumbnail(args.srDescription).waitFor({ timeout: 60000 });
  mark('seriesListed');
  await page.waitForFunction(() => window.cornerstone?.getRenderingEngines?.()[0]?.getViewports?.()[0]?.getCurrentImageId?.(),
    null, { timeout: 60000 });
  mark('firstImage');
  const tour = page.getByText('Skip all');  // OHIF's first-visit tour, over the whole page
  if (await tour.first().waitFor({ timeout: 5000 }).then(() => true, () => false)) await tour.first().click();
  await page.waitForTimeout(300);
  await page.screenshot({ path: shot('01-study.png') });

  await thumbnail(args.srDescription).dblclick();
  await page.waitForFunction(() => document.querySelectorAll('svg.svg-layer ellipse').length > 0,
    null, { timeout: 60000 });
  mark('srShown');
  await page.waitForTimeout(500);
  await page.screenshot({ path: shot('02-sr-first-finding.png') });

  // What the SR put into the viewer: every finding as an annotation on its image.
  report.annotations = await page.evaluate(() => window.cornerstoneTools.annotation.state.getAllAnnotations()
    .filter(a => a.metadata.toolName === 'DICOMSRDisplay')
    .map(a => ({ uid: a.annotationUID, imageId: a.metadata.referencedImageId })));

  // The viewport's arrows step through the findings (OHIF 3.13.2 moves only within the series
  // shown: a finding on another series logs "No image URI found" and the view stays).
  const next = page.locator('[data-cy="viewport-action-arrows-right"]');
  const key = state => JSON.stringify(state.drawn.map(d => d.uid)) + state.imageId;
  let unchanged = 0;  // steps in a row that showed nothing new: 3 end the walk
  for (let i = 0; i < args.maxFindings && unchanged < 3; i++) {
    const state = await viewportState();
    const seen = report.findings.some(f => key(f) === key(state));
    unchanged = seen ? unchanged + 1 : 0;
    report.findings.push(state);
    console.error(`${(Date.now() - started) / 1000} s: step ${i} ${state.drawn.map(d => d.uid).join(',')}`);
    if (i === 0) await page.locator('[data-cy="viewport-pane"]').first().screenshot({ path: shot('03-sr-finding-viewport.png') });
    if (!(await next.count())) break;
    await next.click();
    await page.waitForFunction(b => {
      const uids = [...document.querySelectorAll('svg.svg-layer [data-annotation-uid]')].map(g => g.getAttribute('data-annotation-uid'));
      const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
      return uids.length > 0 && JSON.stringify(uids) + vp.getCurrentImageId() !== b;
    }, key(state), { timeout: 1000 }).catch(() => {});
    await page.waitForTimeout(100);
    if (i === 2) await page.screenshot({ path: shot('04-sr-third-step.png') });
  }
  mark('findingsStepped');
  report.afterSr = await notifications();

  await thumbnail(args.scDescription).dblclick();
  await page.waitForFunction(s => {
    const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    return (vp.getCurrentImageId() || '').includes(`/series/${s}/`);
  }, args.scSeriesUid, { timeout: 60000 });
  await page.waitForTimeout(1500);
  mark('scShown');
  report.sc = await viewportState();
  report.sc.corners = await page.evaluate(() => {  // the image's corners on the canvas (CSS pixels)
    const { getRenderingEngines, utilities, metaData } = window.cornerstone;
    const viewport = getRenderingEngines()[0].getViewports()[0];
    const imageId = viewport.getCurrentImageId();
    const { rows, columns } = metaData.get('imagePixelModule', imageId);
    return [[0, 0], [columns, rows]].map(p => viewport.worldToCanvas(utilities.imageToWorldCoords(imageId, p)));
  });
  await page.screenshot({ path: shot('05-heatmaps.png') });
  await page.locator('[data-cy="viewport-pane"] canvas').first().screenshot({ path: shot('06-heatmap-canvas.png') });
  report.afterSc = await notifications();

  if (args.pdfDescription) {  // the PDF summary: OHIF shows it in the viewport (its dicom-pdf extension)
    await thumbnail(args.pdfDescription).dblclick();
    await page.waitForFunction(() => document.querySelector('[data-cy="viewport-pane"] object, [data-cy="viewport-pane"] iframe, [data-cy="viewport-pane"] embed'),
      null, { timeout: 30000 });
    await page.waitForTimeout(1500);
    mark('pdfShown');
    report.pdf = await page.evaluate(() => {
      const element = document.querySelector('[data-cy="viewport-pane"] object, [data-cy="viewport-pane"] iframe, [data-cy="viewport-pane"] embed');
      return { tag: element.tagName, type: element.getAttribute('type'), src: (element.getAttribute('data') || element.getAttribute('src') || '').slice(0, 200) };
    });
    await page.screenshot({ path: shot('07-pdf.png') });
    report.afterPdf = await notifications();
  }
} catch (error) {
  report.failure = String(error.stack || error).slice(0, 3000);
  await page.screenshot({ path: shot('99-failure.png') }).catch(() => {});
  report.atFailure = await notifications().catch(() => null);
} finally {
  await context.close();
}
console.log(JSON.stringify(report));
