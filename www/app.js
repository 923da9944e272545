// Seedling volunteer page: the controls, the figures and the notices. No
// framework and no build step: the browser loads these ES modules as they are.
//
//   pool.js    the Web Workers (worker.js), one volunteer connection each
//   status.js  /api/status, polled; the curve from /api/history
//   chart.js   the loss chart
//   format.js  how numbers are written
//   credit.js  the lasting name and tokens, and the contributors' leaderboard
//   state.js   window.seedling, published after every change
//
// Every change (a worker's message, a button, a status answer, the 1 s
// clock) ends in `render()`, which redraws the tab's figures from the pool
// and the poller and publishes them. Workers' messages redraw at most every
// RENDER_MS (`renderSoon`): each worker reports twice a step, and a redraw
// per report made the tab's main thread cost more CPU than its volunteer.
//
// The volunteer's CPU share and the automatic pause: each worker computes
// the chosen share of the time (a duty cycle in worker.js), and the page
// holds every worker back while the tab is hidden (Page Visibility) or the
// device runs on battery (navigator.getBattery, where the browser has it),
// starting them again by itself when that ends. The query string may preset
// the controls: `?share=25&workers=1&autostart=1` (the fleet emulator opens
// headless tabs so).

import { LossChart } from './chart.js';
import { Leaderboard, NAME_MAX, cleanName, loadName, saveName } from './credit.js';
import { fmtDuration, fmtInt, fmtParams, fmtRate, prettyData } from './format.js';
import { Pool } from './pool.js';
import { publish } from './state.js';
import { StatusPoller } from './status.js';

const NOTICE_MS = 8000;
/**
 * Workers' messages redraw the page at most this often. A fleet at 64
 * steps/s sends each worker a hash and a status notice per step; with a
 * redraw for each, a headless tab's main thread used 22% of a core against
 * 13% for its volunteer at a 25% share (docs/LEARNING.md, "Browsers in
 * the fleet").
 */
const RENDER_MS = 250;
/** The pending redraw a worker's message asked for, when the last ran, and how many ran. */
let renderTimer = null;
let renderedAt = -Infinity;
let renders = 0;
/** The busy fraction is measured over this much recent wall time. */
const BUSY_WINDOW_MS = 5000;
/** The CPU shares the page offers, in percent. */
const SHARES = [25, 50, 75, 100];

const $ = (id) => document.getElementById(id);

const cores = navigator.hardwareConcurrency || 2;
const maxWorkers = Math.max(2, cores);

function clampWorkers(v) {
  const n = Math.round(Number(v));
  return Number.isFinite(n) ? Math.min(maxWorkers, Math.max(1, n)) : 1;
}

// ------------------------------------------------------------------ notices

/** Shows `message` above the figures; a fatal one stays, others fade. */
const showNotice = (() => {
  let timer = null;
  return (message, fatal) => {
    const el = $('notice');
    el.textContent = message;
    el.classList.toggle('fatal', !!fatal);
    el.hidden = false;
    clearTimeout(timer);
    if (!fatal) timer = setTimeout(() => { el.hidden = true; }, NOTICE_MS);
  };
})();

function showSample(text, step) {
  const el = $('sample');
  el.classList.remove('placeholder');
  // The prompt is a newline, so samples often open with a blank line.
  el.textContent = text.replace(/^\s+/, '');
  $('sample-meta').textContent =
    `Sampled in this tab from its own copy of the weights at step ${fmtInt(step)}: 120 characters at temperature 0.8.`;
}

function showVersion(version, protocol) {
  $('version').textContent = `v${version}`;
  $('protocol').textContent = String(protocol);
  $('build').hidden = false;
}

// ------------------------------------------------------- share and pauses

const query = new URLSearchParams(location.search);

/** Whether the volunteer asked to contribute (pauses aside). */
let wanted = false;
/** Why the page holds its workers back: 'hidden', 'battery' or null. */
let pauseReason = null;
/** The battery, when the browser tells (null: unknown, treated as mains). */
let battery = null;
/** Recent {t, busy, workers} samples of the tab's evaluation time. */
let busySamples = [];

/** Rest between jobs needs a blocking wait, which needs cross-origin isolation. */
const canRest = self.crossOriginIsolated && typeof SharedArrayBuffer === 'function';

function shareFromQuery() {
  const p = Number(query.get('share'));
  if (!canRest) return 100;
  return SHARES.includes(p) ? p : 100;
}

