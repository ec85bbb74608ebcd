"""BEiT models: `create_model(name, **overrides)`, `list_models()`, `load_checkpoint(model, path_or_sd)`."""
from .beit import Attention, Beit, BeitForImageClassification, BeitForMaskedImageModeling, Block  # noqa: F401
from .checkpoint import LoadReport, load_checkpoint  # noqa: F401
from .config import PRESETS, BeitConfig, preset_config  # noqa: F401


def list_models() -> list[str]:
    return sorted(PRESETS)


def build_model(config: BeitConfig):
    """A classification model, or a masked-image-modeling model when config.vocab_size > 0."""
    return BeitForMaskedImageModeling(config) if config.vocab_size > 0 else BeitForImageClassification(config)


def create_model(name: str, **overrides):
    """create_model('beit_base_patch16_224', drop_path_rate=0.1, attn_impl='sdpa') etc."""
    return build_model(preset_config(name, **overrides))
