"""naivediffusion: denoising diffusion (DDPM, Ho et al. 2020) from first principles.

The package that the chapters of the NaiveDiffusion book add up to:

    from naivediffusion import Diffusion, UNet
    diffusion = Diffusion(timesteps=1000, schedule="linear")
    model = UNet.from_preset("mnist")
    loss = diffusion.loss(model, x0)           # L_simple, Eq. 14
    images = diffusion.sample(model, (16, 1, 28, 28))
"""

from . import data, schedule, viz
from .budget import Budget, get_budget, pick_device
from .diffusion import Diffusion
from .unet import UNet

__version__ = "0.1.0"

__all__ = [
    "Budget", "Diffusion", "UNet", "data", "get_budget", "pick_device", "schedule", "viz",
    "__version__",
]
