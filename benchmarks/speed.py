"""Training-step speed of our U-Net beside diffusers' UNet2DModel at the same architecture,
each fast path on and off; model-FLOPs utilisation; the sampler's overhead.

Our step is the real one, `Trainer.train_step` (AdamW, clipping, EMA, the scheduler), fed by
`Trainer.batches()` from synthetic uint8 images held on the device (`data.InMemoryImages`).
diffusers' network gets the same step around it: the same loss, optimizer, clipping and EMA
code. The contestants of one compile mode are timed in interleaved rounds in one process (so
that a noisy neighbour or a GPU's clock changes hit all of them alike) and each row reports the
median round; "vs diffusers" is a row's step time over diffusers' at the same compile mode.
The compile modes are measured one after another, in the order given (the rows without a
--compile mode of their own, --data-on-host and --contiguous, with the first), and the DDIM
sampler after the first mode. --json PATH is rewritten (atomically) after each mode's rows and
after the sampler, with "complete": false until the end, so that a run killed part-way, say
while it compiles, leaves what it had measured. Prints numbers; it is not a test.

    python benchmarks/speed.py                                   # this machine's device, defaults below
    python benchmarks/speed.py --device cpu --model ddpm-cifar10 --batch-size 16
    python benchmarks/speed.py --device cuda --model ddpm-cifar10 --batch-size 128 --precision bf16 \\
        --compile none,reduce-overhead
    python benchmarks/speed.py --device cuda --model mnist --batch-size 128 --sampling 1000
    python benchmarks/speed.py --device cpu --model mnist-small --batch-size 64 --contiguous
    python benchmarks/speed.py --dry-run                         # every row at toy size, quickly

Each row also gives its start-up: what the --warmup steps took beyond as many timed steps (the
compilation, for a compiled network), and the steps a 20-minute run reaches after paying it,
which is how a compile mode is judged for a run of that length.

The fast paths: --compile modes, data on the device (--data-on-host adds a row without it) and
channels-last memory (--contiguous adds a row in NCHW; diffusers' network gets our layout).

MFU (model-FLOPs utilisation) = the FLOPs of the network's forward and backward pass, counted
by `torch.utils.flop_counter.FlopCounterMode`, divided by the step time and by the GPU's
peak dense tensor-core throughput at that precision (the table PEAK_TFLOPS, from the
vendors' data sheets). diffusers is optional: without it (`pip install diffusers`) only our
rows are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

import torch
from record import provenance
from torch.optim.swa_utils import AveragedModel
from torch.utils.flop_counter import FlopCounterMode

from naivediffusion import Diffusion, UNet, pick_device
from naivediffusion.config import COMPILE_MODES, PRECISIONS, TrainConfig, resolve_precision
from naivediffusion.data import InMemoryImages
from naivediffusion.sampling import DDIM_STEPS
from naivediffusion.train import Trainer, adamw, ema_update_fn

DATASET_OF = {"ddpm-cifar10": "cifar10", "mnist": "mnist", "mnist-small": "mnist"}

# Peak dense tensor-core TFLOP/s by GPU name (a substring of torch.cuda.get_device_name) and
# precision: NVIDIA's data sheets, without sparsity; fp32 runs as TF32 here (the Trainer sets
# matmul precision "high"). SXM figures for the H100/H200.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name and precision in peaks:
            return peaks[precision] * 1e12
    return None


def diffusers_twin(model: UNet):
    """diffusers' UNet2DModel built to our network's architecture: the same levels, channels,
    residual blocks per level, attention levels and heads, dropout and sinusoidal time
    embedding (the parameter counts are printed side by side)."""
    from diffusers import UNet2DModel

    cfg = model.config
    levels = len(cfg["channel_mults"])
    attends = [cfg["image_size"] // 2**i in cfg["attention_resolutions"] for i in range(levels)]
    channels = [cfg["base_channels"] * m for m in cfg["channel_mults"]]
    heads = cfg["num_heads"]
    # diffusers gives every block the same head size; ours gives every block the same number
    # of heads. They agree where it matters: every attending level, and the middle block.
    head_dim = {c // heads for c, a in zip(channels, attends, strict=True) if a} | {channels[-1] // heads}
    if len(head_dim) != 1:
        raise ValueError("this architecture's attention levels have different head sizes, which "
                         "UNet2DModel cannot express")
    groups = max(1, 32 // max(1, cfg.get("min_group_channels") or 1))
    return UNet2DModel(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["in_channels"],
        layers_per_block=cfg["num_res_blocks"], block_out_channels=tuple(channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        attention_head_dim=head_dim.pop(), norm_num_groups=min(groups, min(channels)),
        dropout=cfg["dropout"], time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
    )


@contextlib.contextmanager
def compile_backend(backend: str):
    """Inside the block, torch.compile compiles with `backend` whatever mode it is asked for
    (the Trainer passes only the mode); after it, torch.compile is the real one again.
    "inductor", torch.compile's own default, changes nothing."""
    if backend == "inductor":
        yield
        return
    real_compile = torch.compile

    def compile_with_backend(model, mode=None, **kwargs):
        return real_compile(model, backend=backend)

    torch.compile = compile_with_backend
    try:
        yield
    finally:
        torch.compile = real_compile


