"""Sequence parallelism (issue 23, parallel.py): the DiT step with its latent frames split over N GPUs.

Without torchrun it COMPUTES, for the release at 961 frames (704x1280, bf16, CFG batch 2), what each GPU receives
per DiT step through parallel.py's collectives for N = 2, 4, 8, and an expected step time from the measured one-GPU
step; nothing runs on a GPU:
    python bench/parallel.py [--frames 961 --one-gpu 6.48] [--ranks 2,4,8] [--bandwidth 450] [--latency 25]
The model: every collective is an all-gather, in which each GPU receives the other N - 1 ranks' pieces (padded to
the longest span), over NVLink at --bandwidth GB/s per direction per GPU (H200: 450), plus --latency us per
collective; no overlap with compute (parallel.py's collectives are blocking). Compute: the one-GPU step (--one-gpu
seconds: 6.48 s per CFG step at 961 frames, measured with bench/generate.py, issue 23) times the longest span's
share of the frames, plus the GDN blocks' recomputed halo streams (their share of the GEMMs: BENCHMARKS.md's
profile at 961 frames) and the scan's second pass. Not modelled: the block glue that one GPU runs compiled
(fast.FastBlock) and parallel.block_forward runs piece by piece.

Under torchrun it MEASURES, on random full-size weights, bf16, CFG batch 2: one DiT step of the sampler
(parallel.velocity: inputs broadcast from rank 0, the whole velocity gathered) per --frames, its seconds (median,
slowest rank) and peak memory per GPU, the same step on one GPU (rank 0) and the relative error against it:
    torchrun --nproc_per_node 8 bench/parallel.py --frames 321,961
    torchrun --nproc_per_node 2 bench/parallel.py --tiny      # CPU (gloo), the tests' tiny config: checks the script
"""
import argparse
import math
import os
import pathlib
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
import parallel  # noqa: E402
from dit import DiT, DiTConfig  # noqa: E402
from dit_step import make_inputs, timed  # noqa: E402
from reference import TINY_DIT, max_rel_err, randomize_  # noqa: E402

# BENCHMARKS.md, "Where the time goes at 961 frames" (one H200, B=1, 3.22 s of kernel time): the GEMMs' and the GDN
# state scan's shares of the step
GEMM_SHARE, SCAN_SHARE = 0.675 / 3.22, 0.037 / 3.22


@dataclass
class Video:
    frames: int             # latent frames
    tokens: int             # per frame (h * w)
    batch: int              # 2: the CFG pair
    value_bytes: int        # the model dtype's (bf16: 2); the GDN maps are fp32
    text_tokens: int = 300


