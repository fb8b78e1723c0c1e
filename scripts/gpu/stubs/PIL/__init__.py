"""Import-only stand-in for Pillow (scripts/gpu/torch_gpu.py): diffusers imports PIL at import
time; the GPU check builds a UNet and a scheduler and never touches an image. Any real use
raises."""
from _standin import standin

__version__ = "10.0.0"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return standin("PIL", name)
