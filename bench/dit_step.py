"""Benchmark of one DiT denoising step (issue 10): ours (dit.py) against diffusers 0.42.1's SanaWMTransformer3DModel
with the same random weights, bf16, 704x1280 video (22x40 latents), 300 text tokens, camera and Plücker inputs.

Run on a CUDA machine from the repository root (needs diffusers):
    python bench/dit_step.py [--frames 81,321,961] [--batch 1,2] [--skip-diffusers] [--profile 961]
    python bench/dit_step.py --frames 961 --part-frames 16 --memory-cap 12   # also the memory mode, capped
    python bench/dit_step.py --tiny      # the tests' tiny config, fp32 on the CPU: checks the script end to end
Per size: median seconds per step (CUDA events, after warm-up); peak memory (max_memory_allocated; the models
share one copy of the weights, so each peak counts it once; for ours also the caching allocator's reserved
peak); ours / diffusers; max|ours - theirs| / max|theirs|;
our step over the practical floor measured in the same run: the full attentions (main + camera branch of each
softmax block: ten) at the best SDPA backend's time plus the linears, 2 * params * tokens FLOP (the issue's
2 * 2.66e9 * N), at the measured bf16 matmul rate. --profile F: the 25 costliest kernels of our step at F frames.
--part-frames P: also our memory mode (DiT(..., part_frames=P)), with the caching allocator limited to
--memory-cap GiB for it (torch.cuda.set_per_process_memory_fraction; the weights count): its time, peak, and
max|memory mode - ours| / max|ours|.
"""
import argparse
import contextlib
import pathlib
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import camera  # noqa: E402
import fast  # noqa: E402
from dit import DiT, DiTConfig  # noqa: E402
from reference import TINY_DIT, max_rel_err, randomize_  # noqa: E402


def make_inputs(cfg, batch, frames, hw, text_len, device, dtype, seed=0):
    """Our forward's arguments: latents (B, c, T, h, w), timesteps (B, T) with the clean conditioning frame 0,
    text (B, L, C) with a padded tail, and raymap (B, T, 20) + Plücker (B, 48, T, h, w) from one camera path."""
    steps, (h, w) = frames - 1, hw
    # Legacy key meanings: walk turning right, then strafe right turning left.
    c2w = camera.action_to_c2w(f"wl-{steps // 2},dj-{steps - steps // 2}", scheme="legacy")
    H, W = 32 * h, 32 * w  # pixels; focal length 0.78 W as in tests/reference.tiny_camera
    raymap, plucker = camera.prepare_camera(c2w, [W * 25 / 32, W * 25 / 32, W / 2, H / 2], size=(H, W))
    T = raymap.shape[0]
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, T, h, w, generator=g, device=device, dtype=dtype)
    text = torch.randn(batch, text_len, cfg.caption_channels, generator=g, device=device, dtype=dtype)
    mask = torch.ones(batch, text_len, dtype=torch.int64, device=device)
    mask[:, 2 * text_len // 5:] = 0  # a 120-token prompt padded to 300
    t = torch.full((batch, T), 800.0, device=device)
    t[:, 0] = 0
    # The pipeline hands the camera inputs over in the model dtype.
    raymap = raymap.to(device, dtype)[None].repeat(batch, 1, 1)
    plucker = plucker.to(device, dtype)[None].repeat(batch, 1, 1, 1, 1)
    return x, t, text, mask, raymap, plucker


def timed(fn, warmup, reps, device):
    """(median seconds, last output) of reps calls after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(fn, warmup, reps, device):
    """(seconds, peak bytes, output on the CPU) of one model's step, or None if it ran out of GPU memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds, out = timed(fn, warmup, reps, device)
    except torch.OutOfMemoryError:
        return None
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    return seconds, peak, out.cpu()


def summary(result):
    """(seconds, GiB) of a measure() result; "OOM" where it ran out of memory, "-" (False) where it was not run."""
    if not result:
        return ("-", "-") if result is False else ("OOM", "OOM")
    return result[0], result[1] / 2**30


def ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else "-"


def cell(value, spec, width=8):
    """A number (NaN: no figure, e.g. memory on the CPU) or a word, right-aligned."""
    ok = isinstance(value, float) and value == value
    return f"{value:{width}{spec}}" if ok else f"{value if isinstance(value, str) else '-':>{width}}"


def repetitions(tokens):
    """(warm-up, timed) steps: diffusers takes ~6.6 s per step at 961 frames, so few there."""
    return (2, 5) if tokens < 30 * 880 else (1, 3) if tokens < 100 * 880 else (1, 2)


def matmul_tflops(n, device, dtype):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, 3, 10, device)[0] / 1e12


