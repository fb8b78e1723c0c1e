"""Import-only stand-in (see PIL/__init__.py)."""
import enum

from _standin import standin


class Resampling(enum.IntEnum):
    NEAREST = 0
    LANCZOS = 1
    BILINEAR = 2
    BICUBIC = 3
    BOX = 4
    HAMMING = 5


NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = (r for r in Resampling)


Image = standin("PIL.Image", "Image")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return standin("PIL.Image", name)
