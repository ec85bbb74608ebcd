"""Training: BEiT pretraining, fine-tuning, evaluation and visual tokenizers, as a Python API and the
`beit-fast` CLI (beit_fast/cli.py).

    from beit_fast.train import pretrain, finetune, preset
    pretrain(preset("pretrain", "demo"))            # = `beit-fast pretrain`
    finetune(dataclasses.replace(preset("finetune", "demo"), init="runs/pretrain-demo"))
    bench("attention", "--smoke", "--out", "/tmp/b"); info()   # = `beit-fast bench ...`, `beit-fast info`
"""
from .config import (ConfigError, EvalConfig, FinetuneConfig, PretrainConfig, TokenizerFitConfig,  # noqa: F401
                     list_presets, preset, resolve)
from .evaluation import evaluate  # noqa: F401
from .finetuning import finetune  # noqa: F401
from .pretraining import pretrain  # noqa: F401
from .tokenizer_fitting import fit_tokenizer  # noqa: F401
from ..benchmarks import run as bench  # noqa: F401  (= `beit-fast bench`)
from ..info import main as info  # noqa: F401  (= `beit-fast info`)
