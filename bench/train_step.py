"""One DiT training step (issue 9): full-size SANA-WM DiT (2.6 B parameters, random weights), an 81-frame 704x1280
clip (latents (1, 128, 11, 22, 40)), camera on, bf16 autocast over fp32 master weights, activation checkpointing
per block, AdamW. Seconds per step and peak GPU memory with our Triton GDN scan, with our torch GDN scan, and for
diffusers' SanaWMTransformer3DModel (its torch GDN, its gradient checkpointing) in the same run.

    python bench/train_step.py                  # CUDA machine; about 2-3 minutes on one H100
    python bench/train_step.py --tiny           # CPU: tests/reference.py's tiny config, only checks that it runs

The step is train.py's: the flow-matching loss (train.dit_loss), backward, gradient clipping, AdamW, EMA.
"""
import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

if "--tiny" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter on CPU tensors
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import camera  # noqa: E402
import gdn  # noqa: E402
import train as T  # noqa: E402
from dit import DiT, DiTConfig  # noqa: E402

TINY = dict(in_channels=8, num_layers=4, hidden_size=48, num_attention_heads=2, softmax_every_n=2,
            linear_head_dim=24, caption_channels=32)  # tests/reference.py's tiny config


def make_batch(cfg: DiTConfig, frames: int, height: int, width: int, device) -> dict:
    """Random latents/noise/text, σ = 0.7 on the noisy frames (frame 0 clean), a real camera path's inputs."""
    g = torch.Generator().manual_seed(0)
    T_lat, h, w = (frames - 1) // 8 + 1, height // 32, width // 32
    c2w = camera.action_to_c2w(f"w-{frames // 2},jw-{frames - 1 - frames // 2}", scheme="legacy")
    k = [0.6 * width, 0.6 * width, width / 2, height / 2]
    raymap, plucker = camera.prepare_camera(c2w, k, size=(height, width))
    sigma = torch.full((1, T_lat), 0.7)
    sigma[:, 0] = 0
    batch = dict(latents=torch.randn(1, cfg.in_channels, T_lat, h, w, generator=g),
                 noise=torch.randn(1, cfg.in_channels, T_lat, h, w, generator=g), sigma=sigma,
                 text=torch.randn(1, 300, cfg.caption_channels, generator=g), text_mask=torch.ones(1, 300),
                 raymap=raymap[None], plucker=plucker[None])
    return {k: v.to(device) for k, v in batch.items()}


def diffusers_loss(model, batch):
    """The same objective through diffusers' forward signature."""
    x0, eps, sigma = batch["latents"], batch["noise"], batch["sigma"]
    x = (1 - sigma[:, None, :, None, None]) * x0 + sigma[:, None, :, None, None] * eps
    v = model(x, timestep=(sigma * 1000)[:, None], encoder_hidden_states=batch["text"],
              encoder_attention_mask=batch["text_mask"], camera_conditions=batch["raymap"],
              chunk_plucker=batch["plucker"], return_dict=False)[0]
    return (v.float() - (eps - x0))[:, :, 1:].pow(2).mean()


def measure(model, loss_fn, batch, steps: int, device) -> tuple[float, float, float]:
    """(median seconds per step after one warm-up step, peak GPU memory GiB, the first step's loss) of
    loss -> backward -> clip -> AdamW -> EMA. Same weights and batch in every variant: the first losses agree."""
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ema = [p.detach().clone() for p in params]
    cuda = device.type == "cuda"
    times, first_loss = [], None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        first_loss = loss.item() if first_loss is None else first_loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)
        if cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return sorted(times)[len(times) // 2], peak, first_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (a smoke test)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--no_diffusers", action="store_true", help="skip the diffusers row")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        sys.exit("the full-size benchmark needs CUDA; use --tiny on CPU")
    cfg = DiTConfig(**TINY) if args.tiny else DiTConfig()
    frames, height, width = (17, 128, 192) if args.tiny else (args.frames, 704, 1280)
    batch = make_batch(cfg, frames, height, width, device)
    shape = tuple(batch["latents"].shape)

    rows = []
    scan = gdn.gdn_scan
    torch.manual_seed(0)
    with torch.device(device):  # the model's own initialisation, kept on the host for every variant
        init = {k: v.cpu() for k, v in DiT(cfg).state_dict().items()}
    for backend in ("triton", "torch"):
        # GDNSelfAttention calls the module-level gdn.gdn_scan, whose "auto" backend picks Triton for CUDA tensors;
        # the benchmark pins the backend by rebinding that name.
        gdn.gdn_scan = functools.partial(scan, backend=backend)
        with torch.device("meta"):
            model = DiT(cfg)
        model.load_state_dict({k: v.to(device, copy=True) for k, v in init.items()}, assign=True)
        model.train()
        T.checkpoint_blocks(model.blocks)
        loss_fn = functools.partial(T.dit_loss, use_camera=True, chunk_size=None)
        params = sum(p.numel() for p in model.parameters())
        sec, peak, loss = measure(model, loss_fn, batch, args.steps, device)
        rows.append((f"ours, {backend} GDN", sec, peak, loss))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gdn.gdn_scan = scan

    if not args.no_diffusers:
        from diffusers.models.transformers.transformer_sana_wm import SanaWMTransformer3DModel
        kwargs = dict(TINY, patch_size=(1, 1, 1)) if args.tiny else {}
        with torch.device(device):
            ref = SanaWMTransformer3DModel(**kwargs)
        ref.load_state_dict(init)  # the same weights: the loss column doubles as a check
        ref.train().enable_gradient_checkpointing()
        sec, peak, loss = measure(ref, diffusers_loss, batch, args.steps, device)
        rows.append(("diffusers 0.42.1", sec, peak, loss))

    print(f"\nDiT training step: {params / 1e6:.1f} M params, latents {shape}, bf16 autocast, fp32 master weights, "
          f"activation checkpointing, AdamW; device: "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (tiny smoke test)'}")
    base_name, base = rows[-1][:2]
    print(f"{'variant':<22} {'s/step':>9} {'peak GiB':>9} {'speed-up vs ' + base_name:>30} {'loss 1':>9}")
    for name, sec, peak, loss in rows:
        print(f"{name:<22} {sec:>9.3f} {peak:>9.2f} {base / sec:>29.2f}x {loss:>9.4f}")


if __name__ == "__main__":
    main()
