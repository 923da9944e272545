// How the page writes numbers, durations and the corpus name. Pure
// functions, shared by the page's figures and the loss chart.

const intFmt = new Intl.NumberFormat('en-US');

/** `12345.6` -> `"12,346"`; a dash for a missing figure. */
export function fmtInt(n) {
  return n == null || !Number.isFinite(n) ? '–' : intFmt.format(Math.round(n));
}

/** A rate: one decimal below 10 (a slow tab still shows progress), whole above. */
export function fmtRate(x) {
  if (x == null || !Number.isFinite(x)) return '–';
  if (x === 0) return '0';
  if (x < 10) return x.toFixed(1);
  return intFmt.format(Math.round(x));
}

/** A parameter count in words a volunteer reads at a glance. */
export function fmtParams(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(n >= 1e7 ? 0 : 1)} million`;
  return intFmt.format(n);
}

/** Milliseconds as `m:ss` or `h:mm:ss`. */
export function fmtDuration(ms) {
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** The server names its data by path; volunteers want to know what it is. */
export function prettyData(name) {
  if (!name) return 'public text';
  const files = name.split(', ').map((p) => p.split(/[\\/]/).pop());
  if (files.length === 1 && /^tiny-?shakespeare/i.test(files[0])) {
    return 'Tiny Shakespeare, about 1 MB of public-domain Shakespeare plays';
  }
  return files.join(', ');
}
