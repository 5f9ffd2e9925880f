// dashboard.test.js - drives the curvd dashboard in headless Chromium.
//
// Usage: node dashboard.test.js BASE_URL SCREENSHOT.png
// (run by tests/e2e_dashboard.sh, which starts the daemon and installs
// playwright-core; NODE_PATH points at its node_modules.)  Uses Debian's
// chromium ($CHROMIUM, default /usr/bin/chromium).  Opens the page, checks
// the models/datasets tables, submits a density job from the form, waits
// for the SVG plot and checks that it has drawn content, takes a screenshot,
// then does the same for the eigenvalue, per-layer trace and SNR presets and
// an invalid job (the server's error is shown); the op and curvature selects
// are GET /v1/ops's lists, and the form follows op_specs (opSpecForm).  Every request must go to the
// daemon (the page works offline).  Ends with 'N passed, M failed'.
'use strict';
const { chromium } = require('playwright-core');

const BASE = process.argv[2];
const SHOT = process.argv[3] || 'dashboard.png';
const results = { passed: 0, failed: 0 };
function check(name, ok, detail) {
  if (ok) results.passed++;
  else { results.failed++; console.log('FAIL', name, detail === undefined ? '' : detail); }
  if (process.env.VERBOSE && ok) console.log('ok  ', name);
}

async function submitPreset(page, preset, extra) {
  await page.click(`[data-preset="${preset}"]`);
  await page.selectOption('#model', 'demo-mlp');
  await page.selectOption('#dataset', 'digits');
  if (extra) await extra(page);
  const before = await page.$$eval('#jobs tbody tr[data-id]', (r) => r.length);
  await page.click('#submit');
  await page.waitForFunction((n) => document.querySelectorAll('#jobs tbody tr[data-id]').length > n, before, { timeout: 10000 });
}