def attention_seconds(batch, tokens, heads, head_dim, device, dtype):
    """{backend: median seconds (None where it cannot run)} of one full non-causal SDPA over all tokens."""
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]
    result = {}
    for backend in backends:
        key = backend.name.split("_")[0].lower()
        result[key] = None  # stays None where the backend has no kernel for this shape ("No available kernel")
        with sdpa_kernel(backend), warnings.catch_warnings(), contextlib.suppress(RuntimeError):
            warnings.simplefilter("ignore")
            result[key] = timed(lambda: F.scaled_dot_product_attention(q, k, v), 1, 3, device)[0]
    return result


def profile_step(fn, device):
    fn()
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", help="comma-separated video frame counts 8k+1 (default 81,321,961; tiny 9,17)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (2 = one CFG step)")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--profile", type=int, metavar="FRAMES", help="profile one step of ours at this size")
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (checks the script)")
    parser.add_argument("--part-frames", type=int, metavar="P", help="also run the memory mode, P frames per part")
    parser.add_argument("--memory-cap", type=float, metavar="GIB", help="GPU memory limit for the memory mode")
    args = parser.parse_args()
    frame_list = [int(f) for f in (args.frames or ("9,17" if args.tiny else "81,321,961")).split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    if any(f < 9 or (f - 1) % 8 for f in frame_list):
        parser.error(f"--frames: expected counts 8k+1 >= 9, got {frame_list}")
    if args.memory_cap is not None and not args.part_frames:
        parser.error("--memory-cap: applies to the memory mode only; give --part-frames too")
    if args.profile is not None and args.profile not in frame_list:
        parser.error(f"--profile: expected one of --frames {frame_list}, got {args.profile}")

    if args.tiny:  # fp32: diffusers' camera geometry refuses bf16 on the CPU
        device, dtype, cfg, hw, text_len, mm_n = "cpu", torch.float32, DiTConfig.from_dict(TINY_DIT), (4, 6), 8, 512
    else:
        device, dtype, cfg, hw, text_len, mm_n = "cuda", torch.bfloat16, DiTConfig(), (22, 40), 300, 8192
    device = torch.device(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    tflops = matmul_tflops(mm_n, device, dtype)
    print(f"device: {name}, torch {torch.__version__}; {str(dtype)[6:]} matmul {mm_n}^3: {tflops:.3g} TFLOP/s",
          flush=True)

    torch.set_grad_enabled(False)
    with torch.device("meta"):
        ours = DiT(cfg).eval()
    ours = randomize_(ours.to(dtype).to_empty(device=device))  # drawn on the device: a second for the full model
    fast.accelerate(ours)  # the CUDA kernels and compiled blocks, as generate.py runs the DiT
    state = ours.state_dict()
    n_params = sum(p.numel() for p in ours.parameters())
    heads, head_dim = cfg.hidden_size // cfg.linear_head_dim, cfg.linear_head_dim
    n_attn = 2 * sum(cfg.is_softmax(i) for i in range(cfg.num_layers))  # main + camera branch per softmax block
    theirs = None
    if not args.skip_diffusers:
        from diffusers.models.transformers.transformer_sana_wm import SanaWMTransformer3DModel

        with torch.device(device):  # its RoPE table is a plain attribute: build it for real, not on meta
            theirs = SanaWMTransformer3DModel(**(TINY_DIT if args.tiny else {})).eval()
        theirs.load_state_dict(state, strict=True, assign=True)  # shares our tensors: one copy of the weights
    del state

    rows, low = [], []
    for batch in batches:
        for frames in frame_list:
            x, t, text, mask, raymap, plucker = make_inputs(cfg, batch, frames, hw, text_len, device, dtype)
            tokens = batch * x.shape[2] * hw[0] * hw[1]
            warmup, reps = repetitions(tokens)
            attn = attention_seconds(batch, tokens // batch, heads, head_dim, device, dtype)
            best = min((s, b) for b, s in attn.items() if s is not None)
            floor = n_attn * best[0] + 2 * n_params * tokens / (tflops * 1e12)
            flop = 4 * tokens * (tokens // batch) * heads * head_dim
            print(f"{frames} frames, B={batch}: one attention " + ", ".join(
                f"{b} {s * 1e3:.1f} ms ({flop / s / 1e12:.3g} TFLOP/s)" if s else f"{b} n/a" for b, s in attn.items()),
                flush=True)

            run_ours = lambda: ours(x, t, text, mask, raymap, plucker)  # noqa: E731
            mine = measure(run_ours, warmup, reps, device)
            (o_s, o_m), (d_s, d_m), err = summary(mine), summary(False), "-"
            reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else float("nan")
            print(f"  ours: {cell(o_s, '.3f', 0)} s, {cell(o_m, '.2f', 0)} GiB ({reserved:.2f} GiB reserved by the "
                  f"caching allocator)", flush=True)
            if mine and args.profile == frames and batch == batches[0]:
                profile_step(run_ours, device)
            low_run = memory_mode(ours, (x, t, text, mask, raymap, plucker), args, warmup, reps, device) \
                if args.part_frames else None
            ref = None
            if theirs is not None:
                ref = measure(lambda: theirs(x, t[:, None], text[:, None], mask, camera_conditions=raymap,
                                             chunk_plucker=plucker, return_dict=False)[0], warmup, reps, device)
                (d_s, d_m), err = summary(ref), max_rel_err(mine[2], ref[2]) if mine and ref else "-"
                print(f"  diffusers: {cell(d_s, '.3f', 0)} s, {cell(d_m, '.2f', 0)} GiB", flush=True)
            if low_run is not None:
                low.append(memory_row(frames, batch, *low_run, mine, ref))
            del ref
            rows.append(f"{frames:6d} {batch} | {cell(o_s, '.3f')} {cell(d_s, '.3f')} {cell(ratio(o_s, d_s), '.2f', 9)}"
                        f" | {cell(o_m, '.2f')} {cell(d_m, '.2f')} {cell(ratio(o_m, d_m), '.2f', 9)} | "
                        f"{cell(err, '.1e')} | {floor:8.3f} {best[1]:>7} {cell(ratio(o_s, floor), '.2f', 10)}")
            del x, t, text, mask, raymap, plucker, mine

    print(f"\nDiT step, {name}, {str(dtype)[6:]}, {hw[0]}x{hw[1]} latents, matmul {tflops:.3g} TFLOP/s; "
          f"floor = {n_attn} attentions (best SDPA backend) + linears 2*{n_params:.3g}*N FLOP at the matmul rate")
    print("frames B |   ours s   diff s ours/diff | ours GiB diff GiB ours/diff |  rel.err |"
          "  floor s  (attn) ours/floor")
    print("\n".join(rows))
    if low:
        cap = f"allocator capped at {args.memory_cap:g} GiB" if args.memory_cap else "no cap"
        print(f"\nmemory mode, part_frames={args.part_frames} ({cap}); rel.err = max|memory mode - x| / max|x| for x"
              f" = ours, diffusers")
        print("frames B |   mode s  ours s  mode/ours |  peak GiB  reserved GiB | err ours  err diff")
        print("\n".join(low))


def memory_mode(ours, inputs, args, warmup, reps, device):
    """(measure() result, reserved GiB) of the memory mode at this size, run under the memory cap (the default steps
    are not)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        cap = min(1.0, args.memory_cap * 2**30 / total) if args.memory_cap else 1.0
        torch.cuda.set_per_process_memory_fraction(cap)
    try:
        result = measure(lambda: ours(*inputs, part_frames=args.part_frames), warmup, reps, device)
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else float("nan")
    (m_s, m_m) = summary(result)
    print(f"  memory mode: {cell(m_s, '.3f', 0)} s, {cell(m_m, '.2f', 0)} GiB ({reserved:.2f} reserved)", flush=True)
    return result, reserved


def memory_row(frames, batch, result, reserved, mine, ref):
    (m_s, m_m), (o_s, _) = summary(result), summary(mine)
    errors = [max_rel_err(result[2], other[2]) if result and other else "-" for other in (mine, ref)]
    return (f"{frames:6d} {batch} | {cell(m_s, '.3f')} {cell(o_s, '.3f', 7)} {cell(ratio(m_s, o_s), '.2f', 10)} | "
            f"{cell(m_m, '.2f', 9)} {cell(reserved, '.2f', 13)} | {cell(errors[0], '.1e')}  {cell(errors[1], '.1e')}")

if __name__ == "__main__":
    main()
