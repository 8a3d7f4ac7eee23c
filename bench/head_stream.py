"""Benchmark of the fused per-head streams (fast.head_stream, one Triton kernel) against the same streams as
the readable code compiled by torch.compile (what the DiT blocks ran before), at the release's 961-frame shape:
B=1, N=121*880 tokens, 20 heads of 112, bf16, the GDN and softmax layers' seven streams.

Run on a CUDA machine from the repository root: python bench/head_stream.py [--frames 961] [--tune]
Per stream: median ms of both, the fewest bytes it must move (input read once, outputs written once; the short
conv's neighbouring frames and the per-token tables not counted) over our time, and max|ours - compiled| / max|.|.
--tune: also times the kernel's launch variants (tokens and heads per program, warps).
"""
import argparse
import pathlib
import sys

import torch
from triton.testing import do_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import fast  # noqa: E402
from attention import RMSNorm, rope_table, camera_rope_table  # noqa: E402
from fast import head_stream  # noqa: E402
from reference import max_rel_err, readable_stream  # noqa: E402

H, D, K = 20, 112, 4
C = H * D
TUNE = [(1, 4, 1), (2, 2, 1), (2, 4, 1), (2, 4, 2), (4, 2, 2), (4, 4, 4), (8, 2, 4), (16, 1, 4)]  # tokens, heads, warps


def streams(T, rope, rope_cam, P, norm, taps, scale):
    """{name: head_stream's arguments besides x} of the layers' seven streams (gdn.py, attention.py)."""
    conv = (taps, T, None, 0)
    camera = dict(table=rope_cam, matrix=P, cap=True)
    return {
        "gdn q (norm, ReLU, RoPE; + plain)": dict(table=rope, norm=norm, relu=True, keep_plain=True),
        "gdn k (+ short conv, scale)": dict(table=rope, norm=norm, relu=True, scale=scale, conv=conv, keep_plain=True),
        "softmax q (norm, RoPE)": dict(table=rope, norm=norm),
        "camera q (norm, ReLU, UCPE, cap)": dict(camera, norm=norm, relu=True),
        "camera k (+ conv, inflation)": dict(camera, norm=norm, relu=True, scale=scale, conv=conv, inflation=True),
        "camera v (UCPE, cap)": camera,
        "camera decode (UCPE^-1)": dict(table=rope_cam, matrix=P, conjugate=True),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=961)
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    T, (h, w) = (args.frames - 1) // 8 + 1, (22, 40)
    S, N = h * w, T * h * w
    gen = torch.Generator("cuda").manual_seed(0)
    qkv = torch.randn(1, N, 3, H, D, device="cuda", generator=gen).bfloat16()
    x = qkv[:, :, 0]                                        # a view of a fused projection, as in the model
    rope = rope_table(D, (T, h, w), "cuda")
    rope_cam = camera_rope_table(rope, D).contiguous()
    P = (torch.eye(4, device="cuda") + 0.3 * torch.randn(1, N, 4, 4, device="cuda", generator=gen)).bfloat16()
    norm = RMSNorm(C, 1e-5).cuda().bfloat16()
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    taps = (0.5 * torch.randn(C, 1, K, device="cuda", generator=gen)).bfloat16()
    scale = D ** -0.5 * S ** -0.5
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.frames} frames, N={N}", flush=True)
    rows = []
    for name, kwargs in streams(T, rope, rope_cam, P, norm, taps, scale).items():
        fused = lambda x: [o for o in head_stream(x, **kwargs) if o is not None]  # noqa: E731
        readable = {k: v for k, v in kwargs.items() if k not in ("keep_plain", "inflation")}
        kept = [True, kwargs.get("keep_plain", False), kwargs.get("inflation", False)]
        compiled = torch.compile(lambda x: [o for o, keep in zip(readable_stream(x, **readable), kept) if keep],
                                 dynamic=False, options={"layout_optimization": False})
        expected, got = compiled(x), fused(x)
        err = max(max_rel_err(a.float(), b.float()) for a, b in zip(got, expected))
        t_ref = do_bench(lambda: compiled(x), warmup=25, rep=200, return_mode="median")
        t_ours = do_bench(lambda: fused(x), warmup=25, rep=200, return_mode="median")
        moved = x.numel() * 2 + sum(o.numel() * o.element_size() for o in got)
        rows.append(f"{name:36s} | {t_ref:8.3f} {t_ours:8.3f} {t_ref / t_ours:6.2f}x | {moved / t_ours / 1e6:6.0f} | "
                    f"{err:.1e}")
        print(rows[-1], flush=True)
        if args.tune:
            default = dict(fast.HEAD_STREAM_LAUNCH)
            for tokens, heads, warps in TUNE:
                fast.HEAD_STREAM_LAUNCH.update(tokens=tokens, heads=heads, warps=warps)
                ms = do_bench(lambda: fused(x), warmup=10, rep=100, return_mode="median")
                print(f"    tokens {tokens:2d} heads {heads} warps {warps}: {ms:.3f} ms", flush=True)
            fast.HEAD_STREAM_LAUNCH.update(default)
    print(f"\nper-head streams, {torch.cuda.get_device_name()}, bf16, {args.frames} frames (N={N}, 20 x 112)")
    print(f"{'stream':36s} | compiled    fused  ratio |   GB/s | rel.err")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
