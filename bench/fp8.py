"""FP8 (W8A8) and NVFP4 against bf16 (issue 22): the DiT step and the refiner's block, speed and error, with full-size
random weights (tests/reference.randomize_), bf16 activations, each quantised model built anew from the same seed.

    python bench/fp8.py                                     # CUDA, sm_89+ (fp8); the tables last
    python bench/fp8.py --precisions fp8 --skip-refiner     # the DiT step only, fp8 against bf16
    python bench/fp8.py --skip-dit                          # the refiner only
    python bench/fp8.py --tiny     # the same code on the CPU at the tests' tiny configs (fp32, the torch references)

1. The DiT step (bench/dit_step.py's inputs: batch 1, 704x1280, 300 text tokens, camera; fast.accelerate: compiled
   blocks and Triton kernels, as generate.py runs it) at 81/321/961 frames for bf16 and each --precisions (the
   DiT's default layer set, quantize.PRESETS["default"]): median seconds after warm-up (compilation), speed over
   bf16, peak memory, and the velocity's error against bf16's (max |a - b| / max |b| and ||a - b|| / ||b||).
2. The latents after 4 Euler steps with CFG 5 (generate.sample, a random negative prompt) at --sample-frames
   (81): their error against bf16's.
3. The refiner (refiner.py, 48 blocks): one RefinerStream.refine call, 3 latent frames at 704x1280 (22x40) with 10
   frames of history (after 4 blocks: the last also warms the kernels up) and a sink frame, 1024 random text tokens:
   seconds per block, peak memory, the block's error against bf16's.
"""
import argparse
import gc
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import fast  # noqa: E402
import generate as G  # noqa: E402
import refiner as R  # noqa: E402
from dit import DiT, DiTConfig  # noqa: E402
from dit_step import make_inputs, repetitions, timed  # noqa: E402
from quantize import PRECISIONS, PRESETS, REFINER_EXCLUDE, REFINER_INCLUDE, set_precision  # noqa: E402
from reference import TINY_DIT, TINY_REFINER, max_rel_err, randomize_  # noqa: E402

