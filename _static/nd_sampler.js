/*
 * The book's DDIM sampler, in the reader's browser: the loop of naivediffusion/sampling.py
 * (`sample` with sampler="ddim", `ddim_timesteps`, `ddim_step`) and the classifier-free
 * guidance of naivediffusion/diffusion.py (`Diffusion.guided_model`), line for line.
 *
 * The network itself is not written here: it is the shipped model exported as ONNX
 * (`python -m naivediffusion export`, naivediffusion/export.py) and run by ONNX Runtime Web.
 * The JSON written beside it holds the float64 table alphas_cumprod (abar_t), the objective
 * ("eps", "x0" or "v"), the image shape and the null class. This file does the rest: the
 * timesteps, the conversions between the network's output, x0 and eps, the clip of x0 to
 * [-1, 1], the DDIM jump with its eta noise, and guidance.
 *
 * It runs unchanged in a page (it defines `NDSampler`; nd_sampler_page.js is the page's glue)
 * and under Node (`require("./nd_sampler.js")`), where the tests give it the same noise the
 * Python sampler drew and compare the images.
 *
 * Index convention, as in the package: code t = 0 .. T-1 is the paper's t = 1 .. T. Images
 * are float32 arrays [N, C, H, W], row-major, in [-1, 1]. The arithmetic of a step is done in
 * float64 (JavaScript's numbers) and stored back as float32, the dtype of the Python loop.
 */
