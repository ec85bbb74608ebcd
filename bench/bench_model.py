"""End-to-end training-step throughput: one forward + backward of a whole BEiT model (images/s), for
pretraining (masked image modeling, ~75 of 196 patches masked) and fine-tuning (classification).

Providers (what a user would otherwise pick):
  timm            timm's Beit (SDPA float-mask attention), fine-tuning only (timm has no MIM model)
  hf              transformers' BeitForMaskedImageModeling / BeitForImageClassification (SDPA)
  ours_reference  beit_fast with fused=False, attn_impl="sdpa" (timm-equivalent math)
  torch_compile   ours_reference under torch.compile
  ours_fused      beit_fast with the fused kernels (fused=True, attn_impl="fused")
Every provider's loss is checked against beit_fast's reference loaded with the same weights, under the
same autocast as the timed step, before it is timed. bf16 autocast on CUDA; fp32 tiny models on CPU with
--smoke. --quick: BEiT-B at batch 64 (what bench/gpu_check.sh runs); torch_compile comes last, as it
compiles the whole model.

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


def build(provider, name, mode):
    """-> (model, loss_fn(model, x, mask, target, masked_index)) for one provider. masked_index: the flat
    positions of the masked patches, which our model takes as the trainer passes them; the others use the mask."""
    if provider in ("ours_reference", "torch_compile"):
        m = create_model(name, fused=False, attn_impl="sdpa")
    elif provider == "ours_fused":
        m = create_model(name, fused=True, attn_impl="fused")
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
        def loss(model, x, mask, target, masked_index):
            if mode == "pretrain":
                logits = model(pixel_values=x, bool_masked_pos=mask).logits[mask]
            else:
                logits = model(pixel_values=x).logits
            return F.cross_entropy(logits.float(), target)
    else:
        def loss(model, x, mask, target, masked_index):
            # the masked positions as the trainer passes them (found on the host, no GPU wait in the step)
            logits = model(x, mask, masked_index=masked_index) if mode == "pretrain" else model(x)
            return F.cross_entropy(logits.float(), target)
    return m, loss


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--models", default=None, help="comma list of model names")
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args(argv)
    device, dtypes = device_and_dtypes(args)
    env = environment(device)
    if args.smoke:
        names, batch = ["beit_test_patch4_32"], args.batch or 4
    else:
        names = (args.models or ("beit_base_patch16_224" if args.quick else
                                 "beit_base_patch16_224,beit_large_patch16_224")).split(",")
        batch = args.batch or 64
    providers = selected_providers(args, ("ours_reference", "ours_fused", "timm", "hf", "torch_compile"))
    # relative loss tolerance of the check, per autocast dtype (fp32: exact math up to summation order)
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
    rows, outcomes = [], Outcomes()
    for cls_name in names:
        for mode in ("pretrain", "finetune"):
            name = cls_name if mode == "finetune" else (
                cls_name + "_mim" if cls_name.startswith("beit_test") else cls_name + "_8k_vocab")
            ref, ref_loss = build("ours_reference", name, mode)
            ref = ref.to(device).eval()
            img = ref.config.img_size
            x = torch.randn(batch, 3, img, img, device=device)
            mask = torch.zeros(batch, ref.num_patches, dtype=torch.bool, device=device)
            mask[:, torch.randperm(ref.num_patches)[: int(0.38 * ref.num_patches)]] = True
            masked_index = mask.flatten().nonzero().squeeze(1)
            n_out = int(mask.sum()) if mode == "pretrain" else batch
            classes = ref.config.vocab_size if mode == "pretrain" else ref.config.num_classes
            target = torch.randint(0, classes, (n_out,), device=device)
            for dtype in dtypes:
                autocast = dict(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
                for prov in providers:
                    with outcomes.guard(f"{prov} {name} {dtype}"):
                        model, loss_fn = build(prov, name, mode)
                        model = model.to(device)
                        # check against the reference with the provider's own weights, in the timed precision
                        load_checkpoint(ref, model.state_dict(), strict=False)
                        run = torch.compile(model) if prov == "torch_compile" else model
                        with torch.no_grad(), torch.autocast(**autocast):
                            want = ref_loss(ref, x, mask, target, masked_index).item()
                            got = loss_fn(run.eval(), x, mask, target, masked_index).item()
                        if abs(got - want) > tol[dtype] * max(1.0, abs(want)):
                            raise CheckFailed(f"loss {got} differs from the reference's {want}")
                        run.train()

                        def step():
                            with torch.autocast(**autocast):
                                loss = loss_fn(run, x, mask, target, masked_index)
                            loss.backward()
                            for q in model.parameters():
                                q.grad = None

                        t = time_ms(step, device, warmup=2 if device == "cpu" else 10,
                                    rep=5 if device == "cpu" else 30, cuda_rep_ms=400)
                        shape = {"model": name, "B": batch, "mode": mode}
                        row = make_row("train_step", prov, "fwd_bwd", shape, dtype, t, env,
                                       peak=peak_mb(step, device), images_per_s=batch / (t["median_ms"] / 1e3))
                        rows.append(row)
                        print(f"{name} {mode} {prov} {dtype}: {t['median_ms']:.2f} ms, "
                              f"{row['images_per_s']:.0f} img/s")
                    model = run = None   # free this provider's model before the next one is built
                    write_report(rows, args.out, "bench_model", outcomes)   # a time limit keeps what ran
    finish(rows, args.out, "bench_model", outcomes)


if __name__ == "__main__":
    main()