REFINER_HISTORY_BLOCKS = 4  # 4 blocks of 3 frames: a history of 12 frames, trimmed to kv_max_frames - sink = 10


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def weight_gib(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30


def build(cls, cfg, precision: str, include, exclude, device, dtype):
    """The model with the same random weights for every precision (randomize_, seed 1, on the device), then its
    layer set quantised."""
    with torch.device("meta"):
        model = cls(cfg).eval()
    model = randomize_(model.to(dtype).to_empty(device=device), seed=1)
    set_precision(model, precision, include, exclude)
    return model


def free(device) -> None:
    torch._dynamo.reset()  # the previous model's compiled graphs (and what they hold)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def dit_runs(precisions, frame_list, sample_frames, cfg, hw, text_len, device, dtype) -> dict:
    """{precision: {"weights": GiB, frames: (seconds, peak GiB, velocity on the CPU), "latents": after 4 steps}}."""
    runs = {}
    for precision in precisions:
        model = fast.accelerate(build(DiT, cfg, precision, *PRESETS["default"], device, dtype))
        row = runs[precision] = {"weights": weight_gib(model)}
        for frames in frame_list:
            inputs = make_inputs(cfg, 1, frames, hw, text_len, device, dtype)
            warmup, reps = repetitions(inputs[0].shape[2] * hw[0] * hw[1])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, out = timed(lambda: model(*inputs), warmup, reps, device)
            row[frames] = (seconds, peak_gib(device), out.float().cpu())
            print(f"{precision} {frames} frames: {seconds:.3f} s/step", flush=True)
            del inputs, out
        x, _, text, mask, raymap, plucker = make_inputs(cfg, 1, sample_frames, hw, text_len, device, dtype)
        negative, negative_mask = make_inputs(cfg, 1, sample_frames, hw, text_len, device, dtype, seed=1)[2:4]
        row["latents"] = G.sample(model, x, G.schedule(4).to(device), text, mask, raymap, plucker, 5.0, negative,
                                  negative_mask).float().cpu()
        del model, x, text, mask, raymap, plucker, negative, negative_mask
        free(device)
    return runs


@torch.no_grad()
def refiner_runs(precisions, cfg, hw, device, dtype) -> dict:
    """{precision: (weights GiB, seconds of one block, peak GiB, the refined block on the CPU)}."""
    g = torch.Generator(device).manual_seed(3)
    frames = 1 + 3 * (REFINER_HISTORY_BLOCKS + 1)
    latents = torch.randn(1, cfg.in_channels, frames, *hw, generator=g, device=device).to(dtype)
    text = torch.randn(1, 1024, cfg.caption_channels, generator=g, device=device).to(dtype)
    mask = torch.ones(1, 1024, dtype=torch.int64, device=device)
    runs = {}
    for precision in precisions:
        model = build(R.Refiner, cfg, precision, REFINER_INCLUDE, REFINER_EXCLUDE, device, dtype)
        stream = R.RefinerStream(model, latents[:, :, :1], text, mask, fps=16,
                                 generator=torch.Generator(device).manual_seed(42))
        for b in range(REFINER_HISTORY_BLOCKS):
            stream.refine(latents[:, :, 1 + 3 * b:4 + 3 * b])
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = stream.refine(latents[:, :, -3:])
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs[precision] = (weight_gib(model), time.perf_counter() - start, peak_gib(device), out.float().cpu())
        print(f"refiner {precision}: {runs[precision][1]:.3f} s/block (history {stream.hist} frames)", flush=True)
        del model, stream, out
        free(device)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, against bf16")
    parser.add_argument("--frames", help="comma-separated DiT frame counts 8k+1 (default 81,321,961; tiny 9,17,25)")
    parser.add_argument("--sample-frames", type=int, help="frames of the 4-step latents (default 81; tiny 9)")
    parser.add_argument("--skip-dit", action="store_true")
    parser.add_argument("--skip-refiner", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny configs, fp32 on the CPU (checks the script)")
    args = parser.parse_args()
    precisions = ["bf16"] + args.precisions.split(",")
    if any(p not in PRECISIONS for p in precisions[1:]):
        parser.error(f"--precisions: expected some of {PRECISIONS}, got {args.precisions!r}")
    frame_list = [int(f) for f in (args.frames or ("9,17,25" if args.tiny else "81,321,961")).split(",")]
    sample_frames = args.sample_frames or (9 if args.tiny else 81)
    if any(f < 9 or (f - 1) % 8 for f in frame_list + [sample_frames]):
        parser.error(f"--frames, --sample-frames: expected counts 8k+1 >= 9, got {frame_list}, {sample_frames}")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        dit_cfg, refiner_cfg = DiTConfig.from_dict(TINY_DIT), R.RefinerConfig.from_dict(TINY_REFINER)
        hw, text_len, refiner_hw = (4, 6), 8, (2, 3)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/fp8.py needs a CUDA device (or --tiny)")
        device, dtype, dit_cfg, refiner_cfg = torch.device("cuda"), torch.bfloat16, DiTConfig(), R.RefinerConfig()
        hw, text_len, refiner_hw = (22, 40), 300, (22, 40)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    torch.set_grad_enabled(False)
    dit = None if args.skip_dit else dit_runs(precisions, frame_list, sample_frames, dit_cfg, hw, text_len, device,
                                               dtype)
    ref = None if args.skip_refiner else refiner_runs(precisions, refiner_cfg, refiner_hw, device, dtype)

    activations = "fp32 (tiny, CPU: the torch reference kernels)" if args.tiny else "bf16 activations"
    if dit is not None:
        print(f"\nDiT step, {name}, {activations}, {hw[0]}x{hw[1]} latents, batch 1; errors against bf16's velocity")
        print("| precision | weights GiB | frames | step s | speed vs bf16 | peak GiB | max rel err | rel L2 err |")
        print("|---|---|---|---|---|---|---|---|")
        for precision, row in dit.items():
            for frames in frame_list:
                seconds, peak, out = row[frames]
                base_s, _, base = dit["bf16"][frames]
                print(f"| {precision} | {row['weights']:.2f} | {frames} | {seconds:.3f} | {base_s / seconds:.2f}x | "
                      f"{peak:.1f} | {max_rel_err(out, base):.2e} | {rel_l2(out, base):.2e} |")
        print(f"\nLatents after 4 Euler steps with CFG 5 at {sample_frames} frames, against bf16's")
        print("| precision | max rel err | rel L2 err |\n|---|---|---|")
        for precision, row in list(dit.items())[1:]:
            base = dit["bf16"]["latents"]
            print(f"| {precision} | {max_rel_err(row['latents'], base):.2e} | {rel_l2(row['latents'], base):.2e} |")
    if ref is not None:
        print(f"\nRefiner, {name}, {activations}: one RefinerStream.refine call, 3 latent frames at "
              f"{refiner_hw[0]}x{refiner_hw[1]}, 10 frames of history, a sink frame, 1024 text tokens")
        print("| precision | weights GiB | s/block | speed vs bf16 | peak GiB | max rel err | rel L2 err |")
        print("|---|---|---|---|---|---|---|")
        for precision, (weights, seconds, peak, out) in ref.items():
            _, base_s, _, base = ref["bf16"]
            print(f"| {precision} | {weights:.2f} | {seconds:.3f} | {base_s / seconds:.2f}x | {peak:.1f} | "
                  f"{max_rel_err(out, base):.2e} | {rel_l2(out, base):.2e} |")


if __name__ == "__main__":
    main()
