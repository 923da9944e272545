// Seedling volunteer page: live figures from /api/status, and a pool of Web
// Workers (www/worker.js), each one independent volunteer connection with its
// own wasm instance. No framework and no build step: this file is served as is.
//
// For tests (and the curious), `window.seedling` exposes what the page knows:
//   hashes[i]   the last {step, hash} worker i reported to the server (hex
//               hash, the server's format), or null before its first report;
//   running, workers, membersEvaluated, status (the last /api/status).

const POLL_MS = 1500;
/// A worker's members/s counts towards the tab's only while this fresh.
const RATE_FRESH_MS = 15000;
/// Worker 0 posts a text sample every this many steps (and at most every 2 s).
const SAMPLE_EVERY_STEPS = 3;
const NOTICE_MS = 8000;

const $ = (id) => document.getElementById(id);

const cores = navigator.hardwareConcurrency || 2;
const maxWorkers = Math.max(2, cores);

const seedling = {
  hashes: [],
  running: false,
  workers: 0,
  membersEvaluated: 0,
  status: null,
};
window.seedling = seedling;

/** Live workers, in index order: {worker, index, members, rate, rateAt, connected, step}. */
let pool = [];
/** Members evaluated by workers that were stopped since the page opened. */
let retiredMembers = 0;
/** Milliseconds spent contributing before the current run of workers. */
let contributedMs = 0;
let runningSince = null;
let stoppedOnce = false;
/** Set when contributing stopped on a fatal error (shown in the notice). */
let failed = false;
let lastStatus = null;
/** The last time the run's step was seen to change, to spot a stalled run. */
let stepSeen = { step: null, at: 0 };
let noticeTimer = null;

// ---------------------------------------------------------------- formatting

const intFmt = new Intl.NumberFormat('en-US');

function fmtInt(n) {
  return n == null || !Number.isFinite(n) ? '–' : intFmt.format(Math.round(n));
}

function fmtRate(x) {
  if (x == null || !Number.isFinite(x)) return '–';
  if (x === 0) return '0';
  if (x < 10) return x.toFixed(1);
  return intFmt.format(Math.round(x));
}