class Contestant:
    """One row of the table: a network, the step that trains it, and what the step costs."""

    def __init__(self, name: str, step, network, batch: int, mode: str):
        self.name, self.step, self.network, self.batch, self.mode = name, step, network, batch, mode
        self.rounds: list[float] = []  # seconds per step, one entry per timed round
        self.peak_mib = None
        self.flops = None
        self.warmup_seconds = None  # the untimed warm-up steps, compilation included

    @property
    def seconds(self) -> float:
        return statistics.median(self.rounds)


def ours(args, device, precision, mode: str, data_on_device: bool, run_dir: str,
         channels_last: bool | None = None) -> Contestant:
    dataset = DATASET_OF[args.model]
    config = TrainConfig.for_dataset(
        dataset, model=args.model, batch_size=args.batch_size, device=device.type, precision=precision,
        compile=mode, data_on_device=data_on_device, channels_last=channels_last, run_dir=run_dir,
        warmup_steps=0,
        model_overrides={"base_channels": 8} if args.dry_run else {},
    )
    info = {"cifar10": (3, 32), "mnist": (1, 28)}[dataset]
    n = max(4 * args.batch_size, 256)
    images = torch.randint(0, 256, (n, info[0], info[1], info[1]), dtype=torch.uint8)
    data = InMemoryImages(images, torch.randint(0, 10, (n,)), flip=dataset == "cifar10")
    if not data_on_device:
        # The DataLoader path: the same images read one by one on the host, then copied.
        data = torch.utils.data.TensorDataset(images.float() / 127.5 - 1, data.labels)
    trainer = Trainer(config, data=data)
    batches = trainer.batches()

    def step():
        images, _ = next(batches)
        return trainer.train_step(images)

    def eager(x_t, t):  # the uncompiled network under the step's autocast, for counting FLOPs
        with torch.autocast(device.type, dtype=trainer.amp_dtype or torch.float32,
                            enabled=trainer.amp_dtype is not None):
            return trainer.model(x_t.contiguous(memory_format=trainer.memory_format), t)

    fast = ([f"compile={mode}"] + ([] if data_on_device else ["data on host"])
            + ([] if trainer.memory_format == torch.channels_last else ["NCHW"]))
    contestant = Contestant(f"naivediffusion ({', '.join(fast)})", step, (trainer.model, eager), args.batch_size, mode)
    contestant.memory_format = trainer.memory_format
    return contestant


