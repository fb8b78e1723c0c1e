#!/usr/bin/env python3
"""PyTorch side of the LDM-256 benchmark (docs/benchmarks.md, "Engine part 2").

Times the official CompVis modules of the paper's base model (txt2img-f8-large) with random
weights, f32 on CPU: openaimodel.UNetModel (latent 32x32, 77 x 1280 context, t = 500) and the
BERTEmbedder's TransformerWrapper (32 layers, 77 tokens), at the same batch sizes as
`cargo bench --bench ldm_forward`.

Needs a checkout of the official code (github.com/sjtuplayer/anomalydiffusion): pass its
path with --official. torchvision and PIL, imported but unused on these paths, are stubbed
when absent. The venv (default /tmp/defectforge-torch-venv, TORCH_BENCH_VENV) gets torch and
einops and omegaconf on first run.

Usage: python3 workers/engine/benches/torch_ldm.py --official DIR [--batches 1,8] [--iters 3]
       [--parts unet,bert] [--threads N]
"""

import argparse
import os
import resource
import subprocess
import sys
import time
import types

VENV = os.environ.get("TORCH_BENCH_VENV", "/tmp/defectforge-torch-venv")


def ensure_venv():
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    probe = subprocess.run([py, "-c", "import torch, einops, omegaconf"], capture_output=True)
    if probe.returncode != 0:
        subprocess.check_call([py, "-m", "pip", "install", "--quiet", "torch", "einops", "omegaconf"])
    os.execv(py, [py] + sys.argv)


def stub(name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


def stub_unused_imports():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = stub("torchvision")
        tv.transforms = stub("torchvision.transforms")
        tv.utils = stub("torchvision.utils", save_image=None)
    try:
        import PIL  # noqa: F401
    except ImportError:
        pil = stub("PIL")
        pil.Image = stub("PIL.Image")
        pil.ImageDraw = stub("PIL.ImageDraw")
        pil.ImageFont = stub("PIL.ImageFont")


def timed(label, iters, fn):
    import torch

    with torch.inference_mode():
        fn()
        times = []
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(iters):
            s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - s)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / iters
    rss = r1.ru_maxrss / 1024 / 1024
    print(
        f"torch {label}: mean {sum(times) / len(times):.3f} s min {min(times):.3f} s over "
        f"{iters} iters, {cpu:.2f} CPU-s/forward; peak RSS {rss:.2f} GiB"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="checkout of sjtuplayer/anomalydiffusion")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--parts", default="unet,bert")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    ensure_venv()
    sys.path.insert(0, os.path.abspath(args.official))
    stub_unused_imports()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(x) for x in args.batches.split(",")]
    if "unet" in args.parts:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        t0 = time.perf_counter()
        unet = UNetModel(
            image_size=32, in_channels=4, out_channels=4, model_channels=320,
            attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
            num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=1280,
            use_checkpoint=True, legacy=False,
        ).eval()
        params = sum(p.numel() for p in unet.parameters())
        print(
            f"torch {torch.__version__} threads {args.threads}; LDM-256 UNet "
            f"{params / 1e6:.1f} M params, init {time.perf_counter() - t0:.1f} s"
        )
        for b in batches:
            x = torch.randn(b, 4, 32, 32)
            ctx = torch.randn(b, 77, 1280)
            t = torch.full((b,), 500, dtype=torch.long)
            timed(f"unet batch {b}", args.iters, lambda: unet(x, t, context=ctx))
        del unet
    if "bert" in args.parts:
        from ldm.modules.x_transformer import Encoder, TransformerWrapper

        t0 = time.perf_counter()
        bert = TransformerWrapper(
            num_tokens=30522, max_seq_len=77, attn_layers=Encoder(dim=1280, depth=32)
        ).eval()
        params = sum(p.numel() for n, p in bert.named_parameters() if not n.startswith("to_logits"))
        print(f"torch LDM-256 BERT {params / 1e6:.1f} M params (32 layers), init {time.perf_counter() - t0:.1f} s")
        ident = lambda ids, emb, **kw: (emb, None)  # noqa: E731 (the official code needs a manager)
        for b in batches:
            ids = (torch.arange(b * 77) * 7919 % 30000).reshape(b, 77)
            timed(
                f"bert batch {b}",
                args.iters,
                lambda: bert(ids, return_embeddings=True, embedding_manager=ident),
            )


if __name__ == "__main__":
    main()
