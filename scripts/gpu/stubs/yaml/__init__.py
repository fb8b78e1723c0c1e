"""Import-only stand-in for PyYAML (scripts/gpu/torch_gpu.py): imported by diffusers' and
huggingface_hub's modules, never called by the GPU check. Any real use raises."""
from _standin import standin


class YAMLError(Exception):
    pass


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return standin("yaml", name)
