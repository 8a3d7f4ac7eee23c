"""Benchmark of streaming stage 1 (the SANA-WM streaming release's chunk-by-chunk sampler): full-size models with
RANDOM weights, bf16, 704x1280, the streaming DiT (dit.forward_chunk with its caches, the official switches, the
CUDA kernels of fast.py) and the causal LTX-2 decoder (vae.CausalDecodeStream), 4 steps + 1 cache pass per
3-latent-frame chunk, CFG 1. Random text embeddings of the release's shape stand in for Gemma-2 (said in the
output). With --refiner, also the LTX-2 refiner in the stream (refiner.RefinerStream: one block of 3 latent frames
per chunk, 3 Euler steps + 1 history pass) on random full-size weights, random (1, 1024, 3840) embeddings standing
in for Gemma-3 + the text connectors.

Run from the repository root on a CUDA machine:
    python bench/stream.py                  # 241 and 961 frames
    python bench/stream.py --frames 241     # one length
    python bench/stream.py --refiner        # stage 1 + refiner + decode
    python bench/stream.py --tiny           # CPU, the demo's tiny models: checks the script runs
Per length: seconds per chunk (the 5 DiT forwards; the refiner's block; the decode), time to the first decoded frame (from the first
chunk's start: model loading, prompt and image encoding not counted), the real-time factor at 16 fps (stage 1 alone,
and stage 1 + decode), peak GPU memory (torch.cuda.max_memory_allocated, weights included) and the cache sizes.
"""
import argparse
import dataclasses
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import fast  # noqa: E402
import generate as G  # noqa: E402
from dit import OFFICIAL_SWITCHES, DiT, DiTConfig  # noqa: E402
from reference import randomize_  # noqa: E402
from refiner import Refiner, RefinerConfig, RefinerStream  # noqa: E402
from vae import VAE, CausalDecodeStream, VAEConfig  # noqa: E402

FPS = 16


def random_model(cls, cfg, device, dtype, seed):
    with torch.device("meta"):
        model = cls(cfg)
    return randomize_(model.to(dtype).to_empty(device=device), seed).eval()


def tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return 0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run(dit, vae, frames, size, device, dtype, refiner=None):
    T, (H, W) = (frames - 1) // 8 + 1, size
    h, w = H // 32, W // 32
    g = torch.Generator().manual_seed(42)
    x = torch.randn(1, dit.config.in_channels, T, h, w, generator=g).to(device, dtype)
    text = torch.randn(1, 300, dit.config.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(1, 300, dtype=torch.long, device=device)
    c2w = G.camera.action_to_c2w(f"w-{frames - 1}")
    raymap, plucker = G.camera.prepare_camera(c2w, [W * 0.8, W * 0.8, W / 2, H / 2], size=(H, W))
    raymap, plucker = raymap[None].to(device, dtype), plucker[None].to(device, dtype)
    stream = CausalDecodeStream(vae)
    caches = []
    forward_chunk = G.forward_chunk
    G.forward_chunk = lambda *a, **k: caches.append(k["cache"]) or forward_chunk(*a, **k)  # keep the cache to size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stage1, refine, decode, first_frame, written = [], [], [], None, 0
    sync(device)
    start = time.perf_counter()
    runner = None
    if refiner is not None:  # the sink: the image frame (here the noise's frame 0 stands in for the image latent)
        rtext = torch.randn(1, 1024, refiner.cfg.caption_channels, generator=g).to(device, dtype)
        runner = RefinerStream(refiner, x[:, :, :1], rtext, torch.ones(1, 1024, dtype=torch.long, device=device),
                               fps=FPS, generator=torch.Generator(device).manual_seed(42))
    chunks = G.stream_sample(dit, x, text, mask, raymap, plucker)
    while True:
        t0 = time.perf_counter()
        try:
            s, e, z = next(chunks)
        except StopIteration:
            break
        sync(device)
        t1 = time.perf_counter()
        if runner is not None:
            z = torch.cat([z[:, :, :1], runner.refine(z[:, :, 1:])], 2) if s == 0 else runner.refine(z)
            sync(device)
        refine.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        pixels = stream.decode(vae.denormalize(z.to(vae.decoder.conv_in.conv.weight.dtype)))
        video = ((pixels[0].float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()  # what a writer gets
        written += video.shape[1] - (s == 0)  # the first chunk's image frame is dropped
        t2 = time.perf_counter()
        if first_frame is None:
            first_frame = t2 - start
        stage1.append(t1 - t0)
        decode.append(t2 - t1)
    assert written == frames - 1, (written, frames)
    total = time.perf_counter() - start
    G.forward_chunk = forward_chunk
    seconds = (frames - 1) / FPS
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    cache = caches[-1]
    steady = lambda ts: statistics.median(ts[1:] or ts)  # noqa: E731
    return dict(frames=frames, chunks=len(stage1), stage1_chunk=steady(stage1), refine_chunk=steady(refine),
                first_chunk=stage1[0], decode_chunk=steady(decode), first_frame=first_frame,
                rt_stage1=seconds / sum(stage1), rt_total=seconds / total, peak=peak,
                cache_gib=tensor_bytes(cache.blocks) / 2 ** 30)


@torch.no_grad()
def profile(dit, frames, size, device, dtype, refiner=None):
    """The kernels of one chunk's 5 forwards (the 4th chunk: the softmax window full), by total GPU time; with a
    refiner, then the kernels of its 4th block."""
    T, (H, W) = (frames - 1) // 8 + 1, size
    g = torch.Generator().manual_seed(42)
    x = torch.randn(1, dit.config.in_channels, T, H // 32, W // 32, generator=g).to(device, dtype)
    text = torch.randn(1, 300, dit.config.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(1, 300, dtype=torch.long, device=device)
    raymap, plucker = G.camera.prepare_camera(G.camera.action_to_c2w(f"w-{frames - 1}"),
                                              [W * 0.8, W * 0.8, W / 2, H / 2], size=(H, W))
    chunks = G.stream_sample(dit, x, text, mask, raymap[None].to(device, dtype), plucker[None].to(device, dtype))
    for _ in range(3):
        next(chunks)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        next(chunks)
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    if refiner is None:
        return
    rtext = torch.randn(1, 1024, refiner.cfg.caption_channels, generator=g).to(device, dtype)
    runner = RefinerStream(refiner, x[:, :, :1], rtext, None, fps=FPS)
    for i in range(3):
        runner.refine(x[:, :, 1 + 3 * i:4 + 3 * i])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.refine(x[:, :, 10:13])
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default="241,961", help="comma-separated frame counts 24k+1")
    p.add_argument("--tiny", action="store_true", help="CPU, the demo's tiny models (checks the script)")
    p.add_argument("--profile", action="store_true", help="also profile the 5 forwards of one chunk (the 4th)")
    p.add_argument("--refiner", action="store_true", help="refine each chunk in the stream (random LTX-2 refiner)")
    args = p.parse_args()
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        dit_cfg = dataclasses.replace(G.DEMO_DIT, **OFFICIAL_SWITCHES)
        vae_cfg, size = dataclasses.replace(G.DEMO_VAE, decoder_causal=True), G.DEMO_SIZE
        frames = [25, 49]
        refiner_cfg = G.DEMO_REFINER
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        dit_cfg = DiTConfig(**OFFICIAL_SWITCHES)
        vae_cfg, size = dataclasses.replace(VAEConfig(), decoder_causal=True), (704, 1280)
        frames = [int(f) for f in args.frames.split(",")]
        refiner_cfg = RefinerConfig()
    dit = fast.accelerate(random_model(DiT, dit_cfg, device, dtype, seed=1))
    vae = random_model(VAE, vae_cfg, device, dtype, seed=2)
    refiner = random_model(Refiner, refiner_cfg, device, dtype, seed=3) if args.refiner else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {str(dtype)[6:]}; text: random embeddings (1, 300, "
          f"{dit_cfg.caption_channels}) stand in for Gemma-2; switches {OFFICIAL_SWITCHES}", flush=True)
    if refiner is not None:
        print("refiner: random weights; random (1, 1024, 3840) embeddings stand in for Gemma-3 + connectors")
    run(dit, vae, frames[0], size, device, dtype, refiner)  # warm-up: compiles the kernels and blocks
    rows = [run(dit, vae, f, size, device, dtype, refiner) for f in frames]
    if args.profile:
        profile(dit, max(frames[0], 121), size, device, dtype, refiner)  # 5 chunks at least
    print("\nframes chunks | stage-1 s/chunk (first) | refiner s/chunk | decode s/chunk | first frame s | "
          "real time: stage 1, all | peak GiB | cache GiB")
    for r in rows:
        print(f"{r['frames']:6d} {r['chunks']:6d} | {r['stage1_chunk']:8.3f} ({r['first_chunk']:6.3f})      | "
              f"{r['refine_chunk']:8.3f}        | {r['decode_chunk']:8.3f}       | {r['first_frame']:8.3f}      | "
              f"{r['rt_stage1']:6.2f}x {r['rt_total']:6.2f}x        | {r['peak']:7.2f}  | {r['cache_gib']:6.3f}")


if __name__ == "__main__":
    main()
