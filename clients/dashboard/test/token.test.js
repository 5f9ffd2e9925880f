// token.test.js - the dashboard against a daemon that requires a token
// (curvd serve --generate-token / --auth-token-file).
//
// Usage: node token.test.js BASE_URL TOKEN
// (run by tests/e2e_dashboard.sh, like dashboard.test.js.)  1. The page
// opened as BASE/#token=TOKEN loads the models table, sends
// "Authorization: Bearer TOKEN" with its API calls and removes the token from
// the address bar.  2. Opened without it, the page asks for the token on the
// first 401 (a prompt, answered here) and then loads.  Ends with 'N passed,
// M failed'.
'use strict';
const { chromium } = require('playwright-core');

const BASE = process.argv[2];
const TOKEN = process.argv[3];
const results = { passed: 0, failed: 0 };
function check(name, ok, detail) {
  if (ok) results.passed++;
  else { results.failed++; console.log('FAIL', name, detail === undefined ? '' : detail); }
  if (process.env.VERBOSE && ok) console.log('ok  ', name);
}

async function modelsListed(page) {
  await page.waitForFunction(() => Array.from(document.querySelectorAll('#models tbody td.mono'))
    .some((t) => t.textContent === 'demo-mlp'), null, { timeout: 15000 });
  return true;
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run'],
  });
  try {
    // 1. #token= link
    const page = await browser.newPage();
    const auth = [];
    page.on('request', (r) => { if (r.url().includes('/v1/')) auth.push(r.headers().authorization || ''); });
    let prompted = 0;
    page.on('dialog', (d) => { prompted++; d.dismiss(); });
    await page.goto(BASE + '/#token=' + encodeURIComponent(TOKEN), { waitUntil: 'load', timeout: 15000 });
    check('#token= link: models table loads', await modelsListed(page).catch(() => false));
    check('#token= link: every API call carries the token', auth.length > 0 && auth.every((a) => a === 'Bearer ' + TOKEN),
      JSON.stringify(auth.slice(0, 5)));
    check('#token= link: no prompt', prompted === 0, prompted);
    check('#token= link: the token leaves the address bar', !page.url().includes(TOKEN), page.url());
    await page.close();

    // 2. no token: a prompt on the first 401
    const ctx = await browser.newContext();
    const p2 = await ctx.newPage();
    let asked = 0;
    p2.on('dialog', (d) => { asked++; d.accept(TOKEN); });
    await p2.goto(BASE + '/', { waitUntil: 'load', timeout: 15000 });
    check('no token: the page asks once and then loads', await modelsListed(p2).catch(() => false) && asked === 1, asked);
    await ctx.close();
  } catch (e) {
    check('token test run', false, e && e.stack ? e.stack : String(e));
  } finally {
    await browser.close();
  }
  console.log(`${results.passed} passed, ${results.failed} failed`);
  process.exit(results.failed ? 1 : 0);
})();
