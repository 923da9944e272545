// The run's status: /api/status polled every 1.5 s (a few KB, whatever the
// run's length), the learning curve fetched by increments from
// /api/history?since=STEP, and whether the run looks stalled.

export const POLL_MS = 1500;

/** Points the page keeps; past this the older half is thinned. */
const MAX_POINTS = 4000;

/**
 * Polls /api/status for as long as the page is open. `onStatus(status)`
 * gets each answer, `onDown()` is called when the server cannot be reached
 * (or the answer cannot be shown). The poller remembers the last answer and
 * when the run's step last moved.
 */
export class StatusPoller {
  /** The last /api/status, or null before the first. */
  last = null;
  /** The learning curve so far: {step, train_loss, val_loss, ...}, oldest first. */
  history = [];
  /** The run the curve belongs to. */
  #run = null;
  /** The last step seen and when it was first seen (performance.now()). */
  #stepSeen = { step: null, at: 0 };
  #onStatus;
  #onDown;

  constructor({ onStatus, onDown }) {
    this.#onStatus = onStatus;
    this.#onDown = onDown;
  }

  start() {
    this.#poll();
  }

  async #poll() {
    try {
      const res = await fetch('/api/status', { cache: 'no-store' });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const status = await res.json();
      await this.#catchUp(status);
      this.last = status;
      if (status.step !== this.#stepSeen.step) this.#stepSeen = { step: status.step, at: performance.now() };
      this.#onStatus(status);
    } catch {
      this.#onDown();
    } finally {
      setTimeout(() => this.#poll(), POLL_MS);
    }
  }

  /**
   * Fetches the curve's points newer than the ones held, when the status
   * says there are some. A new run (or a server restarted from an earlier
   * checkpoint) starts the curve over.
   */
  async #catchUp(status) {
    const held = this.history.length ? this.history.at(-1).step : -1;
    const newest = status.history_step ?? -1;
    if (status.run !== this.#run || newest < held) {
      this.#run = status.run;
      this.history = [];
    }
    const since = this.history.length ? this.history.at(-1).step : -1;
    if (newest <= since) return;
    const res = await fetch(`/api/history?since=${since}`, { cache: 'no-store' });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const points = await res.json();
    this.history = this.history.concat(points.filter((p) => p.step > since));
    if (this.history.length > MAX_POINTS) {
      const half = this.history.length >> 1;
      const old = this.history.slice(0, half).filter((p, i) => i % 2 === 0 || p.val_loss != null);
      this.history = old.concat(this.history.slice(half));
    }
  }

  /**
   * The run's live rates at `now`: steps per minute and members per second,
   * both zero once the run looks stalled. /api/status reports rates over the
   * last closed steps, which stay put when a run stalls; after a long
   * silence (10 s, or four steps' worth) the honest rate is zero.
   */
  rates(now) {
    const s = this.last;
    if (!s) return { stalled: false, stepsMin: null, runRate: null };
    const expected = s.steps_per_s > 0 ? 1000 / s.steps_per_s : Infinity;
    const stalled = now - this.#stepSeen.at > Math.max(10000, 4 * expected);
    return {
      stalled,
      stepsMin: stalled ? 0 : s.steps_per_s * 60,
      runRate: stalled ? 0 : s.members_per_s,
    };
  }
}
