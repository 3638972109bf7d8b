"""dmdx: distil many-step diffusion and flow-matching teachers into one-to-four-step students."""

__version__ = "0.1.0"
