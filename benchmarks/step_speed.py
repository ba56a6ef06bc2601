"""Speed of one training step of a U-Net preset on synthetic data: steps/s, images/s, memory.

Measures the network alone (no data loading), the way `Trainer.train_step` runs it:
AdamW, L_simple, mixed precision, channels_last on CUDA, optionally torch.compile.
Prints numbers; it is not a test.

    python benchmarks/step_speed.py --model ddpm-cifar10 --device cuda --batch-size 128
    python benchmarks/step_speed.py --model ddpm-cifar10 --device cuda --compile
    python benchmarks/step_speed.py --model mnist --device cpu --batch-size 32 --steps 5
"""

import argparse
import time

import torch

from naivediffusion import Diffusion, UNet, pick_device
from naivediffusion.train import resolve_precision

SHAPES = {"ddpm-cifar10": (3, 32), "mnist": (1, 28)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm-cifar10", choices=sorted(SHAPES), help="default: ddpm-cifar10")
    parser.add_argument("--batch-size", type=int, default=128, help="default: 128 (the paper's)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (default: 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    args = parser.parse_args()

    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    channels, size = SHAPES[args.model]
    model = UNet.from_preset(args.model).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        model = model.to(memory_format=torch.channels_last)
    network = torch.compile(model) if args.compile else model
    diffusion = Diffusion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x0 = torch.rand(args.batch_size, channels, size, size, device=device) * 2 - 1
    if device.type == "cuda":
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def predict(x_t, t):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return network(x_t, t)

    def step():
        loss = diffusion.loss(predict, x0)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        return loss

    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warmup_seconds = time.perf_counter() - compile_start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()  # waits for the GPU
    seconds = time.perf_counter() - start

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"{args.model}: {model.count_parameters() / 1e6:.2f}M parameters, batch {args.batch_size}, "
          f"{precision}, compile={args.compile}, device {name}, torch {torch.__version__}")
    print(f"warm-up ({args.warmup} steps, includes compilation): {warmup_seconds:.1f} s")
    print(f"{args.steps} steps in {seconds:.2f} s: {args.steps / seconds:.2f} steps/s, "
          f"{args.steps * args.batch_size / seconds:.0f} images/s")
    if device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
