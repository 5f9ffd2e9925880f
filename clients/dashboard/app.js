/* curvd dashboard - plain JavaScript, no build step, no external resources.
 *
 * Polls the daemon's /v1 API (same origin): health, models, datasets and the
 * job list with live progress; submits jobs from the form; draws results as
 * SVG (spectral density, eigenvalues, per-layer traces, SNR per direction,
 * vectors) or canvas (dense matrices). */
'use strict';

(function () {
  // ---- small helpers --------------------------------------------------------

  const $ = (sel, el) => (el || document).querySelector(sel);
  const SVGNS = 'http://www.w3.org/2000/svg';

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    append(e, kids);
    return e;
  }
  function sv(tag, attrs, ...kids) {
    const e = document.createElementNS(SVGNS, tag);
    setAttrs(e, attrs);
    append(e, kids);
    return e;
  }
  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') e.textContent = v;
      else if (k === 'onclick') e.addEventListener('click', v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
  }
  function append(e, kids) {
    for (const k of kids.flat()) {
      if (k === null || k === undefined || k === false) continue;
      e.appendChild(typeof k === 'string' || typeof k === 'number' ? document.createTextNode(String(k)) : k);
    }
  }
  const isNum = (v) => typeof v === 'number' && isFinite(v);

  function fmt(v, digits) {
    if (v === null || v === undefined) return '–';
    if (typeof v !== 'number') return String(v);
    if (!isFinite(v)) return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e7) return String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential((digits || 4) - 1).replace('e+', 'e');
    return String(+v.toPrecision(digits || 4));
  }
  function tick(v) {
    if (v === 0) return '0';
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(0).replace('e+', 'e');
    return String(+v.toPrecision(4));
  }
  function shape(s) { return Array.isArray(s) ? s.join('×') : fmt(s); }

  // The bearer token of a server run with --auth-token-file: from the page's
  // #token=... fragment (never sent to the server; removed from the address
  // bar), else this tab's sessionStorage, else asked for on the first 401.
  const TOKEN_KEY = 'curvd-token';
  function storedToken() {
    try { return window.sessionStorage.getItem(TOKEN_KEY) || ''; } catch (e) { return ''; }
  }
  function storeToken(t) {
    try { window.sessionStorage.setItem(TOKEN_KEY, t); } catch (e) { /* private mode */ }
  }
  (function tokenFromFragment() {
    const m = /(?:^#|&)token=([^&]+)/.exec(window.location.hash || '');
    if (!m) return;
    storeToken(decodeURIComponent(m[1]));
    const rest = window.location.hash.slice(1).split('&').filter((kv) => !/^token=/.test(kv)).join('&');
    try { window.history.replaceState(null, '', window.location.pathname + window.location.search + (rest ? '#' + rest : '')); } catch (e) { /* old browser */ }
  })();
  let tokenAsked = false;

  async function api(method, path, body) {
    const init = { method, headers: { Accept: 'application/json' } };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const token = storedToken();
    if (token) init.headers.Authorization = 'Bearer ' + token;
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      const err = new Error('cannot reach curvd: ' + e.message);
      err.code = 'connection_failed';
      throw err;
    }
    if (r.status === 401 && storedToken() && storedToken() !== token) {
      return api(method, path, body); // the token arrived (prompt) while this call was out
    }
    if (r.status === 401 && !tokenAsked && typeof window.prompt === 'function') {
      tokenAsked = true; // once per page: a wrong token is reported, not asked again in a loop
      const t = window.prompt('This curvd server needs a token (curvd serve --auth-token-file):', '');
      if (t) {
        storeToken(t.trim());
        return api(method, path, body);
      }
    }
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (!r.ok) {
      const e = (data && data.error) || {};
      const err = new Error(e.message || ('HTTP ' + r.status));
      err.status = r.status;
      err.code = e.code || 'http_' + r.status;
      err.field = e.field || '';
      throw err;
    }
    return data;
  }

  // ---- state ----------------------------------------------------------------

  const state = {
    ops: [], curvatures: [], models: [], datasets: [], jobs: [],
    opSpecs: {},             // GET /v1/ops op_specs: options, uses_curvature, blockwise per op
    selected: null,          // job id shown in the result card
    full: {},                // id -> finished job document (with result)
    modelDocs: {},           // model name -> GET /v1/models/{name} (layer names and module types)
    optionsEdited: false,
    logScale: true,
    firstJobs: true,
    online: null,
  };

  const TERMINAL = ['succeeded', 'failed', 'cancelled'];
  const DEFAULT_OPTIONS = {
    density: { lanczos_steps: 80, runs: 1, grid_points: 200 },
    eigen: { k: 10 },
    trace: { method: 'hutchinson', max_probes: 50 },
    diag: { max_probes: 30 },
    snr: { k: 5 },
    solve: { damping: 0.1 },
    newton: { damping: 0.1 },
    matvec: { probe_seed: 1 },
  };
  const HINTS = {
    loss: 'The loss on the batch.',
    gradient: 'The gradient (state_dict order).',
    matvec: 'One curvature-vector product (vector or probe_seed).',
    dense: 'The dense curvature matrix (small models only).',
    per_sample_gradients: 'One gradient per sample.',
    trace: 'Hutchinson / Hutch++ trace estimate; with blocks "layer", one per layer.',
    diag: 'Diagonal estimate (hutchinson or exact).',
    eigen: 'Extreme eigenvalues by Lanczos (k, which, tol).',
    density: 'Spectral density by stochastic Lanczos quadrature (lanczos_steps, runs, grid_points).',
    solve: 'Damped curvature solve with CG (damping, rhs).',
    newton: 'Damped Newton step (cg or vivit).',
    snr: 'Gradient/curvature SNR along the top GGN directions (curvature ggn or fisher_mc).',
  };
  const PRESETS = {
    density: { op: 'density', blocks: 'full', curvature: '', options: { lanczos_steps: 80, runs: 1, grid_points: 200 } },
    eigen: { op: 'eigen', blocks: 'full', curvature: '', options: { k: 10 } },
    'trace-layer': { op: 'trace', blocks: 'layer', curvature: '', options: { max_probes: 50 } },
    snr: { op: 'snr', blocks: 'full', curvature: 'fisher_mc', options: { k: 5 } },
  };

  // ---- header: health ------------------------------------------------------

  async function refreshHealth() {
    const box = $('#health');
    try {
      const h = await api('GET', '/v1/health');
      state.online = true;
      box.replaceChildren(
        el('span', { class: 'chip ' + (h.status === 'ok' ? 'ok' : 'bad'), text: h.status + ' · v' + h.version }),
        el('span', { class: 'chip', text: 'workers ' + h.busy_workers + '/' + h.workers + ' busy' }),
        el('span', { class: 'chip', text: 'queue ' + h.queue_depth + '/' + h.max_queue }),
        el('span', { class: 'chip', text: h.models + ' models · ' + h.datasets + ' datasets' }),
        el('span', { class: 'chip', text: 'registry ' + (h.registry_bytes / 1048576).toFixed(1) + ' MiB' }),
        el('span', { class: 'chip', text: 'up ' + uptime(h.uptime_s) }));
    } catch (e) {
      state.online = false;
      box.replaceChildren(el('span', { class: 'chip bad', text: e.status ? 'draining' : 'offline: ' + e.message }));
    }
  }
  function uptime(s) {
    if (s < 120) return Math.round(s) + ' s';
    if (s < 7200) return Math.round(s / 60) + ' min';
    return (s / 3600).toFixed(1) + ' h';
  }

  // ---- models and datasets -------------------------------------------------

  async function refreshRegistry() {
    try {
      const [m, d] = await Promise.all([api('GET', '/v1/models'), api('GET', '/v1/datasets')]);
      state.models = m.models || [];
      state.datasets = d.datasets || [];
    } catch (e) {
      return;
    }
    const mt = $('#models tbody');
    mt.replaceChildren(...(state.models.length ? state.models.map((x) => el('tr', {},
      el('td', { class: 'mono', title: x.source || '', text: x.name }),
      el('td', { class: 'num', text: x.version }),
      el('td', { class: 'num', text: fmt(x.parameter_count) }),
      el('td', { text: shape(x.input_shape) + ' → ' + x.output_dim }))) :
      [el('tr', { class: 'empty' }, el('td', { colspan: 4, text: 'no models' }))]));
    $('#models-count').textContent = '(' + state.models.length + ')';
    const dt = $('#datasets tbody');
    dt.replaceChildren(...(state.datasets.length ? state.datasets.map((x) => el('tr', {},
      el('td', { class: 'mono', title: x.source || '', text: x.name }),
      el('td', { class: 'num', text: x.version }),
      el('td', { class: 'num', text: fmt(x.n) }),
      el('td', { text: shape((x.x_shape || []).slice(1)) }),
      el('td', { text: x.y ? (x.y.kind + (x.y.kind === 'labels' ? ' ' + x.y.min_label + '…' + x.y.max_label : ' ' + shape((x.y.shape || []).slice(1)))) : '' }))) :
      [el('tr', { class: 'empty' }, el('td', { colspan: 5, text: 'no datasets' }))]));
    $('#datasets-count').textContent = '(' + state.datasets.length + ')';
    fillSelect($('#model'), state.models.map((x) => x.name));
    fillSelect($('#dataset'), state.datasets.map((x) => x.name));
    matchDataset();
  }

  function fillSelect(sel, names, labels) {
    const cur = sel.value;
    const same = sel.options.length === names.length && names.every((n, i) => sel.options[i].value === n);
    if (same) return;
    sel.replaceChildren(...names.map((n, i) => el('option', { value: n, text: labels ? labels[i] : n })));
    if (names.includes(cur)) sel.value = cur;
  }

  // Picks a dataset whose sample shape fits the model's input, if the chosen one does not.
  function matchDataset() {
    const m = state.models.find((x) => x.name === $('#model').value);
    if (!m) return;
    const fits = (d) => JSON.stringify((d.x_shape || []).slice(1)) === JSON.stringify(m.input_shape);
    const cur = state.datasets.find((x) => x.name === $('#dataset').value);
    if (cur && fits(cur)) return;
    const d = state.datasets.find(fits);
    if (d) $('#dataset').value = d.name;
  }

  // ---- jobs ------------------------------------------------------------------

  async function refreshJobs() {
    let list;
    try {
      list = await api('GET', '/v1/jobs?limit=100');
    } catch (e) {
      return;
    }
    state.jobs = (list.jobs || []).slice().reverse(); // newest first
    if (state.firstJobs) {
      state.firstJobs = false;
      if (!state.selected) {
        const j = state.jobs.find((x) => x.status === 'succeeded');
        if (j) select(j.id);
      }
    }
    renderJobs();
    const sel = state.selected && state.jobs.find((x) => x.id === state.selected);
    if (sel) {
      if (TERMINAL.includes(sel.status)) {
        if (!state.full[sel.id]) await loadResult(sel.id);
      } else {
        renderPending(sel);
      }
    }
  }

  function renderJobs() {
    const tb = $('#jobs tbody');
    $('#jobs-count').textContent = '(' + state.jobs.length + ')';
    if (!state.jobs.length) {
      tb.replaceChildren(el('tr', { class: 'empty' }, el('td', { colspan: 8, text: 'no jobs yet' })));
      return;
    }
    tb.replaceChildren(...state.jobs.map((j) => {
      const p = j.progress || {};
      const frac = Math.max(0, Math.min(1, p.fraction || 0));
      const active = !TERMINAL.includes(j.status);
      return el('tr', { 'data-id': j.id, 'data-status': j.status, class: j.id === state.selected ? 'selected' : '',
        onclick: () => select(j.id) },
        el('td', { class: 'mono', title: j.id, text: j.id.slice(0, 8) }),
        el('td', { text: j.op }),
        el('td', { class: 'mono', text: j.model + ':v' + j.model_version }),
        el('td', { class: 'mono', text: j.dataset }),
        el('td', {}, el('span', { class: 'pill ' + j.status, text: j.status })),
        el('td', { title: (p.matvecs_done || 0) + ' of at most ' + (p.matvecs_planned || 0) + ' matvecs' },
          el('div', { class: 'bar ' + j.status },
            el('i', { style: 'width:' + (100 * frac).toFixed(1) + '%' }),
            el('span', { text: Math.round(100 * frac) + '% · ' + (p.matvecs_done || 0) + '/' + (p.matvecs_planned || 0) }))),
        el('td', { class: 'num', text: isNum(j.run_s) ? j.run_s.toFixed(2) : '' }),
        el('td', {}, active ? el('button', { class: 'link', type: 'button', title: 'cancel this job', text: 'cancel',
          onclick: (ev) => { ev.stopPropagation(); cancel(j.id); } }) : null));
    }));
  }

  async function cancel(id) {
    try {
      await api('DELETE', '/v1/jobs/' + encodeURIComponent(id));
    } catch (e) {
      showError(e);
    }
    refreshJobs();
  }

  function select(id) {
    state.selected = id;
    for (const tr of document.querySelectorAll('#jobs tbody tr')) {
      tr.classList.toggle('selected', tr.getAttribute('data-id') === id);
    }
    if (state.full[id]) renderResult(state.full[id]);
    else loadResult(id);
  }

  async function loadResult(id) {
    let j;
    try {
      j = await api('GET', '/v1/jobs/' + encodeURIComponent(id));
    } catch (e) {
      renderMessage('Job ' + id, 'cannot load: ' + e.message);
      return;
    }
    if (TERMINAL.includes(j.status)) {
      await modelDoc(j.model);
      state.full[id] = j;
    }
    if (state.selected !== id) return;
    if (TERMINAL.includes(j.status)) renderResult(j);
    else renderPending(j);
  }

  // The model's document (its architecture names the layers' module types),
  // read once per model name; null when it cannot be read (deleted model).
  async function modelDoc(name) {
    if (!name) return null;
    if (!(name in state.modelDocs)) {
      try { state.modelDocs[name] = await api('GET', '/v1/models/' + encodeURIComponent(name)); } catch (e) { state.modelDocs[name] = null; }
    }
    return state.modelDocs[name];
  }

  // ---- the form --------------------------------------------------------------

  // The ops, curvatures and (from servers that send them) each op's options
  // come from GET /v1/ops; there is no list of our own.  Until the daemon
  // answers, the form says so and asks again.
  async function loadOps() {
    let o;
    try {
      o = await api('GET', '/v1/ops');
    } catch (e) {
      $('#op-hint').textContent = 'cannot read the ops (GET /v1/ops): ' + e.message + '; retrying…';
      setTimeout(loadOps, 2000);
      return;
    }
    state.ops = o.ops || [];
    state.curvatures = o.curvatures || [];
    state.opSpecs = o.op_specs || {};
    fillSelect($('#op'), state.ops);
    fillSelect($('#curvature'), [''].concat(state.curvatures), ['(default: hessian)'].concat(state.curvatures));
    if (state.ops.includes('density')) $('#op').value = 'density';
    onOpChange();
  }

  function bound(x) {
    return Math.abs(x) >= 1e5 ? x.toExponential().replace('e+', 'e') : String(x);
  }
  // "k (integer 1..1e6), which (largest|smallest|magnitude), ..." from op_specs
  function optionsText(spec) {
    const opts = spec.options || [];
    if (!opts.length) return 'No options.';
    return 'Options: ' + opts.map((o) => {
      const range = o.min !== undefined ? ' ' + bound(o.min) + '..' + bound(o.max) : '';
      const choices = (o.choices || []).join('|');
      const what = o.type === 'enum' ? choices
        : o.type === 'list' ? 'list of numbers'
          : o.type === 'enum_or_list' ? choices + ' or a list of numbers'
            : o.type === 'number_or_list' ? 'number' + range + ' or a list of them'
              : o.type === 'enum_list' ? 'list of ' + choices
              : /_or_enum$/.test(o.type) ? o.type.split('_')[0] + range + ' or ' + choices
                : o.type + range;
      return o.name + ' (' + what + (o.methods ? '; method ' + o.methods.join('|') : '') + ')';
    }).join(', ') + '.';
  }

  // Hint, curvature and blocks of the form for op: an op that reads no
  // curvature gets none, "layer" only for ops with one result per block.
  function applyOpSpec(op) {
    const spec = state.opSpecs[op];
    $('#op-hint').textContent = [HINTS[op] || '', spec ? optionsText(spec) : ''].filter(Boolean).join(' ');
    $('#curvature').disabled = !!spec && spec.uses_curvature === false;
    const layer = $('#blocks option[value="layer"]');
    layer.disabled = !!spec && spec.blockwise === false;
    if (layer.disabled && $('#blocks').value === 'layer') $('#blocks').value = 'full';
  }

  function onOpChange() {
    const op = $('#op').value;
    if (!state.optionsEdited) $('#options').value = JSON.stringify(DEFAULT_OPTIONS[op] || {});
    const c = $('#curvature');
    if (op === 'snr' && (c.value === '' || c.value === 'hessian' || c.value === 'ef')) c.value = 'fisher_mc';
    applyOpSpec(op);
  }

  function applyPreset(name) {
    const p = PRESETS[name];
    if (!p) return;
    $('#op').value = p.op;
    $('#blocks').value = p.blocks;
    $('#curvature').value = p.curvature;
    $('#options').value = JSON.stringify(p.options);
    state.optionsEdited = false;
    applyOpSpec(p.op);
    clearError();
  }

  function parseBatch(s) {
    s = s.trim();
    if (!s) return undefined;
    if (s === 'all') return 'all';
    if (/^\d+$/.test(s)) return { offset: 0, size: +s };
    const m = /^(\d+)\s*:\s*(\d+)$/.exec(s);
    if (m) return { offset: +m[1], size: +m[2] };
    try {
      const v = JSON.parse(s);
      return Array.isArray(v) ? { indices: v } : v;
    } catch (e) {
      throw fieldError('batch', 'batch must be all, SIZE, OFFSET:SIZE or JSON');
    }
  }
  function fieldError(field, msg) {
    const e = new Error(msg);
    e.field = field;
    e.code = 'invalid_input';
    return e;
  }

  function buildJob() {
    const job = { op: $('#op').value, model: $('#model').value, dataset: $('#dataset').value };
    if (!job.model) throw fieldError('model', 'no model registered');
    if (!job.dataset) throw fieldError('dataset', 'no dataset registered');
    if ($('#curvature').value && !$('#curvature').disabled) job.curvature = $('#curvature').value;
    if ($('#blocks').value !== 'full') job.blocks = $('#blocks').value;
    const b = parseBatch($('#batch').value);
    if (b !== undefined) job.batch = b;
    const seed = $('#seed').value.trim();
    if (seed !== '') job.seed = +seed;
    const o = $('#options').value.trim();
    if (o && o !== '{}') {
      let opts;
      try { opts = JSON.parse(o); } catch (e) { throw fieldError('options', 'options is not valid JSON: ' + e.message); }
      if (!opts || typeof opts !== 'object' || Array.isArray(opts)) throw fieldError('options', 'options must be a JSON object');
      job.options = opts;
    }
    return job;
  }

  async function onSubmit(ev) {
    ev.preventDefault();
    clearError();
    let job;
    try {
      job = buildJob();
    } catch (e) {
      showError(e);
      return;
    }
    const btn = $('#submit');
    btn.disabled = true;
    $('#form-status').textContent = 'submitting…';
    try {
      const st = await api('POST', '/v1/jobs', job);
      $('#form-status').textContent = 'submitted ' + st.id.slice(0, 8) + ' (' + job.op + ')';
      state.selected = st.id;
      renderPending(Object.assign({ id: st.id, op: job.op, model: job.model, dataset: job.dataset }, st));
      await refreshJobs();
    } catch (e) {
      $('#form-status').textContent = '';
      showError(e);
    } finally {
      btn.disabled = false;
    }
  }

  const FIELD_INPUT = { op: 'op', model: 'model', dataset: 'dataset', curvature: 'curvature', blocks: 'blocks', batch: 'batch', seed: 'seed', options: 'options' };
  function showError(e) {
    const box = $('#form-error');
    box.hidden = false;
    box.textContent = e.message + (e.code ? '  [' + e.code + (e.field ? ', field ' + e.field : '') + ']' : '');
    const top = (e.field || '').split(/[.[]/)[0];
    const id = FIELD_INPUT[top];
    if (id) $('#' + id).classList.add('invalid');
  }
  function clearError() {
    $('#form-error').hidden = true;
    for (const x of document.querySelectorAll('.invalid')) x.classList.remove('invalid');
  }

  // ---- result card -------------------------------------------------------------

  function title(j) {
    const t = $('#result-title');
    t.replaceChildren(j.op + ' ', el('span', { class: 'sub',
      text: '· ' + j.model + (j.model_version ? ' v' + j.model_version : '') + ' · ' + j.dataset +
        (j.result && j.result.curvature ? ' · ' + j.result.curvature : '') + ' · job ' + j.id.slice(0, 8) }),
      ' ', el('a', { class: 'permalink', id: 'job-permalink', href: '#job=' + encodeURIComponent(j.id), title: 'a link that reopens this job (while the server keeps it)', text: 'permalink' }));
  }

  function renderMessage(t, msg) {
    $('#result-title').textContent = t;
    $('#plot-controls').replaceChildren();
    $('#plot').replaceChildren(el('p', { class: 'muted', text: msg }));
    $('#summary').replaceChildren();
    $('#raw').textContent = '';
  }

  function renderPending(j) {
    title(j);
    const p = j.progress || {};
    $('#plot-controls').replaceChildren();
    $('#plot').replaceChildren(el('div', { class: 'pending' },
      el('p', {}, el('span', { class: 'pill ' + j.status, text: j.status }), ' ',
        (p.matvecs_done || 0) + ' of at most ' + (p.matvecs_planned || 0) + ' matvecs'),
      el('div', { class: 'bar ' + j.status }, el('i', { style: 'width:' + (100 * (p.fraction || 0)).toFixed(1) + '%' }),
        el('span', { text: Math.round(100 * (p.fraction || 0)) + '%' }))));
    $('#summary').replaceChildren();
    $('#raw').textContent = '';
  }

  function renderResult(j) {
    title(j);
    const ctl = $('#plot-controls');
    ctl.replaceChildren();
    const plot = $('#plot');
    if (j.status !== 'succeeded') {
      const e = j.error || {};
      plot.replaceChildren(el('div', { class: 'error', text: j.status + ': ' + (e.message || '') + (e.code ? '  [' + e.code + (e.field ? ', field ' + e.field : '') + ']' : '') }));
      $('#summary').replaceChildren();
      $('#raw').textContent = JSON.stringify(j, null, 2);
      return;
    }
    const r = j.result || {};
    let node = null;
    try {
      node = plotFor(r, ctl, () => renderResult(j), state.modelDocs[j.model]);
    } catch (e) {
      node = el('div', { class: 'error', text: 'cannot plot: ' + e.message });
    }
    plot.replaceChildren(...(node ? [].concat(node) : [el('p', { class: 'muted', text: 'nothing to plot for ' + r.op })]));
    $('#summary').replaceChildren(...summary(r, state.modelDocs[j.model]));
    $('#raw').textContent = JSON.stringify(r, truncateArrays, 1);
  }

  function truncateArrays(key, v) {
    if (Array.isArray(v) && v.length > 24) return v.slice(0, 24).concat(['… ' + (v.length - 24) + ' more']);
    return v;
  }

  function logToggle(ctl, redraw) {
    const box = el('input', { type: 'checkbox', id: 'logscale' });
    box.checked = state.logScale;
    box.addEventListener('change', () => { state.logScale = box.checked; redraw(); });
    ctl.appendChild(el('label', {}, box, 'log scale'));
  }

  // The module named `name` in a model document's architecture: the graph
  // form's modules by qualified name, the Sequential form's layers by index.
  function moduleOf(doc, name) {
    const a = doc && doc.architecture;
    if (!a || name === undefined || name === null) return null;
    if (a.modules && a.modules[name]) return a.modules[name];
    if (Array.isArray(a.layers) && /^\d+$/.test(String(name))) return a.layers[+name] || null;
    return null;
  }
  // "Linear(64→32)", "Conv2d(3→8, k3×3)", ... from a module's attributes
  function moduleText(m) {
    if (!m || !m.type) return '';
    const io = m.in_features !== undefined ? m.in_features + '→' + m.out_features
      : m.in_channels !== undefined ? m.in_channels + '→' + m.out_channels + (m.kernel_size !== undefined ? ', k' + [].concat(m.kernel_size).join('×') : '')
        : m.num_embeddings !== undefined ? m.num_embeddings + '×' + m.embedding_dim
          : m.embed_dim !== undefined ? m.embed_dim + ', ' + m.num_heads + ' heads'
            : m.normalized_shape !== undefined ? [].concat(m.normalized_shape).join('×')
              : m.num_features !== undefined ? String(m.num_features) : '';
    return m.type + (io ? '(' + io + ')' : '');
  }
  // A block's label: its module's qualified name and type ("0 · Linear(64→32)")
  // when the result names it, else the modules of its parameters.  `type` is
  // the module type a result may carry itself (op instruments' layers).
  function blockLabel(params, i, name, doc, type) {
    const names = name ? [String(name)] : Array.from(new Set((params || []).map((p) => p.split('.').slice(0, -1).join('.') || p)));
    if (!names.length) return 'block ' + i;
    return names.map((n) => {
      const t = moduleText(moduleOf(doc, n)) || type || '';
      return t ? n + ' · ' + t : n;
    }).join(', ');
  }
  // A category of a per-block bar plot: the label and the parameter names under it.
  function blockCat(b, i, doc) {
    return { text: blockLabel(b.params, i, b.name, doc, b.type), sub: (b.params || []).join(', ') };
  }

  // Chooses the plot for an op's result.
  function plotFor(r, ctl, redraw, doc) {
    const blocks = Array.isArray(r.blocks) ? r.blocks : null;
    switch (r.op) {
      case 'density': {
        // one curve for the full vector, one per block otherwise
        const src = blocks || [r];
        const series = src.filter((b) => b.density).map((b, i) => ({
          label: blocks ? blockLabel(b.params, i, b.name, doc) : 'density', grid: b.density.grid || [], values: b.density.values || [],
          nodes: b.nodes || [], weights: b.weights || [],
        }));
        if (!series.length) return null;
        logToggle(ctl, redraw);
        return densityPlot(series, r, blocks ? blocks[0] : r);
      }
      case 'eigen': {
        const series = blocks ? blocks.map((b, i) => ({ label: blockLabel(b.params, i, b.name, doc), ys: b.eigenvalues || [] }))
          : [{ label: 'eigenvalue', ys: r.eigenvalues || [] }];
        return eigenPlot(series, r);
      }
      case 'trace': {
        const bs = blocks || [r];
        return barPlot({
          op: 'trace', title: blocks ? 'Trace per layer (± stderr)' : 'Trace (± stderr)',
          cats: bs.map((b, i) => blocks ? blockCat(b, i, doc) : 'full'),
          series: [{ label: 'trace', ys: bs.map((b) => b.trace), err: bs.map((b) => b.stderr), color: '#3461c9' }],
          ylabel: 'trace',
        });
      }
      case 'diag': {
        const v = r.diag || (blocks && [].concat(...blocks.map((b) => b.diag || [])));
        return v ? vectorPlot(v, 'Curvature diagonal', 'diag', 'diag') : null;
      }
      case 'snr': {
        const dirs = r.directions || (blocks && blocks[0] && blocks[0].directions) || [];
        logToggle(ctl, redraw);
        const out = [barPlot({
          op: 'snr', title: 'SNR along the top directions', log: state.logScale,
          cats: dirs.map((d, i) => 'λ' + (i + 1) + ' = ' + fmt(d.eigenvalue, 3)),
          series: [
            { label: 'gradient SNR (γ)', ys: dirs.map((d) => d.gamma_snr), color: '#7b4fc9' },
            { label: 'curvature SNR (λ)', ys: dirs.map((d) => d.lambda_snr), color: '#e08a1e' },
          ],
          ylabel: 'SNR',
        })];
        if (Array.isArray(r.gsnr) && r.gsnr.length) {
          out.push(barPlot({
            op: 'gsnr', cls: 'secondary', title: 'Gradient SNR per layer (GSNR)', log: state.logScale, height: 220,
            cats: r.gsnr.map((b, i) => blockCat(b, i, doc)),
            series: [{ label: 'gsnr', ys: r.gsnr.map((b) => b.gsnr), color: '#1f8a4c' }],
            ylabel: 'GSNR',
          }));
        }
        return out;
      }
      case 'instruments':
        return instrumentsPlots(r, doc);
      case 'dense':
        return r.matrix ? heatmap(r.matrix) : null;
      case 'loss':
        return el('div', { class: 'big', text: 'loss ' + fmt(r.loss, 6) });
      case 'gradient':
        return r.gradient ? vectorPlot(r.gradient, 'Gradient', 'gradient', 'gradient') : null;
      case 'matvec':
        return r.product ? vectorPlot(r.product, 'Curvature-vector product', 'product', 'matvec') : null;
      case 'solve':
        return r.solution ? vectorPlot(r.solution, 'Solution of (C + damping I) x = b', 'solution', 'solve') : null;
      case 'newton':
        return r.step ? vectorPlot(r.step, 'Newton step', 'step', 'newton') : null;
      default:
        return null;
    }
  }

  // Key facts of a result as a definition list, plus per-block tables.
  function summary(r, doc) {
    const out = [];
    const dl = el('dl', { class: 'kv' });
    for (const [k, v] of Object.entries(r)) {
      if (v === null || typeof v !== 'object') dl.append(el('dt', { text: k }), el('dd', { text: fmt(v, 6) }));
    }
    out.push(dl);
    for (const [k, v] of Object.entries(r)) {
      if (v && typeof v === 'object' && !Array.isArray(v) && Object.values(v).length && Object.values(v).every(isNum)) {
        out.push(el('h3', { text: k }), table(Object.keys(v), [Object.values(v).map((x) => fmt(x, 5))]));
      }
    }
    if (Array.isArray(r.eigenvalues) && r.eigenvalues.length) {
      out.push(el('h3', { text: 'eigenvalues' }), table(['#', 'eigenvalue', 'residual'],
        r.eigenvalues.map((v, i) => [i + 1, fmt(v, 6), fmt((r.residuals || [])[i], 3)])));
    }
    if (Array.isArray(r.directions) && r.directions.length) {
      const cols = ['eigenvalue', 'gamma_snr', 'lambda_snr', 'alignment'];
      out.push(el('h3', { text: 'directions' }), table(['#'].concat(cols),
        r.directions.map((d, i) => [i + 1].concat(cols.map((c) => fmt(d[c], 4))))));
    }
    if (Array.isArray(r.blocks)) {
      const cols = [];
      for (const b of r.blocks) for (const [k, v] of Object.entries(b)) if (k !== 'params' && (v === null || typeof v !== 'object') && !cols.includes(k)) cols.push(k);
      out.push(el('h3', { text: 'blocks' }), table(['block', 'params'].concat(cols),
        r.blocks.map((b, i) => [blockLabel(b.params, i, b.name, doc), (b.params || []).join(', ')].concat(cols.map((c) => fmt(b[c], 5))))));
    }
    return out;
  }

  function table(head, rows) {
    return el('table', { class: 'grid compact' },
      el('thead', {}, el('tr', {}, head.map((h) => el('th', { text: h })))),
      el('tbody', {}, rows.map((r) => el('tr', {}, r.map((c, i) => el('td', { class: i && /^[-\d.e+–]+$/.test(String(c)) ? 'num' : '', text: c }))))));
  }

  // ---- plotting (SVG) ------------------------------------------------------------

  function niceStep(span, n) {
    const raw = span / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / mag;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
  }
  function linTicks(lo, hi, n) {
    const st = niceStep(hi - lo, n || 6);
    const out = [];
    for (let v = Math.ceil(lo / st - 1e-9) * st; v <= hi + st * 1e-9; v += st) out.push(Math.abs(v) < st * 1e-9 ? 0 : +v.toPrecision(12));
    return out;
  }
  function logTicks(lo, hi) {
    const a = Math.floor(Math.log10(lo) + 1e-9), b = Math.ceil(Math.log10(hi) - 1e-9);
    const k = Math.max(1, Math.ceil((b - a) / 7));
    const out = [];
    for (let e = a; e <= b; e += k) out.push(Math.pow(10, e));
    return out;
  }
  function range(vals, pad, withZero) {
    let lo = Infinity, hi = -Infinity;
    for (const v of vals) if (isNum(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (withZero) { lo = Math.min(lo, 0); hi = Math.max(hi, 0); }
    if (lo === hi) { const d = Math.abs(lo) || 1; lo -= d / 2; hi += d / 2; }
    const p = (hi - lo) * (pad || 0);
    return [withZero && lo === 0 ? 0 : lo - p, withZero && hi === 0 ? 0 : hi + p];
  }

  /* A frame with axes.  opts: {op, cls, title, width, height, x: {lo, hi, log, label, cats},
   * y: {lo, hi, log, label}}.  Returns {svg, sx, sy, plot: <g>, ...}. */
  function frame(opts) {
    const W = opts.width || 760;
    const m = Object.assign({ l: 66, r: 18, t: opts.title ? 30 : 12, b: 44 }, opts.margin || {});
    // category labels: horizontal (with the parameter names under them) where
    // they fit their slot, else slanted, the plot made taller to hold them
    const cats = opts.x.cats ? opts.x.cats.map((c) => (typeof c === 'object' ? c : { text: String(c), sub: '' })) : null;
    let slant = false, extra = 0;
    if (cats) {
      const slot = (W - m.l - m.r) / Math.max(1, cats.length);
      const widest = Math.max(0, ...cats.map((c) => Math.max(textWidth(c.text, 11), c.sub ? textWidth(c.sub, 10) : 0)));
      slant = widest > slot - 6;
      const hasSub = cats.some((c) => c.sub);
      m.b = slant ? Math.min(200, 30 + Math.ceil(Math.max(...cats.map((c) => textWidth(c.text, 11))) * 0.5)) : hasSub ? 70 : 58;
      extra = m.b - 58;
    }
    const H = (opts.height || 330) + Math.max(0, extra);
    const svg = sv('svg', { class: 'plot ' + (opts.cls || ''), 'data-op': opts.op, viewBox: '0 0 ' + W + ' ' + H,
      role: 'img', 'aria-label': opts.title || opts.op, preserveAspectRatio: 'xMidYMid meet' });
    const x = opts.x, y = opts.y;
    const tx = (v) => x.log ? Math.log10(v) : v;
    const ty = (v) => y.log ? Math.log10(v) : v;
    const x0 = tx(x.lo), x1 = tx(x.hi), y0 = ty(y.lo), y1 = ty(y.hi);
    const sx = (v) => m.l + (tx(v) - x0) / (x1 - x0 || 1) * (W - m.l - m.r);
    const sy = (v) => H - m.b - (ty(v) - y0) / (y1 - y0 || 1) * (H - m.t - m.b);
    if (opts.title) svg.appendChild(sv('text', { class: 'title', x: m.l, y: 18, text: opts.title }));
    const axes = sv('g', { class: 'axis' });
    // y grid and ticks
    const yt = y.log ? logTicks(y.lo, y.hi) : linTicks(y.lo, y.hi, 6);
    for (const v of yt) {
      if (y.integer && !Number.isInteger(v)) continue;
      if (v < y.lo * (1 - 1e-9) || v > y.hi * (1 + 1e-9) + (y.log ? 0 : 1e-12)) continue;
      const py = sy(v);
      axes.appendChild(sv('line', { class: 'gridline', x1: m.l, x2: W - m.r, y1: py, y2: py }));
      axes.appendChild(sv('text', { x: m.l - 6, y: py + 3.5, 'text-anchor': 'end', text: tick(v) }));
    }
    if (!y.log && y.lo < 0 && y.hi > 0) axes.appendChild(sv('line', { class: 'zero', x1: m.l, x2: W - m.r, y1: sy(0), y2: sy(0) }));
    // x ticks
    if (cats) {
      cats.forEach((c, i) => {
        const px = sx(i), py = H - m.b + 16;
        if (slant) {
          axes.appendChild(sv('text', { class: 'cat', x: px, y: py, 'text-anchor': 'end', transform: 'rotate(-30 ' + px + ' ' + py + ')', text: c.text },
            c.sub ? sv('title', { text: c.sub }) : null));
        } else {
          axes.appendChild(sv('text', { class: 'cat', x: px, y: py, 'text-anchor': 'middle' }, sv('tspan', { text: c.text }),
            c.sub ? sv('tspan', { class: 'sub', x: px, dy: 14, text: c.sub }) : null));
        }
      });
    } else {
      const xt = x.log ? logTicks(x.lo, x.hi) : linTicks(x.lo, x.hi, 8);
      for (const v of xt) {
        if (v < x.lo - 1e-12 || v > x.hi + 1e-12 || (x.integer && !Number.isInteger(v))) continue;
        const px = sx(v);
        axes.appendChild(sv('line', { x1: px, x2: px, y1: H - m.b, y2: H - m.b + 4 }));
        axes.appendChild(sv('text', { x: px, y: H - m.b + 16, 'text-anchor': 'middle', text: tick(v) }));
      }
    }
    axes.appendChild(sv('path', { d: 'M' + m.l + ',' + m.t + 'V' + (H - m.b) + 'H' + (W - m.r), fill: 'none' }));
    if (x.label) axes.appendChild(sv('text', { x: (m.l + W - m.r) / 2, y: H - 8, 'text-anchor': 'middle', text: x.label }));
    if (y.label) axes.appendChild(sv('text', { x: 14, y: (m.t + H - m.b) / 2, 'text-anchor': 'middle', transform: 'rotate(-90 14 ' + (m.t + H - m.b) / 2 + ')', text: y.label }));
    svg.appendChild(axes);
    const plot = sv('g', { class: 'data' });
    svg.appendChild(plot);
    return { svg, sx, sy, plot, m, W, H };
  }

  // The width of `s` in px at `size` px (DejaVu Sans-like: 0.6 em per character).
  function textWidth(s, size) { return String(s).length * 0.6 * (size || 11); }
  const catText = (c) => (typeof c === 'object' ? c.text : String(c));

  function legend(f, items) {
    let x = f.W - f.m.r;
    const g = sv('g', { class: 'legend' });
    for (const it of items.slice().reverse()) {
      const w = 18 + 6.2 * it.label.length;
      x -= w + 10;
      g.appendChild(sv('rect', { x, y: 8, width: 10, height: 10, rx: 2, fill: it.color }));
      g.appendChild(sv('text', { x: x + 14, y: 17, text: it.label }));
    }
    f.svg.appendChild(g);
  }

  function pathOf(pts) {
    let d = '';
    for (const [x, y] of pts) d += (d ? 'L' : 'M') + x.toFixed(2) + ',' + y.toFixed(2);
    return d;
  }

  const PALETTE = ['#3461c9', '#e08a1e', '#1f8a4c', '#c23a3a', '#7b4fc9', '#2a9db0', '#8a6d3b'];

  /* Spectral densities: series [{label, grid, values, nodes, weights}] (one per block). */
  function densityPlot(series, r, first) {
    const log = state.logScale;
    let peak = 0, xlo = Infinity, xhi = -Infinity;
    for (const s of series) {
      for (const v of s.values) if (isNum(v)) peak = Math.max(peak, v);
      if (s.grid.length) { xlo = Math.min(xlo, s.grid[0]); xhi = Math.max(xhi, s.grid[s.grid.length - 1]); }
    }
    if (!isFinite(xlo) || xlo === xhi) { xlo = isFinite(xlo) ? xlo - 1 : 0; xhi = xlo + 2; }
    // pad the x range so that a peak at either end of the grid is drawn whole:
    // 4 broadening widths (the curve continued there from the Ritz values) or 3%
    const s2x = (first && first.sigma2) || r.sigma2;
    const sd = isNum(s2x) && s2x > 0 ? Math.sqrt(s2x) : 0;
    const pad = Math.max(4 * sd, 0.03 * (xhi - xlo));
    const gridLo = xlo, gridHi = xhi;
    xlo -= pad;
    xhi += pad;
    series.forEach((s) => extendDensity(s, sd, gridLo - pad, gridHi + pad));
    for (const s of series) for (const v of s.values) if (isNum(v)) peak = Math.max(peak, v);
    const floor = log ? Math.max(peak * 1e-8, 1e-300) : 0;
    const [ylo, yhi] = log ? [floor, peak > 0 ? peak * 2 : 1] : [0, (peak || 1) * 1.05];
    const steps = (first && first.lanczos_steps) || r.lanczos_steps;
    const s2 = (first && first.sigma2) || r.sigma2;
    const f = frame({ op: 'density', title: 'Spectral density (SLQ' + (steps ? ', ' + steps + ' Lanczos steps' : '') + (isNum(s2) ? ', σ² = ' + fmt(s2, 3) : '') + ')',
      x: { lo: xlo, hi: xhi, label: 'eigenvalue' },
      y: { lo: ylo, hi: yhi, log, label: log ? 'density (log)' : 'density' } });
    const base = f.sy(ylo);
    const single = series.length === 1;
    series.forEach((s, si) => {
      const color = PALETTE[si % PALETTE.length];
      const pts = s.grid.map((x, i) => {
        const v = isNum(s.values[i]) ? s.values[i] : 0;
        return [f.sx(x), f.sy(log ? Math.max(v, floor) : v)];
      });
      if (!pts.length) return;
      if (single) {
        f.plot.appendChild(sv('path', { class: 'area', d: pathOf(pts) + 'L' + pts[pts.length - 1][0].toFixed(2) + ',' + base + 'L' + pts[0][0].toFixed(2) + ',' + base + 'Z',
          fill: color, 'fill-opacity': 0.12, stroke: 'none' }));
      }
      f.plot.appendChild(sv('path', { class: 'series', d: pathOf(pts), fill: 'none', stroke: color, 'stroke-width': single ? 1.8 : 1.4,
        'data-points': pts.length - (s.extended ? s.extended[0] + s.extended[1] : 0), 'data-extended': s.extended ? s.extended.join(',') : '0,0',
        'data-label': s.label }));
    });
    if (single) {
      // the Ritz values of the Lanczos runs as a rug (their weights as opacity)
      const s = series[0];
      const rug = sv('g', { class: 'rug' });
      s.nodes.forEach((run, k) => (run || []).forEach((x, i) => {
        if (!isNum(x) || x < xlo || x > xhi) return;
        const w = (s.weights[k] || [])[i];
        const op = isNum(w) ? Math.min(1, 0.25 + 3 * Math.sqrt(Math.max(w, 0))) : 0.5;
        rug.appendChild(sv('line', { x1: f.sx(x), x2: f.sx(x), y1: base, y2: base - 8, stroke: '#c23a3a', 'stroke-opacity': op.toFixed(2) }));
      }));
      f.plot.appendChild(rug);
      legend(f, [{ label: s.label, color: PALETTE[0] }, { label: 'Ritz values', color: '#c23a3a' }]);
    } else {
      legend(f, series.map((s, i) => ({ label: s.label, color: PALETTE[i % PALETTE.length] })));
    }
    return f.svg;
  }

  /* Continues a density curve beyond its grid (to lo, hi) with the Gaussian
   * broadening the server used (standard deviation sd) of the Ritz values (nodes,
   * weights per run), scaled to the server's normalization on the grid. */
  function extendDensity(s, sd, lo, hi) {
    const G = s.grid.length;
    if (!(sd > 0) || G < 2 || !s.nodes.length) return;
    const mix = (x) => {
      let y = 0;
      s.nodes.forEach((run, k) => (run || []).forEach((t, i) => {
        const w = (s.weights[k] || [])[i];
        if (isNum(t) && isNum(w)) y += w * Math.exp(-(x - t) * (x - t) / (2 * sd * sd));
      }));
      return y;
    };
    let a = 0, b = 0;
    s.grid.forEach((x, i) => { if (isNum(s.values[i])) { a += s.values[i]; b += mix(x); } });
    if (!(a > 0 && b > 0)) return;
    const scale = a / b, dx = (s.grid[G - 1] - s.grid[0]) / (G - 1) / 4;
    const left = [], right = [];
    for (let x = s.grid[0] - dx; x >= lo - dx / 2; x -= dx) left.unshift(x);
    for (let x = s.grid[G - 1] + dx; x <= hi + dx / 2; x += dx) right.push(x);
    s.grid = left.concat(s.grid, right);
    s.values = left.map((x) => scale * mix(x)).concat(s.values, right.map((x) => scale * mix(x)));
    s.extended = [left.length, right.length];
  }

  function eigenPlot(series, r) {
    const n = Math.max(1, ...series.map((s) => s.ys.length));
    const all = [].concat(...series.map((s) => s.ys));
    const [lo, hi] = range(all, 0.08, true);
    const f = frame({ op: 'eigen', title: 'Eigenvalues (' + (r.which || 'largest') + ', ' + (r.method || 'lanczos') + ')',
      x: { lo: 0.4, hi: n + 0.6, label: 'index' }, y: { lo, hi, label: 'eigenvalue' } });
    const k = series.length;
    series.forEach((s, si) => {
      const color = PALETTE[si % PALETTE.length];
      const off = k > 1 ? (si - (k - 1) / 2) * Math.min(0.5 / k, 0.15) : 0;
      const g = sv('g', { class: 'series stems', 'data-label': s.label });
      s.ys.forEach((v, i) => {
        if (!isNum(v)) return;
        const px = f.sx(i + 1 + off);
        g.appendChild(sv('line', { x1: px, x2: px, y1: f.sy(0), y2: f.sy(v), stroke: color, 'stroke-width': 2 }));
        g.appendChild(sv('circle', { class: 'point', cx: px, cy: f.sy(v), r: 4, fill: color }, sv('title', { text: s.label + ' #' + (i + 1) + ': ' + fmt(v, 6) })));
      });
      f.plot.appendChild(g);
    });
    if (k > 1) legend(f, series.map((s, i) => ({ label: s.label, color: PALETTE[i % PALETTE.length] })));
    return f.svg;
  }

  /* Grouped bars over categories; opts: {op, cls, title, cats, series: [{label, ys, err, color}], log, ylabel, height}. */
  function barPlot(opts) {
    const n = opts.cats.length;
    const vals = [];
    for (const s of opts.series) s.ys.forEach((v, i) => { if (isNum(v)) vals.push(v + (s.err && isNum(s.err[i]) ? s.err[i] : 0)); });
    let lo, hi;
    if (opts.log) {
      const pos = vals.filter((v) => v > 0);
      lo = pos.length ? Math.min(...pos) / 3 : 1e-3;
      hi = pos.length ? Math.max(...pos) * 3 : 1;
    } else {
      [lo, hi] = range(vals, 0.08, true);
    }
    // value labels: 3 significant digits, 2 where 3 do not fit the bar's box, else
    // upright text (room made above the tallest bar); the full value is in each bar's title
    const slotW = (760 - 66 - 18) / Math.max(1, n);
    const boxW = Math.min(60, slotW * 0.7 / opts.series.length) + (opts.series.length > 1 ? 0 : slotW * 0.3);
    const labelOf = (v) => { const t3 = fmt(v, 3); return textWidth(t3, 11) <= boxW - 2 ? [t3, false] : textWidth(fmt(v, 2), 11) <= boxW - 2 ? [fmt(v, 2), false] : [fmt(v, 3), true]; };
    const upright = n <= 12 && vals.some((v) => labelOf(v)[1]);
    if (upright && opts.log) hi *= 30;
    else if (upright) hi += (hi - lo) * 0.3;
    const f = frame({ op: opts.op, cls: opts.cls, title: opts.title, height: opts.height,
      x: { lo: -0.5, hi: n - 0.5, cats: opts.cats }, y: { lo, hi, log: opts.log, label: opts.ylabel + (opts.log ? ' (log)' : '') } });
    const k = opts.series.length;
    const slot = (f.sx(1) - f.sx(0)) * 0.7;
    const bw = Math.min(60, slot / k);
    opts.series.forEach((s, si) => {
      const g = sv('g', { class: 'series bars', 'data-label': s.label });
      s.ys.forEach((v, i) => {
        if (!isNum(v) || (opts.log && v <= 0)) return;
        const cx = f.sx(i) + (si - (k - 1) / 2) * bw;
        const y0 = opts.log ? f.sy(lo) : f.sy(0), y1 = f.sy(v);
        g.appendChild(sv('rect', { class: 'bar', x: cx - bw / 2 + 1, width: Math.max(1, bw - 2), y: Math.min(y0, y1), height: Math.max(1, Math.abs(y0 - y1)),
          fill: s.color, rx: 2 }, sv('title', { text: s.label + ' · ' + catText(opts.cats[i]) + ': ' + fmt(v, 6) + (s.err && isNum(s.err[i]) ? ' ± ' + fmt(s.err[i], 3) : '') })));
        if (s.err && isNum(s.err[i]) && s.err[i] > 0) {
          const a = f.sy(Math.max(opts.log ? lo : -Infinity, v - s.err[i])), b = f.sy(v + s.err[i]);
          g.appendChild(sv('path', { class: 'errorbar', d: 'M' + (cx - 6) + ',' + a + 'H' + (cx + 6) + 'M' + cx + ',' + a + 'V' + b + 'M' + (cx - 6) + ',' + b + 'H' + (cx + 6),
            stroke: '#1d2433', 'stroke-width': 1.3, fill: 'none' }));
        }
        if (n <= 12) {
          const [txt, up] = labelOf(v);
          const ly = Math.min(y0, y1) - 4 - (s.err && isNum(s.err[i]) ? Math.abs(f.sy(v + s.err[i]) - y1) : 0);
          g.appendChild(sv('text', { class: 'value', x: cx + (up ? 4 : 0), y: ly, 'text-anchor': up ? 'start' : 'middle', 'data-box': boxW.toFixed(1),
            'data-value': v, transform: up ? 'rotate(-90 ' + (cx + 4) + ' ' + ly + ')' : null, text: txt }));
        }
      });
      f.plot.appendChild(g);
    });
    if (k > 1) legend(f, opts.series.map((s) => ({ label: s.label, color: s.color })));
    return f.svg;
  }

  /* Op instruments: per-layer norms (gradient, update, distance from init), per-layer
   * mean GSNR, and the histogram of the per-sample gradient entries (log counts). */
  function instrumentsPlots(r, doc) {
    const out = [];
    const layers = Array.isArray(r.layers) ? r.layers : [];
    if (layers.length) {
      const cats = layers.map((b, i) => blockCat(b, i, doc));
      const series = [['gradient_norm', '#3461c9'], ['update_size', '#e08a1e'], ['distance_from_init', '#1f8a4c']]
        .filter(([k]) => layers.some((b) => isNum(b[k])))
        .map(([k, color]) => ({ label: k, ys: layers.map((b) => b[k]), color }));
      if (series.length) out.push(barPlot({ op: 'instruments-layers', title: 'Norms per layer', cats, series, ylabel: 'norm' }));
      if (layers.some((b) => isNum(b.mean_gsnr))) {
        out.push(barPlot({ op: 'instruments-gsnr', cls: 'secondary', title: 'Mean GSNR per layer', cats, height: 220,
          series: [{ label: 'mean_gsnr', ys: layers.map((b) => b.mean_gsnr), color: '#7b4fc9' }], ylabel: 'GSNR' }));
      }
    }
    const h = r.gradient_histogram;
    if (h && Array.isArray(h.counts) && h.counts.length && Array.isArray(h.range)) {
      const [lo, hi] = h.range, n = h.counts.length, w = (hi - lo) / n;
      const top = Math.max(1, ...h.counts);
      const f = frame({ op: 'instruments-histogram', title: 'Per-sample gradient entries (' + n + ' bins, log counts)', height: 240,
        x: { lo, hi, label: 'gradient entry' }, y: { lo: 0.5, hi: top * 2, log: true, label: 'count (log)' } });
      h.counts.forEach((c, i) => {
        if (!(c > 0)) return;
        const a = f.sx(lo + i * w), b = f.sx(lo + (i + 1) * w);
        f.plot.appendChild(sv('rect', { class: 'bar', x: a + 0.5, width: Math.max(1, b - a - 1), y: f.sy(c), height: Math.max(1, f.sy(0.5) - f.sy(c)), fill: '#2a9db0' },
          sv('title', { text: fmt(lo + i * w, 4) + ' … ' + fmt(lo + (i + 1) * w, 4) + ': ' + c })));
      });
      out.push(f.svg);
    }
    return out.length ? out : null;
  }

  function vectorPlot(v, ttl, ylabel, op) {
    const n = v.length;
    const stride = Math.max(1, Math.ceil(n / 2000));
    const pts = [];
    for (let i = 0; i < n; i += stride) {
      // keep the extreme of each stride so spikes stay visible
      let best = v[i];
      for (let j = i; j < Math.min(n, i + stride); j++) if (isNum(v[j]) && Math.abs(v[j]) > Math.abs(best)) best = v[j];
      pts.push([i, best]);
    }
    const [lo, hi] = range(pts.map((p) => p[1]), 0.05, true);
    const f = frame({ op, title: ttl + ' (' + n + ' entries)', x: { lo: 0, hi: Math.max(1, n - 1), label: 'parameter index (state_dict order)' }, y: { lo, hi, label: ylabel } });
    f.plot.appendChild(sv('path', { class: 'series', d: pathOf(pts.map(([i, y]) => [f.sx(i), f.sy(isNum(y) ? y : 0)])), fill: 'none', stroke: '#3461c9', 'stroke-width': 1 }));
    return f.svg;
  }

  function heatmap(M) {
    const n = M.length, m = (M[0] || []).length;
    const c = el('canvas', { width: m, height: n, class: 'plot', 'data-op': 'dense', title: 'dense matrix ' + n + '×' + m });
    c.style.width = Math.min(520, Math.max(260, m * 3)) + 'px';
    const ctx = c.getContext('2d');
    const img = ctx.createImageData(m, n);
    let amax = 0;
    for (const row of M) for (const v of row) if (isNum(v)) amax = Math.max(amax, Math.abs(v));
    amax = amax || 1;
    for (let i = 0; i < n; i++) for (let j = 0; j < m; j++) {
      const t = Math.sign(M[i][j]) * Math.sqrt(Math.abs(M[i][j]) / amax); // diverging, sqrt-compressed
      const k = 4 * (i * m + j);
      img.data[k] = t > 0 ? 255 : Math.round(255 * (1 + t));
      img.data[k + 1] = Math.round(255 * (1 - Math.abs(t)));
      img.data[k + 2] = t < 0 ? 255 : Math.round(255 * (1 - t));
      img.data[k + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return el('div', {}, el('p', { class: 'muted', text: 'Dense curvature matrix, ' + n + '×' + m + ' (red > 0, blue < 0, |max| = ' + fmt(amax, 4) + ')' }), c);
  }

  // ---- start -----------------------------------------------------------------------

  /* Runs fn now and then every ms (4x slower in a hidden tab); resolves after the first run. */
  function loop(fn, ms) {
    const run = async () => {
      try { await fn(); } catch (e) { /* shown where it matters */ }
      setTimeout(run, document.hidden ? ms * 4 : ms);
    };
    return run();
  }

  document.addEventListener('DOMContentLoaded', async () => {
    $('#job-form').addEventListener('submit', onSubmit);
    $('#op').addEventListener('change', onOpChange);
    $('#model').addEventListener('change', matchDataset);
    $('#options').addEventListener('input', () => { state.optionsEdited = true; });
    for (const b of document.querySelectorAll('[data-preset]')) b.addEventListener('click', () => applyPreset(b.getAttribute('data-preset')));
    for (const id of Object.values(FIELD_INPUT)) $('#' + id).addEventListener('input', () => $('#' + id).classList.remove('invalid'));
    openJobFromHash();
    await loadOps();
    await refreshRegistry();
    // data-ready: every card has had its first fill, so the layout has its loaded size
    await Promise.all([loop(refreshHealth, 2000), loop(refreshRegistry, 5000), loop(refreshJobs, 1000)]);
    document.body.setAttribute('data-ready', '1');
  });

  // The page's fragment as {key: value}: #job=ID (a job's permalink),
  // #model=NAME&monitor=ID&lr=ETA&from=V&to=V (a training-monitor panel's, monitor.js).
  function hashParams() {
    const out = {};
    for (const kv of window.location.hash.replace(/^#/, '').split('&')) {
      const i = kv.indexOf('=');
      if (i > 0) out[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
    }
    return out;
  }
  function openJobFromHash() {
    const p = hashParams();
    if (!p.job) return;
    state.selected = p.job;
    select(p.job);
    $('#result-card').scrollIntoView();
  }
  window.addEventListener('hashchange', openJobFromHash);

  // for tests, the console and monitor.js
  window.curvd = { state, api, select,
    lib: { el, sv, fmt, frame, pathOf, PALETTE, isNum, textWidth, hashParams } };
})();