// The form from GET /v1/ops op_specs: the options hint, no curvature for ops
// that read none, blocks "layer" only for blockwise ops.
// The first GET /v1/ops fails: the form says so and loads the ops on retry.
async function opSpecForm(browser, table) {
  const body = table;
  check('GET /v1/ops has op_specs', !!table.op_specs, Object.keys(table));
  const page = await browser.newPage({ viewport: { width: 1360, height: 1000 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  let calls = 0;
  await page.route(BASE + '/v1/ops', (route) => (++calls === 1 ? route.fulfill({ status: 503, contentType: 'application/json',
    body: '{"error":{"code":"shutting_down","message":"not now","field":""}}' }) : route.fulfill({ json: body })));
  try {
    await page.goto(BASE + '/', { waitUntil: 'load', timeout: 15000 });
    await page.waitForSelector('body[data-ready="1"]', { timeout: 15000 });
    const hint0 = await page.$eval('#op-hint', (e) => e.textContent);
    const n0 = await page.$$eval('#op option', (o) => o.length);
    check('GET /v1/ops failing: no ops of our own, the form says so', n0 === 0 && /cannot read the ops/.test(hint0), n0 + ' ' + hint0);
    await page.waitForFunction((n) => document.querySelectorAll('#op option').length === n, body.ops.length, { timeout: 10000 });
    check('ops loaded on retry', calls >= 2, calls);
    const form = async (op) => {
      await page.selectOption('#op', op);
      return page.evaluate(() => ({ hint: document.querySelector('#op-hint').textContent,
        curvature: !document.querySelector('#curvature').disabled,
        layer: !document.querySelector('#blocks option[value="layer"]').disabled }));
    };
    const eigen = await form('eigen');
    check('eigen hint lists its options from op_specs', /which \(largest\|smallest\|magnitude\)/.test(eigen.hint) &&
      /threshold \(number 0\.\.1e9; method gram\)/.test(eigen.hint) && eigen.curvature && eigen.layer, JSON.stringify(eigen));
    await page.selectOption('#blocks', 'layer');
    const loss = await form('loss');
    check('loss: no curvature, no "layer" blocks, "No options."', !loss.curvature && !loss.layer && /No options\./.test(loss.hint) &&
      (await page.$eval('#blocks', (b) => b.value)) === 'full', JSON.stringify(loss));
    const grad = await form('gradient');
    check('gradient: no curvature, "layer" blocks', !grad.curvature && grad.layer, JSON.stringify(grad));
    const mv = await form('matvec');
    check('matvec: curvature, no "layer" blocks', mv.curvature && !mv.layer && /probe_seed \(integer 0\.\.9e15\)/.test(mv.hint),
      JSON.stringify(mv));
    // the job sent for an op without curvature has none, even if one was chosen before
    await page.selectOption('#op', 'density');
    await page.selectOption('#curvature', 'ggn');
    await page.selectOption('#op', 'loss');
    await page.selectOption('#model', 'demo-mlp');
    await page.selectOption('#dataset', 'digits');
    const [req] = await Promise.all([page.waitForRequest((r) => r.url().startsWith(BASE + '/v1/jobs') && r.method() === 'POST'),
      page.click('#submit')]);
    const sent = JSON.parse(req.postData());
    check('loss job sent without curvature', sent.op === 'loss' && !('curvature' in sent), req.postData());
    check('no page errors (op_specs form)', errors.length === 0, errors.join(' | '));
  } catch (e) {
    check('op_specs form', false, e && e.stack ? e.stack : String(e));
  } finally {
    await page.close();
  }
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-dev-shm-usage'],
  });
  const page = await browser.newPage({ viewport: { width: 1360, height: 1000 } });
  const foreign = [], consoleErrors = [], pageErrors = [];
  page.on('request', (r) => {
    const u = r.url();
    if (!u.startsWith(BASE) && !u.startsWith('data:')) foreign.push(u);
  });
  page.on('console', (m) => {
    // the refused job's 400 answer is logged by Chromium as a failed resource: expected
    if (m.type() === 'error' && !/status of 4\d\d/.test(m.text())) consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  try {
    const resp = await page.goto(BASE + '/', { waitUntil: 'load', timeout: 15000 });
    check('GET / is 200 text/html', resp.status() === 200 && /text\/html/.test(resp.headers()['content-type']),
      resp.status() + ' ' + resp.headers()['content-type']);
    await page.waitForSelector('body[data-ready="1"]', { timeout: 15000 });
    check('title', (await page.title()).includes('curvd'));
    const models = await page.$$eval('#models tbody td.mono', (t) => t.map((x) => x.textContent));
    check('models table lists demo-mlp', models.includes('demo-mlp'), models);
    const datasets = await page.$$eval('#datasets tbody td.mono', (t) => t.map((x) => x.textContent));
    check('datasets table lists digits', datasets.includes('digits'), datasets);
    const ops = await page.$$eval('#op option', (o) => o.map((x) => x.value));
    check('op list from /v1/ops', ['density', 'eigen', 'trace', 'snr'].every((o) => ops.includes(o)), ops);
    const table = await page.evaluate(async () => (await fetch('/v1/ops')).json());
    check('op select == GET /v1/ops ops', JSON.stringify(ops) === JSON.stringify(table.ops), ops.join() + ' vs ' + table.ops);
    const curvs = await page.$$eval('#curvature option', (o) => o.map((x) => x.value));
    check('curvature select == GET /v1/ops curvatures', JSON.stringify(curvs) === JSON.stringify([''].concat(table.curvatures)),
      curvs.join() + ' vs ' + table.curvatures);
    await page.waitForSelector('#health .chip.ok', { timeout: 10000 });
    const chip = await page.$eval('#health .chip.ok', (e) => e.textContent);
    const health = await page.evaluate(async () => (await fetch('/v1/health')).json());
    check('health chip shows the daemon\'s status and version', health.status === 'ok' &&
      chip === 'ok · v' + health.version, chip + ' vs ' + JSON.stringify(health));

    // ---- a density job from the form
    await page.selectOption('#op', 'density');
    await page.selectOption('#model', 'demo-mlp');
    await page.selectOption('#dataset', 'digits');
    await page.selectOption('#curvature', 'hessian');
    await page.fill('#options', '{"lanczos_steps": 60, "runs": 1, "grid_points": 160}');
    await page.click('#submit');
    const plot = await page.waitForSelector('#plot svg.plot[data-op="density"] path.series', { timeout: 30000 });
    check('density plot appears', !!plot);
    const info = await page.$eval('#plot svg.plot[data-op="density"] path.series', (p) => {
      const b = p.getBBox();
      return { d: p.getAttribute('d'), points: +p.getAttribute('data-points'), len: p.getTotalLength(), w: b.width, h: b.height,
        extended: p.getAttribute('data-extended').split(',').map(Number) };
    });
    const segs = (info.d.match(/L/g) || []).length;
    // the grid's points plus the curve continued beyond both ends (the padded x range)
    check('density path has the grid points', info.points === 160 && segs === 159 + info.extended[0] + info.extended[1] &&
      info.extended[0] > 0 && info.extended[1] > 0, info.points + ' points, ' + segs + ' segments, ' + info.extended);
    check('density path has drawn content', info.len > 200 && info.w > 300 && info.h > 50, JSON.stringify({ len: info.len, w: info.w, h: info.h }));
    const rug = await page.$$eval('#plot svg .rug line', (l) => l.length);
    check('Ritz values drawn', rug > 10, rug);
    const ticks = await page.$$eval('#plot svg .axis text', (t) => t.length);
    check('axes have tick labels', ticks > 8, ticks);
    const row = await page.$eval('#jobs tbody tr.selected', (r) => ({ st: r.getAttribute('data-status'), text: r.textContent }));
    check('submitted job selected and succeeded in the job list', row.st === 'succeeded' && /density/.test(row.text), JSON.stringify(row));
    const sum = await page.$eval('#summary', (s) => s.textContent);
    check('summary shows the result fields', /lanczos_steps/.test(sum) && /matvecs/.test(sum), sum.slice(0, 200));
    // the log-scale toggle redraws the plot
    await page.click('#logscale');
    await page.waitForSelector('#plot svg.plot[data-op="density"] path.series');
    const ylabel = await page.$$eval('#plot svg .axis text', (t) => t.map((x) => x.textContent).join('|'));
    check('log toggle switches to a linear axis', /\|density\|?/.test(ylabel + '|') && !/density \(log\)/.test(ylabel), ylabel.slice(-80));
    await page.click('#logscale');
    await page.waitForSelector('#plot svg.plot[data-op="density"] path.series');
    await page.screenshot({ path: SHOT, fullPage: true });
    check('screenshot written', require('fs').statSync(SHOT).size > 10000);

    // ---- eigenvalues preset
    await submitPreset(page, 'eigen', (p) => p.fill('#options', '{"k": 8}'));
    await page.waitForSelector('#plot svg.plot[data-op="eigen"] circle.point', { timeout: 30000 });
    const stems = await page.$$eval('#plot svg.plot[data-op="eigen"] circle.point', (c) => c.length);
    check('eigenvalue stems (k=8)', stems === 8, stems);
    await page.screenshot({ path: SHOT.replace(/\.png$/, '-eigen.png'), fullPage: false });

    // ---- per-layer trace preset
    await submitPreset(page, 'trace-layer', (p) => p.fill('#options', '{"max_probes": 20}'));
    await page.waitForSelector('#plot svg.plot[data-op="trace"] rect.bar', { timeout: 30000 });
    const bars = await page.$$eval('#plot svg.plot[data-op="trace"] rect.bar', (r) => r.map((x) => +x.getAttribute('height')));
    check('per-layer trace bars (2 layers with parameters)', bars.length === 2 && bars.every((h) => h > 1), JSON.stringify(bars));
    const errbars = await page.$$eval('#plot svg.plot[data-op="trace"] path.errorbar', (r) => r.length);
    check('trace error bars', errbars === 2, errbars);
    const cats = await page.$$eval('#plot svg.plot[data-op="trace"] .axis text', (t) => t.map((x) => x.textContent));
    check('trace bars labelled by module name and type, parameter names under them',
      cats.includes('0 · Linear(64→32)0.weight, 0.bias') && cats.includes('2 · Linear(32→10)2.weight, 2.bias'), cats.join('|'));
    await page.screenshot({ path: SHOT.replace(/\.png$/, '-trace.png'), fullPage: false });

    // ---- SNR preset (fisher_mc curvature chosen by the preset)
    await submitPreset(page, 'snr', (p) => p.fill('#options', '{"k": 4}'));
    await page.waitForSelector('#plot svg.plot[data-op="snr"] rect.bar', { timeout: 40000 });
    const snrBars = await page.$$eval('#plot svg.plot[data-op="snr"] g.series', (g) => g.map((x) => x.querySelectorAll('rect.bar').length));
    check('SNR bars: 2 series x 4 directions', snrBars.length === 2 && snrBars[1] === 4 && snrBars[0] >= 1, JSON.stringify(snrBars));
    const gsnr = await page.$$('#plot svg.plot[data-op="gsnr"] rect.bar');
    check('GSNR per layer plot', gsnr.length === 2, gsnr.length);
    await page.screenshot({ path: SHOT.replace(/\.png$/, '-snr.png'), fullPage: false });

    // ---- per-layer densities: one curve per layer
    await page.selectOption('#op', 'density');
    await page.selectOption('#blocks', 'layer');
    await page.selectOption('#curvature', '');
    await page.fill('#options', '{"lanczos_steps": 30, "grid_points": 80}');
    await page.click('#submit');
    await page.waitForFunction(() => document.querySelectorAll('#plot svg.plot[data-op="density"] path.series').length === 2
      && /blocks/.test(document.querySelector('#summary').textContent), null, { timeout: 30000 });
    const labels = await page.$$eval('#plot svg.plot[data-op="density"] path.series', (p) => p.map((x) => x.getAttribute('data-label')));
    check('per-layer densities: one curve per layer', labels.join() === '0 · Linear(64→32),2 · Linear(32→10)', labels.join());
    await page.screenshot({ path: SHOT.replace(/\.png$/, '-layers.png'), fullPage: false });

    // ---- a dense matrix (canvas heat map) and a vector (gradient) on the small demo model
    await page.selectOption('#blocks', 'full');
    await page.selectOption('#model', 'demo-regression');
    await page.selectOption('#dataset', 'regression');
    await page.selectOption('#op', 'dense');
    await page.fill('#options', '{}');
    await page.click('#submit');
    await page.waitForSelector('#plot canvas[data-op="dense"]', { timeout: 30000 });
    const px = await page.$eval('#plot canvas[data-op="dense"]', (c) => {
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let colored = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] !== 255 || d[i + 1] !== 255 || d[i + 2] !== 255) colored++;
      return { w: c.width, h: c.height, colored };
    });
    check('dense heat map drawn (114x114)', px.w === 114 && px.h === 114 && px.colored > 1000, JSON.stringify(px));
    await page.screenshot({ path: SHOT.replace(/\.png$/, '-dense.png'), fullPage: false });
    await page.selectOption('#op', 'gradient');
    await page.click('#submit');
    await page.waitForSelector('#plot svg.plot[data-op="gradient"] path.series', { timeout: 30000 });
    const grad = await page.$eval('#plot svg.plot[data-op="gradient"]', (svg) => ({
      vertices: (svg.querySelector('path.series').getAttribute('d').match(/[ML]/g) || []).length,
      text: svg.textContent,
    }));
    // demo-regression: Linear(4,16) Tanh Linear(16,2) = 114 parameters, one vertex each
    check('gradient vector plot: one point per parameter (114)', grad.vertices === 114 && /114 entries/.test(grad.text),
      JSON.stringify(grad).slice(0, 300));
    await page.selectOption('#model', 'demo-mlp');
    await page.selectOption('#dataset', 'digits');

    // ---- a job the server refuses: its error message and field are shown
    await page.selectOption('#op', 'eigen');
    await page.fill('#options', '{"k": 3, "bogus_option": 1}');
    await page.click('#submit');
    await page.waitForSelector('#form-error:not([hidden])', { timeout: 10000 });
    const err = await page.$eval('#form-error', (e) => e.textContent);
    check('server error shown with code and field', /bogus_option/.test(err) && /unknown_option/.test(err), err);
    check('options input marked invalid', await page.$eval('#options', (e) => e.classList.contains('invalid')));

    // ---- cancel a long job from the list
    await page.fill('#options', '{"max_probes": 1000000, "tol": 0}');
    await page.selectOption('#op', 'trace');
    await page.selectOption('#blocks', 'full');
    await page.click('#submit');
    await page.waitForSelector('#jobs tbody tr[data-status="running"] button.link', { timeout: 15000 });
    const runningId = await page.$eval('#jobs tbody tr[data-status="running"]', (r) => r.getAttribute('data-id'));
    // live progress: the row's "N% · done/planned" is redrawn from the server's polls
    const doneOnPage = () => page.$eval(`#jobs tbody tr[data-id="${runningId}"] .bar span`,
      (sp) => parseInt(sp.textContent.split('\u00b7')[1], 10));
    const done1 = await doneOnPage();
    await new Promise((res) => setTimeout(res, 3000));
    const done2 = await doneOnPage();
    check('live progress on the page: matvecs done grows while the job runs', done1 >= 0 && done2 > done1,
      `${done1} -> ${done2}`);
    await page.click(`#jobs tbody tr[data-id="${runningId}"] button.link`);
    await page.waitForSelector(`#jobs tbody tr[data-id="${runningId}"][data-status="cancelled"]`, { timeout: 15000 });
    const cancelled = await page.evaluate(async (id) => (await fetch('/v1/jobs/' + id)).json(), runningId);
    check('running job cancelled from the page (server says cancelled)', cancelled.status === 'cancelled' &&
      cancelled.error && cancelled.error.code === 'cancelled' && cancelled.op === 'trace', JSON.stringify(cancelled).slice(0, 300));

    await opSpecForm(browser, table);

    check('no requests outside the daemon (works offline)', foreign.length === 0, foreign.join(' '));
    check('no page errors', pageErrors.length === 0, pageErrors.join(' | '));
    check('no console errors', consoleErrors.length === 0, consoleErrors.join(' | '));
  } catch (e) {
    check('dashboard run', false, e && e.stack ? e.stack : String(e));
    try { await page.screenshot({ path: SHOT.replace(/\.png$/, '-failure.png'), fullPage: true }); } catch (e2) { /* ignore */ }
  } finally {
    await browser.close();
  }
  console.log(`${results.passed} passed, ${results.failed} failed`);
  process.exit(results.failed ? 1 : 0);
})();
