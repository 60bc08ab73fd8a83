"""iosd: open-vocabulary segmentation data engine built on diffusion features."""

import os

__version__ = "0.1.0"

# transformers warns at import that torchvision is absent (iosd never uses its image
# processors); keep the CLI output to what users act on.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
