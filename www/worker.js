// One Seedling volunteer: a dedicated Web Worker with its own wasm instance.
//
// This file loads the wasm module, forwards messages, and holds the worker
// to its CPU share. The job loop lives in Rust: the volunteer lifecycle
// (handshake, updates, rejections, reconnection) in seedling-core's
// `volunteer` module, its WebSocket driver in wasm-client/src/net.rs, which
// posts plain objects back to the page: {type: 'status' | 'hash' | 'sample'
// | 'identity' | 'error', ...}; 'identity' carries the session token to keep
// for the next load.
//
// The duty cycle lives here, not in the Rust loop: that loop evaluates a
// job synchronously inside the socket's message handler and sends its
// results at once, so resting right after it (this file gets the job's
// 'status' notice synchronously, after the results went out) delays the
// next job and never a result. The rest is a blocking `Atomics.wait` on a
// private SharedArrayBuffer, which only a cross-origin isolated page has
// (the server sends COOP/COEP); elsewhere the page offers 100 % only.
// The arithmetic is server/src/duty.rs's `DutyCycle`, the native worker's
// `--cpu-percent`: a token bucket over a 100 ms window, charged with the
// time spent computing (`busyMs`, measured with performance.now() around
// the handling of each server frame, evaluation included, in the Rust loop).
//
// Page -> worker:
//   {type: 'start', url, sampleEvery, share, token, name}
//                                        join the run at the WebSocket `url`
//                                        (or the first of several separated
//                                        by spaces, moving to the next each
//                                        time a connection ends),
//                                        computing `share` (0-1] of the time,
//                                        as the contributor of `token` (from
//                                        an earlier 'identity' notice; null
//                                        for a new one) named `name`
//   {type: 'share', share}               a new CPU share
//   {type: 'stop'}                       say goodbye and close
// (The page stops workers with worker.terminate(); 'stop' is the polite way.)
// Worker -> page: the Rust loop's notices, each 'status' with `restMs` (the
// time this worker rested so far) added.

import init, { Volunteer } from './pkg/seedling_wasm.js';

/** The window of the share: after idling, a worker may compute share * WINDOW_MS without resting. */
const WINDOW_MS = 100;
/** Shorter rests are carried as debt into the next job. */
const MIN_REST_MS = 1;

/** server/src/duty.rs's DutyCycle, on performance.now()'s clock (ms). */
export class DutyCycle {
  constructor(share) {
    this.share = Math.min(1, Math.max(0.01, share));
    this.cap = this.share * WINDOW_MS;
    this.credit = this.cap;
    this.last = null;
  }

  /** The worker computed `busy` ms, ending at `now`: how long to rest. */
  rest(now, busy) {
    const idle = this.last == null ? 0 : Math.max(0, now - this.last - busy);
    const saved = Math.min(this.cap, this.credit + this.share * idle);
    this.credit = saved - (1 - this.share) * busy;
    this.last = now;
    if (this.credit >= 0) return 0;
    const rest = -this.credit / this.share;
    if (rest < MIN_REST_MS) return 0;
    this.credit = 0;
    this.last = now + rest;
    return rest;
  }
}

const ready = init().catch((err) => {
  self.postMessage({
    type: 'error',
    fatal: true,
    message: `Could not load the WebAssembly module: ${err}`,
  });
  throw err;
});

/** A cell to wait on, when this worker may block (cross-origin isolated). */
const cell = typeof SharedArrayBuffer === 'function' ? new Int32Array(new SharedArrayBuffer(4)) : null;

let volunteer = null;
let duty = new DutyCycle(1);
let lastBusy = 0;
let restedMs = 0;

/** Blocks this worker for `ms`: no frame is handled meanwhile. */
function sleep(ms) {
  if (cell) Atomics.wait(cell, 0, 0, ms);
}

/** A notice from the Rust loop: posted, then the rest it calls for. */
function onNotice(msg) {
  let rest = 0;
  if (msg.type === 'status' && typeof msg.busyMs === 'number') {
    const busy = msg.busyMs - lastBusy;
    lastBusy = msg.busyMs;
    if (busy > 0 && duty.share < 1 && cell) rest = duty.rest(performance.now(), busy);
    restedMs += rest;
    msg.restMs = restedMs;
  }
  self.postMessage(msg);
  if (rest > 0) sleep(rest);
}

self.onmessage = async ({ data }) => {
  try {
    await ready;
  } catch {
    return;
  }
  if (data.type === 'start' && !volunteer) {
    duty = new DutyCycle(data.share ?? 1);
    volunteer = new Volunteer();
    volunteer.identity(data.token ?? undefined, String(data.name ?? ''));
    self.postMessage({ type: 'version', version: Volunteer.version(), protocol: Volunteer.protocolVersion() });
    volunteer.start(data.url, onNotice, data.sampleEvery ?? 0);
  } else if (data.type === 'share') {
    duty = new DutyCycle(data.share ?? 1);
  } else if (data.type === 'stop' && volunteer) {
    volunteer.stop();
    volunteer.free();
    volunteer = null;
  }
};