(function (root, factory) {
  if (typeof module === "object" && module.exports) module.exports = factory();
  else root.NDSampler = factory();
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  // ------------------------------------------------------------------ timesteps

  /* Round half to even, as torch.round does. */
  function roundHalfEven(v) {
    const r = Math.round(v);
    return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  /*
   * sampling.ddim_timesteps: `steps` timesteps evenly spaced over 0..T-1, both ends
   * included, descending (T-1 first, 0 last). torch.linspace computes the first half from
   * the start and the second half from the end; so does this, so that both round alike.
   */
  function ddimTimesteps(T, steps) {
    if (!Number.isInteger(steps) || steps < 1 || steps > T) {
      throw new Error(`steps must be an integer from 1 to T=${T}, got ${steps}`);
    }
    if (steps === 1) return [T - 1];
    const step = (T - 1) / (steps - 1);
    const half = Math.floor(steps / 2);
    const seq = [];
    for (let i = 0; i < steps; i++) {
      const v = i < half ? i * step : (T - 1) - (steps - 1 - i) * step;
      seq.push(roundHalfEven(v));
    }
    return seq.reverse();
  }

  // ------------------------------------------------------------------ noise

  /* A seeded stream of 32-bit integers (mulberry32: small, fast, good enough for noise). */
  function mulberry32(seed) {
    let a = seed >>> 0;
    return function () {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  /*
   * randn(n) -> Float32Array of n standard normal numbers, from `seed` (Box-Muller). The page
   * draws with it; the tests pass their own randn instead, which hands back the noise that
   * torch drew for the Python sampler, in the same order: x_T first, then one array per step.
   */
  function seededRandn(seed) {
    const uniform = mulberry32(seed);
    return function (n) {
      const out = new Float32Array(n);
      for (let i = 0; i < n; i += 2) {
        const u1 = 1 - uniform();  // in (0, 1]: log(u1) is finite
        const u2 = uniform();
        const r = Math.sqrt(-2 * Math.log(u1));
        out[i] = r * Math.cos(2 * Math.PI * u2);
        if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
      }
      return out;
    };
  }

  // ------------------------------------------------------------------ the network

  /*
   * One call of the ONNX network on a batch: x [B, C, H, W], one timestep for all, and the
   * labels [B] of a conditional model (null: unconditional). Returns the output as a
   * Float32Array shaped like x (the exported graph returns only the mean's C channels).
   */
  async function runNetwork(ort, session, tables, x, batch, t, labels) {
    const [C, H, W] = tables.image_shape;
    const feeds = {
      x: new ort.Tensor("float32", x, [batch, C, H, W]),
      t: new ort.Tensor("int64", BigInt64Array.from({ length: batch }, () => BigInt(t)), [batch]),
    };
    if (tables.num_classes !== null) {
      feeds.labels = new ort.Tensor("int64", BigInt64Array.from(labels, (k) => BigInt(k)), [batch]);
    }
    const result = await session.run(feeds);
    return result.output.data;
  }

  // ------------------------------------------------------------------ output, x0 and eps

  /* Diffusion.predict_x0: the clean image implied by the network's output at (x_t, t). */
  function predictX0(objective, abar, xt, out) {
    if (objective === "eps") return Math.sqrt(1 / abar) * xt - Math.sqrt(1 / abar - 1) * out;
    if (objective === "x0") return out;
    return Math.sqrt(abar) * xt - Math.sqrt(1 - abar) * out;  // v
  }

  /* Diffusion.eps_from_output: the noise implied by the output, for any objective. */
  function epsFromOutput(objective, abar, xt, out) {
    if (objective === "eps") return out;
    if (objective === "x0") return (Math.sqrt(1 / abar) * xt - out) / Math.sqrt(1 / abar - 1);
    return Math.sqrt(abar) * out + Math.sqrt(1 - abar) * xt;  // v
  }

  /* Diffusion.output_from_eps: what the network would output if it predicted `eps`. */
  function outputFromEps(objective, abar, xt, eps) {
    if (objective === "eps") return eps;
    const x0 = Math.sqrt(1 / abar) * xt - Math.sqrt(1 / abar - 1) * eps;
    if (objective === "x0") return x0;
    return (eps - Math.sqrt(1 - abar) * xt) / Math.sqrt(abar);  // v
  }

  /*
   * The model the DDIM step sees, as in `Diffusion.guided_model`: without guidance (w = 0, or
   * an unconditional model) one call on the batch; with w > 0, ONE call on the doubled batch
   * (x_t twice; the labels, then as many null labels), and in eps (Ho & Salimans, Eq. 6):
   *
   *     eps~ = (1 + w) eps(x_t, c) - w eps(x_t, null),
   *
   * turned back into the objective's output so that the step (clip of x0, DDIM) is the same
   * as without guidance. The conversions are in float64, as the Python ones.
   */
  async function modelOutput(ort, session, tables, x, n, t, labels, w) {
    if (tables.num_classes === null || !(w > 0)) {
      return runNetwork(ort, session, tables, x, n, t, labels);
    }
    const size = x.length;
    const doubled = new Float32Array(2 * size);
    doubled.set(x, 0);
    doubled.set(x, size);
    const both = [...labels, ...labels.map(() => tables.null_class)];
    const out = await runNetwork(ort, session, tables, doubled, 2 * n, t, both);
    const abar = tables.alphas_cumprod[t];
    const guided = new Float32Array(size);
    for (let i = 0; i < size; i++) {
      const epsCond = epsFromOutput(tables.objective, abar, x[i], out[i]);
      const epsUncond = epsFromOutput(tables.objective, abar, x[i], out[size + i]);
      const eps = (1 + w) * epsCond - w * epsUncond;
      guided[i] = outputFromEps(tables.objective, abar, x[i], eps);
    }
    return guided;
  }

  // ------------------------------------------------------------------ one DDIM step

  /*
   * sampling.ddim_step: one DDIM step from t to prev (Song et al. 2021, Eq. 12 and 16);
   * prev = -1 means x_0. `output` is the (guided) network output at (x, t). `z` is the step's
   * noise (used when prev >= 0 and eta > 0). Returns [x_prev, pred_x0], both Float32Array.
   */
  function ddimStep(tables, x, output, t, prev, eta, clip, z) {
    const abar = tables.alphas_cumprod[t];
    const abarPrev = prev >= 0 ? tables.alphas_cumprod[prev] : 1;
    // The noise of the jump: eta = 0 is deterministic, eta = 1 the posterior's variance.
    const sigma = eta * Math.sqrt((1 - abarPrev) / (1 - abar) * (1 - abar / abarPrev));
    const direction = Math.sqrt(Math.max(1 - abarPrev - sigma * sigma, 0));
    const xPrev = new Float32Array(x.length);
    const predX0 = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) {
      let x0 = Math.fround(predictX0(tables.objective, abar, x[i], output[i]));
      if (clip) x0 = Math.min(Math.max(x0, -1), 1);
      // The noise direction consistent with the (clipped) x0 estimate (Diffusion.predict_eps).
      const eps = Math.fround((Math.sqrt(1 / abar) * x[i] - x0) / Math.sqrt(1 / abar - 1));
      let next = Math.sqrt(abarPrev) * x0 + direction * eps;
      if (prev >= 0 && eta > 0) next += sigma * z[i];
      xPrev[i] = next;
      predX0[i] = x0;
    }
    return [xPrev, predX0];
  }

  // ------------------------------------------------------------------ the loop

  /*
   * sampling.sample(..., sampler="ddim"): draw n images from x_T ~ N(0, I).
   *
   * options: {ort, session, tables, n, steps, eta, clip, labels (n class indices, for a
   * conditional model; default the null class), guidance (w >= 0), randn (n -> Float32Array
   * of standard normals; default seededRandn(seed)), seed, onStep(i, t, x_t, pred_x0)
   * (awaited after each step, e.g. to draw)}.
   * Returns Float32Array [n, C, H, W] in [-1, 1] (clipped, as the Python loop's end).
   */
  async function sample(options) {
    const { ort, session, tables } = options;
    const n = options.n ?? 1;
    const steps = options.steps ?? tables.defaults.steps;
    const eta = options.eta ?? tables.defaults.eta;
    const clip = options.clip ?? tables.defaults.clip;
    const w = options.guidance ?? 0;
    if (!(w >= 0)) throw new Error(`the guidance scale must be >= 0; got ${w}`);
    if (!(eta >= 0)) throw new Error(`eta must be >= 0; got ${eta}`);
    const labels = options.labels ?? new Array(n).fill(tables.null_class ?? 0);
    const randn = options.randn ?? seededRandn(options.seed ?? 0);
    const [C, H, W] = tables.image_shape;
    const size = n * C * H * W;

    const timesteps = ddimTimesteps(tables.timesteps, steps);
    let x = randn(size);  // x_T
    for (let i = 0; i < timesteps.length; i++) {
      const t = timesteps[i];
      const prev = i + 1 < timesteps.length ? timesteps[i + 1] : -1;
      const output = await modelOutput(ort, session, tables, x, n, t, labels, w);
      // The step's noise is drawn after the network's call, in the order torch draws it.
      const z = prev >= 0 && eta > 0 ? randn(size) : null;
      const [xPrev, predX0] = ddimStep(tables, x, output, t, prev, eta, clip, z);
      if (options.onStep) await options.onStep(i, t, xPrev, predX0);
      x = xPrev;
    }
    if (clip) x = x.map((v) => Math.min(Math.max(v, -1), 1));
    return x;
  }

  /* Images in [-1, 1] as uint8 0..255, as the package's viz does ((x + 1) / 2 * 255). */
  function toUint8(x) {
    return Uint8Array.from(x, (v) => Math.round((Math.min(Math.max(v, -1), 1) + 1) * 127.5));
  }

  return { ddimTimesteps, mulberry32, seededRandn, runNetwork, predictX0, epsFromOutput,
           outputFromEps, modelOutput, ddimStep, sample, toUint8 };
});
