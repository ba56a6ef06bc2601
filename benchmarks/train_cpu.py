"""Training speed of the "mnist" preset: steps/s, images/s and peak memory.

The same `Trainer.train_step` as `python -m naivediffusion train`, on real MNIST,
timed after a few warm-up steps. Prints numbers; it is not a test.

    python benchmarks/train_cpu.py                                  # CPU, 20 steps of 64
    python benchmarks/train_cpu.py --device cuda --batch-size 128 --steps 200
    python benchmarks/train_cpu.py --device cuda --precision fp16   # as on a T4
"""

import argparse
import platform
import sys
import tempfile
import time

import torch

from naivediffusion.config import TrainConfig
from naivediffusion.train import Trainer


def peak_memory_mib(device: torch.device) -> tuple[str, float]:
    """Peak memory of this process: GPU memory allocated on CUDA, else the resident set size."""
    if device.type == "cuda":
        return "GPU memory allocated", torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return "resident memory", maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"),
                        help="default: cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="default: auto (fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--model", default="mnist", help="UNet preset (default: mnist)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data loading processes (default: 0 on CPU, up to 4 with CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig.for_dataset(
            "mnist", model=args.model, batch_size=args.batch_size, device=args.device,
            precision=args.precision, compile=args.compile, num_workers=args.num_workers,
            run_dir=run_dir,
        )
        trainer = Trainer(config)
        device = trainer.device
        batches = trainer.batches()
        for _ in range(args.warmup):
            trainer.train_step(next(batches)[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = trainer.train_step(next(batches)[0])
        loss = loss.item()  # waits for the GPU
        seconds = time.perf_counter() - start
        batches.close()

    what, mib = peak_memory_mib(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"model {args.model!r}: {trainer.model.count_parameters() / 1e6:.2f}M parameters, "
          f"batch {args.batch_size}, {trainer.precision}, compile={args.compile}")
    print(f"device: {device.type} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{args.steps} steps in {seconds:.2f} s: {args.steps / seconds:.2f} steps/s, "
          f"{args.steps * args.batch_size / seconds:.0f} images/s (last loss {loss:.4f})")
    print(f"peak {what}: {mib:.0f} MiB")


if __name__ == "__main__":
    main()
