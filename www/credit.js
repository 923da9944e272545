// Credit that lasts: the volunteer's display name and session tokens, kept
// in localStorage so a reload carries on as the same contributor, and the
// contributors' leaderboard from /api/contributors.
//
// Each worker is its own connection, and the server lets one connection
// hold a session at a time, so each worker slot keeps its own token
// (`seedling.token.<slot>`), and a slot is claimed with a Web Lock so two
// tabs of this browser never present the same token at once. A slot's
// public id is the first 12 hex digits of the SHA-256 of its token: what
// the server shows on the leaderboard (it never shows a token).
//
// Names are untrusted text, everyone's: they are only ever set with
// textContent, never parsed as HTML.

const NAME_KEY = 'seedling.name';
const tokenKey = (slot) => `seedling.token.${slot}`;
/** Slots tried when claiming one; more workers than this run without one. */
const MAX_SLOTS = 256;
/** The server's cap (`protocol::MAX_NAME_CHARS`). */
export const NAME_MAX = 32;
const BOARD_EVERY_MS = 5000;

function storageGet(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null; // storage disabled: nothing lasts, everything still works
  }
}

function storageSet(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // Storage full or disabled: this session's credit still counts.
  }
}

// Control characters, and invisible format characters (bidirectional
// overrides and isolates, zero-width characters, the byte-order mark), as
// the core's `clean_name` drops them.
const HIDDEN = /[\p{Cc}\u00AD\u061C\u180E\u200B-\u200F\u202A-\u202E\u2060-\u206F\uFEFF\uFFF9-\uFFFB]/gu;

/** The name as the server will show it: see `protocol::clean_name`. */
export function cleanName(raw) {
  const words = String(raw ?? '')
    .split(/\s+/u)
    .map((w) => w.replace(HIDDEN, ''))
    .filter((w) => w.length > 0);
  let out = '';
  for (const w of words) {
    const next = out ? `${out} ${w}` : w;
    const chars = [...next];
    if (chars.length > NAME_MAX) {
      if (!out) out = chars.slice(0, NAME_MAX).join('');
      else {
        const room = NAME_MAX - [...out].length - 1;
        if (room > 0) out = `${out} ${[...w].slice(0, room).join('')}`;
      }
      break;
    }
    out = next;
  }
  return out;
}

export function loadName() {
  return cleanName(storageGet(NAME_KEY) || '');
}

export function saveName(name) {
  storageSet(NAME_KEY, cleanName(name));
}

function loadToken(slot) {
  const t = storageGet(tokenKey(slot));
  return t && /^[0-9a-f]{32}$/.test(t) ? t : null;
}

/** Keeps slot `slot`'s token, from the worker's `identity` notice. */
export function saveToken(slot, token) {
  if (/^[0-9a-f]{32}$/.test(token)) storageSet(tokenKey(slot), token);
}

/** The public id of a token (hex), or null where Web Crypto is missing. */
export async function publicId(tokenHex) {
  if (!tokenHex || !self.crypto || !crypto.subtle) return null;
  const bytes = new Uint8Array(tokenHex.match(/../g).map((b) => parseInt(b, 16)));
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return [...digest.slice(0, 6)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/** Slots this tab holds. */
const held = new Set();

/**
 * Claims a slot no other worker of this browser holds: {slot, token,
 * release}. `token` is the slot's stored token or null (a new contributor).
 */
export async function claimSlot() {
  if (navigator.locks) {
    for (let slot = 0; slot < MAX_SLOTS; slot++) {
      if (held.has(slot)) continue;
      let release = null;
      const got = await new Promise((resolve) => {
        navigator.locks
          .request(`seedling-identity-${slot}`, { ifAvailable: true }, (lock) => {
            if (!lock) return resolve(false);
            // Held until released: the promise returned keeps the lock.
            return new Promise((done) => {
              release = done;
              resolve(true);
            });
          })
          .catch(() => resolve(false));
      });
      if (got) {
        held.add(slot);
        return { slot, token: loadToken(slot), release: () => { held.delete(slot); release(); } };
      }
    }
    return { slot: null, token: null, release: () => {} };
  }
  // No Web Locks (an insecure context): slots are unique within this tab.
  let slot = 0;
  while (held.has(slot)) slot++;
  held.add(slot);
  return { slot, token: loadToken(slot), release: () => held.delete(slot) };
}

/**
 * Polls /api/contributors and draws the leaderboard into `table`'s body,
 * marking the rows whose public id `mine()` holds. `onBoard(board)` hears
 * every answer.
 */
export class Leaderboard {
  last = null;
  #table;
  #mine;
  #onBoard;

  constructor(table, { mine, onBoard }) {
    this.#table = table;
    this.#mine = mine;
    this.#onBoard = onBoard;
  }

  start() {
    this.poll();
    setInterval(() => this.poll(), BOARD_EVERY_MS);
  }

  async poll() {
    try {
      const res = await fetch('/api/contributors', { cache: 'no-store' });
      if (!res.ok) return;
      this.last = await res.json();
      this.draw();
      this.#onBoard(this.last);
    } catch {
      // The status poller tells the volunteer when the server is down.
    }
  }

  /** Redraws the last board (also when this tab's ids change). */
  draw() {
    const board = this.last;
    if (!board) return;
    const mine = new Set(this.#mine());
    const body = this.#table.tBodies[0];
    const rows = board.contributors.map((c) => {
      const tr = document.createElement('tr');
      tr.dataset.id = String(c.id);
      if (mine.has(c.id)) tr.classList.add('mine');
      if (c.banned) tr.classList.add('banned');
      const cells = [
        String(c.rank),
        c.name ? String(c.name) : 'anonymous',
        String(c.id),
        c.banned ? 'void' : Number(c.members).toLocaleString('en-US'),
      ];
      for (const [i, text] of cells.entries()) {
        const td = document.createElement('td');
        td.textContent = text; // names are untrusted: text, never markup
        if (i === 1 && !c.name) td.classList.add('anon');
        tr.append(td);
      }
      return tr;
    });
    body.replaceChildren(...rows);
    this.#table.hidden = rows.length === 0;
  }
}
