/* curvd dashboard, the training-monitor panel (Cockpit-style): a grid of small
 * time-series plots over model versions from GET /v1/models/{name}/history,
 * with hover values, a shared zoom on the version axis, CSV/JSON export and a
 * permalink (#model=NAME&monitor=ID&lr=ETA&from=V&to=V).  Uses app.js's
 * helpers (window.curvd.lib); plain SVG, no external resources. */
'use strict';

(function () {
  const { el, sv, fmt, frame, pathOf, PALETTE, isNum } = window.curvd.lib;
  const api = window.curvd.api;
  const $ = (sel) => document.querySelector(sel);

  /* The cells.  series: instruments drawn as lines; hline: a threshold;
   * eos: the 2/η line from the learning rate; hist: a histogram of an
   * instrument's values over the versions shown. */
  const CELLS = [
    { id: 'loss', title: 'loss', series: ['loss'] },
    { id: 'gradient_norm', title: 'gradient norm ‖ḡ‖', series: ['gradient_norm'] },
    { id: 'alpha', title: 'α (step position on the parabola)', series: ['alpha', 'alpha_fit'], hline: { y: 0, label: 'α = 0' } },
    { id: 'alpha_hist', title: 'α histogram', hist: 'alpha' },
    { id: 'distance', title: 'distance from init, update size', series: ['distance_from_init', 'update_size'] },
    { id: 'tests', title: 'gradient tests (threshold 1)', series: ['norm_test', 'inner_product_test', 'orthogonality_test'], hline: { y: 1, label: 'threshold 1' } },
    { id: 'gsnr', title: 'mean GSNR', series: ['mean_gsnr'] },
    { id: 'tic', title: 'TIC', series: ['tic_trace', 'tic_diag'] },
    { id: 'trace', title: 'Hessian trace', series: ['hessian_trace'] },
    { id: 'lmax', title: 'λmax (Hessian)', series: ['hessian_max_eigenvalue'], eos: true },
  ];
  const CELL_W = 380, CELL_H = 210;

  const mon = {
    model: '', monitor: '', lr: null, xr: null,  // the view (the permalink's fields)
    monitors: [], entries: [], stamp: '',       // the monitor list and the shown monitor's entries
    hover: null, drag: null, urls: [], seq: 0,
  };

  // ---- the view and the permalink -------------------------------------------------

  function viewHash() {
    const q = ['model=' + encodeURIComponent(mon.model)];
    if (mon.monitor) q.push('monitor=' + encodeURIComponent(mon.monitor));
    if (isNum(mon.lr)) q.push('lr=' + mon.lr);
    if (mon.xr) q.push('from=' + mon.xr[0], 'to=' + mon.xr[1]);
    return '#' + q.join('&');
  }
  function publishView() {
    const card = $('#monitor-card');
    card.setAttribute('data-view', JSON.stringify({ model: mon.model, monitor: mon.monitor, lr: mon.lr, from: mon.xr ? mon.xr[0] : null, to: mon.xr ? mon.xr[1] : null }));
    $('#mon-permalink').setAttribute('href', viewHash());
  }

  /* Sets the view a permalink names: {model, monitor, lr, from, to} (strings). */
  function setView(p) {
    mon.model = p.model || '';
    mon.monitor = p.monitor || '';
    mon.lr = p.lr !== undefined && p.lr !== '' && isFinite(+p.lr) && +p.lr > 0 ? +p.lr : null;
    mon.xr = p.from !== undefined && p.to !== undefined && isFinite(+p.from) && isFinite(+p.to) && +p.to > +p.from ? [+p.from, +p.to] : null;
    $('#mon-lr').value = mon.lr === null ? '' : String(mon.lr);
    mon.stamp = '';
  }
  /* Opens it: the panel scrolled into view. */
  async function open(p) {
    setView(p);
    await refresh();
    $('#monitor-card').scrollIntoView();
  }

  // ---- data ----------------------------------------------------------------------

  async function pickModel() {
    const models = ((await api('GET', '/v1/models')).models || []).map((m) => m.name);
    fillSelect($('#mon-model'), models);
    if (mon.model) return;
    for (const m of models) {
      const l = await api('GET', '/v1/models/' + encodeURIComponent(m) + '/monitors');
      if ((l.monitors || []).length) { mon.model = m; return; }
    }
    mon.model = models[0] || '';
  }

  function fillSelect(sel, names, labels) {
    const same = sel.options.length === names.length && names.every((n, i) => sel.options[i].value === n && sel.options[i].textContent === (labels ? labels[i] : n));
    if (!same) sel.replaceChildren(...names.map((n, i) => el('option', { value: n, text: labels ? labels[i] : n })));
  }

  async function refresh() {
    const seq = ++mon.seq; // a newer refresh (a permalink opened, a select changed) wins
    await pickModel();
    if (seq !== mon.seq) return;
    if (!mon.model) { render('no models'); return; }
    $('#mon-model').value = mon.model;
    let list;
    try {
      list = (await api('GET', '/v1/models/' + encodeURIComponent(mon.model) + '/monitors')).monitors || [];
    } catch (e) {
      if (seq === mon.seq) render('cannot read the monitors of ' + mon.model + ': ' + e.message);
      return;
    }
    if (seq !== mon.seq) return;
    mon.monitors = list;
    fillSelect($('#mon-id'), list.map((m) => m.id), list.map((m) => m.id + ' · ' + m.dataset + ' · every ' + m.every));
    if (!list.some((m) => m.id === mon.monitor)) mon.monitor = list.length ? list[0].id : '';
    $('#mon-id').value = mon.monitor;
    const m = list.find((x) => x.id === mon.monitor);
    if (!m) { mon.entries = []; render('no monitor on ' + mon.model + ' (POST /v1/models/' + mon.model + '/monitors)'); return; }
    const stamp = m.id + ':' + m.runs + ':' + m.history_entries;
    if (stamp !== mon.stamp) {
      const h = await api('GET', '/v1/models/' + encodeURIComponent(mon.model) + '/history?monitor=' + encodeURIComponent(m.id));
      if (seq !== mon.seq) return;
      mon.entries = h.history || [];
      mon.stamp = stamp;
      render();
    } else {
      publishView();
    }
  }

  // ---- export --------------------------------------------------------------------

  function names() {
    const out = [];
    for (const e of mon.entries) for (const k of Object.keys(e.instruments || {})) if (!out.includes(k)) out.push(k);
    return out;
  }
  function csvText() {
    const cols = names();
    const q = (s) => (/[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s);
    const rows = [['monitor', 'version', 'time', 'job', 'skipped', 'error'].concat(cols).join(',')];
    for (const e of mon.entries) {
      const ins = e.instruments || {};
      rows.push([e.monitor, e.version, e.time, e.job, e.skipped, e.error ? q(e.error.code + ': ' + e.error.message) : '']
        .concat(cols.map((c) => (isNum(ins[c]) ? String(ins[c]) : ''))).join(','));
    }
    return rows.join('\n') + '\n';
  }
  function jsonText() {
    return JSON.stringify({ model: mon.model, monitor: mon.monitor, history: mon.entries }, null, 1) + '\n';
  }
  function setExports() {
    for (const u of mon.urls) URL.revokeObjectURL(u);
    mon.urls = [];
    const base = (mon.model + '-' + mon.monitor).replace(/[^A-Za-z0-9._-]/g, '_');
    for (const [id, text, type, ext] of [['#mon-csv', csvText(), 'text/csv', 'csv'], ['#mon-json', jsonText(), 'application/json', 'json']]) {
      const u = URL.createObjectURL(new Blob([text], { type }));
      mon.urls.push(u);
      $(id).setAttribute('href', u);
      $(id).setAttribute('download', base + '-history.' + ext);
    }
  }

  // ---- the grid ------------------------------------------------------------------

  function shown() {
    const ok = mon.entries.filter((e) => e.instruments);
    return mon.xr ? ok.filter((e) => e.version >= mon.xr[0] && e.version <= mon.xr[1]) : ok;
  }
  function xRange(list) {
    if (mon.xr) return mon.xr.slice();
    if (!list.length) return [0, 1];
    const lo = list[0].version, hi = list[list.length - 1].version;
    return lo === hi ? [lo - 0.5, hi + 0.5] : [lo, hi];
  }
  // the plotted x range: the versions shown, padded so the end points are whole
  function padded(x0, x1) {
    const p = (x1 - x0) * 0.03;
    return [x0 - p, x1 + p];
  }

  function render(msg) {
    const grid = $('#mon-grid');
    publishView();
    setExports();
    const sub = $('#mon-sub');
    const list = shown();
    sub.textContent = mon.monitor ? mon.entries.length + ' entries' + (mon.xr ? ' · versions ' + mon.xr[0] + '–' + mon.xr[1] + ' shown' : '') : '';
    if (msg || !mon.entries.length) {
      grid.replaceChildren(el('p', { class: 'muted', text: msg || 'no history yet: the monitor adds an entry per monitored version' }));
      return;
    }
    const [x0, x1] = padded(...xRange(list));
    grid.replaceChildren(...CELLS.map((c) => cell(c, list, x0, x1)));
  }

  function yRange(vals) {
    let lo = Infinity, hi = -Infinity;
    for (const v of vals) if (isNum(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (!isFinite(lo)) return [0, 1];
    if (lo === hi) { const d = Math.abs(lo) * 0.1 || 1; return [lo - d, hi + d]; }
    const p = (hi - lo) * 0.08;
    return [lo - p, hi + p];
  }

  function cell(c, list, x0, x1) {
    const box = el('div', { class: 'mon-cell', 'data-cell': c.id });
    if (c.hist) return histCell(c, box, list);
    const vals = [];
    for (const e of list) for (const s of c.series) vals.push(e.instruments[s]);
    const extra = [];
    if (c.hline) extra.push(c.hline.y);
    const eos = c.eos && isNum(mon.lr) ? 2 / mon.lr : null;
    const dataMax = Math.max(-Infinity, ...vals.filter(isNum));
    const eosShown = eos !== null && (!isFinite(dataMax) || eos <= 5 * Math.abs(dataMax) || !vals.some(isNum));
    if (eosShown) extra.push(eos);
    const [lo, hi] = yRange(vals.concat(extra));
    const f = frame({ op: 'monitor-' + c.id, cls: 'mon', width: CELL_W, height: CELL_H, margin: { l: 58, r: 10, t: 8, b: 34 },
      x: { lo: x0, hi: x1, label: 'version', integer: true }, y: { lo, hi } });
    f.svg.setAttribute('data-x', x0 + ',' + x1);
    const head = el('div', { class: 'mon-head' }, el('b', { text: c.title }));
    const clip = 'clip-' + c.id;
    f.svg.appendChild(sv('defs', {}, sv('clipPath', { id: clip }, sv('rect', { x: f.m.l, y: f.m.t, width: f.W - f.m.l - f.m.r, height: f.H - f.m.t - f.m.b }))));
    f.plot.setAttribute('clip-path', 'url(#' + clip + ')');
    if (c.hline && c.hline.y >= lo && c.hline.y <= hi) {
      f.plot.appendChild(sv('line', { class: 'threshold', x1: f.m.l, x2: f.W - f.m.r, y1: f.sy(c.hline.y), y2: f.sy(c.hline.y), 'data-y': c.hline.y },
        sv('title', { text: c.hline.label })));
    }
    if (eosShown) {
      f.plot.appendChild(sv('line', { class: 'threshold eos', x1: f.m.l, x2: f.W - f.m.r, y1: f.sy(eos), y2: f.sy(eos), 'data-y': eos },
        sv('title', { text: '2/η = ' + fmt(eos, 6) })));
      head.appendChild(el('span', { class: 'key eos', text: '2/η = ' + fmt(eos, 4) }));
    } else if (eos !== null) {
      head.appendChild(el('span', { class: 'key eos', text: '2/η = ' + fmt(eos, 4) + ' (above)' }));
    } else if (c.eos) {
      head.appendChild(el('span', { class: 'key muted', text: 'learning rate not set: no 2/η line' }));
    }
    c.series.forEach((name, si) => {
      const color = PALETTE[si % PALETTE.length];
      const pts = list.filter((e) => isNum(e.instruments[name])).map((e) => [e.version, e.instruments[name]]);
      if (c.series.length > 1 || !pts.length) head.appendChild(el('span', { class: 'key', style: 'color:' + color, text: '● ' + name + (pts.length ? '' : ' (none)') }));
      if (!pts.length) return;
      f.plot.appendChild(sv('path', { class: 'series', d: pathOf(pts.map(([x, y]) => [f.sx(x), f.sy(y)])), fill: 'none', stroke: color, 'stroke-width': 1.6, 'data-name': name, 'data-points': pts.length }));
      if (pts.length <= 300) {
        const g = sv('g', { class: 'points', 'data-name': name });
        for (const [x, y] of pts) g.appendChild(sv('circle', { class: 'pt', cx: f.sx(x).toFixed(2), cy: f.sy(y).toFixed(2), r: 2.6, fill: color, 'data-version': x, 'data-value': y }));
        f.plot.appendChild(g);
      }
    });
    const cursor = sv('line', { class: 'cursor', x1: 0, x2: 0, y1: f.m.t, y2: f.H - f.m.b, visibility: 'hidden' });
    const band = sv('rect', { class: 'band', x: 0, y: f.m.t, width: 0, height: f.H - f.m.t - f.m.b, visibility: 'hidden' });
    f.svg.appendChild(cursor);
    f.svg.appendChild(band);
    interact(f, c, list, x0, x1, cursor, band);
    box.append(head, f.svg);
    return box;
  }

  function histCell(c, box, list) {
    const vals = list.map((e) => e.instruments[c.hist]).filter(isNum);
    const head = el('div', { class: 'mon-head' }, el('b', { text: c.title }), el('span', { class: 'key', text: vals.length + ' values' }));
    const bins = 12;
    let [lo, hi] = vals.length ? [Math.min(...vals), Math.max(...vals)] : [-1, 1];
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    const counts = new Array(bins).fill(0);
    for (const v of vals) counts[Math.min(bins - 1, Math.floor((v - lo) / (hi - lo) * bins))]++;
    const f = frame({ op: 'monitor-' + c.id, cls: 'mon', width: CELL_W, height: CELL_H, margin: { l: 58, r: 10, t: 8, b: 34 },
      x: { lo, hi, label: c.hist }, y: { lo: 0, hi: Math.max(1, ...counts) * 1.1, integer: true } });
    const w = (hi - lo) / bins;
    counts.forEach((n, i) => {
      if (!n) return;
      const a = f.sx(lo + i * w), b = f.sx(lo + (i + 1) * w);
      f.plot.appendChild(sv('rect', { class: 'bar', x: a + 0.5, width: Math.max(1, b - a - 1), y: f.sy(n), height: f.sy(0) - f.sy(n), fill: PALETTE[0], 'data-count': n },
        sv('title', { text: fmt(lo + i * w, 3) + ' … ' + fmt(lo + (i + 1) * w, 3) + ': ' + n })));
    });
    if (lo < 0 && hi > 0) f.plot.appendChild(sv('line', { class: 'threshold', x1: f.sx(0), x2: f.sx(0), y1: f.m.t, y2: f.H - f.m.b }, sv('title', { text: 'α = 0' })));
    box.append(head, f.svg);
    return box;
  }

  // ---- hover and zoom ---------------------------------------------------------------

  function interact(f, c, list, x0, x1, cursor, band) {
    const svg = f.svg;
    const toVersion = (ev) => {
      const r = svg.getBoundingClientRect();
      const px = (ev.clientX - r.left) * f.W / r.width;
      return x0 + (px - f.m.l) / (f.W - f.m.l - f.m.r) * (x1 - x0);
    };
    const nearest = (v) => {
      let best = null;
      for (const e of list) if (!best || Math.abs(e.version - v) < Math.abs(best.version - v)) best = e;
      return best;
    };
    svg.addEventListener('mousemove', (ev) => {
      const v = toVersion(ev);
      if (mon.drag && mon.drag.svg === svg) {
        const a = f.sx(Math.max(x0, Math.min(mon.drag.v, v))), b = f.sx(Math.min(x1, Math.max(mon.drag.v, v)));
        band.setAttribute('x', a);
        band.setAttribute('width', Math.max(0, b - a));
        band.setAttribute('visibility', 'visible');
      }
      const e = nearest(v);
      if (!e) return;
      cursor.setAttribute('x1', f.sx(e.version));
      cursor.setAttribute('x2', f.sx(e.version));
      cursor.setAttribute('visibility', 'visible');
      showTip(ev, c, e);
    });
    svg.addEventListener('mouseleave', () => {
      cursor.setAttribute('visibility', 'hidden');
      $('#mon-tip').hidden = true;
    });
    svg.addEventListener('mousedown', (ev) => {
      ev.preventDefault();
      mon.drag = { svg, v: toVersion(ev) };
    });
    svg.addEventListener('mouseup', (ev) => {
      const d = mon.drag;
      mon.drag = null;
      band.setAttribute('visibility', 'hidden');
      if (!d || d.svg !== svg) return;
      const v = toVersion(ev);
      const a = Math.max(x0, Math.min(d.v, v)), b = Math.min(x1, Math.max(d.v, v));
      if ((b - a) / (x1 - x0) < 0.02) return; // a click, not a drag
      zoomTo(Math.round(a), Math.round(b));
    });
    svg.addEventListener('wheel', (ev) => {
      ev.preventDefault();
      const [u0, u1] = xRange(shown());
      const v = Math.max(u0, Math.min(u1, toVersion(ev)));
      if (ev.deltaY < 0) zoomTo(Math.ceil(v - (v - u0) * 0.7), Math.floor(v + (u1 - v) * 0.7));
      else zoomTo(Math.floor(v - (v - u0) * 1.5 - 1), Math.ceil(v + (u1 - v) * 1.5 + 1));
    }, { passive: false });
    svg.addEventListener('dblclick', resetZoom);
  }

  function zoomTo(a, b) {
    const all = mon.entries.filter((e) => e.instruments);
    if (!all.length) return;
    const lo = all[0].version, hi = all[all.length - 1].version;
    a = Math.max(lo, a);
    b = Math.min(hi, b);
    if (!(b > a)) return;
    mon.xr = a <= lo && b >= hi ? null : [a, b];
    $('#mon-tip').hidden = true;
    render();
  }
  function resetZoom() {
    mon.xr = null;
    render();
  }

  function showTip(ev, c, e) {
    const tip = $('#mon-tip');
    const rows = c.series.map((s) => el('div', { class: 'tip-row', 'data-name': s, 'data-value': isNum(e.instruments[s]) ? e.instruments[s] : '' },
      el('span', { text: s + ' ' }), el('b', { text: fmt(e.instruments[s], 6) })));
    tip.replaceChildren(el('div', { class: 'tip-head', text: 'version ' + e.version + (e.skipped ? ' (' + e.skipped + ' skipped before)' : '') }), ...rows);
    tip.setAttribute('data-version', e.version);
    tip.setAttribute('data-cell', c.id);
    tip.hidden = false;
    const card = $('#monitor-card').getBoundingClientRect();
    tip.style.left = (ev.clientX - card.left + 14) + 'px';
    tip.style.top = (ev.clientY - card.top + 14) + 'px';
  }

  // ---- start ---------------------------------------------------------------------------

  function loop(fn, ms) {
    const run = async () => {
      try { await fn(); } catch (e) { /* the next poll retries */ }
      setTimeout(run, document.hidden ? ms * 4 : ms);
    };
    run();
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('#mon-model').addEventListener('change', () => { mon.model = $('#mon-model').value; mon.monitor = ''; mon.xr = null; mon.stamp = ''; refresh(); });
    $('#mon-id').addEventListener('change', () => { mon.monitor = $('#mon-id').value; mon.xr = null; mon.stamp = ''; refresh(); });
    $('#mon-lr').addEventListener('change', () => {
      const v = +$('#mon-lr').value;
      mon.lr = $('#mon-lr').value.trim() !== '' && isFinite(v) && v > 0 ? v : null;
      render();
    });
    $('#mon-reset').addEventListener('click', resetZoom);
    const p = window.curvd.lib.hashParams();
    if (p.model) setView(p);
    loop(refresh, 2000);
    if (p.model) setTimeout(() => $('#monitor-card').scrollIntoView(), 300);
    window.addEventListener('hashchange', () => { const q = window.curvd.lib.hashParams(); if (q.model) open(q); });
  });

  window.curvd.monitor = { state: mon, open, csvText, jsonText, refresh };
})();
