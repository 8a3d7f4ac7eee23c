"""Benchmark of the frame-wise GDN scan (gdn.py, paper Eq. 3): ours (Triton) against diffusers' bidirectional
`torch_chunk_sana_gdn` path (two scans + flip_and_shift + division, as SanaWMBidirectionalGDNAttention runs it),
forward and forward+backward, bf16 inputs, B=1, H=20, D=112, S=880 (704x1280 video), T in {11, 41, 121}.

Run on a CUDA machine from the repository root (needs diffusers): python bench/gdn.py
Prints the device's copy bandwidth (a large device-to-device copy, bytes read + written) and, per T, the median
times, the ratio diffusers / ours, and our forward's effective bandwidth: the fewest bytes the forward must move
(q_rot, k_rot, v, q, k, beta read once, the output written once) over its time.
"""
import pathlib
import sys

import torch
from triton.testing import do_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import gdn  # noqa: E402
from reference import diffusers_gdn_bidirectional  # noqa: E402

B, H, D, S = 1, 20, 112, 880


def copy_bandwidth_gbs(nbytes=4 << 30):
    x = torch.randn(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=500, return_mode="median")
    return 2 * nbytes / ms / 1e6


def make_inputs(T, seed=0):
    """Release-like bf16 inputs: q_rot, k_rot, v, beta, decay (float32), q, k; keys scaled by 1/sqrt(D*S)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, T * S, H, D)
    r = lambda scale=1.0: (torch.randn(shape, generator=gen, device="cuda") * scale).bfloat16()  # noqa: E731
    scale = (D * S) ** -0.5
    q_rot, k_rot, v = r(), r(scale), r()
    q, k = r().relu(), r(scale).relu()
    beta = torch.rand(B, T * S, H, generator=gen, device="cuda").bfloat16()
    decay = 0.5 + 0.5 * torch.rand(B, T, H, generator=gen, device="cuda")
    return [q_rot, k_rot, v, beta, decay, q, k]


def forward_backward(fn, args, weight):
    leaves = [x.detach().requires_grad_() for x in args]
    return lambda: torch.autograd.grad(fn(*leaves), leaves, weight)


def main():
    ours = lambda *a: gdn.gdn_scan(*a, backend="triton")  # noqa: E731
    bench = lambda f, rep: do_bench(f, warmup=rep // 4, rep=rep, return_mode="median")  # noqa: E731
    copy = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {copy:.0f} GB/s")
    rows = []
    for T in (11, 41, 121):
        args = make_inputs(T)
        weight = torch.randn_like(args[2])
        with torch.no_grad():
            ref = diffusers_gdn_bidirectional(*args)
            err = (ours(*args).float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
            del ref
            fwd = (bench(lambda: ours(*args), 200), bench(lambda: diffusers_gdn_bidirectional(*args), 1000))
        both = (bench(forward_backward(ours, args, weight), 500),
                bench(forward_backward(diffusers_gdn_bidirectional, args, weight), 2000))
        nbytes = sum(x.numel() * x.element_size() for x in args) + args[2].numel() * 2
        rows.append((T, err, *fwd, *both, nbytes / fwd[0] / 1e6))
        del args, weight
        torch.cuda.empty_cache()
    print(f"\nGDN scan, bf16, B={B} H={H} D={D} S={S}; median ms; ratio = diffusers / ours")
    print("   T  rel.err |  fwd ours  diffusers  ratio | fwd+bwd ours  diffusers  ratio | fwd GB/s (of copy)")
    for T, err, fo, fd, bo, bd, gbs in rows:
        print(f"{T:4d}  {err:.1e} | {fo:8.2f}  {fd:9.2f}  {fd / fo:5.1f}x | {bo:12.2f}  {bd:9.2f}  {bd / bo:5.1f}x |"
              f" {gbs:6.0f} ({gbs / copy:.0%})")


if __name__ == "__main__":
    main()
