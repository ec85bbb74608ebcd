"""`beit-fast`: pretrain, finetune, eval, fit-tokenizer, bench, info.

Every training command takes a named preset (`--preset`), a YAML file (`--config`), `--set key=value`
pairs and one flag per config field (`--lr 1e-3`, `--output-dir runs/x`, `--resume`); later sources win.
With no arguments, `beit-fast pretrain` runs the digits demo and `beit-fast finetune` fine-tunes on digits
(from --init when given, else from random initialisation).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

import yaml

from .train import config as C

_KINDS = {"pretrain": C.PretrainConfig, "finetune": C.FinetuneConfig, "eval": C.EvalConfig,
          "fit-tokenizer": C.TokenizerFitConfig}
_HELP = {"pretrain": "BEiT masked-image-modeling pretraining (default: a tiny BEiT on the built-in digits)",
         "finetune": "fine-tune a classifier (from --init: a checkpoint of this package, unilm, timm or HF)",
         "eval": "top-1 / top-5 of a fine-tuned checkpoint on the held-out split",
         "fit-tokenizer": "fit a k-means visual tokenizer on your images (no external weights)"}
_BARE = {"resume": "auto"}       # what a flag given without a value means, besides true for on/off fields
_NOTES = {"model_overrides": "a mapping merges into the current one, e.g. '{depth: 6}'; null or {} clears it",
          "fused": "none: fused kernels on CUDA, the reference ops elsewhere"}


def _add_config_args(p: argparse.ArgumentParser, kind: str) -> None:
    cls = _KINDS[kind]
    p.add_argument("--preset", default="", help=f"named preset: {', '.join(C.list_presets(kind))} "
                                                f"(default {C.DEFAULT_PRESET[kind]})")
    p.add_argument("--config", default="", metavar="FILE.yaml", help="YAML file of field: value (may name a preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field (value parsed as YAML; text fields take the text as written); repeatable")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit (after checking its values; the files, data "
                        "and devices it names are not looked at)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    hints = typing.get_type_hints(cls)
    name = C.DEFAULT_PRESET[kind]
    base = C.preset(kind)          # what the command runs with no arguments
    source = "default" if name == "default" else f"{name} preset:"
    fields = p.add_argument_group("config fields (same as --set field=value)" + (
        "" if name == "default" else f"; the values shown are the {name} preset's, run with no arguments"))
    for f in dataclasses.fields(cls):
        if f.name == "preset":
            continue
        typ = hints[f.name]
        kw = dict(dest="field:" + f.name, default=argparse.SUPPRESS, metavar="V")
        bare = _BARE.get(f.name, "true" if typ in (bool, typing.Optional[bool]) else None)
        if bare:
            kw.update(nargs="?", const=bare)
        flag = "--" + f.name.replace("_", "-")
        notes = [f"{source} {getattr(base, f.name)!r}"] + ([f"bare {flag}: {bare}"] if bare else []) + \
            ([_NOTES[f.name]] if f.name in _NOTES else [])
        fields.add_argument(flag, help=f"({'; '.join(notes)})".replace("%", "%%"), **kw)   # argparse formats help


def _resolve(kind: str, args) -> object:
    overrides = C.parse_set(args.set, _KINDS[kind])
    hints = typing.get_type_hints(_KINDS[kind])
    for key, raw in vars(args).items():
        if key.startswith("field:"):
            name = key[6:]
            overrides[name] = _parse_flag(raw, hints[name], name)
    return C.resolve(kind, args.preset, args.config, overrides)


def _parse_flag(raw: str, typ, name: str):
    """A flag's text as the field's type takes it: text fields as written (a path with a comma, `yes`,
    `0755`); tuple fields as comma-separated values (--betas 0.9,0.98); the others parsed as YAML."""
    flag = "--" + name.replace("_", "-")
    if C.is_text(typ):
        return raw
    if typ is tuple or typing.get_origin(typ) is tuple:
        if "," in raw and not raw.strip().startswith("["):
            return [C.parse_yaml_value(v, flag) for v in raw.split(",")]
    return C.parse_yaml_value(raw, flag)


def _bench(args) -> int:
    from .benchmarks import run
    return run(args.name, *args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit-fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for kind in _KINDS:
        _add_config_args(sub.add_parser(kind, help=_HELP[kind], description=_HELP[kind]), kind)
    b = sub.add_parser("bench", help="run a benchmark script: bench/bench_<name>.py of a checkout, or the copy "
                                     "installed with the package")
    b.add_argument("name", nargs="?", default="", help="e.g. attention for bench/bench_attention.py")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the script")
    sub.add_parser("info", help="versions, device, and which backend every fused op uses here")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import main as info_main
        info_main()
        return 0
    if args.command == "bench":
        return _bench(args)
    kind = args.command
    if args.list_presets:
        print("\n".join(C.list_presets(kind)))
        return 0
    try:
        cfg = _resolve(kind, args)
        if args.print_config:
            C.check(cfg, values_only=True)
            print(yaml.safe_dump(C.to_dict(cfg), sort_keys=False), end="")
            return 0
        from . import train
        run = {"pretrain": train.pretrain, "finetune": train.finetune, "eval": train.evaluate,
               "fit-tokenizer": train.fit_tokenizer}[kind]
        run(cfg)
    except C.ConfigError as e:
        print(f"beit-fast {kind}: error: {e}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """Process entry (the `beit-fast` script, `python -m beit_fast.cli`): main(), then exit with its status.

    A torchrun worker that returned leaves through os._exit: with gloo, a worker whose run had finished
    (checkpoints and logs written, process group destroyed) sometimes aborted afterwards, inside the
    interpreter's own shutdown ("terminate called without an active exception", no Python frame left; seen
    in about 1 of 45 two-process CPU runs), which torchrun reports as a failed run. os._exit skips atexit
    handlers: the process group is destroyed here first (after a successful run; see runtime.teardown)."""
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if rc == 0:
            from .train.runtime import leave_group
            leave_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
