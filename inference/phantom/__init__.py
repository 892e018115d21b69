"""Synthetic head-and-neck CTA phantom with a ground-truth facemask (see docs/phantom.md)."""

from inference.phantom.generate import Phantom, PhantomOptions, generate_phantom
from inference.phantom.write import load_ground_truth, write_phantom

__all__ = ["Phantom", "PhantomOptions", "generate_phantom", "load_ground_truth", "write_phantom"]
