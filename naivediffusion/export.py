"""Export: a trained network as ONNX, and the sampler's tables as JSON, for the book's pages.

The published book is a static site with no kernel. Its live sampler (`_static/nd_sampler.js`)
runs the shipped networks in the reader's browser with ONNX Runtime Web and does the rest, the
DDIM loop and classifier-free guidance of `sampling.py` and `diffusion.py`, in JavaScript. It
needs two files per model, written here:

- NAME.onnx: the EMA network as a graph, (x_t [B, C, H, W] float32, t [B] int64 and, for a
  class-conditional model, labels [B] int64) -> output [B, C, H, W], with a dynamic batch axis.
  A network that also predicts a variance (2C output channels) is exported with only its first C
  channels, the mean's parameterization, which is all that DDIM reads.
- NAME.json: what the sampler needs besides the network: the float64 table alphas_cumprod (all
  T values, as JSON numbers), the objective, the image shape, the classes and the null class,
  the default sampler settings, and where the model came from.

    python -m naivediffusion export --checkpoint pretrained:mnist --format onnx --out _static/models
    export_onnx("pretrained:mnist_conditional", "out/")   # -> (Path of .onnx, Path of .json)

`onnx` must be installed (`pip install onnx`); ONNX Runtime (`onnxruntime`) is only for the tests
that compare the graph with PyTorch.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import (
    PRETRAINED_PREFIX,
    load_model,
    pretrained_names,
    pretrained_record,
    write_atomic,
)
from .sampling import DEFAULT_ETA

FORMATS = ("onnx",)
# The in-page sampler's default number of DDIM steps: fewer than the command line's DDIM_STEPS,
# so that a reader's laptop draws a digit in well under a second.
PAGE_STEPS = 20
OPSET = 17
MAX_BYTES = 2 * 1024 * 1024  # each .onnx file stays small enough to ship with the site


class MeanOutput(nn.Module):
    """`model` with a fixed signature for export, returning only the first C output channels.

    A learned-variance network outputs 2C channels (the mean's parameterization, then the
    variance's); DDIM reads only the first C. `out_channels` comes from the network's config
    (the input channels when it has none)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.channels = model.config["in_channels"]
        self.conditional = model.config.get("num_classes") is not None

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        out = self.model(x, t, labels) if self.conditional else self.model(x, t)
        return out[:, : self.channels]


def model_name(source: str) -> str:
    """The files' stem: NAME for "pretrained:NAME", else the checkpoint file's (or folder's) name."""
    if source.startswith(PRETRAINED_PREFIX):
        return source[len(PRETRAINED_PREFIX):]
    path = Path(source)
    return path.name if path.is_dir() else path.stem


def provenance(source: str, info: dict) -> dict:
    """Where the model came from: a shipped model's record (its plain fields), else the file."""
    if source.startswith(PRETRAINED_PREFIX):
        record = pretrained_record(source[len(PRETRAINED_PREFIX):])
        plain = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))}
        return {"source": source, **plain}
    return {"source": str(info["path"]), "step": info["step"], "total_steps": info["total_steps"]}


def recommended_guidance(source: str) -> float:
    """The guidance weight w that benchmarks/guidance.py measured best for a shipped model, else 0."""
    if not source.startswith(PRETRAINED_PREFIX):
        return 0.0
    record = pretrained_record(source[len(PRETRAINED_PREFIX):])
    return float((record.get("recommended_guidance") or {}).get("w", 0.0))