/** Why the workers should pause now, or null. */
function pauseCause() {
  if (document.visibilityState === 'hidden') return 'hidden';
  if (battery && battery.charging === false) return 'battery';
  return null;
}

/** Starts or stops the pool so it runs exactly when wanted and not paused. */
function sync() {
  pauseReason = pauseCause();
  const should = wanted && pauseReason == null;
  if (should && !pool.running) {
    busySamples = [];
    pool.start(clampWorkers($('workers').value));
  } else if (!should && pool.running) {
    busySamples = [];
    pool.stop(pauseReason != null ? 'pause' : 'user');
  }
  render();
}

function watchPauses() {
  document.addEventListener('visibilitychange', sync);
  if (typeof navigator.getBattery === 'function') {
    navigator.getBattery().then((b) => {
      battery = b;
      b.addEventListener('chargingchange', sync);
      sync();
    }, () => {});
  }
}

/** The tab's busy time per worker over the last BUSY_WINDOW_MS, or null. */
function busyFraction(now) {
  if (!pool.running) return null;
  busySamples.push({ t: now, busy: pool.busyMs(), workers: pool.size });
  while (busySamples.length > 2 && now - busySamples[1].t >= BUSY_WINDOW_MS) busySamples.shift();
  const first = busySamples[0];
  const span = now - first.t;
  if (span < 1000 || first.workers !== pool.size) return null;
  return (pool.busyMs() - first.busy) / (span * pool.size);
}

// ---------------------------------------------------------------- the parts

const pool = new Pool({
  onChange: () => {
    // A failure stops the pool for good: the volunteer presses Contribute again.
    if (!pool.running && pool.stopReason === 'failure') wanted = false;
    renderSoon();
  },
  onSample: showSample,
  onVersion: showVersion,
  onNotice: showNotice,
  name: () => cleanName($('name').value),
});

const board = new Leaderboard($('leaderboard'), {
  mine: () => pool.publicIds(),
  onBoard: (b) => {
    $('board-total').textContent = `${fmtInt(b.total)} in all`;
    render();
  },
});

const chart = new LossChart($('chart'), $('chart-empty'));

const poller = new StatusPoller({
  onStatus: (status) => {
    renderStatus(status);
    render();
  },
  onDown: () => setPill('down', 'Server unreachable'),
});

// ------------------------------------------------------------------ controls

function setupControls() {
  const input = $('workers');
  input.max = String(maxWorkers);
  input.value = String(query.has('workers') ? clampWorkers(query.get('workers')) : Math.max(1, cores - 1));
  $('workers-hint').textContent =
    `Your device has ${cores} CPU thread${cores === 1 ? '' : 's'}. Each worker keeps one busy while you contribute.`;

  const apply = () => {
    const n = clampWorkers(input.value);
    input.value = String(n);
    if (pool.running && n !== pool.size) pool.resize(n);
  };
  input.addEventListener('change', apply);
  $('workers-minus').addEventListener('click', () => { input.value = String(clampWorkers(input.value) - 1); apply(); });
  $('workers-plus').addEventListener('click', () => { input.value = String(clampWorkers(input.value) + 1); apply(); });
  $('contribute').addEventListener('click', () => {
    wanted = !wanted;
    sync();
  });

  const share = $('cpu-share');
  for (const p of SHARES) {
    const option = document.createElement('option');
    option.value = String(p);
    option.textContent = `${p} %`;
    share.append(option);
  }
  share.value = String(shareFromQuery());
  share.disabled = !canRest;
  if (!canRest) $('cpu-hint').textContent = 'This page is not cross-origin isolated, so its workers cannot rest: they use all of their core.';
  pool.setShare(Number(share.value) / 100);
  share.addEventListener('change', () => pool.setShare(Number(share.value) / 100));

  $('isolation').textContent = self.crossOriginIsolated ? 'yes' : 'no';

  // The name is kept as the server will show it; running workers keep the
  // name they joined with until they reconnect.
  const name = $('name');
  name.value = loadName();
  name.addEventListener('change', () => {
    name.value = cleanName(name.value).slice(0, 4 * NAME_MAX);
    saveName(name.value);
    render();
  });
}

// ------------------------------------------------------------------ figures

/** `render()` within RENDER_MS of the last one, once however many ask. */
function renderSoon() {
  if (renderTimer != null) return;
  const wait = Math.max(0, renderedAt + RENDER_MS - performance.now());
  renderTimer = setTimeout(() => {
    renderTimer = null;
    render();
  }, wait);
}

