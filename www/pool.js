// The tab's pool of Web Workers (worker.js), each one independent volunteer
// connection with its own wasm instance, and the tab's tallies of them.
//
// The postMessage interface with worker.js:
//   page -> worker: {type: 'start', url, sampleEvery, share, token, name}
//                   {type: 'share', share}
//   worker -> page: {type: 'status', membersEvaluated, membersPerSec, connected, step, busyMs, restMs}
//                   {type: 'hash', step, hash}
//                   {type: 'sample', text, step}
//                   {type: 'version', version, protocol}
//                   {type: 'identity', token}   (kept for the next load)
//                   {type: 'error', message, fatal}
// The page ends a worker with worker.terminate().
//
// Each worker joins as the contributor of an identity slot it claims
// (credit.js): the slot's stored session token and the page's name.

import { claimSlot, publicId, saveToken } from './credit.js';

/** A worker's members/s counts towards the tab's only while this fresh. */
const RATE_FRESH_MS = 15000;
/** Worker 0 posts a text sample every this many steps (and at most every 2 s). */
const SAMPLE_EVERY_STEPS = 3;

/** The run's WebSocket on the server that served the page. */
function localWsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

/**
 * Where a new worker connects, as WebSocket URLs separated by spaces: the
 * run's relays in a random order, when the coordinator lists relays with
 * a public URL (`/api/relays`, `seedling serve --nats`); otherwise the
 * server that served the page (a one-process server, or a relay serving
 * the page itself). The worker joins the first and moves to the next
 * each time its connection ends, so a tab whose relay goes away goes on
 * through another.
 */
