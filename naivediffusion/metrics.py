"""Deprecated name: bits/dim now live in `naivediffusion.likelihood`, the sample-quality score in
`naivediffusion.quality`, and the command lines in `naivediffusion.__main__`."""

from .likelihood import *  # noqa: F401,F403
from .quality import *  # noqa: F401,F403