def theirs(args, device, precision, mode: str, reference: UNet, memory_format) -> Contestant:
    """diffusers' network inside the same step as ours, in the same memory format."""
    model = diffusers_twin(reference).to(device, memory_format=memory_format)
    network = model if mode == "none" else torch.compile(model, mode=mode)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    diffusion = Diffusion(1000, "linear", "eps")
    optimizer = adamw(model.parameters(), 2e-4, 0.0, device)  # the Trainer's optimizer
    ema = AveragedModel(model, multi_avg_fn=ema_update_fn(0.9999), use_buffers=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    shape = (args.batch_size, reference.config["in_channels"], reference.config["image_size"],
             reference.config["image_size"])
    x0 = torch.rand(shape, device=device) * 2 - 1

    def run(net, x_t, t):
        x_t = x_t.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return net(x_t, t).sample

    def predict(x_t, t):
        return run(network, x_t, t)

    def eager(x_t, t):  # uncompiled, for counting FLOPs
        return run(model, x_t, t)

    def step():
        loss = diffusion.loss(predict, x0)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        ema.update_parameters(model)
        return loss.detach()

    return Contestant(f"diffusers UNet2DModel (compile={mode})", step, (model, eager), args.batch_size, mode)


def count_flops(contestant: Contestant, shape, device) -> float:
    """FLOPs of one forward and backward pass of the network (not the optimizer or EMA)."""
    model, predict = contestant.network
    x = torch.randn(shape, device=device)
    t = torch.randint(0, 1000, (shape[0],), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        out = predict(x, t)
        out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(contestants, device, steps: int, rounds: int, warmup: int) -> None:
    for c in contestants:  # warm-up (and compilation) first, timed apart
        synchronize(device)
        start = time.perf_counter()
        for _ in range(warmup):
            c.step()
        synchronize(device)
        c.warmup_seconds = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            c.step()
            synchronize(device)
            c.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    for _ in range(rounds):
        for c in contestants:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                loss = c.step()
            loss.item()  # waits for the device
            c.rounds.append((time.perf_counter() - start) / steps)


def sampling_overhead(args, device, precision) -> dict:
    """DDIM of n images with the default DDIM_STEPS (50) against as many bare network calls on
    the same batch."""
    model = UNet.from_preset(args.model, **({"base_channels": 8} if args.dry_run else {})).to(device).eval()
    diffusion = Diffusion(1000, "linear", "eps")
    n, steps = args.sampling, DDIM_STEPS
    shape = (n, model.config["in_channels"], model.config["image_size"], model.config["image_size"])
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def net(x, t):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(x, t).float()

    x = torch.randn(shape, device=device)
    t = torch.full((n,), 500, device=device, dtype=torch.long)
    result = {}
    with torch.no_grad():
        for _ in range(2):  # the first is the warm-up
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                net(x, t)
            synchronize(device)
            calls = time.perf_counter() - start
            start = time.perf_counter()
            diffusion.sample(net, shape, sampler="ddim", steps=steps, progress=False, device=device)
            synchronize(device)
            sample = time.perf_counter() - start
        result = {"n": n, "ddim_steps": steps, "network_calls_s": calls, "sample_s": sample,
                  "overhead": sample / calls - 1}
    return result


def load_diffusers(wanted: bool):
    """The diffusers package, or None: when it is not wanted (--no-diffusers), without importing
    it at all (an import alone costs seconds and pulls in its dependencies), and when it is not
    installed, with a line saying so."""
    if not wanted:
        return None
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed (pip install diffusers): timing our network only")
        return None
    return diffusers


def save_json(path: str | None, result: dict) -> None:
    """Write `result` to `path` at once or not at all: a temporary file in the same folder,
    then os.replace, so that a reader (or a kill) never sees half a file."""
    if not path:
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(temporary, path)


# A run of this length pays a compile once: the rows say how many steps it reaches.
RUN_MINUTES = 20


def measured_row(c: Contestant, flops: dict, twins: dict, peak: float | None, warmup: int) -> dict:
    """The numbers of one timed contestant; `twins`: diffusers' step time by compile mode.

    "startup_seconds" is what the `warmup` untimed steps took beyond as many timed ones (the
    compilation, for a compiled network), and "steps_in_run" the steps a RUN_MINUTES run
    reaches after paying it."""
    kind = "diffusers" if c.name.startswith("diffusers") else "naivediffusion"
    base = twins.get(c.mode)
    achieved = flops[kind] / c.seconds
    startup = max(0.0, c.warmup_seconds - warmup * c.seconds)
    return {"name": c.name, "compile": c.mode, "parameters": c.parameters, "seconds_per_step": c.seconds,
            "images_per_sec": c.batch / c.seconds, "relative_to_diffusers": c.seconds / base if base else None,
            "tflops_per_sec": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "peak_mib": c.peak_mib, "rounds": c.rounds, "warmup_steps": warmup,
            "startup_seconds": startup, "steps_in_run": int(max(0.0, RUN_MINUTES * 60 - startup) / c.seconds),
            "run_minutes": RUN_MINUTES}


def print_row(c: Contestant, row: dict) -> None:
    ratio, mfu = row["relative_to_diffusers"], row["mfu"]
    print(f"{c.name:52} {c.parameters / 1e6:7.2f}M {1000 * c.seconds:9.2f} {row['images_per_sec']:8.0f} "
          f"{(f'{ratio:.2f}x') if ratio else '-':>12} "
          f"{(f'{100 * mfu:.1f}%') if mfu is not None else '-':>6} "
          f"{(f'{c.peak_mib:.0f}') if c.peak_mib else '-':>9} {row['startup_seconds']:9.1f} "
          f"{row['steps_in_run']:>10,}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm-cifar10", choices=sorted(DATASET_OF), help="default: ddpm-cifar10")
    parser.add_argument("--batch-size", type=int, help="default: 128 on a GPU, 16 on a CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--compile", default="none",
                        help="comma-separated torch.compile modes to compare, from "
                        f"{', '.join(COMPILE_MODES)} (default: none)")
    parser.add_argument("--data-on-host", action="store_true",
                        help="also time our step with the images read through a DataLoader")
    parser.add_argument("--contiguous", action="store_true",
                        help="also time our step with the convolutions in NCHW memory, not channels last")
    parser.add_argument("--no-diffusers", action="store_true", help="only our rows")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round (default: 10)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--sampling", type=int, metavar="N",
                        help=f"also time DDIM-{DDIM_STEPS} of N images against its {DDIM_STEPS} network calls")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON here, after each compile mode's rows")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend (default: inductor, the one that makes code); "
                        "aot_eager traces the graphs and runs them as they are, for checking a run "
                        "on a machine without a working C++ compiler (a dry run's default)")
    parser.add_argument("--dry-run", action="store_true",
                        help="toy size (8 base channels, batch 4, 1 round of 2 steps, the aot_eager "
                        "backend): checks every row runs")
    args = parser.parse_args()
    if args.dry_run and args.compile_backend == "inductor":
        args.compile_backend = "aot_eager"

    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.batch_size is None:
        args.batch_size = 128 if device.type == "cuda" else 16
    if args.dry_run:
        args.batch_size, args.steps, args.rounds, args.warmup = 4, 2, 1, 1
        args.sampling = args.sampling and 8
    modes = list(dict.fromkeys(m.strip() for m in args.compile.split(",") if m.strip()))
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown or not modes:
        parser.error(f"unknown --compile mode {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(COMPILE_MODES)}")
    diffusers = load_diffusers(wanted=not args.no_diffusers)

    with compile_backend(args.compile_backend), tempfile.TemporaryDirectory() as scratch:
        contestants = []
        for i, mode in enumerate(modes):
            contestants.append(ours(args, device, precision, mode, True, f"{scratch}/ours{i}"))
            if diffusers is not None:
                contestants.append(theirs(args, device, precision, mode, contestants[0].network[0],
                                          contestants[0].memory_format))
        if args.data_on_host:
            contestants.append(ours(args, device, precision, modes[0], False, f"{scratch}/host"))
        if args.contiguous:
            contestants.append(ours(args, device, precision, modes[0], True, f"{scratch}/nchw", False))
        reference = contestants[0].network[0]
        shape = (args.batch_size, reference.config["in_channels"], reference.config["image_size"],
                 reference.config["image_size"])
        for c in contestants:
            c.parameters = sum(p.numel() for p in c.network[0].parameters())
        # FLOPs of the uncompiled networks, before timing (the counter sees eager ops only).
        flops = {"naivediffusion": count_flops(contestants[0], shape, device)}
        twin = next((c for c in contestants if c.name.startswith("diffusers")), None)
        if twin is not None:
            flops["diffusers"] = count_flops(twin, shape, device)
        peak = peak_flops(device, precision)
        name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{device.type} ({torch.get_num_threads()} threads)")
        result = {"model": args.model, "batch_size": args.batch_size, "precision": precision,
                  "device": name, "torch": torch.__version__,
                  "diffusers": diffusers.__version__ if twin is not None else None,
                  "flops_per_step": flops, "peak_flops": peak, "rows": [], "sampling": None,
                  "complete": False, **provenance()}
        print(f"{args.model}, batch {args.batch_size}, {precision}, on {name}, torch {torch.__version__}"
              + (f", diffusers {diffusers.__version__}" if twin is not None else ""))
        print(f"network forward + backward: {flops['naivediffusion'] / 1e9:.1f} GFLOPs per step"
              + (f" (diffusers' twin: {flops['diffusers'] / 1e9:.1f})" if "diffusers" in flops else "")
              + (f"; peak {peak / 1e12:.0f} TFLOP/s at {precision}" if peak else "; no peak known for MFU"))
        print(f"{args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps, "
              "per compile mode; median round")
        print(f"{'':52} {'params':>8} {'ms/step':>9} {'img/s':>8} {'vs diffusers':>12} {'MFU':>6} {'peak MiB':>9} "
              f"{'startup s':>9} {f'steps/{RUN_MINUTES}min':>10}", flush=True)
        for i, mode in enumerate(modes):
            group = [c for c in contestants if c.mode == mode]
            time_rounds(group, device, args.steps, args.rounds, args.warmup)
            # Each row against diffusers' network under the same compile mode.
            twins = {c.mode: c.seconds for c in group if c.name.startswith("diffusers")}
            for c in group:
                row = measured_row(c, flops, twins, peak, args.warmup)
                result["rows"].append(row)
                print_row(c, row)
            save_json(args.json, result)
            if i == 0 and args.sampling:  # before the next mode compiles
                sampling = result["sampling"] = sampling_overhead(args, device, precision)
                print(f"sampling: DDIM-{sampling['ddim_steps']} of {sampling['n']} images in "
                      f"{sampling['sample_s']:.2f} s; its {sampling['ddim_steps']} network calls alone "
                      f"{sampling['network_calls_s']:.2f} s (the sampler adds {100 * sampling['overhead']:.1f}%)",
                      flush=True)
                save_json(args.json, result)
        result["complete"] = True
        save_json(args.json, result)


if __name__ == "__main__":
    main()
