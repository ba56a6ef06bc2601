"""naivediffusion: denoising diffusion (DDPM, Ho et al. 2020) from first principles.

The package that the chapters of the NaiveDiffusion book add up to:

    from naivediffusion import Diffusion, UNet, load_model, sampling
    diffusion = Diffusion(timesteps=1000, schedule="linear")
    model = UNet.from_preset("mnist")
    loss = diffusion.loss(model, x0)           # L_simple, Eq. 14
    images = diffusion.sample(model, (16, 1, 28, 28))   # the loops are in naivediffusion.sampling
    model, diffusion, info = load_model("pretrained:mnist")  # the model that ships with it
    images = sampling.draw(diffusion, model, 1000, info["image_shape"])  # in batches, as the CLI draws
"""

from . import checkpoint, data, distributed, sampling, schedule, viz
from .budget import Budget, get_budget, pick_device
from .checkpoint import CheckpointError, load_checkpoint, load_model, pretrained, pretrained_record
from .diffusion import Diffusion
from .unet import UNet

__version__ = "0.1.0"

__all__ = [
    "Budget", "CheckpointError", "Diffusion", "UNet", "checkpoint", "data", "distributed", "get_budget",
    "load_checkpoint", "load_model", "pick_device", "pretrained", "pretrained_record", "sampling", "schedule",
    "viz", "__version__",
]