async function wsUrls() {
  try {
    const res = await fetch('/api/relays');
    if (res.ok) {
      const urls = Object.values(await res.json()).map((r) => r.url).filter((u) => /^https?:\/\//.test(u));
      if (urls.length > 0) {
        for (let i = urls.length - 1; i > 0; i--) {
          const j = Math.floor(Math.random() * (i + 1));
          [urls[i], urls[j]] = [urls[j], urls[i]];
        }
        return urls.map((u) => `${u.replace(/\/+$/, '').replace(/^http/, 'ws')}/ws`).join(' ');
      }
    }
  } catch {
    // No relay list: this server is the one to join.
  }
  return localWsUrl();
}

/**
 * The running workers and what they reported. The page reads it and is
 * told of every change through `onChange`; a worker's text samples, its
 * build and notices go to `onSample(text, step)`, `onVersion(version,
 * protocol)` and `onNotice(message, fatal)`. A fatal error stops the pool.
 */
export class Pool {
  /** hashes[i]: the last {step, hash} worker i reported, or null. */
  hashes = [];
  /** Why the pool last stopped: null (never did), 'user' or 'failure'. */
  stopReason = null;
  /** Live workers in index order: {worker, index, members, rate, rateAt, connected, step, busyMs, identity, id}. */
  #slots = [];
  /** Members evaluated by workers that were stopped since the page opened. */
  #retiredMembers = 0;
  /** Milliseconds of evaluation by workers that were stopped. */
  #retiredBusyMs = 0;
  /** Each worker's CPU share, in (0, 1] (see worker.js). */
  #share = 1;
  /** Milliseconds spent contributing before the current run of workers. */
  #contributedMs = 0;
  /** When the current run of workers started (performance.now()), or null. */
  #since = null;
  #on;

  /** `name()`: the display name a new worker joins under. */
  constructor({ onChange, onSample, onVersion, onNotice, name }) {
    this.#on = { onChange, onSample, onVersion, onNotice, name };
  }

  /** The public ids of the running workers' contributors (known so far). */
  publicIds() {
    return this.#slots.map((s) => s.id).filter((id) => id != null);
  }

  /** Whether the tab is contributing. */
  get running() {
    return this.#since != null;
  }

  /** How many workers run. */
  get size() {
    return this.#slots.length;
  }

  /** The CPU share every worker computes (0-1]. */
  get share() {
    return this.#share;
  }

  /** Sets every worker's CPU share, running ones included. */
  setShare(share) {
    this.#share = share;
    for (const slot of this.#slots) slot.worker.postMessage({ type: 'share', share });
    this.#on.onChange();
  }

  /** Starts `n` workers. */
  start(n) {
    this.hashes = new Array(n).fill(null);
    this.#slots = [];
    for (let i = 0; i < n; i++) this.#slots.push(this.#spawn(i));
    this.#since = performance.now();
    this.#on.onChange();
  }

  /** Ends every worker at once (`reason`: 'user' or 'failure'). */
  stop(reason = 'user') {
    for (const slot of this.#slots) this.#retire(slot);
    this.#slots = [];
    if (this.#since != null) this.#contributedMs += performance.now() - this.#since;
    this.#since = null;
    this.stopReason = reason;
    this.#on.onChange();
  }

  /** Grows or shrinks the running pool to `n` workers. */
  resize(n) {
    while (this.#slots.length < n) this.#slots.push(this.#spawn(this.#slots.length));
    while (this.#slots.length > n) this.#retire(this.#slots.pop());
    this.hashes.length = n;
    for (let i = 0; i < n; i++) if (this.hashes[i] === undefined) this.hashes[i] = null;
    this.#on.onChange();
  }

  /** Members this tab evaluated since it opened, stopped workers included. */
  membersEvaluated() {
    return this.#retiredMembers + this.#slots.reduce((sum, s) => sum + s.members, 0);
  }

  /** The tab's members/s at `now`, from workers that reported recently. */
  rate(now) {
    return this.#slots.reduce((sum, s) => sum + (now - s.rateAt < RATE_FRESH_MS ? s.rate : 0), 0);
  }

  /** Milliseconds the tab's workers spent evaluating since it opened. */
  busyMs() {
    return this.#retiredBusyMs + this.#slots.reduce((sum, s) => sum + s.busyMs, 0);
  }

  /** Workers connected to the server. */
  connected() {
    return this.#slots.filter((s) => s.connected).length;
  }

  /** The newest step any worker is at, or -1. */
  latestStep() {
    return this.#slots.reduce((m, s) => (s.step != null && s.step > m ? s.step : m), -1);
  }

  /** Milliseconds contributed since the page opened, at `now`. */
  contributedMs(now) {
    return this.#contributedMs + (this.#since != null ? now - this.#since : 0);
  }

  /** Milliseconds since the current run of workers started, or null. */
  runningFor(now) {
    return this.#since != null ? now - this.#since : null;
  }

  #spawn(index) {
    const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
    const slot = {
      worker, index, members: 0, rate: 0, rateAt: 0, connected: false, step: null, busyMs: 0, identity: null, id: null,
    };
    worker.onmessage = (e) => this.#onMessage(slot, e.data);
    // A script that fails to load or a Rust panic: the worker is unusable,
    // and its siblings almost surely share the problem, so stop and say so.
    worker.onerror = (e) => {
      e.preventDefault();
      if (!this.#slots.includes(slot)) return;
      this.#fail(`A worker failed and contributing stopped: ${e.message || 'the worker script could not start'}.`);
    };
    claimSlot().then(async (identity) => {
      if (!this.#slots.includes(slot)) return identity.release();
      slot.identity = identity;
      worker.postMessage({
        type: 'start',
        url: await wsUrls(),
        sampleEvery: index === 0 ? SAMPLE_EVERY_STEPS : 0,
        token: identity.token,
        name: this.#on.name(),
        share: this.#share,
      });
      slot.id = await publicId(identity.token);
      this.#on.onChange();
    });
    return slot;
  }

  /** Ends a worker at once; its counted members stay in the tab's total. */
  #retire(slot) {
    slot.worker.terminate();
    if (slot.identity) slot.identity.release();
    this.#retiredMembers += slot.members;
    this.#retiredBusyMs += slot.busyMs;
  }

  #fail(message) {
    this.#on.onNotice(message, true);
    this.stop('failure');
  }

  #onMessage(slot, msg) {
    if (!this.#slots.includes(slot)) return; // a message that raced terminate()
    switch (msg.type) {
      case 'status':
        slot.members = msg.membersEvaluated;
        slot.rate = msg.membersPerSec;
        slot.rateAt = performance.now();
        slot.connected = msg.connected;
        slot.step = msg.step;
        if (typeof msg.busyMs === 'number') slot.busyMs = msg.busyMs;
        break;
      case 'hash':
        this.hashes[slot.index] = { step: msg.step, hash: msg.hash };
        slot.step = msg.step;
        break;
      case 'sample':
        this.#on.onSample(msg.text, msg.step);
        break;
      case 'version':
        this.#on.onVersion(msg.version, msg.protocol);
        break;
      case 'identity':
        if (slot.identity && slot.identity.slot != null) saveToken(slot.identity.slot, msg.token);
        publicId(msg.token).then((id) => {
          slot.id = id;
          this.#on.onChange();
        });
        break;
      case 'error':
        if (msg.fatal) return this.#fail(msg.message);
        this.#on.onNotice(msg.message, false);
        break;
      default:
        break;
    }
    this.#on.onChange();
  }
}
