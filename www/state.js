// `window.seedling`: what the page knows, for tests (tests/tests/browser.rs
// reads it through WebDriver) and the curious. It is written here and
// nowhere else, by `publish`, which the page calls at every redraw, so it
// can never disagree with what the page shows.
//
//   renders           how many times the page redrew its figures (workers'
//                     notices add at most four a second, however fast the
//                     run goes);
//   hashes[i]         the last {step, hash} worker i reported to the server
//                     (hex hash, the server's format), or null before its
//                     first report;
//   running           whether the tab is contributing;
//   workers           how many workers run;
//   membersEvaluated  members this tab evaluated since it opened (the
//                     figure #tab-members shows);
//   status            the last /api/status, or null before the first;
//   identity          {name, ids}: the display name new workers join under
//                     and the public ids of the running workers'
//                     contributors (their tokens stay in localStorage);
//   contributors      the last /api/contributors, or null before the first;
//   cpu               the tab's CPU share and pause: {share (0-1], paused
//                     (true while the page holds its workers back), pauseReason
//                     ('hidden', 'battery' or null), busyMs (evaluation time of
//                     all its workers so far), busyFraction (busy time per
//                     worker over the last few seconds of wall time, or null
//                     before there are two samples)}.

const seedling = {
  renders: 0,
  hashes: [],
  running: false,
  workers: 0,
  membersEvaluated: 0,
  status: null,
  identity: { name: '', ids: [] },
  contributors: null,
  cpu: { share: 1, paused: false, pauseReason: null, busyMs: 0, busyFraction: null },
};

/**
 * Copies the page's current figures into `window.seedling`. Takes the
 * values rather than reading the page's objects, so the published view is
 * exactly what was just rendered.
 */
export function publish({ renders, hashes, running, workers, membersEvaluated, status, identity, contributors, cpu }) {
  seedling.renders = renders;
  seedling.hashes = hashes.slice();
  seedling.running = running;
  seedling.workers = workers;
  seedling.membersEvaluated = membersEvaluated;
  seedling.status = status;
  seedling.identity = { name: identity.name, ids: identity.ids.slice() };
  seedling.contributors = contributors;
  seedling.cpu = { ...cpu };
  window.seedling = seedling;
}
