"""Benchmark of the stage-2 refinement loop (refiner.py `refine`, paper App. A) against diffusers'
`SanaWMLTX2Refiner` on the full-size LTX-2 transformer with random weights, bf16, 161 frames at 704x1280:
latent (1, 128, 21, 22, 40), 7 blocks of 3 frames (29 forwards), sink 1, window 11, random text (1, 1024, 3840).
The text path (Gemma-3 + connectors) runs once per prompt and is not timed here.

Both models share one set of weight tensors: diffusers' full module (audio branch included, 18.9 B parameters) is
built first, and ours (video only, 13.0 B) is loaded from its state dict with assign=True, so no weights are
copied. Each loop gets a 4-frame warm-up, then one timed run; working memory = peak allocated during the run
minus what was allocated before it (KV cache + activations).

Run from the repository root on a CUDA machine (needs diffusers; ~45 GB of GPU memory): python bench/refiner.py
`--tiny` runs the same code on the CPU at tests/reference.py's tiny config (fp32) to check that it runs.
"""
import argparse
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import refiner  # noqa: E402
from reference import randomize_  # noqa: E402

TINY = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
            caption_channels=16, num_layers=2, audio_in_channels=4, audio_out_channels=4,
            audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, rope_type="split")
FULL = dict(rope_type="split")      # diffusers' defaults are LTX-2.0's, except the RoPE layout


def build(kwargs, device, dtype):
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2RefinerTransformer3DModel
    with torch.device("meta"):
        theirs = SanaWMLTX2RefinerTransformer3DModel(**kwargs)
        ours = refiner.Refiner(refiner.RefinerConfig.from_dict(dict(theirs.config)))
    theirs = theirs.to(dtype).to_empty(device=device)      # cast on meta: never a float32 copy of 19 B params
    randomize_(theirs)
    state = theirs.state_dict()
    ours.load_state_dict({k: state[k] for k in ours.state_dict()}, strict=True, assign=True)
    return ours.eval(), theirs.eval()


def diffusers_loop(transformer, text, mask):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.sana_wm.refiner import SanaWMLTX2Refiner
    pipe = SanaWMLTX2Refiner(transformer=transformer, connectors=None, tokenizer=None, text_encoder=None,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    pipe._encode_prompt = lambda prompt, device, dtype: (text, mask)      # the text path is not benchmarked
    return lambda z, g: pipe(z, "", fps=16, generator=g, output_type="latent")


def measure(run, z, device):
    """(seconds, working bytes, output) of one run after a 4-frame warm-up."""
    gen = lambda: torch.Generator(device).manual_seed(42)    # noqa: E731
    run(z[:, :, :4], gen())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = run(z, gen())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    working = torch.cuda.max_memory_allocated() - base if device == "cuda" else float("nan")
    return seconds, working, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny config, fp32")
    args = parser.parse_args()
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    T, h, w = (15, 2, 3) if args.tiny else (21, 22, 40)
    ours, theirs = build(TINY if args.tiny else FULL, device, dtype)
    cfg = ours.cfg
    g = torch.Generator(device).manual_seed(1)
    z = torch.randn(1, cfg.in_channels, T, h, w, generator=g, device=device).to(dtype)
    text = torch.randn(1, 1024, cfg.caption_channels, generator=g, device=device).to(dtype)
    mask = torch.ones(1, 1024, dtype=torch.int64, device=device)
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    ours_run = lambda z, g: refiner.refine(ours, z, text, mask, fps=16, generator=g)    # noqa: E731
    t_ours, m_ours, out_ours = measure(ours_run, z, device)
    t_ref, m_ref, out_ref = measure(diffusers_loop(theirs, text, mask), z, device)
    err = ((out_ours.float() - out_ref.float()).abs().max() / out_ref.float().abs().max()).item()

    blocks = -(-(T - 1) // 3)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in theirs.parameters())
    gb = lambda n: n / 2**30                                   # noqa: E731
    bytes_per = torch.finfo(dtype).bits // 8
    print(f"\nrefiner loop, {'tiny fp32 CPU' if args.tiny else 'full size bf16'}, latent {tuple(z.shape)}, "
          f"{blocks} blocks, {1 + 4 * blocks} forwards; max |ours - diffusers| / max|diffusers| = {err:.1e}")
    print("            total s   s/block  working GiB  weights GiB (params)")
    for name, t, m, n in (("ours", t_ours, m_ours, n_ours), ("diffusers", t_ref, m_ref, n_ref)):
        print(f"{name:10s} {t:8.2f}  {t / blocks:8.3f}  {gb(m):11.2f}  {gb(n * bytes_per):11.2f} ({n / 1e9:.2f} B)")
    print(f"ratio diffusers / ours: time {t_ref / t_ours:.2f}x, working memory {m_ref / m_ours:.2f}x, "
          f"weights {n_ref / n_ours:.2f}x")


if __name__ == "__main__":
    main()
