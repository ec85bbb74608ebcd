"""End-to-end training-step throughput: one forward + backward of a whole BEiT model (images/s), for
pretraining (masked image modeling, ~75 of 196 patches masked) and fine-tuning (classification).

Providers (what a user would otherwise pick):
  timm            timm's Beit (SDPA float-mask attention), fine-tuning only (timm has no MIM model)
  hf              transformers' BeitForMaskedImageModeling / BeitForImageClassification (SDPA)
  ours_reference  beit_fast with fused=False, attn_impl="sdpa" (timm-equivalent math)
  torch_compile   ours_reference under torch.compile
  torch_compile_cudagraphs  ours_reference under torch.compile(mode="reduce-overhead"): the reference with
                  CUDA graphs, the baseline of ours_fused_cudagraphs
  ours_fused      beit_fast with the fused kernels as configured by default (fused=True, attn_impl="fused";
                  fc1 + GELU as nn.Linear + nn.GELU, fused_mlp=False)
Variants of ours_fused that swap one part (which part costs what):
  ours_fused_mlp_triton  fused_mlp=True: fc1 + GELU through linear_gelu (Triton GEMM, GELU epilogue)
  ours_fused_attn_sdpa   attn_impl="sdpa": timm's SDPA float-mask attention in the fused blocks
  ours_attn_only         fused=False, attn_impl="fused": the reference blocks with the fused attention
  ours_fused_compile     ours_fused under torch.compile (the custom ops stay in the graph)
  ours_fused_cudagraphs  ours_fused under torch.compile(mode="reduce-overhead"): CUDA graphs replay the step,
                         so the host's per-op time (what bench/overhead.py measures) drops out. No peak
                         memory (a replayed graph allocates nothing the allocator sees); the row's
                         cudagraph_skips counts graphs inductor ran without CUDA graphs (0: all replayed)
The compiled providers run 3 untimed steps first (compiles, graph recording) and their fine-tuning case first.
Each row's tflops is the step's nominal matmul FLOPs (as the trainer's MFU counts them: step_flops) per second.
Before it is timed, every provider's logits are checked against beit_fast's reference loaded with the
provider's own (randomized) weights, under the same autocast as the timed step. bf16 autocast on CUDA; fp32 tiny models on CPU with
--smoke. --quick: BEiT-B at batch 128, the pretraining recipe's batch per GPU (what bench/gpu_check.sh runs);
the compiled providers come last, as each compiles the whole model.

    python bench/bench_model.py --out bench/out [--quick] [--smoke]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (CheckFailed, Outcomes, Skip, base_parser, device_and_dtypes, environment,  # noqa: E402
                    finish, make_row, peak_mb, selected_providers, time_ms, write_report)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from beit_fast.models import create_model, load_checkpoint, preset_config  # noqa: E402
from beit_fast.models.checkpoint import convert_state_dict  # noqa: E402
from beit_fast.train.feedback import train_flops_per_image  # noqa: E402


def _hf_model(name, mode, cfg):
    import transformers
    hc = transformers.BeitConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), layer_norm_eps=cfg.layer_norm_eps,
        layer_scale_init_value=cfg.init_values or 0.0, drop_path_rate=0.0, hidden_act="gelu",
        use_mean_pooling=True, attn_implementation="sdpa")
    if mode == "pretrain":
        hc.use_mask_token, hc.use_shared_relative_position_bias, hc.vocab_size = True, True, cfg.vocab_size
        return transformers.BeitForMaskedImageModeling(hc)
    hc.use_relative_position_bias, hc.num_labels = True, cfg.num_classes
    return transformers.BeitForImageClassification(hc)


_OURS = {
    "ours_fused": dict(fused=True, attn_impl="fused"),
    "ours_fused_compile": dict(fused=True, attn_impl="fused"),
    "ours_fused_cudagraphs": dict(fused=True, attn_impl="fused"),
    "ours_fused_mlp_triton": dict(fused=True, attn_impl="fused", fused_mlp=True),
    "ours_fused_attn_sdpa": dict(fused=True, attn_impl="sdpa"),
    "ours_attn_only": dict(fused=False, attn_impl="fused"),
}


# provider -> torch.compile's keyword arguments
_COMPILED = {"torch_compile": {}, "torch_compile_cudagraphs": {"mode": "reduce-overhead"}, "ours_fused_compile": {},
             "ours_fused_cudagraphs": {"mode": "reduce-overhead"}}


def build(provider, name, mode):
    """-> (model, logits_fn(model, x, mask, masked_index)) for one provider. masked_index: the flat
    positions of the masked patches, which our model takes as the trainer passes them; the others use the mask."""
    if provider in ("ours_reference", "torch_compile", "torch_compile_cudagraphs"):
        m = create_model(name, fused=False, attn_impl="sdpa")
    elif provider in _OURS:
        m = create_model(name, **_OURS[provider])
    elif provider == "timm":
        from timm.models.beit import Beit
        if mode == "pretrain":
            raise Skip("timm has no masked-image-modeling BEiT")
        c = preset_config(name)
        m = Beit(img_size=c.img_size, patch_size=c.patch_size, num_classes=c.num_classes, embed_dim=c.embed_dim,
                 depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, init_values=c.init_values,
                 use_abs_pos_emb=False, use_rel_pos_bias=True)
    elif provider == "hf":
        m = _hf_model(name, mode, preset_config(name))
    else:
        raise ValueError(provider)
    if provider == "hf":
        def logits(model, x, mask, masked_index):
            if mode == "pretrain":
                return model(pixel_values=x, bool_masked_pos=mask).logits[mask]
            return model(pixel_values=x).logits
    else:
        def logits(model, x, mask, masked_index):
            # the masked positions as the trainer passes them (found on the host, no GPU wait in the step)
            return model(x, mask, masked_index=masked_index) if mode == "pretrain" else model(x)
    return m, logits


def randomize_(model, seed=0, scale=0.05):
    """Random values in every parameter (tables, layer-scale gammas, biases, the 0.001-scaled head): at init
    the logits are near zero and the loss near ln(classes) whatever the model computes, so a check of a
    wrong model would pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = scale * torch.randn(p.shape, generator=g)
            p.copy_(r + 1 if "norm" in name and name.endswith("weight") else r)
    return model