/** Redraws what depends on the pool and publishes `window.seedling`. */
function render() {
  const now = performance.now();
  renderedAt = now;
  renders += 1;
  const running = pool.running;
  const button = $('contribute');
  button.textContent = wanted ? 'Stop' : 'Contribute';
  button.classList.toggle('running', wanted);
  button.setAttribute('aria-pressed', String(wanted));
  const fraction = busyFraction(now);
  const paused = wanted && pauseReason != null;

  const members = pool.membersEvaluated();
  const workers = pool.size;
  const connected = pool.connected();
  $('tab-members').textContent = fmtInt(members);
  $('tab-rate').textContent = fmtRate(pool.rate(now));
  $('tab-workers').textContent = String(workers);
  $('tab-time').textContent = fmtDuration(pool.contributedMs(now));

  const line = $('state-line');
  line.className = 'state-line';
  if (paused) {
    line.textContent = pauseReason === 'hidden'
      ? 'Paused while this tab is hidden; it resumes when you come back.'
      : 'Paused while your device runs on battery; it resumes when it charges.';
    line.classList.add('warn');
  } else if (!running) {
    if (pool.stopReason === 'failure') line.textContent = 'Stopped because of the problem described above.';
    else if (pool.stopReason === 'user') line.textContent = 'Stopped. Thank you for helping!';
    else line.textContent = 'Not contributing. Nothing runs until you press Contribute.';
  } else if (connected === 0) {
    line.textContent = 'Connecting to the training server…';
    if (pool.runningFor(now) > 5000) line.classList.add('warn');
  } else {
    line.textContent = `Contributing with ${connected} of ${workers} worker${workers === 1 ? '' : 's'}.`;
    line.classList.add('ok');
  }

  const remote = poller.last ? poller.last.step : -1;
  const step = Math.max(pool.latestStep(), remote);
  $('step').textContent = step >= 0 ? fmtInt(step) : '–';

  const ids = pool.publicIds();
  $('my-ids').textContent = ids.length ? ` (${ids.join(', ')})` : '';
  board.draw();

  const sharePct = Math.round(pool.share * 100);
  $('cpu-state').textContent = paused
    ? 'paused'
    : running
      ? `${sharePct} % of each worker's core${fraction != null ? `, busy ${Math.round(fraction * 100)} % lately` : ''}`
      : `${sharePct} % of each worker's core`;

  const cpu = { share: pool.share, paused, pauseReason: paused ? pauseReason : null, busyMs: pool.busyMs(), busyFraction: fraction };
  publish({
    renders,
    hashes: pool.hashes,
    running,
    workers,
    membersEvaluated: members,
    status: poller.last,
    identity: { name: cleanName($('name').value), ids },
    contributors: board.last,
    cpu,
  });
}

function setPill(kind, text) {
  const pill = $('run-pill');
  pill.className = `pill ${kind}`;
  $('run-pill-text').textContent = text;
}

/** Shows a fresh /api/status: the run's figures, its state and the loss chart. */
function renderStatus(s) {
  const { stalled, stepsMin, runRate } = poller.rates(performance.now());
  $('params').textContent = fmtParams(s.params);
  $('data').textContent = prettyData(s.data);
  $('data').title = s.data || '';
  $('population').textContent = fmtInt(s.population);
  $('volunteers').textContent = fmtInt(s.volunteers.total);
  $('steps-min').textContent = fmtRate(stepsMin);
  $('run-rate').textContent = fmtRate(runRate);

  if (s.finished) setPill('', 'Run finished');
  else if (s.paused) setPill('', 'Paused by the operator');
  else if (s.volunteers.total === 0) setPill('', 'Waiting for volunteers');
  else if (stalled) setPill('', 'Paused');
  else setPill('live', `Training live · ${fmtInt(s.volunteers.total)} online`);

  chart.draw(poller.history);
  const parts = [];
  if (s.train_loss != null) parts.push(`training ${s.train_loss.toFixed(3)}`);
  if (s.val_loss != null) parts.push(`validation ${s.val_loss.toFixed(3)}`);
  $('loss-now').textContent = parts.length ? `Latest: ${parts.join(', ')}.` : '';
}

// ---------------------------------------------------------------------- boot

setupControls();
watchPauses();
render();
poller.start();
board.start();
setInterval(render, 1000);
if (query.get('autostart') === '1') {
  wanted = true;
  sync();
}
