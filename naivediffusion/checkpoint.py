"""Checkpoints: the file format, atomic writes, and the one place a file becomes a model.

A checkpoint is a dict written by `torch.save`: the header that `checkpoint_record` puts
first ("format", "version", "kind"), then the step, the weights and the settings that rebuild
the network and its noise process. The Trainer writes two kinds (train.py, runfolder.py):

- checkpoint.pt ("checkpoint"): the full state of a run, from which it resumes exactly;
- ema.pt ("ema"): the EMA weights and the settings only, the file to ship.

Files are written atomically (`write_atomic`) and read with `torch.load(weights_only=True)`
(`load_checkpoint`), so a crash never leaves half a file and a file cannot run code.

`load_model` rebuilds the network from the saved "model_config" and "diffusion_config" (the
arguments of `UNet` and `Diffusion`) and hands back the run's settings, "train_config", as the
plain dict they are stored as. So reading a model needs nothing of the training code: the
chapters that only sample import this module, not the Trainer (whose `TrainConfig` can be
rebuilt from that dict, as `Trainer.resume` does). A run that starts from another's weights
(--init-from) gets them from `load_init_weights`.

Models that ship with the package live in naivediffusion/pretrained/NAME.pt, with their record
NAME.json beside them; everything that reads a checkpoint also takes "pretrained:NAME".

    model, diffusion, info = load_model("runs/mnist/ema.pt")
    model, diffusion, info = load_model("pretrained:mnist")     # = load_model(pretrained("mnist"))
    record = pretrained_record("mnist")                          # how it was trained, and measured
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .diffusion import Diffusion
from .unet import UNet

CHECKPOINT_FORMAT = "naivediffusion"
CHECKPOINT_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PRETRAINED_PREFIX = "pretrained:"


class CheckpointError(ValueError):
    """A file that is not a naivediffusion checkpoint, is damaged, or was refused."""


def checkpoint_record(kind: str, **fields) -> dict:
    """A checkpoint's dict: the header ("format", "version", "kind") and then `fields`, in order.

    `kind` is "checkpoint" (a run's full state) or "ema" (the weights to ship)."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": kind, **fields}


# ------------------------------------------------------------------ writing


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call `write(f)` on a binary file so that `path` always holds a complete file.

    The bytes go to a temporary file in the same folder, are forced to disk, and then
    `os.replace` swaps it in, which is atomic: a crash or a kill at any moment leaves
    either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------ reading


def _describe_file(path: Path) -> str:
    """What kind of file `path` is, judged by its first bytes: "torch", "pickle" or "other"."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        return "torch"  # torch.save writes a zip archive (maybe a truncated one)
    return "pickle" if head[:1] == b"\x80" else "other"  # pickle protocol 2+ starts with 0x80


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and check a naivediffusion checkpoint (checkpoint.pt or ema.pt, or a run folder).

    `path` may also name a model shipped with the package, "pretrained:mnist" (see
    `pretrained`), so that a user need not know where pip put it.

    Always `torch.load(..., weights_only=True)`: only tensors and plain data are unpickled,
    so a file that would run code when loaded is refused instead of executed.

    Raises:
        FileNotFoundError: there is no such file.
        CheckpointError: not a checkpoint, damaged, refused, or not written by naivediffusion.
    """
    if isinstance(path, str) and path.startswith(PRETRAINED_PREFIX):
        path = pretrained(path[len(PRETRAINED_PREFIX):])
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in ("checkpoint.pt", "ema.pt") if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"no checkpoint.pt or ema.pt in the folder {path}; give a run "
                                    "folder that training has written to, or the file itself")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; check the path, or train a model first "
            "(python -m naivediffusion train --dataset mnist writes runs/mnist/ema.pt)"
        )
    kind = _describe_file(path)
    if kind == "other":
        raise CheckpointError(f"{path} is not a naivediffusion checkpoint: not a file written by "
                              "torch.save; give the checkpoint.pt or ema.pt of a training run")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about unusual pickle protocols
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} refused: it contains code objects (Python objects other than tensors and "
            "plain data, which could run code when loaded); only checkpoints written by "
            "naivediffusion load"
        ) from err
    except Exception as err:  # zip, pickle and storage errors of a truncated or damaged file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is damaged or truncated and cannot be read ({reason}); "
                              "use another checkpoint or train again") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        what = f"a dict with keys {sorted(map(str, checkpoint))[:6]}" if isinstance(checkpoint, dict) \
            else f"a {type(checkpoint).__name__}"
        raise CheckpointError(f"{path} is not a naivediffusion checkpoint (it holds {what}); give "
                              "the checkpoint.pt or ema.pt written by python -m naivediffusion train")
    if checkpoint.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer naivediffusion (checkpoint version "
                              f"{checkpoint['version']}); upgrade the package to load it")
    checkpoint["path"] = str(path)
    return checkpoint


