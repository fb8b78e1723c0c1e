#!/usr/bin/env python3
"""PyTorch/diffusers side of the engine benchmark (docs/benchmarks.md, "Engine (issue 3)").

Times the full-size Stable Diffusion 1.5 UNet forward with random weights, f32 on CPU, latent
32x32, 77-token context, at the same batch sizes as `cargo bench --bench unet_forward`.

First run: creates a virtual environment (default /tmp/defectforge-torch-venv, override with
TORCH_BENCH_VENV) and pip-installs torch and diffusers into it (the PyPI torch wheel pulls about
3 GB), then re-executes itself inside it.

Usage: python3 workers/engine/benches/torch_unet.py [--batches 1,8] [--iters 3] [--threads N]
"""

import argparse
import os
import resource
import subprocess
import sys
import time

VENV = os.environ.get("TORCH_BENCH_VENV", "/tmp/defectforge-torch-venv")


def ensure_venv():
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    probe = subprocess.run([py, "-c", "import torch, diffusers"], capture_output=True)
    if probe.returncode != 0:
        subprocess.check_call([py, "-m", "pip", "install", "--quiet", "torch", "diffusers"])
    os.execv(py, [py] + sys.argv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    ensure_venv()

    import torch
    import diffusers
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    ).eval()
    params = sum(p.numel() for p in unet.parameters())
    print(
        f"torch {torch.__version__} diffusers {diffusers.__version__} threads {args.threads}; "
        f"SD 1.5 UNet {params / 1e6:.1f} M params, init {time.perf_counter() - t0:.1f} s"
    )
    for b in [int(x) for x in args.batches.split(",")]:
        x = torch.randn(b, 4, args.latent, args.latent)
        ctx = torch.randn(b, 77, 768)
        t = torch.full((b,), 500, dtype=torch.long)
        with torch.inference_mode():
            unet(x, t, ctx)  # warm-up
            times = []
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(args.iters):
                s = time.perf_counter()
                unet(x, t, ctx)
                times.append(time.perf_counter() - s)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / args.iters
        rss = r1.ru_maxrss / 1024 / 1024
        print(
            f"torch batch {b} latent {args.latent}: mean {sum(times) / len(times):.2f} s "
            f"min {min(times):.2f} s over {args.iters} iters, {cpu:.2f} CPU-s/forward; "
            f"peak RSS {rss:.2f} GiB"
        )


if __name__ == "__main__":
    main()
