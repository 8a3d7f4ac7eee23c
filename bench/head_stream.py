"""Benchmark of the fused per-head streams (attention.head_stream, one Triton kernel) against the same streams as
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
import torch.nn.functional as F
from triton.testing import do_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import attention  # noqa: E402
from attention import RMSNorm, apply_rope, head_stream, rms_cap, rope_table, camera_rope_table, ucpe  # noqa: E402
from gdn import short_conv  # noqa: E402
from reference import max_rel_err  # noqa: E402

H, D, K = 20, 112, 4
C = H * D
TUNE = [(1, 4, 1), (2, 2, 1), (2, 4, 1), (2, 4, 2), (4, 2, 2), (4, 4, 4), (8, 2, 4), (16, 1, 4)]  # tokens, heads, warps


def streams(x, S, T, rope, rope_cam, P, norm, taps, scale):
    """{name: (readable function, fused function)} of x (B, N, H, D); each returns a tuple of tensors."""
    B, N = x.shape[:2]
    conv = (taps, T, None, 0)

    def gdn_k(x):
        k = F.relu(norm(short_conv(x.reshape(B, N, C), taps, T))).view(B, N, H, D) * scale
        return apply_rope(k, rope), k

    def cam_k(x):
        kc = F.relu(norm(short_conv(x.reshape(B, N, C), taps, T))).view(B, N, H, D) * scale
        kh = rms_cap(kc, ucpe(kc, P, rope_cam))
        return kh, (kh.norm(dim=-1).clamp_min(1e-6) / kc.norm(dim=-1).clamp_min(1e-6)) ** 2

    def plain_relu(x):
        return F.relu(norm(x.reshape(B, N, C))).view(B, N, H, D)

    return {
        "gdn q (norm, ReLU, RoPE; + plain)": (
            lambda x: (apply_rope(plain_relu(x), rope), plain_relu(x)),
            lambda x: head_stream(x, rope, norm=norm, relu=True, keep_plain=True)[:2]),
        "gdn k (+ short conv, scale)": (gdn_k, lambda x: head_stream(x, rope, norm=norm, relu=True, scale=scale,
                                                                       conv=conv, keep_plain=True)[:2]),
        "softmax q (norm, RoPE)": (lambda x: (apply_rope(norm(x.reshape(B, N, C)).view(B, N, H, D), rope),),
                                   lambda x: head_stream(x, rope, norm=norm)[:1]),
        "camera q (norm, ReLU, UCPE, cap)": (lambda x: (rms_cap(plain_relu(x), ucpe(plain_relu(x), P, rope_cam)),),
                                             lambda x: head_stream(x, rope_cam, norm=norm, relu=True, matrix=P,
                                                                   cap=True)[:1]),
        "camera k (+ conv, inflation)": (cam_k, lambda x: head_stream(x, rope_cam, norm=norm, relu=True, scale=scale,
                                                                      conv=conv, matrix=P, cap=True,
                                                                      inflation=True)[::2]),
        "camera v (UCPE, cap)": (lambda x: (rms_cap(x, ucpe(x, P, rope_cam)),),
                                 lambda x: head_stream(x, rope_cam, matrix=P, cap=True)[:1]),
        "camera decode (UCPE^-1)": (lambda x: (ucpe(x, P, rope_cam, conjugate=True),),
                                    lambda x: head_stream(x, rope_cam, matrix=P, conjugate=True)[:1]),
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
    for name, (readable, fused) in streams(x, S, T, rope, rope_cam, P, norm, taps, scale).items():
        compiled = torch.compile(readable, dynamic=False, options={"layout_optimization": False})
        expected, got = compiled(x), fused(x)
        err = max(max_rel_err(a.float(), b.float()) for a, b in zip(got, expected))
        t_ref = do_bench(lambda: compiled(x), warmup=25, rep=200, return_mode="median")
        t_ours = do_bench(lambda: fused(x), warmup=25, rep=200, return_mode="median")
        moved = x.numel() * 2 + sum(o.numel() * o.element_size() for o in got)
        rows.append(f"{name:36s} | {t_ref:8.3f} {t_ours:8.3f} {t_ref / t_ours:6.2f}x | {moved / t_ours / 1e6:6.0f} | "
                    f"{err:.1e}")
        print(rows[-1], flush=True)
        if args.tune:
            default = dict(attention.HEAD_STREAM_LAUNCH)
            for tokens, heads, warps in TUNE:
                attention.HEAD_STREAM_LAUNCH.update(tokens=tokens, heads=heads, warps=warps)
                ms = do_bench(lambda: fused(x), warmup=10, rep=100, return_mode="median")
                print(f"    tokens {tokens:2d} heads {heads} warps {warps}: {ms:.3f} ms", flush=True)
            attention.HEAD_STREAM_LAUNCH.update(default)
    print(f"\nper-head streams, {torch.cuda.get_device_name()}, bf16, {args.frames} frames (N={N}, 20 x 112)")
    print(f"{'stream':36s} | compiled    fused  ratio |   GB/s | rel.err")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
