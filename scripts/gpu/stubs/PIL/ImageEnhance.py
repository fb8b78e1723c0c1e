"""Import-only stand-in (see PIL/__init__.py)."""
from _standin import standin


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return standin("PIL.ImageEnhance", name)
