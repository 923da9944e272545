// Seedling volunteer page: the controls, the figures and the notices. No
// framework and no build step: the browser loads these ES modules as they are.
//
//   pool.js    the Web Workers (worker.js), one volunteer connection each
//   status.js  /api/status, polled
//   chart.js   the loss chart
//   format.js  how numbers are written
//   credit.js  the lasting name and tokens, and the contributors' leaderboard
//   state.js   window.seedling, published after every change
//
// Every change (a worker's message, a button, a status answer, the 1 s
// clock) ends in `render()`, which redraws the tab's figures from the pool
// and the poller and publishes them.

import { LossChart } from './chart.js';
import { Leaderboard, NAME_MAX, cleanName, loadName, saveName } from './credit.js';
import { fmtDuration, fmtInt, fmtParams, fmtRate, prettyData } from './format.js';
import { Pool } from './pool.js';
import { publish } from './state.js';
import { StatusPoller } from './status.js';

const NOTICE_MS = 8000;

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

// ---------------------------------------------------------------- the parts

const pool = new Pool({
  onChange: () => render(),
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
  input.value = String(Math.max(1, cores - 1));
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
  $('contribute').addEventListener('click', () => (pool.running ? pool.stop() : pool.start(clampWorkers(input.value))));

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

/** Redraws what depends on the pool and publishes `window.seedling`. */
function render() {
  const now = performance.now();
  const running = pool.running;
  const button = $('contribute');
  button.textContent = running ? 'Stop' : 'Contribute';
  button.classList.toggle('running', running);
  button.setAttribute('aria-pressed', String(running));

  const members = pool.membersEvaluated();
  const workers = pool.size;
  const connected = pool.connected();
  $('tab-members').textContent = fmtInt(members);
  $('tab-rate').textContent = fmtRate(pool.rate(now));
  $('tab-workers').textContent = String(workers);
  $('tab-time').textContent = fmtDuration(pool.contributedMs(now));

  const line = $('state-line');
  line.className = 'state-line';
  if (!running) {
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

  publish({
    hashes: pool.hashes,
    running,
    workers,
    membersEvaluated: members,
    status: poller.last,
    identity: { name: cleanName($('name').value), ids },
    contributors: board.last,
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

  chart.draw(s.history || []);
  const last = (s.history || []).at(-1);
  const parts = [];
  if (last && last.train_loss != null) parts.push(`training ${last.train_loss.toFixed(3)}`);
  if (s.val_loss != null) parts.push(`validation ${s.val_loss.toFixed(3)}`);
  $('loss-now').textContent = parts.length ? `Latest: ${parts.join(', ')}.` : '';
}

// ---------------------------------------------------------------------- boot

setupControls();
render();
poller.start();
board.start();
setInterval(render, 1000);
