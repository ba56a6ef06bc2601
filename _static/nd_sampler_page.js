/*
 * The page's glue around nd_sampler.js: controls, a canvas, ONNX Runtime Web, and a hook that
 * tests drive. Nothing happens on a page without an element id="nd-sampler".
 *
 *   <div id="nd-sampler" data-model="mnist"></div>                              (unconditional)
 *   <div id="nd-sampler" data-model="mnist_conditional" data-conditional="true"></div>
 *
 * The model's files (MODEL.onnx, MODEL.json) and ONNX Runtime Web's single-threaded WebAssembly
 * build are in the site's _static/nd/ (written there by .ci/prepare_static); nothing comes from
 * another server. They load on the first "Draw", or at once with the hook:
 *
 *   PAGE.html?nd-autorun=1&nd-seed=S&nd-steps=N[&nd-label=K][&nd-n=COUNT][&nd-eta=E][&nd-w=W]
 *
 * The element's data-status is then loading, running, done or error; when done, data-shape is
 * "N,H,W", data-pixels the images as base64 of uint8 (row-major) and data-ms the milliseconds
 * the sampling took (the model's loading not included).
 */
(function () {
  "use strict";
  // Where this script was loaded from: the site's _static/ folder.
  const script = document.currentScript;
  const STATIC = script ? script.src.split("?")[0].replace(/[^/]*$/, "") : "_static/";

  let ortPromise = null;
  const sessions = {};

  /* ONNX Runtime Web, single-threaded WebAssembly (GitHub Pages cannot send the headers that
   * threads need), loaded once from _static/nd/. */
  function loadOrt() {
    if (!ortPromise) {
      ortPromise = import(STATIC + "nd/ort.wasm.min.mjs").then((ort) => {
        ort.env.wasm.numThreads = 1;
        ort.env.wasm.proxy = false;
        ort.env.wasm.wasmPaths = STATIC + "nd/";
        return ort;
      });
    }
    return ortPromise;
  }

  async function loadModel(ort, name) {
    if (!sessions[name]) {
      sessions[name] = (async () => {
        const response = await fetch(STATIC + "nd/" + name + ".json");
        if (!response.ok) throw new Error(`${name}.json: HTTP ${response.status}`);
        const tables = await response.json();
        const session = await ort.InferenceSession.create(STATIC + "nd/" + name + ".onnx", {
          executionProviders: ["wasm"],
          graphOptimizationLevel: "all",
        });
        return { tables, session };
      })();
    }
    return sessions[name];
  }

  function field(parent, label, attrs) {
    const wrap = document.createElement("label");
    wrap.style.marginRight = "1em";
    wrap.textContent = label + " ";
    const input = document.createElement(attrs.options ? "select" : "input");
    if (attrs.options) {
      for (const v of attrs.options) input.add(new Option(String(v), String(v)));
    } else {
      Object.assign(input, { type: "number", step: attrs.step || "1", min: attrs.min ?? "" });
      input.style.width = "5em";
    }
    input.value = String(attrs.value);
    wrap.appendChild(input);
    parent.appendChild(wrap);
    return input;
  }

  /* Draw images [n, C, H, W] in [-1, 1] side by side, in grey (the first channel). */
  function paint(canvas, x, n, H, W, C) {
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(n * W, H);
    for (let k = 0; k < n; k++) {
      for (let r = 0; r < H; r++) {
        for (let c = 0; c < W; c++) {
          const v = x[((k * C) * H + r) * W + c];
          const g = Math.round((Math.min(Math.max(v, -1), 1) + 1) * 127.5);
          const o = (r * n * W + k * W + c) * 4;
          image.data[o] = image.data[o + 1] = image.data[o + 2] = g;
          image.data[o + 3] = 255;
        }
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  function base64(bytes) {
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  }

  function setup(el) {
    const conditional = el.dataset.conditional === "true";
    const model = el.dataset.model;
    const params = new URLSearchParams(window.location.search);
    const get = (key, fallback) => (params.has(key) ? params.get(key) : fallback);

    const controls = document.createElement("div");
    const seed = field(controls, "seed", { value: get("nd-seed", 0), min: "0" });
    const steps = field(controls, "steps", { value: get("nd-steps", 20), min: "1" });
    const eta = field(controls, "eta", { value: get("nd-eta", 1), step: "0.1", min: "0" });
    const count = field(controls, "images", { value: get("nd-n", el.dataset.n || 1), min: "1" });
    const digit = conditional ? field(controls, "digit", { options: [...Array(10).keys()], value: get("nd-label", 3) }) : null;
    const w = conditional ? field(controls, "w", { value: get("nd-w", el.dataset.w || 0.5), step: "0.5", min: "0" }) : null;
    const button = document.createElement("button");
    button.textContent = "Draw";
    controls.appendChild(button);
    const canvas = document.createElement("canvas");
    canvas.style.cssText = "image-rendering: pixelated; display: block; max-width: 100%; height: auto; margin: 0.5em 0; background: #000";
    const line = document.createElement("div");
    line.style.marginBottom = "1em";
    el.replaceChildren(controls, canvas, line);

    async function draw() {
      button.disabled = true;
      try {
        if (typeof WebAssembly !== "object") throw new Error("this browser has no WebAssembly");
        el.dataset.status = "loading";
        line.textContent = "Loading the model and ONNX Runtime Web...";
        const ort = await loadOrt();
        const { tables, session } = await loadModel(ort, model);
        const [C, H, W] = tables.image_shape;
        const n = Math.max(1, parseInt(count.value, 10) || 1);
        canvas.width = n * W;
        canvas.height = H;
        canvas.style.width = `${n * W * (n > 3 ? 3 : 6)}px`;  // 6x or 3x, never wider than the page
        el.dataset.status = "running";
        line.textContent = "Sampling...";
        const options = {
          ort, session, tables, n,
          steps: parseInt(steps.value, 10),
          eta: parseFloat(eta.value),
          seed: parseInt(seed.value, 10) || 0,
          labels: conditional ? new Array(n).fill(parseInt(digit.value, 10)) : undefined,
          guidance: conditional ? parseFloat(w.value) : 0,
          // Show x_t after each step, and give the browser the chance to paint it.
          onStep: (i, t, x) => { paint(canvas, x, n, H, W, C); return new Promise((r) => setTimeout(r, 0)); },
        };
        const start = performance.now();
        const images = await NDSampler.sample(options);
        const ms = performance.now() - start;
        paint(canvas, images, n, H, W, C);
        const first = new Float32Array(n * H * W);  // the first channel of each image
        for (let k = 0; k < n; k++) first.set(images.subarray(k * C * H * W, k * C * H * W + H * W), k * H * W);
        el.dataset.shape = `${n},${H},${W}`;
        el.dataset.pixels = base64(NDSampler.toUint8(first));
        el.dataset.ms = ms.toFixed(1);
        el.dataset.status = "done";
        line.textContent = `${n} image${n > 1 ? "s" : ""}, DDIM ${options.steps} steps, eta ${options.eta}` +
          (conditional ? `, digit ${digit.value}, w ${options.guidance}` : "") + `: ${ms.toFixed(0)} ms in this browser.`;
      } catch (err) {
        el.dataset.status = "error";
        line.textContent = `The live sampler could not run here (${err && err.message ? err.message : err}); the figures on this page come from the same model.`;
      } finally {
        button.disabled = false;
      }
    }

    button.addEventListener("click", draw);
    if (params.get("nd-autorun") === "1") draw();
  }

  function start() {
    const el = document.getElementById("nd-sampler");
    if (!el) return;
    if (typeof NDSampler === "undefined") {
      el.dataset.status = "error";
      el.textContent = "The live sampler could not run here (nd_sampler.js did not load).";
      return;
    }
    setup(el);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