def received_bytes(cfg: DiTConfig, video: Video, ranks: int) -> dict:
    """Bytes one GPU receives per DiT step through parallel.py's collectives, by kind: `forward` (the blocks:
    softmax keys and values, GDN halos and span maps, FFN halos) and `velocity`'s (the inputs broadcast from rank
    0, the velocity gathered)."""
    longest = math.ceil(video.frames / ranks)
    C, D = cfg.hidden_size, cfg.linear_head_dim
    H = C // D
    frame = video.batch * video.tokens * C * video.value_bytes          # one frame of (B, S, C) activations
    softmax = sum(cfg.is_softmax(i) for i in range(cfg.num_layers))
    gdn = cfg.num_layers - softmax
    others = ranks - 1
    gdn_halo = 2 * (cfg.conv_kernel_size - 1) * frame                  # a rank's first and last frames of u
    # per rank and branch: the span's transition (NA D x D) and its forward and backward states (2 R x D), fp32;
    # main: NA = 2, R = D + 1 (the normaliser); camera: NA = 1, R = D
    maps = video.batch * H * D * ((2 * D + 2 * (D + 1)) + (D + 2 * D)) * 4
    x = video.batch * cfg.in_channels * video.frames * video.tokens * video.value_bytes
    text = video.batch * video.text_tokens * (cfg.caption_channels * video.value_bytes + 8)  # (with the int64 mask)
    return {
        "softmax K/V": others * softmax * 2 * (2 * longest * frame),   # main and camera branches: (K, V) each
        "GDN halos": others * gdn * gdn_halo,
        "GDN maps": others * gdn * maps,
        "FFN halos": others * cfg.num_layers * 2 * (cfg.t_kernel_size // 2) * frame,
        "inputs + velocity": x * (1 + cfg.chunk_plucker_channels / cfg.in_channels) + text
        + others * x * longest // video.frames,
    }


def collectives(cfg: DiTConfig) -> int:
    """Collective calls per sampler step: 2 per softmax block, 2 per GDN block, 1 per FFN, the broadcasts
    (latents, timesteps, text, mask, raymap, Plücker) and the velocity's gather."""
    softmax = sum(cfg.is_softmax(i) for i in range(cfg.num_layers))
    return 2 * softmax + 2 * (cfg.num_layers - softmax) + cfg.num_layers + 6 + 1


def estimate(cfg: DiTConfig, video: Video, ranks: int, one_gpu: float, bandwidth: float, latency: float):
    """(bytes received per GPU, communication s, compute s) of one step on `ranks` GPUs."""
    received = sum(received_bytes(cfg, video, ranks).values())
    longest = math.ceil(video.frames / ranks)
    gdn = sum(not cfg.is_softmax(i) for i in range(cfg.num_layers))
    # the GDN blocks' stream projections (q, k, v and their camera three: 6 C^2 per token of the block's 24 C^2)
    # again for the 2 (K - 1) halo frames
    halo_gemms = gdn * 6 * 2 * (cfg.conv_kernel_size - 1) / (cfg.num_layers * 24 * longest)
    compute = one_gpu * longest / video.frames * (1 + GEMM_SHARE * halo_gemms + SCAN_SHARE)
    return received, received / (bandwidth * 1e9) + latency * 1e-6 * collectives(cfg), compute


def computed_table(args):
    cfg = DiTConfig()
    frames = int(args.frames or 961)
    video = Video((frames - 1) // 8 + 1, 22 * 40, 2, 2)
    print(f"COMPUTED, not measured: DiT step at {frames} frames ({video.frames} latent frames of 22x40), "
          f"bf16, CFG batch 2; one GPU {args.one_gpu} s per step; all-gathers at {args.bandwidth:g} GB/s per GPU "
          f"and {args.latency:g} us each, not overlapped")
    kinds = list(received_bytes(cfg, video, 2))
    print(f"{'GPUs':>4} {'frames':>6} | " + " ".join(f"{k:>17}" for k in kinds) + " |  total GB  comm s  compute s "
          " step s  speed-up")
    for ranks in args.ranks:
        parts = received_bytes(cfg, video, ranks)
        total, comm, compute = estimate(cfg, video, ranks, args.one_gpu, args.bandwidth, args.latency)
        step = comm + compute
        print(f"{ranks:>4} {math.ceil(video.frames / ranks):>6} | "
              + " ".join(f"{parts[k] / 1e9:>14.2f} GB" for k in kinds)
              + f" | {total / 1e9:9.2f} {comm:7.3f} {compute:10.3f} {step:7.3f} {args.one_gpu / step:9.2f}x")


def measured(args):
    """The torchrun mode: one sampler step per --frames on all ranks, and on rank 0 alone."""
    cuda = not args.tiny
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg, hw, text_len = (DiTConfig(), (22, 40), 300) if cuda else (DiTConfig.from_dict(TINY_DIT), (4, 6), 8)
    frame_list = [int(f) for f in (args.frames or ("321,961" if cuda else "25,33")).split(",")]
    torch.set_grad_enabled(False)
    with torch.device("meta"):
        model = DiT(cfg).eval()
    model = randomize_(model.to(dtype).to_empty(device=device))     # the same seed, so the same weights on all ranks
    if cuda:
        import fast
        fast.accelerate(model)
    rows = []
    for frames in frame_list:
        inputs = make_inputs(cfg, 2, frames, hw, text_len, device, dtype)
        latent = inputs[0].shape[2]
        warmup, reps = (1, 3) if latent * hw[0] * hw[1] > 100 * 880 else (2, 5)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds, split = timed(lambda: parallel.velocity(model, *inputs), warmup, reps, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        per_rank = [None] * ranks
        dist.all_gather_object(per_rank, (seconds, peak))
        if rank == 0:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            one, whole = timed(lambda: model(*inputs), warmup, reps, device)
            one_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            slowest = max(s for s, _ in per_rank)
            rows.append(f"{frames:6d} {latent:6d} | {slowest:8.3f} {one:8.3f} {one / slowest:8.2f}x | "
                        + " ".join(f"{p:6.2f}" for _, p in per_rank) + f" | {one_peak:7.2f} | "
                        f"{max_rel_err(split, whole):.1e}")
            print(rows[-1], flush=True)
        dist.barrier()
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "CPU (gloo)"
        print(f"\nMEASURED: DiT sampler step (parallel.velocity), {ranks} x {name}, {str(dtype)[6:]}, CFG batch 2, "
              f"{hw[0]}x{hw[1]} latents, random weights; rel.err = max|split - one GPU| / max|one GPU|")
        print(f"frames latent |  split s  1 GPU s  speed-up | peak GiB per GPU{' ' * max(0, 7 * ranks - 17)} | "
              f"1 GPU GiB | rel.err")
        print("\n".join(rows))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", help="the video's frames, 8k+1 (computed: one count, default 961; torchrun: "
                                    "comma-separated, default 321,961, tiny 25,33)")
    p.add_argument("--ranks", default="2,4,8", help="computed mode: comma-separated GPU counts")
    p.add_argument("--bandwidth", type=float, default=450.0, help="GB/s per GPU per direction (H200 NVLink: 450)")
    p.add_argument("--latency", type=float, default=25.0, help="microseconds per collective call")
    p.add_argument("--one-gpu", type=float, default=6.48, help="seconds of one CFG step on one GPU at --frames")
    p.add_argument("--tiny", action="store_true", help="torchrun mode on the CPU: the tests' tiny config, fp32")
    args = p.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        measured(args)
    else:
        computed_table(args)


if __name__ == "__main__":
    main()
