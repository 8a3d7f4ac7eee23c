"""NVFP4 DiT benchmark (issue 8): DiT weight memory bf16 vs NVFP4, one denoising step at 81 and 321 frames
(704x1280: latents (1, 128, T, 22, 40), T = 11 and 41) with time, peak memory and the output's error vs bf16
on the same random inputs and full-size random weights; and the Triton dequantising matmul (W4A16) against
bf16 torch.matmul at the DiT's linear shapes.

    python bench/quantize.py                 # CUDA machine; prints the matmul table, then the step table last
    python bench/quantize.py --frames 81     # only the short clip

NVFP4 configs, each quantising more of the same model: "default" = quantize.py's DEFAULT_INCLUDE (attention,
cross-attention, FFN 1x1 convs); "+camera" adds the camera projections and plucker_proj (smaller, but the release
found it hurts action-following); "small" adds the FFN temporal conv too: quantize.py's SMALL_INCLUDE
(`--preset small`), the set that fits issue 8's 1.6 GB goal.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from reference import randomize_  # noqa: E402
from quantize import nvfp4_linear_torch, nvfp4_linear_triton, quantize_model, quantize_nvfp4  # noqa: E402

CAMERA_LAYERS = ("blocks.*.attn.*_cam", "blocks.*.plucker_proj")
TEMPORAL_CONV = ("blocks.*.mlp.t_conv",)  # with the two sets above: quantize.py's SMALL_INCLUDE
LATENT_HW = (22, 40)  # 704x1280 pixels / 32


def cuda_time(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run (Triton compiles there)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max|a-b| / max|b|, ||a-b|| / ||b||) in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item(), ((a - b).norm() / b.norm()).item()


def bench_matmul(tokens: list[int], repeats: int) -> list[tuple]:
    """The DiT's NVFP4 linears (in -> out) at the token counts of one step."""
    shapes = {"qkv": (2240, 6720), "proj/out_gate/q": (2240, 2240), "kv_linear": (2240, 4480),
              "inverted_conv": (2240, 13440), "point_conv": (6720, 2240)}
    rows = []
    for M in tokens:
        for name, (K, N) in shapes.items():
            w = torch.randn(N, K, device="cuda") / math.sqrt(K)
            packed, scale, scale_2 = quantize_nvfp4(w)
            w16 = w.bfloat16()
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_bf16 = cuda_time(lambda: x @ w16.T, repeats)
            t_fp4 = cuda_time(lambda: nvfp4_linear_triton(x, packed, scale, scale_2), repeats)
            err = rel_err(nvfp4_linear_triton(x, packed, scale, scale_2),
                          nvfp4_linear_torch(x.float(), packed, scale, scale_2))[0]
            tflops = lambda t: 2 * M * N * K / t / 1e12  # noqa: E731
            rows.append((M, name, K, N, t_bf16 * 1e3, tflops(t_bf16), t_fp4 * 1e3, tflops(t_fp4), t_bf16 / t_fp4,
                         err))
            del w, w16, x, packed, scale
    return rows


def weight_gb(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 1e9


def step_inputs(frames: int, seed: int = 1):
    """x, timestep, text, text_mask, raymap, plucker of one CFG-free step of a 704x1280 clip, bf16 on CUDA."""
    from camera import action_to_c2w, prepare_camera

    T = (frames - 1) // 8 + 1
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, 128, T, *LATENT_HW, device="cuda", generator=g).bfloat16()
    timestep = torch.full((1, T), 700.0, device="cuda")
    timestep[:, 0] = 0  # the conditioning frame
    text = torch.randn(1, 300, 2304, device="cuda", generator=g).bfloat16()
    mask = torch.ones(1, 300, dtype=torch.int64, device="cuda")
    mask[:, 120:] = 0
    c2w = action_to_c2w(f"wl-{(frames - 1) // 2},dk-{frames - 1 - (frames - 1) // 2}", scheme="legacy")
    raymap, plucker = prepare_camera(c2w, [640.0, 640.0, 640.0, 352.0])
    return x, timestep, text, mask, raymap[None].cuda(), plucker[None].cuda().bfloat16()


def bench_step(model, frames: int, repeats: int):
    args = step_inputs(frames)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = cuda_time(lambda: model(*args), repeats)
    peak = torch.cuda.max_memory_allocated() / 1e9
    return seconds, peak, model(*args).float().cpu()


@torch.no_grad()  # inference: no autograd graph (it would hold every activation of the step)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[81, 321])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/quantize.py needs a CUDA device")
    from dit import DiT, DiTConfig
    from fast import accelerate

    device = torch.cuda.get_device_name()
    tokens = [((f - 1) // 8 + 1) * LATENT_HW[0] * LATENT_HW[1] for f in args.frames]
    matmul_rows = bench_matmul(tokens, args.repeats)

    with torch.device("meta"):
        model = DiT(DiTConfig())
    model = model.to(torch.bfloat16).to_empty(device="cuda").eval()
    randomize_(model)
    accelerate(model)  # as generate.py runs it (the NVFP4 layers swapped in later keep the fast blocks)
    results, reference = {}, {}
    for config in ("bf16", "nvfp4 default", "nvfp4 +camera", "nvfp4 small"):
        if config == "nvfp4 default":
            quantize_model(model)
        elif config == "nvfp4 +camera":
            quantize_model(model, include=CAMERA_LAYERS, exclude=())
        elif config == "nvfp4 small":
            quantize_model(model, include=TEMPORAL_CONV, exclude=())
        torch.cuda.empty_cache()
        row = {"weights": weight_gb(model)}
        for frames in args.frames:
            seconds, peak, out = bench_step(model, frames, args.repeats)
            if config == "bf16":
                reference[frames] = out
            row[frames] = (seconds, peak, *rel_err(out, reference[frames]))
            del out
        results[config] = row

    print(f"\nTriton NVFP4 (W4A16) matmul vs bf16 torch.matmul, {device}")
    print("| tokens | layer | K | N | bf16 ms | bf16 TFLOP/s | nvfp4 ms | nvfp4 TFLOP/s | speed vs bf16 "
          "| max rel err vs torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for M, name, K, N, t16, f16, t4, f4, ratio, err in matmul_rows:
        print(f"| {M} | {name} | {K} | {N} | {t16:.3f} | {f16:.0f} | {t4:.3f} | {f4:.0f} | {ratio:.2f}x "
              f"| {err:.1e} |")

    print(f"\nDiT one denoising step (batch 1, with camera), full-size random weights, {device}")
    print("| config | weights GB | frames | step s | speed vs bf16 | peak GB | max rel err vs bf16 "
          "| rel L2 err vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for config, row in results.items():
        for frames in args.frames:
            seconds, peak, max_err, l2_err = row[frames]
            ratio = results["bf16"][frames][0] / seconds
            print(f"| {config} | {row['weights']:.2f} | {frames} | {seconds:.3f} | {ratio:.2f}x | {peak:.1f} | "
                  f"{max_err:.2e} | {l2_err:.2e} |")


if __name__ == "__main__":
    main()
