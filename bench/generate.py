"""Benchmark of generate.py end to end (issue 6; with --refiner also the stage-2 hand-off of issue 7): full-size
models with RANDOM weights, bf16, 161 frames at 704x1280 (latents (1, 128, 21, 22, 40)), 4 sampler steps with
classifier-free guidance 5 (the negative prompt batched: 2 x 18 480 tokens per DiT call), tiled VAE decode, run
once with every model resident on the GPU and once with --offload (only the running model on the GPU).

The text encoders are SKIPPED, and the output says so: a 2-layer random Gemma-2 of width 2304 (generate.py's demo
text encoder) stands in for Gemma-2-2b-it, so the DiT reads random text embeddings of the release's shape
(1, 300, 2304); with --refiner, random (1, 1024, 3840) embeddings stand in for Gemma-3-12B + connectors. Model
weights are drawn directly on the GPU (the full DiT in about a second), from the distributions of
tests/reference.randomize_, so no path is zero.

Run from the repository root on a CUDA machine (about 2-3 minutes on an H100; needs transformers for the stand-in):
    python bench/generate.py               # no offload, then --offload
    python bench/generate.py --refiner     # the no-offload run also runs stage 2: the full-size video-only LTX-2
                                           # refiner (13 B parameters, random) over the 21 latent frames
    python bench/generate.py --tiny        # CPU, fp32, the demo's tiny models at 17 frames of 128x192: checks the
                                           # script runs (add --refiner for stage 2)
A warm-up call (1 step, no decode) compiles the Triton kernels first. Per run: seconds per sampler step, the
refinement loop (seconds and seconds per 3-frame block; model loading not counted), decode seconds, the peak GPU
memory of each stage (torch.cuda.max_memory_allocated, resident weights included) and the run's wall time.
diffusers is not run here: its pipeline at this size is compared step by step in bench/dit_step.py,
bench/vae.py and bench/refiner.py.
"""
import argparse
import math
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import generate as G  # noqa: E402
from dit import DiT, DiTConfig  # noqa: E402
from reference import randomize_  # noqa: E402
from refiner import Refiner, RefinerConfig  # noqa: E402
from vae import VAE, VAEConfig  # noqa: E402


def random_model(cls, cfg, device, dtype, seed):
    """Built on the meta device, cast there (no float32 copy of the weights ever exists), then materialised on
    `device` and drawn at random."""
    with torch.device("meta"):
        model = cls(cfg)
    return randomize_(model.to(dtype).to_empty(device=device), seed).eval()


def random_stage2(cfg: RefinerConfig, text_length: int, device, dtype) -> G.Stage2:
    """Stage 2 with random text embeddings in place of Gemma-3 + connectors, and a random-weight video-only refiner
    built when generate() asks for it (after the stage-1 models have left the GPU)."""
    def encode(prompt: str):
        g = torch.Generator(device).manual_seed(3)
        text = torch.randn(1, text_length, cfg.caption_channels, generator=g, device=device, dtype=dtype)
        return text, torch.ones(1, text_length, dtype=torch.int64, device=device)
    return G.Stage2(lambda: encode, lambda: random_model(Refiner, cfg, device, dtype, seed=4))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refiner", action="store_true", help="also run stage 2 in the no-offload run")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with the demo's tiny models")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--frames", type=int, default=161)
    args = p.parse_args()

    if args.tiny:
        device, dtype, (H, W) = "cpu", torch.float32, G.DEMO_SIZE
        dit_cfg, vae_cfg, refiner_cfg, refiner_text = G.DEMO_DIT, G.DEMO_VAE, G.DEMO_REFINER, 128
        frames = min(args.frames, 17)
        torch.set_num_threads(1)  # tiny models: more threads only add synchronisation
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/generate.py needs a CUDA device (or --tiny for the CPU smoke test)")
        device, dtype, (H, W) = "cuda", torch.bfloat16, (G.HEIGHT, G.WIDTH)
        dit_cfg, vae_cfg, refiner_cfg, refiner_text = DiTConfig(), VAEConfig(), RefinerConfig(), 1024
        frames = args.frames

    start = time.perf_counter()
    dit = random_model(DiT, dit_cfg, device, dtype, seed=1)
    vae = random_model(VAE, vae_cfg, device, dtype, seed=2)
    tokenizer, text_encoder = G.demo_text_encoder(hidden_size=dit_cfg.caption_channels)
    text_encoder = text_encoder.to(device, dtype)
    build = time.perf_counter() - start
    params = sum(t.numel() for t in dit.parameters()) / 1e9, sum(t.numel() for t in vae.parameters()) / 1e9
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# {device_name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}; RANDOM weights: DiT "
          f"{params[0]:.3g} B + VAE {params[1]:.3g} B parameters, built in {build:.1f} s")
    print(f"# TEXT ENCODERS SKIPPED: a 2-layer random Gemma-2 stands in (random text embeddings (1, 300, "
          f"{dit_cfg.caption_channels})); stage 2 reads random (1, {refiner_text}, {refiner_cfg.caption_channels}) "
          f"embeddings instead of Gemma-3 + connectors")

    image = G.demo_image(H, W)
    fx = W / (2 * math.tan(math.radians(G.DEFAULT_FOV_DEG) / 2))
    moves = frames - 1  # camera: forward, then forward while turning left
    common = dict(action=f"w-{moves // 2},jw-{moves - moves // 2}", intrinsics=[fx, fx, W / 2, H / 2],
                  num_frames=frames, guidance_scale=5.0, negative_prompt="blurry", height=H, width=W, device=device)

    # Warm-up: the Triton kernels compile on their first call, at these very shapes.
    G.generate(dit, vae, tokenizer, text_encoder, image, G.DEMO_PROMPT, steps=1, decode=False, **common)

    rows = []
    for offload in (False, True):
        stage2 = random_stage2(refiner_cfg, refiner_text, device, dtype) if args.refiner and not offload else None
        for model in (dit, vae, text_encoder):  # offload: the models wait on the CPU; else all on the GPU
            model.to("cpu" if offload else device)
        G._free_memory(device)
        name = "offload" if offload else "resident" + (" + refiner" if stage2 else "")
        start = time.perf_counter()
        try:
            r = G.generate(dit, vae, tokenizer, text_encoder, image, G.DEMO_PROMPT, refiner=stage2,
                           steps=args.steps, offload=offload, **common)
        except torch.OutOfMemoryError as e:
            r, failure = None, str(e).splitlines()[0]
        wall = time.perf_counter() - start
        G._free_memory(device)  # after the except clause, whose traceback held the failed run's tensors
        if r is None:
            print(f"# {name}: out of GPU memory ({failure})")
            rows.append((name, "OOM", "", "", "", "", "", "", ""))
            continue
        blocks = math.ceil(((frames - 1) // 8) / 3)  # latent frames after the sink, in blocks of 3
        mem = {k: f"{v:.1f}" for k, v in r.peak_memory_gib.items()}
        rows.append((name, f"{len(r.frames)}x{W}x{H}", f"{r.seconds_per_step:.2f}",
                     f"{r.refine_seconds:.1f} ({r.refine_seconds / blocks:.2f}/block)" if stage2 else "-",
                     f"{r.decode_seconds:.1f}", mem.get("stage 1", "-"), mem.get("stage 2", "-"),
                     mem.get("decode", "-"), f"{wall:.1f}"))

    header = ("run", "frames", "s/step", "refine s", "decode s", "peak GiB st.1", "st.2", "decode", "wall s")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    print(f"\nbench/generate.py: {frames} frames, {args.steps} steps, guidance 5, {device_name}, RANDOM weights, "
          f"text encoders skipped")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
