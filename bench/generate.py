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

Memory runs (issue 22), `--gpu_memory G [G ...]`: one run per budget, each with generate.py --gpu_memory's plan
(generate.plan_memory: --offload, --low_memory, the DiT / Gemma-3 / refiner blocks streamed from pinned host memory)
and the caching allocator capped at G GiB (torch.cuda.set_per_process_memory_fraction: a card of G GiB, emulated; a
real one keeps ~1 GiB for the CUDA context outside the cap, which the plan's margin allows for); `none` is the
unconstrained run (no cap, every model on the GPU: generate.py's defaults). The TEXT ENCODERS RUN at their real
sizes here, with random weights: Gemma-2-2b (transformers' Gemma2Model) for stage 1, Gemma-3-12B
(Gemma3ForConditionalGeneration, vision tower included) + the refiner's text connectors for stage 2 (--refiner),
from transformers configs of the released sizes, built on the meta device and drawn on the GPU; Gemma-3 and the
refiner are then kept in host memory, and each run loads fresh copies from there as the CLI loads the release (to
the GPU, or to the host to be streamed). A word-level demo tokenizer stands in for Gemma's (the prompt's length
stays the recipe's: 300 tokens for Gemma-2, 1024 for Gemma-3). Per run: the plan, s/step, the refiner loop,
decode, each stage's peak (Gemma-3's prompt encoding apart) and the peak over the whole run, the wall time of the
generate() call (models already built; the stage-2 models loaded inside it) and its ratio to the unconstrained run's.
    python bench/generate.py --refiner --frames 961 --steps 2 --gpu_memory none 24   # issue 22: <= 24 GiB, <= 1.3x
    python bench/generate.py --frames 961 --steps 2 --gpu_memory 8                   # stage 1 + decode <= 8 GiB
    python bench/generate.py --tiny --refiner --gpu_memory none 24 16                # CPU: the plans on tiny models

Precision (issue 22), `--stage1_precision` / `--refiner_precision` bf16|fp8|nvfp4: the random DiT's / refiner's block
linears quantised as generate.py's flags quantise them (quantize.set_precision on PRESETS["default"] /
REFINER_INCLUDE; fp8 needs an sm_89+ GPU, --tiny runs quantize.py's torch reference on the CPU), in every run, and
passed to the --gpu_memory plans:
    python bench/generate.py --refiner --frames 961 --steps 2 --gpu_memory none 16 --stage1_precision fp8 \
        --refiner_precision fp8                                                     # issue 22: <= 16 GiB in fp8
"""
import argparse
import copy
import math
import pathlib
import sys
import time

import torch
import torch.nn as nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import generate as G  # noqa: E402
from dit import DiT, DiTConfig  # noqa: E402
from quantize import PRESETS, REFINER_EXCLUDE, REFINER_INCLUDE, set_precision  # noqa: E402
from reference import randomize_  # noqa: E402
from refiner import ConnectorsConfig, PromptEncoder, Refiner, RefinerConfig, TextConnectors  # noqa: E402
from vae import VAE, VAEConfig  # noqa: E402


def random_model(cls, cfg, device, dtype, seed):
    """Built on the meta device, cast there (no float32 copy of the weights ever exists), then materialised on
    `device` and drawn at random."""
    with torch.device("meta"):
        model = cls(cfg)
    return randomize_(model.to(dtype).to_empty(device=device), seed).eval()


def random_refiner(cfg: RefinerConfig, device, dtype, precision: str) -> Refiner:
    """The random-weight video-only refiner, its blocks' linears in `precision` (as --refiner_precision makes them)."""
    model = random_model(Refiner, cfg, device, dtype, seed=4)
    set_precision(model, precision, REFINER_INCLUDE, REFINER_EXCLUDE)
    return model


def random_stage2(cfg: RefinerConfig, text_length: int, device, dtype, precision: str) -> G.Stage2:
    """Stage 2 with random text embeddings in place of Gemma-3 + connectors, and a random-weight video-only refiner
    (random_refiner) built when generate() asks for it (after the stage-1 models have left the GPU)."""
    def encode(prompt: str):
        g = torch.Generator(device).manual_seed(3)
        text = torch.randn(1, text_length, cfg.caption_channels, generator=g, device=device, dtype=dtype)
        return text, torch.ones(1, text_length, dtype=torch.int64, device=device)
    return G.Stage2(lambda: encode, lambda: random_refiner(cfg, device, dtype, precision))


def budget(value: str):
    """--gpu_memory's values: GiB, or none (the unconstrained run)."""
    if value == "none":
        return None
    gib = float(value)
    if not (math.isfinite(gib) and gib > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB or none, got {value!r}")
    return gib


def twin(model: nn.Module) -> nn.Module:
    """A copy of `model` on the same tensors, with Parameter objects of its own: a run may move or stream it without
    touching `model` (the host copy kept for the next run); buffers are shared (a move replaces them, not changes)."""
    memo = {id(p): nn.Parameter(p.data, p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def real_text_encoders(tiny: bool, device, dtype):
    """(tokenizer, Gemma-2 decoder on `device`, stage-2 prompt encoder in host memory): the released sizes with
    random weights (tiny: the demo's models). The big ones are drawn on the GPU, then moved to the host."""
    import transformers

    if tiny:
        tokenizer, gemma2 = G.demo_text_encoder(hidden_size=G.DEMO_DIT.caption_channels)
        return tokenizer, gemma2, G.demo_refiner().load_prompt_encoder()
    tokenizer = G.demo_tokenizer()
    gemma2_cfg = transformers.Gemma2Config(  # google/gemma-2-2b-it
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    gemma3_cfg = transformers.Gemma3Config(  # google/gemma-3-12b-it, as the refiner's text_encoder/
        text_config=dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                         sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=896, patch_size=14), mm_tokens_per_image=256)
    built = []
    for cls, cfg, seed in ((transformers.Gemma2Model, gemma2_cfg, 5), (transformers.Gemma3ForConditionalGeneration,
                                                                          gemma3_cfg, 6)):
        with torch.device("meta"):
            model = cls(cfg)
        built.append(randomize_(model.to(dtype).to_empty(device=device), seed).eval())
    connectors = random_model(TextConnectors, ConnectorsConfig(), device, dtype, seed=7)
    return tokenizer, built[0], PromptEncoder(tokenizer, built[1].cpu(), connectors.cpu())


def memory_runs(args, dit, vae, device, dtype, common, refiner_cfg):
    """The runs of --gpu_memory (the module docstring); returns the table's rows."""
    tokenizer, gemma2, encoder = real_text_encoders(args.tiny, device, dtype)
    refiner_host = random_refiner(refiner_cfg, device, dtype, args.refiner_precision).cpu() if args.refiner else None
    G._free_memory(device)
    total = torch.cuda.get_device_properties(device).total_memory if device == "cuda" else None
    rows, unconstrained = [], None
    for gib in args.gpu_memory:
        plan = None if gib is None else G.plan_memory(gib, args.frames, refiner=args.refiner,
                                                      stage1_precision=args.stage1_precision,
                                                      refiner_precision=args.refiner_precision)
        name = "unconstrained" if plan is None else f"{gib:g} GiB"
        print(f"# {name}: " + ("no cap, every model on the GPU" if plan is None else plan.describe()))
        offload = plan is not None and plan.offload
        for model in (dit, vae, gemma2):
            model.to("cpu" if offload else device)
        G._free_memory(device)
        if total is not None:
            torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * 2**30 / total))
        settings = dict(offload=offload, part_frames=plan and plan.part_frames,
                        stream_dit_blocks=plan.dit_streamed if plan else 0)
        stage2 = None
        if args.refiner:  # loaded from the host copies, as the CLI loads the release (Gemma-3's vision tower stays)
            host = G.Stage2(lambda: PromptEncoder(tokenizer, twin(encoder.text_encoder), twin(encoder.connectors)),
                            lambda: twin(refiner_host))
            stage2 = G.stream_stage2(host, device, *((plan.gemma3_streamed, plan.refiner_streamed) if plan else (0, 0)))
        try:
            G.generate(dit, vae, tokenizer, gemma2, common["image"], G.DEMO_PROMPT, steps=1, decode=False,
                       **settings, **common["kwargs"])  # warm-up: compiles this plan's kernels
            G._free_memory(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            r = G.generate(dit, vae, tokenizer, gemma2, common["image"], G.DEMO_PROMPT, refiner=stage2,
                           steps=args.steps, **settings, **common["kwargs"])
            wall = time.perf_counter() - start
            # generate() resets the peak counter at each stage's end (GenerateResult.peak_memory_gib): the whole
            # run's peak is the largest stage's, or what came after the last stage.
            peak = max(torch.cuda.max_memory_allocated() / 2**30, *r.peak_memory_gib.values()) \
                if device == "cuda" else None
        except torch.OutOfMemoryError as e:
            r, failure = None, str(e).splitlines()[0]
        G._free_memory(device)
        if r is None:
            print(f"# {name}: out of GPU memory ({failure})")
            rows.append((name, "OOM") + ("",) * 9)
            continue
        unconstrained = wall if plan is None else unconstrained
        blocks = math.ceil(((args.frames - 1) // 8) / 3)
        mem = {k: f"{v:.1f}" for k, v in r.peak_memory_gib.items()}
        rows.append((name, f"{r.seconds_per_step:.2f}",
                     f"{r.refine_seconds:.1f} ({r.refine_seconds / blocks:.2f}/block)" if args.refiner else "-",
                     f"{r.decode_seconds:.1f}", mem.get("stage 1", "-"), mem.get("refiner prompt", "-"),
                     mem.get("stage 2", "-"), mem.get("decode", "-"), "-" if peak is None else f"{peak:.1f}",
                     f"{wall:.1f}", f"{wall / unconstrained:.2f}x" if unconstrained else "-"))
    if total is not None:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refiner", action="store_true",
                   help="also run stage 2 (in the no-offload run; in every --gpu_memory run)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with the demo's tiny models")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--frames", type=int, default=161)
    p.add_argument("--gpu_memory", type=budget, nargs="+", metavar="GiB",
                   help="memory runs (issue 22), one per budget: GiB, or none for the unconstrained run; the text "
                        "encoders at their real sizes")
    for flag, model in (("--stage1_precision", "DiT"), ("--refiner_precision", "refiner")):
        p.add_argument(flag, choices=("bf16", "fp8", "nvfp4"), default="bf16",
                       help=f"the {model}'s block linears, as generate.py's flag (fp8: an sm_89+ GPU)")
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
    params = sum(t.numel() for t in dit.parameters()) / 1e9  # (before quantisation turns weights into buffers)
    set_precision(dit, args.stage1_precision, *PRESETS["default"])
    vae = random_model(VAE, vae_cfg, device, dtype, seed=2)
    tokenizer, text_encoder = G.demo_text_encoder(hidden_size=dit_cfg.caption_channels)
    text_encoder = text_encoder.to(device, dtype)
    build = time.perf_counter() - start
    params = params, sum(t.numel() for t in vae.parameters()) / 1e9
    precisions = f"DiT blocks {args.stage1_precision}" + f", refiner blocks {args.refiner_precision}" * args.refiner
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# {device_name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}; RANDOM weights: DiT "
          f"{params[0]:.3g} B + VAE {params[1]:.3g} B parameters, built in {build:.1f} s; {precisions}")

    image = G.demo_image(H, W)
    fx = W / (2 * math.tan(math.radians(G.DEFAULT_FOV_DEG) / 2))
    moves = frames - 1  # camera: forward, then forward while turning left
    common = dict(action=f"w-{moves // 2},jw-{moves - moves // 2}", intrinsics=[fx, fx, W / 2, H / 2],
                  num_frames=frames, guidance_scale=5.0, negative_prompt="blurry", height=H, width=W, device=device)
    if args.gpu_memory:
        print("# TEXT ENCODERS AT REAL SIZES, RANDOM weights: Gemma-2-2b, Gemma-3-12B + connectors"
              + (" (--tiny: the demo's)" if args.tiny else ""))
        args.frames = frames
        rows = memory_runs(args, dit, vae, device, dtype, dict(image=image, kwargs=common), refiner_cfg)
        header = ("run", "s/step", "refine s", "decode s", "peak GiB st.1", "Gemma-3", "refiner", "decode",
                  "whole run", "wall s", "wall / unconstrained")
        print_table(f"bench/generate.py --gpu_memory: {frames} frames, {args.steps} steps, guidance 5, "
                    f"{device_name}, RANDOM weights, {precisions}, text encoders "
                    + ("the demo's (--tiny)" if args.tiny else "at real sizes"), header, rows)
        return
    print(f"# TEXT ENCODERS SKIPPED: a 2-layer random Gemma-2 stands in (random text embeddings (1, 300, "
          f"{dit_cfg.caption_channels})); stage 2 reads random (1, {refiner_text}, {refiner_cfg.caption_channels}) "
          f"embeddings instead of Gemma-3 + connectors")

    # Warm-up: the Triton kernels compile on their first call, at these very shapes.
    G.generate(dit, vae, tokenizer, text_encoder, image, G.DEMO_PROMPT, steps=1, decode=False, **common)

    rows = []
    for offload in (False, True):
        stage2 = random_stage2(refiner_cfg, refiner_text, device, dtype, args.refiner_precision) \
            if args.refiner and not offload else None
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
    print_table(f"bench/generate.py: {frames} frames, {args.steps} steps, guidance 5, {device_name}, RANDOM weights, "
                f"{precisions}, text encoders skipped", header, rows)


def print_table(title: str, header, rows):
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
