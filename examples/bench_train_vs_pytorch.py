#!/usr/bin/env python3
"""The training step of `difftrain bench train` side by side with PyTorch.

Runs the same step in PyTorch (diffusers' UNet2DConditionModel from the same
config, float32, DDPMScheduler.add_noise, the epsilon MSE, backward,
clip_grad_norm_(1.0), torch.optim.AdamW; with --dream the spec's DREAM update
from one no-grad forward), on random latents and text states of the same
shapes and with the same number of CPU threads as the machine gives
difftrain, then runs `difftrain bench train --json` with the same options,
and prints both with the ratio and each process's peak resident memory.

    python examples/bench_train_vs_pytorch.py --preset small --batch 4 --latent 16
    python examples/bench_train_vs_pytorch.py --preset sd15 --batch 1 --latent 32 --iters 2

Needs torch and diffusers; `--difftrain` names the binary (default
target/release/difftrain, built with `cargo build --release`).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "builtin": "src/train/builtin/unet.json",
    "small": "examples/configs/small_unet.json",
    "sd15": "examples/configs/sd15_unet.json",
}


def pytorch_step(config_path, batch, latent, text_len, iters, dream, threads):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with open(config_path) as f:
        config = json.load(f)
    unet = UNet2DConditionModel.from_config(config).train()
    sched = DDPMScheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    c = unet.config
    latents = torch.randn(batch, c.in_channels, latent, latent)
    context = torch.randn(batch, text_len, c.cross_attention_dim)
    alphas = sched.alphas_cumprod

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        xt = sched.add_noise(latents, noise, t)
        target = noise
        if dream:
            # The spec's DREAM for epsilon with p = 1: lambda = sigma_t.
            with torch.no_grad():
                eps = unet(xt, t, context).sample
            sigma = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
            delta = noise - eps
            xt = xt + sigma * sigma * delta
            target = target + sigma * delta
        pred = unet(xt, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(iters + 2):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(times[2:])
    return {
        "adapter": f"PyTorch {torch.__version__} CPU, {threads} threads",
        "median_ms": median,
        "first_ms": times[0],
        "images_per_s": batch / (median / 1e3),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--config", help="a UNet config.json instead of --preset")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dream", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--difftrain", default=os.path.join(ROOT, "target/release/difftrain"))
    a = p.parse_args()
    config = a.config or os.path.join(ROOT, PRESETS[a.preset])

    shape = ["--batch", str(a.batch), "--latent", str(a.latent), "--text-len", str(a.text_len)]
    which = ["--config", config] if a.config else ["--preset", a.preset]
    cmd = [a.difftrain, "bench", "train", *which, *shape, "--iters", str(a.iters), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ours = [json.loads(line) for line in out.splitlines() if line.startswith("{")][0]
    if a.dream:
        dream = subprocess.run(cmd + ["--dream"], check=True, capture_output=True, text=True)
        ours = [json.loads(l) for l in dream.stdout.splitlines() if l.startswith("{")][1]
    torch_r = pytorch_step(config, a.batch, a.latent, a.text_len, a.iters, a.dream, a.threads)

    name = a.config or a.preset
    print(f"train step of {name}, batch {a.batch}, {a.latent}x{a.latent} latents, "
          f"{a.text_len} tokens, fp32 AdamW{', DREAM' if a.dream else ''}")
    print(f"{'':52} {'median ms':>10} {'first ms':>10} {'img/s':>8} {'peak RSS MiB':>13}")
    for label, r in [(f"difftrain ({ours['adapter']})", ours), (torch_r["adapter"], torch_r)]:
        rss = r.get("peak_rss_bytes")
        rss = f"{rss / 2**20:13.0f}" if rss else f"{'-':>13}"
        print(f"{label[:52]:52} {r['median_ms']:10.1f} {r['first_ms']:10.1f} "
              f"{r['images_per_s']:8.1f} {rss}")
    print(f"ratio difftrain / PyTorch: {ours['median_ms'] / torch_r['median_ms']:.2f}x "
          f"(difftrain: {ours['dispatches']} dispatches, {ours['submissions']} submission(s), "
          f"{ours['gflops']:.1f} GFLOP/s, {ours['peak_bytes'] / 2**20:.1f} MiB GPU buffers)")
    print(f"difftrain's adapter: {ours['adapter']}, driver: {ours['driver']}")


if __name__ == "__main__":
    sys.exit(main())
