"""What the import-only stand-ins hand out for any attribute: a class (usable as a base class,
an annotation or a default value at import time) that raises when anything instantiates it."""


def standin(module, name):
    def refuse(*_a, **_k):
        raise ImportError(f"{module}.{name}: the real package is not installed (import-only stand-in of the GPU check)")

    return type(name, (), {"__new__": refuse, "__init_subclass__": classmethod(lambda cls, **k: None)})
