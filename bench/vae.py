"""Benchmark of the tiled VAE decode (vae.py, tiled) against diffusers' AutoencoderKLLTX2Video, both with
SANA-WM's tiles (512 px every 448, 96 frames every 64), bf16, latents (1, 128, T, 22, 40) -> 704x1280 videos of
8(T - 1) + 1 frames, T in {21, 121}: wall time and peak CUDA memory of each, measured in the same run.

Run from the repository root (needs diffusers):
    python bench/vae.py                          # CUDA: T = 21 and 121, random weights (about 2-3 min on an H100)
    python bench/vae.py --quick                  # T = 21 only
    python bench/vae.py --frames 21 41 --weights /path/to/release   # the release vae/ instead of random weights
    python bench/vae.py --tiny                   # CPU smoke test: tests/reference.py's tiny VAE, fp32, small tiles
Times are the best of up to --repeats runs (default 3; one when a run takes over 10 s). Peak memory is the
largest torch.cuda.max_memory_allocated() during a call above what was allocated before it, plus the model's
own weights: what the decode needs with only that model loaded. "diff" is the largest
|ours - diffusers| over frames 0..64, which both compute the same way (after that diffusers lags one frame,
see vae.py _tile_time). An implementation that runs out of memory is reported as OOM. The table comes last.
"""
import argparse
import gc
import pathlib
import sys
import time

import torch
from diffusers import AutoencoderKLLTX2Video

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from reference import RELEASE_VAE, TINY_VAE  # noqa: E402
from vae import VAE, Tiling, VAEConfig  # noqa: E402


def build(args, device, dtype):
    """(diffusers model, ours) with the same weights: the release's, or random ones shared by both."""
    if args.weights:
        folder = pathlib.Path(args.weights)
        folder = folder / "vae" if (folder / "vae").is_dir() else folder
        ref = AutoencoderKLLTX2Video.from_pretrained(folder, torch_dtype=dtype).to(device)
        ours = VAE.from_pretrained(folder, dtype=dtype, device=device)
    else:
        with torch.device(device):
            ref = AutoencoderKLLTX2Video(**(TINY_VAE if args.tiny else RELEASE_VAE)).to(dtype)
        with torch.device("meta"):
            ours = VAE(VAEConfig.from_dict(dict(ref.config)))
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the same tensors, no copy
    return ref.eval(), ours.eval()


def channels_last(ours):
    """A copy of ours whose 3-D conv weights are channels_last_3d (cuDNN then runs the convs in NDHWC)."""
    with torch.device("meta"):
        model = VAE(ours.cfg)
    state = {k: v.contiguous(memory_format=torch.channels_last_3d) if v.dim() == 5 else v
             for k, v in ours.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def measure(fn, z, keep_frames, weight_bytes, repeats=1):
    """Best time of up to `repeats` runs of fn(z) (one if a run takes over 10 s); (seconds, peak bytes or None,
    the first keep_frames output frames on the CPU), or 'OOM'."""
    cuda = z.is_cuda
    best, peak, head = float("inf"), 0, None
    for _ in range(repeats):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                out = fn(z)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        except torch.OutOfMemoryError:
            return "OOM"
        finally:
            gc.collect()
        best = min(best, seconds)
        peak = max(peak, torch.cuda.max_memory_allocated() - before + weight_bytes) if cuda else None
        if head is None:
            head = out[:, :, :keep_frames].float().cpu()
        del out
        if seconds > 10:
            break
    return best, peak, head


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", help="latent frame counts T (default 21 121; tiny: 5 9)")
    parser.add_argument("--quick", action="store_true", help="T = 21 only (tiny: 5), no channels-last row")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with tests/reference.py's tiny VAE")
    parser.add_argument("--weights", help="release folder (or its vae/ folder); default: random weights")
    parser.add_argument("--no-channels-last", action="store_true", help="skip the ours-channels_last_3d row")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (1 when a run takes > 10 s)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench/vae.py needs a CUDA device; use --tiny for a CPU smoke test")
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    default_frames = ([5], [5, 9]) if args.tiny else ([21], [21, 121])
    frames = args.frames or default_frames[0 if args.quick else 1]
    tiling = Tiling(96, 64, 16, 8) if args.tiny else Tiling()
    latent_hw = (4, 6) if args.tiny else (22, 40)

    ref, ours = build(args, device, dtype)
    ref.enable_tiling(tile_sample_min_height=tiling.size, tile_sample_min_width=tiling.size,
                      tile_sample_min_num_frames=tiling.frames, tile_sample_stride_height=tiling.stride,
                      tile_sample_stride_width=tiling.stride, tile_sample_stride_num_frames=tiling.frame_stride)
    ref.use_framewise_encoding = ref.use_framewise_decoding = True
    impls = {"diffusers": lambda z: ref.decode(z).sample, "ours": lambda z: ours.decode(z, tiling=tiling)}
    if not (args.quick or args.no_channels_last):
        ours_cl = channels_last(ours)
        impls["ours, channels_last_3d weights"] = lambda z: ours_cl.decode(z, tiling=tiling)
    weight_bytes = sum(t.numel() * t.element_size() for t in ours.state_dict().values())
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {dtype}, weights: {args.weights or 'random'} "
          f"({weight_bytes / 2**30:.2f} GiB), tiles {tiling}")

    gen = torch.Generator(device=device).manual_seed(0)
    c = ours.cfg.latent_channels
    warm = torch.randn(1, c, tiling.frames // 8 + 1, *latent_hw, generator=gen, device=device, dtype=dtype)
    for fn in impls.values():  # one full temporal window each: cuDNN set-up, allocator warm-up
        measure(fn, warm, 1, weight_bytes)
    keep = tiling.frame_stride + 1
    rows = []
    for T in frames:
        z = torch.randn(1, c, T, *latent_hw, generator=gen, device=device, dtype=dtype)
        results = {label: measure(fn, z, keep, weight_bytes, args.repeats) for label, fn in impls.items()}
        print(f"T={T} done", flush=True)
        base = results["diffusers"]
        for label, r in results.items():
            if r == "OOM":
                rows.append((T, label, "OOM", "OOM", "-", "-"))
                continue
            seconds, peak, head = r
            ratio = f"{seconds / base[0]:.2f}" if base != "OOM" else "-"
            diff = f"{(head - base[2]).abs().max().item():.2e}" if base != "OOM" and label != "diffusers" else "-"
            rows.append((T, label, f"{seconds:.2f}", "n/a" if peak is None else f"{peak / 2**30:.2f}", ratio, diff))
        del z, results, base

    print(f"\nVAE decode, latents (1, {c}, T, {latent_hw[0]}, {latent_hw[1]}) -> "
          f"{32 * latent_hw[0]}x{32 * latent_hw[1]} video, {dtype}, {name}")
    header = ("T", "implementation", "time s", "peak GiB", "time / diffusers", f"max|diff| frames 0-{keep - 1}")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(v).rjust(w) if i != 1 else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