function fmtParams(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(n >= 1e7 ? 0 : 1)} million`;
  return intFmt.format(n);
}

function fmtDuration(ms) {
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** The server names its data by path; volunteers want to know what it is. */
function prettyData(name) {
  if (!name) return 'public text';
  const files = name.split(', ').map((p) => p.split(/[\\/]/).pop());
  if (files.length === 1 && /^tiny-?shakespeare/i.test(files[0])) {
    return 'Tiny Shakespeare, about 1 MB of public-domain Shakespeare plays';
  }
  return files.join(', ');
}

function wsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

// ------------------------------------------------------------------- workers

function spawn(index) {
  const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
  const slot = { worker, index, members: 0, rate: 0, rateAt: 0, connected: false, step: null };
  worker.onmessage = (e) => onWorkerMessage(slot, e.data);
  // A script that fails to load or a Rust panic: the worker is unusable, and
  // its siblings almost surely share the problem, so stop and say so.
  worker.onerror = (e) => {
    e.preventDefault();
    if (!pool.includes(slot)) return;
    showNotice(`A worker failed and contributing stopped: ${e.message || 'the worker script could not start'}.`, true);
    failed = true;
    stop();
  };
  worker.postMessage({
    type: 'start',
    url: wsUrl(),
    sampleEvery: index === 0 ? SAMPLE_EVERY_STEPS : 0,
  });
  return slot;
}

/** Ends a worker at once; its counted members stay in the tab's total. */
function retire(slot) {
  slot.worker.terminate();
  retiredMembers += slot.members;
}

function onWorkerMessage(slot, msg) {
  if (!pool.includes(slot)) return; // a message that raced terminate()
  switch (msg.type) {
    case 'status':
      slot.members = msg.membersEvaluated;
      slot.rate = msg.membersPerSec;
      slot.rateAt = performance.now();
      slot.connected = msg.connected;
      slot.step = msg.step;
      break;
    case 'hash':
      seedling.hashes[slot.index] = { step: msg.step, hash: msg.hash };
      slot.step = msg.step;
      break;
    case 'sample':
      showSample(msg.text, msg.step);
      break;
    case 'version':
      $('version').textContent = `v${msg.version}`;
      $('protocol').textContent = String(msg.protocol);
      $('build').hidden = false;
      break;
    case 'error':
      showNotice(msg.message, msg.fatal);
      if (msg.fatal) {
        failed = true;
        stop();
      }
      break;
    default:
      break;
  }
  renderLocal();
}

function start() {
  failed = false;
  const n = clampWorkers($('workers').value);
  seedling.hashes = new Array(n).fill(null);
  pool = [];
  for (let i = 0; i < n; i++) pool.push(spawn(i));
  runningSince = performance.now();
  seedling.running = true;
  renderControl();
  renderLocal();
}

function stop() {
  for (const slot of pool) retire(slot);
  pool = [];
  if (runningSince != null) contributedMs += performance.now() - runningSince;
  runningSince = null;
  seedling.running = false;
  stoppedOnce = true;
  renderControl();
  renderLocal();
}

/** Grows or shrinks the running pool to `n` workers. */
function resize(n) {
  while (pool.length < n) pool.push(spawn(pool.length));
  while (pool.length > n) retire(pool.pop());
  seedling.hashes.length = n;
  for (let i = 0; i < n; i++) if (seedling.hashes[i] === undefined) seedling.hashes[i] = null;
  renderLocal();
}

function clampWorkers(v) {
  const n = Math.round(Number(v));
  return Number.isFinite(n) ? Math.min(maxWorkers, Math.max(1, n)) : 1;
}

// ------------------------------------------------------------------ controls

function setupControls() {
  const input = $('workers');
  input.max = String(maxWorkers);
  input.value = String(Math.max(1, cores - 1));
  $('workers-hint').textContent =
    `Your device has ${cores} CPU thread${cores === 1 ? '' : 's'}. Each worker keeps one busy while you contribute.`;

  const apply = () => {
    const n = clampWorkers(input.value);
    input.value = String(n);
    if (seedling.running && n !== pool.length) resize(n);
  };
  input.addEventListener('change', apply);
  $('workers-minus').addEventListener('click', () => { input.value = String(clampWorkers(input.value) - 1); apply(); });
  $('workers-plus').addEventListener('click', () => { input.value = String(clampWorkers(input.value) + 1); apply(); });
  $('contribute').addEventListener('click', () => (seedling.running ? stop() : start()));

  $('isolation').textContent = self.crossOriginIsolated ? 'yes' : 'no';
}

function renderControl() {
  const button = $('contribute');
  button.textContent = seedling.running ? 'Stop' : 'Contribute';
  button.classList.toggle('running', seedling.running);
  button.setAttribute('aria-pressed', String(seedling.running));
}

// -------------------------------------------------------------- local figures

function renderLocal() {
  const now = performance.now();
  const members = retiredMembers + pool.reduce((sum, s) => sum + s.members, 0);
  const rate = pool.reduce((sum, s) => sum + (now - s.rateAt < RATE_FRESH_MS ? s.rate : 0), 0);
  const connected = pool.filter((s) => s.connected).length;
  seedling.workers = pool.length;
  seedling.membersEvaluated = members;

  $('tab-members').textContent = fmtInt(members);
  $('tab-rate').textContent = fmtRate(rate);
  $('tab-workers').textContent = String(pool.length);
  const ms = contributedMs + (runningSince != null ? now - runningSince : 0);
  $('tab-time').textContent = fmtDuration(ms);

  const line = $('state-line');
  line.className = 'state-line';
  if (!seedling.running) {
    if (failed) line.textContent = 'Stopped because of the problem described above.';
    else if (stoppedOnce) line.textContent = 'Stopped. Thank you for helping!';
    else line.textContent = 'Not contributing. Nothing runs until you press Contribute.';
  } else if (connected === 0) {
    line.textContent = 'Connecting to the training server…';
    if (runningSince != null && now - runningSince > 5000) line.classList.add('warn');
  } else {
    line.textContent = `Contributing with ${connected} of ${pool.length} worker${pool.length === 1 ? '' : 's'}.`;
    line.classList.add('ok');
  }
  renderStep();
}

function renderStep() {
  const local = pool.reduce((m, s) => (s.step != null && s.step > m ? s.step : m), -1);
  const remote = lastStatus ? lastStatus.step : -1;
  const step = Math.max(local, remote);
  $('step').textContent = step >= 0 ? fmtInt(step) : '–';
}

function showSample(text, step) {
  const el = $('sample');
  el.classList.remove('placeholder');
  // The prompt is a newline, so samples often open with a blank line.
  el.textContent = text.replace(/^\s+/, '');
  $('sample-meta').textContent =
    `Sampled in this tab from its own copy of the weights at step ${fmtInt(step)}: 120 characters at temperature 0.8.`;
}

function showNotice(message, fatal) {
  const el = $('notice');
  el.textContent = message;
  el.classList.toggle('fatal', !!fatal);
  el.hidden = false;
  clearTimeout(noticeTimer);
  if (!fatal) noticeTimer = setTimeout(() => { el.hidden = true; }, NOTICE_MS);
}

// ---------------------------------------------------------------- run status

async function poll() {
  try {
    const res = await fetch('/api/status', { cache: 'no-store' });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const status = await res.json();
    lastStatus = status;
    seedling.status = status;
    renderStatus(status);
  } catch {
    setPill('down', 'Server unreachable');
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function setPill(kind, text) {
  const pill = $('run-pill');
  pill.className = `pill ${kind}`;
  $('run-pill-text').textContent = text;
}

function renderStatus(s) {
  const now = performance.now();
  if (s.step !== stepSeen.step) stepSeen = { step: s.step, at: now };
  // /api/status reports rates over the last closed steps, which stay put
  // when a run stalls; after a long silence the honest rate is zero.
  const expected = s.steps_per_s > 0 ? 1000 / s.steps_per_s : Infinity;
  const stalled = now - stepSeen.at > Math.max(10000, 4 * expected);
  const stepsMin = stalled ? 0 : s.steps_per_s * 60;
  const runRate = stalled ? 0 : s.members_per_s;

  $('params').textContent = fmtParams(s.params);
  $('data').textContent = prettyData(s.data);
  $('data').title = s.data || '';
  $('population').textContent = fmtInt(s.population);
  $('volunteers').textContent = fmtInt(s.volunteers.total);
  $('steps-min').textContent = fmtRate(stepsMin);
  $('run-rate').textContent = fmtRate(runRate);
  renderStep();

  if (s.finished) setPill('', 'Run finished');
  else if (s.paused) setPill('', 'Paused by the operator');
  else if (s.volunteers.total === 0) setPill('', 'Waiting for volunteers');
  else if (stalled) setPill('', 'Paused');
  else setPill('live', `Training live · ${fmtInt(s.volunteers.total)} online`);

  drawChart(s.history || []);
  const last = (s.history || []).at(-1);
  const parts = [];
  if (last && last.train_loss != null) parts.push(`training ${last.train_loss.toFixed(3)}`);
  if (s.val_loss != null) parts.push(`validation ${s.val_loss.toFixed(3)}`);
  $('loss-now').textContent = parts.length ? `Latest: ${parts.join(', ')}.` : '';
}

// --------------------------------------------------------------------- chart

const SVG_NS = 'http://www.w3.org/2000/svg';
let lastHistory = [];

/** Round tick values covering [lo, hi], about `n` of them. */
function ticks(lo, hi, n) {
  const span = hi - lo || 1;
  const raw = span / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n * 1.5) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

function el(name, attrs, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text != null) node.textContent = text;
  return node;
}

/** Exponential moving average, so the trend shows through the step-to-step noise. */
function smooth(points, alpha) {
  let acc = null;
  return points.map(([x, y]) => {
    acc = acc == null ? y : acc + alpha * (y - acc);
    return [x, acc];
  });
}

function drawChart(history) {
  lastHistory = history;
  const svg = $('chart');
  const train = history
    .filter((p) => p.train_loss != null && Number.isFinite(p.train_loss))
    .map((p) => [p.step, p.train_loss]);
  const val = history
    .filter((p) => p.val_loss != null && Number.isFinite(p.val_loss))
    .map((p) => [p.step, p.val_loss]);
  svg.setAttribute('data-points', String(train.length));
  svg.setAttribute('data-val-points', String(val.length));
  $('chart-empty').hidden = train.length + val.length > 0;

  const w = svg.clientWidth || 600;
  const h = svg.clientHeight || 300;
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  svg.replaceChildren();
  if (train.length + val.length === 0) return;

  const all = train.concat(val);
  let x0 = Math.min(...all.map((p) => p[0]));
  let x1 = Math.max(...all.map((p) => p[0]));
  if (x1 === x0) x1 = x0 + 1;
  let y0 = Math.min(...all.map((p) => p[1]));
  let y1 = Math.max(...all.map((p) => p[1]));
  const padY = (y1 - y0) * 0.08 || 0.1;
  y0 -= padY;
  y1 += padY;

  const m = { l: 46, r: 14, t: 12, b: 30 };
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (w - m.l - m.r);
  const Y = (y) => m.t + (1 - (y - y0) / (y1 - y0)) * (h - m.t - m.b);

  for (const v of ticks(y0, y1, 5)) {
    svg.append(el('line', { x1: m.l, x2: w - m.r, y1: Y(v), y2: Y(v), stroke: '#e6ece8' }));
    svg.append(el('text', { x: m.l - 8, y: Y(v) + 4, 'text-anchor': 'end' }, v.toFixed(2)));
  }
  const xt = ticks(x0, x1, Math.max(2, Math.floor((w - m.l - m.r) / 90))).filter((v) => Number.isInteger(v));
  for (const v of xt) {
    svg.append(el('line', { x1: X(v), x2: X(v), y1: h - m.b, y2: h - m.b + 4, stroke: '#b9c6be' }));
    svg.append(el('text', { x: X(v), y: h - m.b + 18, 'text-anchor': 'middle' }, fmtInt(v)));
  }
  svg.append(el('line', { x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b, stroke: '#b9c6be' }));
  svg.append(el('text', { x: w - m.r, y: h - 2, 'text-anchor': 'end' }, 'step'));

  const path = (pts) => pts.map(([x, y], i) => `${i ? 'L' : 'M'}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join('');
  if (train.length > 1) {
    svg.append(el('path', { d: path(train), fill: 'none', stroke: '#2f9e63', 'stroke-opacity': 0.28, 'stroke-width': 1.2 }));
    const alpha = Math.min(1, 8 / train.length + 0.05);
    svg.append(el('path', { d: path(smooth(train, alpha)), fill: 'none', stroke: '#2f9e63', 'stroke-width': 2.2, 'stroke-linejoin': 'round' }));
  } else if (train.length === 1) {
    svg.append(el('circle', { cx: X(train[0][0]), cy: Y(train[0][1]), r: 3, fill: '#2f9e63' }));
  }
  if (val.length > 1) {
    svg.append(el('path', { d: path(val), fill: 'none', stroke: '#d9822b', 'stroke-width': 2, 'stroke-linejoin': 'round' }));
  }
  for (const [x, y] of val) {
    svg.append(el('circle', { cx: X(x), cy: Y(y), r: 3.2, fill: '#fff', stroke: '#d9822b', 'stroke-width': 2 }));
  }
}

// ---------------------------------------------------------------------- boot

setupControls();
renderControl();
renderLocal();
poll();
setInterval(renderLocal, 1000);
new ResizeObserver(() => drawChart(lastHistory)).observe($('chart'));
