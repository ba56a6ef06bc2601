// Runs the book's sampler (_static/nd_sampler.js) under Node with ONNX Runtime Web, on noise
// that the Python test drew, and writes the images: what tests/test_browser.py compares with
// naivediffusion.sampling. Usage: node tests/js/run_sampler.js SPEC.json
//   SPEC: {"onnx", "tables", "noise" (float32 file: x_T, then each step's noise), "n",
//          "steps", "eta", "guidance", "labels", "out" (float32 file of the images)}
"use strict";
const fs = require("fs");
const path = require("path");
const ort = require("onnxruntime-web");
const NDSampler = require(path.join(__dirname, "..", "..", "_static", "nd_sampler.js"));

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  ort.env.wasm.numThreads = 1;  // as in the page
  const tables = JSON.parse(fs.readFileSync(spec.tables, "utf8"));
  const session = await ort.InferenceSession.create(fs.readFileSync(spec.onnx));
  const bytes = fs.readFileSync(spec.noise);
  const noise = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  let used = 0;
  // The injected noise, handed out in the order the sampler asks for it.
  const randn = (count) => {
    if (used + count > noise.length) throw new Error("the sampler asked for more noise than given");
    const part = noise.slice(used, used + count);
    used += count;
    return part;
  };
  const images = await NDSampler.sample({
    ort, session, tables, n: spec.n, steps: spec.steps, eta: spec.eta, guidance: spec.guidance,
    labels: spec.labels, randn,
  });
  if (used !== noise.length) throw new Error(`the sampler used ${used} of ${noise.length} noise values`);
  fs.writeFileSync(spec.out, Buffer.from(images.buffer, images.byteOffset, images.byteLength));
  const timesteps = {};
  for (const s of spec.timestep_counts || []) timesteps[s] = NDSampler.ddimTimesteps(tables.timesteps, s);
  fs.writeFileSync(spec.out + ".json", JSON.stringify({ timesteps }));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
