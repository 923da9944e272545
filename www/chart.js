// The loss chart: training and validation loss over steps, drawn as SVG.

import { fmtInt } from './format.js';

const SVG_NS = 'http://www.w3.org/2000/svg';

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

/**
 * The chart in `svg`, with `empty` (a placeholder) shown while there is
 * nothing to draw. It redraws itself when the SVG is resized; the counts of
 * points drawn are in the SVG's `data-points` and `data-val-points`.
 */
export class LossChart {
  #svg;
  #empty;
  #history = [];

  constructor(svg, empty) {
    this.#svg = svg;
    this.#empty = empty;
    new ResizeObserver(() => this.draw(this.#history)).observe(svg);
  }

  /** Draws `history`, the curve's {step, train_loss, val_loss} points (from /api/history). */
  draw(history) {
    this.#history = history;
    const svg = this.#svg;
    const train = history
      .filter((p) => p.train_loss != null && Number.isFinite(p.train_loss))
      .map((p) => [p.step, p.train_loss]);
    const val = history
      .filter((p) => p.val_loss != null && Number.isFinite(p.val_loss))
      .map((p) => [p.step, p.val_loss]);
    svg.setAttribute('data-points', String(train.length));
    svg.setAttribute('data-val-points', String(val.length));
    this.#empty.hidden = train.length + val.length > 0;

    const w = svg.clientWidth || 600;
    const h = svg.clientHeight || 300;
    svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
    svg.replaceChildren();
    if (train.length + val.length === 0) return;

    const all = train.concat(val);
    const x0 = Math.min(...all.map((p) => p[0]));
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
}
