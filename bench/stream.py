"""Benchmark of streaming stage 1 (the SANA-WM streaming release's chunk-by-chunk sampler): full-size models with
RANDOM weights, bf16, 704x1280, the streaming DiT (dit.forward_chunk with its caches, the official switches, the
CUDA kernels of fast.py) and the causal LTX-2 decoder (vae.CausalDecodeStream), 4 steps + 1 cache pass per
3-latent-frame chunk, CFG 1. Random text embeddings of the release's shape stand in for Gemma-2 (said in the
output). With --refiner, also the LTX-2 refiner in the stream (refiner.RefinerStream: one block of 3 latent frames
per chunk, 3 Euler steps + 1 history pass) on random full-size weights, random (1, 1024, 3840) embeddings standing
in for Gemma-3 + the text connectors, run as generate.py runs it: fast.accelerate_refiner (K/V windows in place, the
text's K/V made once, compiled pointwise pieces); --eager adds rows for the stream as written (refiner.py alone), and
--refiner_precision gives rows for the refiner's block linears in bf16, fp8 and/or nvfp4 (quantize.set_precision on
REFINER_INCLUDE, as generate.py's --refiner_precision; fp8 needs an sm_89+ GPU).

Run from the repository root on a CUDA machine:
    python bench/stream.py                  # 241 and 961 frames
    python bench/stream.py --frames 241     # one length
    python bench/stream.py --refiner        # stage 1 + refiner + decode
    python bench/stream.py --refiner --overlap   # + a row for the overlapped stream (three CUDA streams)
    python bench/stream.py --refiner --frames 241 --eager --refiner_precision bf16,fp8   # eager vs fast, 2 formats
    python bench/stream.py --refiner --frames 241 --sync_debug   # where the overlapped stream waits for the GPU
    python bench/stream.py --tiny           # CPU, the demo's tiny models: checks the script runs
Per length and mode: the real-time factor of the whole stream at 16 fps (seconds of video over wall seconds), the
time to the first (refined) frames on the host, peak GPU memory (torch.cuda.max_memory_allocated, weights included)
and the cache sizes; the clock starts before the refiner's sink capture (model loading, prompt and image encoding
not counted). The sequential row (generate.run_stream's reference loop) also gives the seconds per chunk of each
part (the 5 DiT forwards; the refiner's block; the decode with the copy to the host), from CUDA events between the
parts, and the real-time factor of stage 1 alone; the overlapped row (generate.run_stream(overlap=True)) has no
per-part times: there the parts run at once and share the GPU. Nothing is encoded to mp4 (the CLI's host also
encodes each chunk with libx264).
"""
import argparse
import collections
import contextlib
import dataclasses
import io
import pathlib
import statistics
import sys
import time
import traceback
import warnings

import torch

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import fast  # noqa: E402
import generate as G  # noqa: E402
from dit import OFFICIAL_SWITCHES, DiT, DiTConfig  # noqa: E402
from reference import randomize_  # noqa: E402
from quantize import PRECISIONS, REFINER_EXCLUDE, REFINER_INCLUDE, set_precision  # noqa: E402
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