def sampler_tables(model: nn.Module, diffusion, info: dict, source: str) -> dict:
    """The JSON beside the graph: everything the in-page sampler reads besides the network."""
    config = model.config
    channels = config["in_channels"]
    num_classes = config.get("num_classes")
    return {
        "format": "naivediffusion-sampler",
        "version": 1,
        "name": model_name(source),
        "objective": diffusion.objective,
        "timesteps": diffusion.num_timesteps,
        "image_shape": list(info["image_shape"]),
        "in_channels": channels,
        # What the exported graph returns; the network itself may output more (learned variance).
        "out_channels": channels,
        "network_out_channels": config.get("out_channels", channels),
        "num_classes": num_classes,
        "null_class": num_classes,  # the label that means "no class" (None: unconditional)
        "inputs": ["x", "t", "labels"] if num_classes is not None else ["x", "t"],
        "defaults": {"sampler": "ddim", "steps": PAGE_STEPS, "eta": DEFAULT_ETA, "clip": True,
                     "guidance": recommended_guidance(source) if num_classes is not None else 0.0},
        # float64, every one of the T values, as JSON numbers (repr round-trips exactly).
        "alphas_cumprod": diffusion.alphas_cumprod.tolist(),
        "diffusion_config": diffusion.config,
        "provenance": provenance(source, info),
    }


def export_graph(model: nn.Module, image_shape, batch: int = 2) -> bytes:
    """The bytes of `model` (wrapped in `MeanOutput`) as ONNX, with a dynamic batch axis."""
    wrapper = MeanOutput(model).eval()
    x = torch.randn(batch, *image_shape)
    t = torch.full((batch,), 500, dtype=torch.long)
    args, names = (x, t), ["x", "t"]
    if wrapper.conditional:
        args, names = (x, t, torch.zeros(batch, dtype=torch.long)), ["x", "t", "labels"]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapper, args, buffer, dynamo=False, input_names=names, output_names=["output"],
            opset_version=OPSET, dynamic_axes={n: {0: "batch"} for n in [*names, "output"]},
            do_constant_folding=True)
    return buffer.getvalue()


def export_onnx(source: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/NAME.onnx and out_dir/NAME.json for the checkpoint `source` (a path, a run
    folder or "pretrained:NAME"), both atomically; returns their paths.

    Raises:
        ImportError: onnx is not installed.
        ValueError: the graph came out over MAX_BYTES (CheckpointError, a ValueError, for a
            file that is no checkpoint; FileNotFoundError for a missing one).
    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError("exporting to ONNX needs the onnx package: pip install onnx") from err
    model, diffusion, info = load_model(source, device="cpu", ema=True)
    data = export_graph(model, info["image_shape"])
    onnx.checker.check_model(onnx.load_from_string(data))
    if len(data) > MAX_BYTES:
        raise ValueError(f"the exported graph is {len(data) / 2**20:.1f} MiB, over the "
                         f"{MAX_BYTES / 2**20:.0f} MiB a page should load; export a smaller model")
    tables = sampler_tables(model, diffusion, info, source)
    tables["onnx_sha256"] = hashlib.sha256(data).hexdigest()
    tables["onnx_bytes"] = len(data)
    name = model_name(source)
    out = Path(out_dir)
    graph = write_atomic(out / f"{name}.onnx", lambda f: f.write(data))
    record = write_atomic(out / f"{name}.json", lambda f: f.write(json.dumps(tables, indent=1).encode()))
    return graph, record


# ------------------------------------------------------------------ the command line


def add_parser(subparsers) -> None:
    """The `export` subcommand of ``python -m naivediffusion``."""
    names = ", ".join(PRETRAINED_PREFIX + n for n in pretrained_names())
    p = subparsers.add_parser(
        "export", help="write a model as ONNX with its sampler tables (JSON), for the book's pages",
        description="Write the EMA network as NAME.onnx and the tables the in-page DDIM sampler "
        "reads as NAME.json (see naivediffusion/export.py).")
    p.add_argument("--checkpoint", required=True,
                   help=f"a run's ema.pt or checkpoint.pt, the run folder, or one of: {names} (required)")
    p.add_argument("--format", default="onnx", help=f"{', '.join(FORMATS)} (default: onnx)")
    p.add_argument("--out", required=True, help="the folder to write NAME.onnx and NAME.json into (required)")
    p.set_defaults(run=run)


def run(args) -> int:
    """Export, then print what was written."""
    if args.format not in FORMATS:
        raise ValueError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder to write the model's files into")
    try:
        graph, record = export_onnx(args.checkpoint, args.out)
    except ImportError as err:
        raise ValueError(str(err)) from err
    print(f"{graph} ({graph.stat().st_size / 1024:.0f} KiB), {record}")
    return 0

