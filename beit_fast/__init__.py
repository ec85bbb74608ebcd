"""beit_fast: fused kernels, model and trainer for BEiT (masked image modeling on visual tokens)."""
import torch  # noqa: F401  (beit_fast._C links against torch's libraries: torch must load first)

__version__ = "0.1.0"


def create_model(name: str, **overrides):
    """Build a registered model by name (see beit_fast.models.list_models()); keyword overrides win."""
    from .models import create_model as _create
    return _create(name, **overrides)
