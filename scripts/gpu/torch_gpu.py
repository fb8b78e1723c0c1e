#!/usr/bin/env python3
"""PyTorch side by side on the GPU (scripts/gpu-check.sh; docs/benchmarks.md, "GPU").

The same UNet configurations the Rust benchmarks time, built with diffusers'
UNet2DConditionModel and random weights, on the same card, batch and dtype:

* SD 1.5 (latent 32x32, 77x768 context) — `unet_forward`;
* LDM-256 txt2img-large, the base of AnomalyDiffusion (latent 32x32, 77x1280 context) —
  `ldm_forward` PARTS=unet;
* the 200-step DDIM loop (eta 1) on the LDM-256 UNet at batch 8 in bf16: UNet + scheduler step
  only, no VAE, no text encoder, no blending, no attention re-weighting — less work than one
  AnomalyDiffusion sample (`ad_sample`), so it bounds PyTorch's time from below.

Prints one `BENCH_JSON {...}` line per measurement (the Rust benchmarks' format), with
torch.cuda.max_memory_allocated as the peak. diffusers is not installed on the GPU machines:
when it is missing, it is installed from --wheels (no network) into a private folder.

Usage: python3 torch_gpu.py [--wheels DIR] [--batches 1,8] [--iters 5] [--loop-steps 200]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def ensure_diffusers(wheels):
    """Imports diffusers; when it is missing, installs the packed wheels (--no-deps, no network)
    into a private folder, and where a binary package diffusers imports but this code never
    uses (Pillow, PyYAML) is missing too, puts import-only stand-ins from stubs/ last on the
    path (a real installed package always wins)."""
    try:
        import diffusers  # noqa: F401

        return "installed"
    except ImportError as e:
        first = str(e)
    if not wheels or not os.path.isdir(wheels):
        sys.exit(f"torch_gpu: diffusers is not importable ({first}) and no --wheels folder was given")
    target = os.path.join(tempfile.gettempdir(), "defectforge-gpu-check-py")
    files = sorted(os.path.join(wheels, f) for f in os.listdir(wheels) if f.endswith(".whl"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
           "--disable-pip-version-check", "--target", target, "--upgrade"] + files
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"torch_gpu: installing the wheels of {wheels} failed:\n{r.stdout}{r.stderr}")
    sys.path.insert(0, target)
    stubs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs")
    used = []
    for mod in ("PIL", "yaml"):
        try:
            __import__(mod)
        except ImportError:
            used.append(mod)
    if used:
        sys.path.append(stubs)
    for m in [m for m in sys.modules if m.split(".")[0] in ("PIL", "yaml")]:
        del sys.modules[m]
    try:
        import diffusers  # noqa: F401,F811
    except ImportError as e:
        sys.exit(f"torch_gpu: diffusers still not importable after installing {wheels}: {e}")
    return "from wheels" + (f" (import-only stand-ins for {', '.join(used)})" if used else "")


def emit(bench, **fields):
    print("BENCH_JSON " + json.dumps({"bench": bench, **fields}), flush=True)


def unet(torch, diffusers, which):
    ctx = 768 if which == "sd-1.5" else 1280
    return diffusers.UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=ctx,
        norm_num_groups=32,
    ), ctx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", default="")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--loop-steps", type=int, default=200)
    ap.add_argument("--loop-batch", type=int, default=8)
    ap.add_argument("--check-imports", action="store_true",
                    help="no GPU needed: import diffusers (installing the wheels if needed), build "
                         "both UNets on the meta device and a DDIM scheduler, print their sizes")
    args = ap.parse_args()
    how = ensure_diffusers(args.wheels)

    import torch
    import diffusers

    if args.check_imports:
        with torch.device("meta"):
            for which in ("sd-1.5", "ldm-256"):
                model, _ = unet(torch, diffusers, which)
                params = sum(p.numel() for p in model.parameters())
                emit("torch_model", model=which, params_m=params / 1e6)
        diffusers.DDIMScheduler(num_train_timesteps=1000).set_timesteps(200)
        print(f"torch_gpu: imports ok: torch {torch.__version__}, diffusers "
              f"{diffusers.__version__} ({how})")
        return

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    settings = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "diffusers_from": how,
        "card": name,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }
    print(f"torch_gpu: {json.dumps(settings)}", flush=True)
    torch.manual_seed(0)
    for which in ("sd-1.5", "ldm-256"):
        model, ctx_dim = unet(torch, diffusers, which)
        params = sum(p.numel() for p in model.parameters())
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
            m = model.to(dev, dtype).eval()
            for b in [int(x) for x in args.batches.split(",")]:
                x = torch.randn(b, 4, 32, 32, device=dev, dtype=dtype)
                c = torch.randn(b, 77, ctx_dim, device=dev, dtype=dtype)
                t = torch.full((b,), 500, device=dev, dtype=torch.long)
                torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    m(x, t, c)
                    torch.cuda.synchronize()
                    times = []
                    for _ in range(args.iters):
                        s = time.perf_counter()
                        m(x, t, c)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - s)
                emit("torch_unet_forward", model=which, dtype=dtype_name, batch=b,
                     params_m=params / 1e6, iters=args.iters,
                     mean_s=sum(times) / len(times), min_s=min(times),
                     peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, **settings)
        if which == "ldm-256":
            m = model.to(dev, torch.bfloat16).eval()
            sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085,
                                            beta_end=0.012, beta_schedule="scaled_linear")
            sched.set_timesteps(args.loop_steps)
            b = args.loop_batch
            c = torch.randn(b, 77, ctx_dim, device=dev, dtype=torch.bfloat16)
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                for warm in (True, False):
                    x = torch.randn(b, 4, 32, 32, device=dev, dtype=torch.bfloat16)
                    torch.cuda.synchronize()
                    s = time.perf_counter()
                    for t in sched.timesteps[: 5 if warm else None]:
                        eps = m(x, t.to(dev), c).sample
                        x = sched.step(eps, t, x, eta=1.0).prev_sample
                    torch.cuda.synchronize()
                    secs = time.perf_counter() - s
            emit("torch_ddim_loop", model="ldm-256", dtype="bf16", batch=b, steps=args.loop_steps,
                 seconds=secs, samples_per_s=b / secs,
                 peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, **settings)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
