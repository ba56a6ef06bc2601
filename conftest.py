"""pytest set-up for the whole repository (unit tests and the notebooks run by nbval).

Environment variables set here reach the notebook kernels nbval starts.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent

# Real MNIST lives beside the repository (../shared/data) on the build machines; the
# package reads its data root from NAIVEDIFFUSION_DATA. Tests never download.
os.environ.setdefault("NAIVEDIFFUSION_DATA", str((REPO / ".." / "shared" / "data").resolve()))
# A dataset missing from that root fails at once with the data-root message, in the tests and
# in the notebooks alike, instead of trying the network (users download by default). Forced,
# not a default: no test or chapter run by pytest may download.
os.environ["NAIVEDIFFUSION_DOWNLOAD"] = "0"
# The smallest compute budget: every notebook runs in seconds to a minute.
os.environ.setdefault("NAIVEDIFFUSION_BUDGET", "ci")