class PartClock:
    """Marks between the parts of the sequential stream: CUDA events on the current stream (the loop does not wait
    for them; read at the end), or the host's clock on the CPU (where each op finishes before the next)."""

    def __init__(self, device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, parts: int) -> list[list[float]]:
        """Per part, its seconds in each chunk (one mark before the first chunk, then one after each part)."""
        if self.cuda:
            torch.cuda.synchronize()
            between = [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        else:
            between = [b - a for a, b in zip(self.marks, self.marks[1:])]
        per_chunk = [between[i:i + parts] for i in range(0, len(between), parts)]
        return [list(part) for part in zip(*per_chunk)]


def stream_inputs(dit, frames, size, device, dtype):
    """Noise (its frame 0 stands in for the image latent), random text of Gemma-2's shape, the camera of a walk."""
    T, (H, W) = (frames - 1) // 8 + 1, size
    g = torch.Generator().manual_seed(42)
    x = torch.randn(1, dit.config.in_channels, T, H // 32, W // 32, generator=g).to(device, dtype)
    text = torch.randn(1, 300, dit.config.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(1, 300, dtype=torch.long, device=device)
    raymap, plucker = G.camera.prepare_camera(G.camera.action_to_c2w(f"w-{frames - 1}"),
                                              [W * 0.8, W * 0.8, W / 2, H / 2], size=(H, W))
    return x, text, mask, raymap[None].to(device, dtype), plucker[None].to(device, dtype)


def refiner_runner(refiner, x, device, dtype, eager=False):
    """The refiner's stream (its sink captured: one forward), random embeddings of the connectors' output shape;
    accelerated (fast.accelerate_refiner) unless eager."""
    if refiner is None:
        return None
    rtext = torch.randn(1, 1024, refiner.cfg.caption_channels, generator=torch.Generator().manual_seed(43))
    runner = RefinerStream(refiner, x[:, :, :1], rtext.to(device, dtype), torch.ones(1, 1024, dtype=torch.long,
                           device=device), fps=FPS, generator=torch.Generator(device).manual_seed(42))
    return runner if eager else fast.accelerate_refiner(runner)


@torch.no_grad()
def run(dit, vae, frames, size, device, dtype, refiner=None, overlap=False, eager=False):
    """One stream: overlap=False the sequential loop of generate.run_stream (refine_chunk, chunk_frames, the frames
    copied to the host), with marks between the parts; overlap=True generate.run_stream on three CUDA streams
    (its progress lines silenced). The clock starts before the refiner's sink capture; nothing is encoded."""
    x, text, mask, raymap, plucker = stream_inputs(dit, frames, size, device, dtype)
    caches = []
    forward_chunk = G.forward_chunk
    G.forward_chunk = lambda *a, **k: caches.append(k["cache"]) or forward_chunk(*a, **k)  # keep the cache to size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_frame, written, chunks_written, clock = None, 0, 0, PartClock(device)

    def write(video):
        nonlocal first_frame, written, chunks_written
        written, chunks_written = written + len(video), chunks_written + 1
        first_frame = time.perf_counter() - start if first_frame is None else first_frame

    sync(device)
    start = time.perf_counter()
    runner = refiner_runner(refiner, x, device, dtype, eager)
    chunks = G.stream_sample(dit, x, text, mask, raymap, plucker)
    decoder = CausalDecodeStream(vae)
    latents = x.new_empty(x.shape)
    if overlap:
        with contextlib.redirect_stderr(io.StringIO()):
            G.run_stream(chunks, runner, decoder, write, latents, fps=FPS, overlap=True)
    else:
        clock.mark()
        for s, e, z in chunks:  # run_stream's loop, the parts marked: stage 1 (in next), refiner, decode
            clock.mark()
            z = G.refine_chunk(runner, s, z)
            clock.mark()
            write(G.chunk_frames(decoder, s, z).cpu())
            clock.mark()
    sync(device)
    total = time.perf_counter() - start
    G.forward_chunk = forward_chunk
    assert written == frames - 1, (written, frames)
    seconds = (frames - 1) / FPS
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    row = dict(mode="overlapped" if overlap else "sequential", frames=frames, chunks=chunks_written,
               first_frame=first_frame, rt_total=seconds / total, peak=peak,
               cache_gib=tensor_bytes(caches[-1].blocks) / 2 ** 30)
    if not overlap:
        stage1, refine, decode = clock.seconds(3)
        steady = lambda ts: statistics.median(ts[1:] or ts)  # noqa: E731
        row.update(stage1_chunk=steady(stage1), first_chunk=stage1[0], refine_chunk=steady(refine),
                   decode_chunk=steady(decode), rt_stage1=seconds / sum(stage1))
    return row


@torch.no_grad()
def profile(dit, frames, size, device, dtype, refiner=None, eager=False):
    """The kernels of one chunk's 5 forwards (the 4th chunk: the softmax window full), by total GPU time; with a
    refiner, then the kernels of its 4th block."""
    x, text, mask, raymap, plucker = stream_inputs(dit, frames, size, device, dtype)
    chunks = G.stream_sample(dit, x, text, mask, raymap, plucker)
    for _ in range(3):
        next(chunks)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        next(chunks)
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    if refiner is None:
        return
    runner = refiner_runner(refiner, x, device, dtype, eager)
    for i in range(3):
        runner.refine(x[:, :, 1 + 3 * i:4 + 3 * i])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.refine(x[:, :, 10:13])
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


def find_syncs(dit, vae, frames, size, device, dtype, refiner=None, eager=False):
    """Where the overlapped stream makes the host wait for the GPU without being asked (a read-back, a blocking
    copy: torch.cuda.set_sync_debug_mode), each such wait a gap in what the host enqueues: per call site (the
    innermost line of the project's files) over one stream, with its count. Explicit waits (the end of the
    stream) are not listed."""
    sites = collections.Counter()

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1]
                if f.filename.startswith(str(ROOT)) and pathlib.Path(f.filename).resolve() != HERE]
        site = ours[-1] if ours else None
        sites[f"{pathlib.Path(site.filename).name}:{site.lineno} {site.name}: {site.line}" if site
              else f"{filename}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            run(dit, vae, frames, size, device, dtype, refiner, overlap=True, eager=eager)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    print(f"\nimplicit waits for the GPU in the overlapped stream of {frames} frames (count, site):")
    for site, count in sites.most_common():
        print(f"{count:6d}  {site}")
    if not sites:
        print("  none" + (" (on the CPU there is nothing to wait for)" if device.type != "cuda" else ""))


def precisions(value: str) -> list[str]:
    """--refiner_precision's comma-separated list."""
    names, known = value.split(","), ("bf16",) + PRECISIONS     # quantize.py's formats, and none
    if any(n not in known for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(known)}, got {value!r}")
    return names


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default="241,961", help="comma-separated frame counts 24k+1")
    p.add_argument("--tiny", action="store_true", help="CPU, the demo's tiny models (checks the script)")
    p.add_argument("--profile", action="store_true", help="also profile the 5 forwards of one chunk (the 4th)")
    p.add_argument("--refiner", action="store_true", help="refine each chunk in the stream (random LTX-2 refiner)")
    p.add_argument("--overlap", action="store_true",
                   help="also run the overlapped stream (three CUDA streams), a row beside the sequential one")
    p.add_argument("--refiner_precision", type=precisions, default=["bf16"], metavar="P[,P...]",
                   help="with --refiner: rows for the refiner's block linears in each of bf16, fp8, nvfp4 "
                        "(comma-separated; fp8 needs an sm_89+ GPU)")
    p.add_argument("--eager", action="store_true",
                   help="with --refiner: also rows for the refiner's stream as written (no fast.accelerate_refiner)")
    p.add_argument("--sync_debug", action="store_true",
                   help="list where the overlapped stream waits for the GPU implicitly (one run of the first length)")
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
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {str(dtype)[6:]}; text: random embeddings (1, 300, "
          f"{dit_cfg.caption_channels}) stand in for Gemma-2; switches {OFFICIAL_SWITCHES}", flush=True)
    if args.refiner:
        print("refiner: random weights; random (1, 1024, 3840) embeddings stand in for Gemma-3 + connectors")
    rows = []
    for precision in args.refiner_precision if args.refiner else [None]:
        refiner = None
        if precision is not None:  # one refiner at a time on the device: the previous one is freed first
            refiner = random_model(Refiner, refiner_cfg, device, dtype, seed=3)
            set_precision(refiner, precision, REFINER_INCLUDE, REFINER_EXCLUDE)
        for eager in ((False, True) if args.eager and args.refiner else (False,)):
            label = "-" if refiner is None else f"{precision} {'eager' if eager else 'fast'}"
            run(dit, vae, frames[0], size, device, dtype, refiner, eager=eager)  # warm-up: compiles kernels, pieces
            rows += [dict(run(dit, vae, f, size, device, dtype, refiner, overlap, eager), refiner=label)
                     for f in frames for overlap in ((False, True) if args.overlap else (False,))]
            if len(rows) == len(frames) * (1 + args.overlap):  # with the first refiner variant only
                if args.sync_debug:
                    find_syncs(dit, vae, frames[0], size, device, dtype, refiner, eager)
                if args.profile:
                    profile(dit, max(frames[0], 121), size, device, dtype, refiner, eager)  # 5 chunks at least
        del refiner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\nrefiner     mode       frames chunks | stage-1 s/chunk (first) | refiner s/chunk | decode s/chunk | "
          "first frame s | real time: stage 1, all | peak GiB | cache GiB")
    for r in rows:
        if r["mode"] == "sequential":
            parts = (f"{r['stage1_chunk']:8.3f} ({r['first_chunk']:6.3f})      | {r['refine_chunk']:8.3f}        | "
                     f"{r['decode_chunk']:8.3f}       |", f"{r['rt_stage1']:6.2f}x")
        else:
            parts = f"{'-':>8s} {'':8s}      | {'-':>8s}        | {'-':>8s}       |", f"{'-':>6s} "
        print(f"{r['refiner']:11s} {r['mode']:10s} {r['frames']:6d} {r['chunks']:6d} | {parts[0]} "
              f"{r['first_frame']:8.3f}      | {parts[1]} {r['rt_total']:6.2f}x        | {r['peak']:7.2f}  | "
              f"{r['cache_gib']:6.3f}")
    print("per part: the median over chunks after the first, from CUDA events between the parts of the sequential "
          "loop;\nmeaningful there only: in the overlapped stream the parts run at once and share the GPU. first "
          "frame:\nseconds from the start (the refiner's sink capture included) to the first frames on the host. "
          "real time:\nseconds of video (16 fps) over wall seconds. Peak: max_memory_allocated, weights included.")

if __name__ == "__main__":
    main()
