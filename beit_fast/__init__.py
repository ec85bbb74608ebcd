"""beit_fast: fused kernels, model and trainer for BEiT (masked image modeling on visual tokens)."""
import torch  # noqa: F401  (beit_fast._C links against torch's libraries: torch must load first)

__version__ = "0.1.0"


def create_model(name: str, **overrides):
    """Build a registered model by name (see beit_fast.models.list_models()); keyword overrides win."""
    from .models import create_model as _create
    return _create(name, **overrides)


_SUBMODULES = ("masking", "models", "ops", "relpos", "train")


def __getattr__(name: str):
    """beit_fast.models / .ops / .masking / .relpos / .train after a bare `import beit_fast` (imported when
    first used: the trainer's imports are not paid by a script that only builds a model)."""
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'beit_fast' has no attribute {name!r}")