def unwrap_state_dict(state: dict) -> dict[str, Tensor]:
    """The plain UNet weights inside the state of an AveragedModel and/or a compiled model:
    drops "n_averaged" and the "module." / "_orig_mod." prefixes they add."""
    weights = {}
    for key, value in state.items():
        if key == "n_averaged":
            continue
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        weights[key] = value
    return weights


def total_steps(checkpoint: dict) -> int:
    """The optimizer steps behind a checkpoint's weights: its run's, plus those of the model its
    run started from (--init-from), and of the one that one started from, and so on."""
    init = checkpoint.get("init") or {}
    return (checkpoint.get("step") or 0) + (init.get("total_steps", init.get("step")) or 0)


def load_model(path: str | os.PathLike, device="cpu", ema: bool = True) -> tuple[UNet, Diffusion, dict]:
    """Rebuild the trained network and its diffusion process from a checkpoint.

    Args:
        path: a checkpoint.pt, an ema.pt, a run folder, or "pretrained:NAME" for a model
            that ships with the package.
        device: where to put the model.
        ema: the EMA weights (what DDPM samples from) rather than the raw ones.
    Returns:
        (model in eval mode, diffusion, info) where info holds "step" (of the run that wrote
        the file), "total_steps" (with those of the models it started from), "image_shape"
        [C, H, W], "train_config", "model_config", "diffusion_config", "kind" and "path".
    """
    checkpoint = load_checkpoint(path)
    path = checkpoint["path"]
    key = "ema" if ema else "model"
    if key not in checkpoint:
        raise CheckpointError(f"{path} holds no {'EMA' if ema else 'raw'} weights (it is a "
                              f"{checkpoint.get('kind')!r} file); use the run's checkpoint.pt")
    try:
        model = UNet(**checkpoint["model_config"])
        diffusion = Diffusion(**checkpoint["diffusion_config"])
        model.load_state_dict(unwrap_state_dict(checkpoint[key]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: its weights do not fit the model it describes ({reason}); "
                              "the file was written for another model or edited") from err
    model.to(device).eval()
    channels = checkpoint["model_config"]["in_channels"]
    size = checkpoint["model_config"]["image_size"]
    info = {
        "path": path,
        "kind": checkpoint.get("kind"),
        "step": checkpoint.get("step"),
        "total_steps": total_steps(checkpoint),
        "init": checkpoint.get("init"),
        "image_shape": list(checkpoint.get("image_shape", [channels, size, size])),
        "train_config": checkpoint.get("train_config"),
        "model_config": checkpoint["model_config"],
        "diffusion_config": checkpoint["diffusion_config"],
    }
    return model, diffusion, info


# ------------------------------------------------------------ fine-tuning


def load_init_weights(source: str, model_config: dict, process: dict) -> tuple[dict, dict]:
    """The EMA weights of checkpoint `source` (a path, a run folder or "pretrained:NAME"), to
    start a new run from (fine-tuning, --init-from); and what they are, {"path", "step",
    "total_steps"}, for the new run's checkpoints to record.

    Raises ValueError unless the checkpoint's network is the one `model_config` describes
    (dropout aside) and its noise process has the "timesteps", "schedule" and "objective"
    of `process`; CheckpointError if it holds no EMA weights.
    """
    start = load_checkpoint(source)
    path = start["path"]
    theirs = start.get("model_config") or {}
    differ = [k for k in sorted(set(theirs) | set(model_config))
              if k not in ("dropout", "out_channels") and theirs.get(k) != model_config.get(k)]
    outputs = [config.get("out_channels") or config.get("in_channels") for config in (theirs, model_config)]
    if not differ and outputs[0] != outputs[1] and outputs[1] != 2 * outputs[0]:
        raise ValueError(f"--init-from {source}: its network outputs {outputs[0]} channels and this run's "
                         f"{outputs[1]}; only a fixed variance's network can start a learned one "
                         "(--variance learned), not the other way round")
    if differ:
        was = ", ".join(f"{k} {theirs.get(k)!r} there, {model_config.get(k)!r} here" for k in differ)
        trained = start.get("train_config") or {}
        preset = f" (a {trained['model']!r} network)" if "model" in trained else ""
        raise ValueError(f"--init-from {source}: its network{preset} is not this run's ({was}); "
                         "pass the --model (and --class-conditional) it was trained with")
    saved = start.get("diffusion_config") or {}
    differ = [k for k in ("timesteps", "schedule", "objective") if saved.get(k) != process[k]]
    if differ:
        was = ", ".join(f"{k} {saved.get(k)!r} there, {process[k]!r} here" for k in differ)
        raise ValueError(f"--init-from {source}: it learned another noise process ({was}); pass the "
                         "same --timesteps, --schedule and --objective")
    if "ema" not in start:
        raise CheckpointError(f"--init-from {source}: {path} holds no EMA weights; give a run's "
                              "checkpoint.pt or ema.pt")
    weights = unwrap_state_dict(start["ema"])
    if outputs[1] != outputs[0]:
        weights = widen_output(weights, outputs[1])
    return weights, {"path": str(path), "step": start.get("step"), "total_steps": total_steps(start)}


def widen_output(weights: dict[str, Tensor], out_channels: int) -> dict[str, Tensor]:
    """A fixed variance's weights for a network with a learned variance's extra outputs: the
    new channels of the last convolution ("conv_out") start at zero, so v = 0 and the variance
    starts at the geometric mean of beta_t and beta-tilde_t (variance.learned_log_variance),
    and the mean's outputs are exactly those of the network fine-tuned from."""
    weights = dict(weights)
    for name in ("conv_out.weight", "conv_out.bias"):
        old = weights[name]
        extra = old.new_zeros((out_channels - old.shape[0], *old.shape[1:]))
        weights[name] = torch.cat([old, extra])
    return weights


# ------------------------------------------------------------ shipped models


def pretrained_names() -> list[str]:
    """The names of the models that ship with the package, e.g. ["mnist"]."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))


def pretrained(name: str = "mnist") -> Path:
    """Path of a model that ships with the package (``naivediffusion/pretrained/NAME.pt``).

    Its provenance (the command, hardware and time that made it) is in NAME.json beside it.
    Everything that reads a checkpoint also takes the name as "pretrained:NAME".
    """
    path = PRETRAINED_DIR / f"{name}.pt"
    if not name or not path.is_file():
        raise FileNotFoundError(f"no pretrained model {name!r}; the package ships: "
                                f"{', '.join(PRETRAINED_PREFIX + n for n in pretrained_names()) or 'none'}")
    return path


def pretrained_record(name: str = "mnist") -> dict:
    """The record of a shipped model (NAME.json beside NAME.pt): how it was trained, and the
    measurements that benchmarks/ wrote there and the chapters read."""
    return json.loads(pretrained(name).with_suffix(".json").read_text())


def update_pretrained_record(name: str, **fields) -> Path:
    """Set top-level fields of a shipped model's record (a benchmark's --write-provenance),
    keeping the rest; written atomically, as the checkpoints are (`write_atomic`)."""
    path = pretrained(name).with_suffix(".json")
    record = {**json.loads(path.read_text()), **fields}
    return write_text_atomic(path, json.dumps(record, indent=2) + "\n")
