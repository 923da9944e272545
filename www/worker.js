// One Seedling volunteer: a dedicated Web Worker with its own wasm instance.
//
// This file only loads the wasm module and forwards messages. The job loop
// lives in Rust: the volunteer lifecycle (handshake, updates, rejections,
// reconnection) in seedling-core's `volunteer` module, its WebSocket driver
// in wasm-client/src/net.rs, which posts plain objects back to the page:
// {type: 'status' | 'hash' | 'sample' | 'identity' | 'error', ...}; 'identity'
// carries the session token to keep for the next load.
//
// Page -> worker:
//   {type: 'start', url, sampleEvery, token, name}
//                                        join the run at the WebSocket `url`
//                                        as the contributor of `token` (from
//                                        an earlier 'identity' notice; null
//                                        for a new one) named `name`
//   {type: 'stop'}                       say goodbye and close
// (The page stops workers with worker.terminate(); 'stop' is the polite way.)

import init, { Volunteer } from './pkg/seedling_wasm.js';

const ready = init().catch((err) => {
  self.postMessage({
    type: 'error',
    fatal: true,
    message: `Could not load the WebAssembly module: ${err}`,
  });
  throw err;
});

let volunteer = null;

self.onmessage = async ({ data }) => {
  try {
    await ready;
  } catch {
    return;
  }
  if (data.type === 'start' && !volunteer) {
    volunteer = new Volunteer();
    volunteer.identity(data.token ?? undefined, String(data.name ?? ''));
    self.postMessage({ type: 'version', version: Volunteer.version(), protocol: Volunteer.protocolVersion() });
    volunteer.start(data.url, (msg) => self.postMessage(msg), data.sampleEvery ?? 0);
  } else if (data.type === 'stop' && volunteer) {
    volunteer.stop();
    volunteer.free();
    volunteer = null;
  }
};