def _grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_grads(got: dict, want: dict, ref, allowed: float) -> None:
    """Every parameter gradient of a provider (its own names, mapped to the reference's as its checkpoints
    are: timm's are ours, transformers' query / key / value join into qkv) against the reference's, each by
    its largest error relative to its largest magnitude."""
    got, _ = convert_state_dict(got, ref)
    missing = sorted(n for n, g in want.items() if n not in got and g.abs().max() > 0)
    if missing:
        raise CheckFailed(f"no gradient for {missing[:5]} ({len(missing)} parameters the reference trains)")
    errs = {n: ((got[n] - g).abs().max() / (g.abs().max() + 1e-12)).item() for n, g in want.items() if n in got}
    worst = max(errs, key=errs.get)
    if not errs[worst] <= allowed:
        raise CheckFailed(f"the gradient of {worst} differs from the reference's by {errs[worst]:.3g} of its "
                          f"largest value (allowed {allowed})")


def time_provider(prov, name, mode, ref, ref_logits, inputs, dtype, batch, device, env, tol):
    """Checks one provider's logits and every parameter gradient against the reference's (randomized
    weights, loaded into the reference by load_checkpoint: every key must map; the timed precision; the
    gradients within 4x the logits' tolerance) and times its training step: -> the JSON row."""
    x, mask, target, masked_index = inputs
    autocast = dict(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    model, logits_fn = build(prov, name, mode)
    model = randomize_(model).to(device).train()   # no dropout, no drop path: train mode computes eval's math
    load_checkpoint(ref, model.state_dict(), strict=True)
    # one compile: the check runs in the mode and grad mode of the timed step (a no-grad or eval check would
    # compile the whole model a second time)
    run = torch.compile(model, **_COMPILED[prov]) if prov in _COMPILED else model
    skips = _cudagraph_skips()   # before run's first forward and backward (both may skip CUDA graphs)
    with torch.no_grad(), torch.autocast(**autocast):
        want = ref_logits(ref, x, mask, masked_index).float()
    with torch.autocast(**autocast):
        got = logits_fn(run, x, mask, masked_index).detach().float()
    err = ((got - want).abs().max() / want.abs().max()).item()
    if got.shape != want.shape or not err <= tol[dtype]:
        raise CheckFailed(f"logits {tuple(got.shape)} differ from the reference's {tuple(want.shape)}: max error "
                          f"{err:.3g} of the largest logit (allowed {tol[dtype]})")

    def step(grads=False):
        with torch.autocast(**autocast):
            loss = F.cross_entropy(logits_fn(run, x, mask, masked_index).float(), target)
        loss.backward()
        out = _grads(model) if grads else None   # read before the next step (a CUDA graph replay) runs
        for q in model.parameters():
            q.grad = None
        return out

    with torch.autocast(**autocast):
        F.cross_entropy(ref_logits(ref, x, mask, masked_index).float(), target).backward()
    want_grads = _grads(ref)
    ref.zero_grad(set_to_none=True)
    check_grads(step(grads=True), want_grads, ref, 4 * tol[dtype])
    del want_grads

    cudagraphs = _COMPILED.get(prov, {}).get("mode") == "reduce-overhead"
    # compiled providers: compile the backward and (CUDA graphs) record both graphs before the timing's own
    # estimate of a call's length, which would otherwise include them and leave too few timed calls
    if prov in _COMPILED:
        for _ in range(3):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    skips = _cudagraph_skips() - skips
    if cudagraphs and device == "cuda" and skips:
        print(f"  NOTE {prov} {name}: inductor skipped CUDA graphs for {skips} graph(s) (see its 'skipping "
              f"cudagraphs' log); the row's cudagraph_skips says so")
    t = time_ms(step, device, warmup=2 if device == "cpu" else 10, rep=5 if device == "cpu" else 30,
                cuda_rep_ms=400, min_calls=10)
    # a replayed CUDA graph allocates nothing, so the allocator's peak would miss the step's activations
    peak = None if cudagraphs else peak_mb(step, device)
    extra = {"cudagraph_skips": skips} if cudagraphs else {}
    return make_row("train_step", prov, "fwd_bwd", {"model": name, "B": batch, "mode": mode}, dtype, t, env,
                    flops=step_flops(ref.config, mode, batch, mask), peak=peak,
                    images_per_s=batch / (t["median_ms"] / 1e3), **extra)


def step_flops(config, mode, batch, mask) -> float:
    """The step's nominal matmul FLOPs, the same count for every provider (the trainer's MFU formula,
    train.feedback.train_flops_per_image: 3x the forward; pretraining's head over the masked patches only,
    whatever a provider computes beyond them)."""
    masked = float(mask.sum()) / batch if mode == "pretrain" else 0.0
    return batch * train_flops_per_image(config, masked)


def _cudagraph_skips() -> int:
    """inductor's count of graphs it ran without CUDA graphs although asked to (0 where it keeps none)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # noqa: BLE001 -- a private counter: absent in some versions
        return 0


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--models", default=None, help="comma list of model names")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--name", default="bench_model",
                   help="base name of the output files (gpu_check's compiled step: bench_model_compiled)")
    p.add_argument("--modes", default="pretrain,finetune",
                   help="comma list of pretrain, finetune (gpu_check's compiled step: finetune only)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or not set(modes) <= {"pretrain", "finetune"}:
        raise SystemExit(f"--modes must be a comma list of pretrain, finetune; got {args.modes!r}")
    device, dtypes = device_and_dtypes(args)
    torch.backends.cudnn.benchmark = True   # as timm's train.py sets it (the patch convolution's algorithm)
    env = environment(device)
    if args.smoke:
        names, batch = ["beit_test_patch4_32"], args.batch or 4
    else:
        names = (args.models or ("beit_base_patch16_224" if args.quick else
                                 "beit_base_patch16_224,beit_large_patch16_224")).split(",")
        batch = args.batch or 128
    providers = selected_providers(args, ("ours_reference", "ours_fused", "timm", "hf", "torch_compile",
                                          "torch_compile_cudagraphs")
                                   + tuple(p for p in _OURS if p != "ours_fused"),
                                   smoke_default=("ours_reference", "ours_fused", "timm", "hf", "torch_compile"))
    # tolerance of the check: max logit error over the largest logit, per autocast dtype (fp32: the same math
    # up to summation order; a wrong model is off by O(1))
    tol = {torch.float32: 1e-3, torch.bfloat16: 8e-2, torch.float16: 2e-2}
    rows, outcomes = [], Outcomes()
    cases = []   # (model name, mode, reference model, its logits function, inputs)
    for cls_name in names:
        for mode in modes:
            name = cls_name if mode == "finetune" else (
                cls_name + "_mim" if cls_name.startswith("beit_test") else cls_name + "_8k_vocab")
            ref, ref_logits = build("ours_reference", name, mode)
            ref = ref.to(device).eval()
            img = ref.config.img_size
            x = torch.randn(batch, 3, img, img, device=device)
            mask = torch.zeros(batch, ref.num_patches, dtype=torch.bool, device=device)
            mask[:, torch.randperm(ref.num_patches)[: int(0.38 * ref.num_patches)]] = True
            masked_index = mask.flatten().nonzero().squeeze(1)
            n_out = int(mask.sum()) if mode == "pretrain" else batch
            classes = ref.config.vocab_size if mode == "pretrain" else ref.config.num_classes
            target = torch.randint(0, classes, (n_out,), device=device)
            cases.append((name, mode, ref, ref_logits, (x, mask, target, masked_index)))
    # every other provider of every case first; the compiled ones, which compile each whole model, at the end,
    # so that a time limit (gpu_check.sh) cuts compiled rows rather than the fused fine-tuning ones
    order = [p for p in providers if p not in _COMPILED] + [p for p in providers if p in _COMPILED]
    for prov in order:
        # the compiled providers fine-tune first: under a time limit that row (static shapes, the one to
        # compare with the other providers' fine-tuning rows) is the one kept
        for name, mode, ref, ref_logits, inputs in (sorted(cases, key=lambda c: c[1] != "finetune")
                                                    if prov in _COMPILED else cases):
            for dtype in dtypes:
                with outcomes.guard(f"{prov} {name} {dtype}"):
                    rows.append(time_provider(prov, name, mode, ref, ref_logits, inputs, dtype, batch, device, env, tol))
                    print(f"{name} {mode} {prov} {dtype}: {rows[-1]['median_ms']:.2f} ms, "
                          f"{rows[-1]['images_per_s']:.0f} img/s")
                write_report(rows, args.out, args.name, outcomes)   # a time limit keeps what ran
    finish(rows, args.out, args.name, outcomes)


if __name__ == "__main__":
    main()
