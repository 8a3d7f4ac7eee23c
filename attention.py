"""Attention pieces of the SANA-WM DiT: RMSNorm, the 3-axis RoPE, the UCPE camera transform, the softmax
self-attention with its camera branch, and text cross-attention. At the end, the inference kernel that makes both
self-attention layers' per-head operands in one pass (`head_stream`; on CUDA, beside the readable code it replaces).

Spec: shared/reference/dit.md §3.4 (RoPE), §5 (self-attention skeleton), §6.6 (UCPE), §7 (softmax blocks),
§8.1 (cross-attention), §10 (precision islands); camera.md §7. The GDN variant of the self-attention lives in
gdn.py and shares the parameter layout defined here (`CameraSelfAttention`).

Layouts: tokens (B, N, C) frame-major (n = (t*h + i)*w + j); per-head tensors (B, N, H, D); RoPE tables
(N, D/2, 2) fp32 (cos, sin); per-token camera matrices (B, N, 4, 4).
"""
import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl


RECOMPILE_LIMIT = 64  # compiled graphs per function (fused_on_cuda); Dynamo's default is 8


def fused_on_cuda(fn):
    """Run fn through torch.compile when its tensors live on CUDA and no autograd graph is recorded (inference);
    elsewhere (the CPU, the tests, training) as written.

    Applied to the DiT block, and to the pieces of it that the memory mode (dit.DiT's part_frames) calls one part at
    a time (inlined when called from a compiled block): its fp32 islands (dit.md §10: casts, modulation, gating,
    the GDN gates; the per-head streams go through `head_stream`'s kernel instead) are chains of pointwise ops, each
    one pass over memory when run op by op. Compiled, each chain is one kernel between the matmuls, attention
    kernels and GDN scans (BENCHMARKS.md: the step time).
    Inside a fused kernel the intermediate values stay fp32 where the code as written rounds them to bf16 between
    ops (Inductor's default): the compiled step is a little more precise than the reference, not bit-equal. The
    first call at a new shape compiles (seconds to a minute), for each of the model's shapes anew (every size,
    batch, camera on or off and block kind is one graph: up to RECOMPILE_LIMIT of them). Training stays
    eager: compiling the blocks' backward (through the GDN operator and activation checkpointing) did not finish
    an 81-frame training step within five minutes on an H200, and was not pursued."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():                   # called from compiled code: inlined there
            return fn(*args, **kwargs)
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda or torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if compiled is None:  # made on first use, so that importing the module stays cheap
            # Sizes as constants (symbolic ones slow the indexing). No layout optimisation: made for conv nets, it
            # stores 4-d tensors channels-last, and our (B, N, H, D) heads would get the tokens innermost.
            compiled = torch.compile(fn, dynamic=False, options={"layout_optimization": False})
        # Dynamo's default of 8 graphs per function would send the blocks back to eager after four video sizes.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)
    return run


class RMSNorm(nn.Module):
    """v / sqrt(mean(v^2) + eps) * weight over the last dim; the statistic is taken in fp32 (dit.md §10)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # promoted to fp32
        return x.to(self.weight.dtype) * self.weight


# --------------------------------------------------------------------------------------------------------------
# RoPE (dit.md §3.4): complex pairs split over (time, row, column); interleaved-pair convention. A table holds
# each pair's rotation as (cos, sin): the reference's complex table seen as real numbers (torch.view_as_real).

def rope_table(head_dim: int, thw: tuple[int, int, int], device=None, theta: float = 10000.0) -> torch.Tensor:
    """(N, head_dim/2, 2) fp32 (cos, sin) table: per token (t, i, j) the angles [t*inv_t | i*inv_h | j*inv_w]."""
    n_hw = head_dim // 6
    n_t = head_dim // 2 - 2 * n_hw

    def axis(n_pairs: int, length: int) -> torch.Tensor:
        # Built on the CPU in fp32 like the reference's precomputed table, then moved: identical bits everywhere.
        inv = 1.0 / theta ** (torch.arange(0, 2 * n_pairs, 2, dtype=torch.float32) / (2 * n_pairs))
        angles = torch.outer(torch.arange(length), inv)
        return torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).to(device)

    T, h, w = thw
    parts = (axis(n_t, T).view(T, 1, 1, -1, 2).expand(T, h, w, -1, 2),
             axis(n_hw, h).view(1, h, 1, -1, 2).expand(T, h, w, -1, 2),
             axis(n_hw, w).view(1, 1, w, -1, 2).expand(T, h, w, -1, 2))
    return torch.cat(parts, dim=-2).reshape(T * h * w, -1, 2)


def camera_rope_table(table: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The RoPE for the second half of a camera head (D/4 pairs): the first frequencies of each axis section
    of the full table, in the same (time, row, column) split for rope dim D/2 (dit.md §3.4)."""
    n_hw, r = head_dim // 6, head_dim // 2
    n_t = head_dim // 2 - 2 * n_hw
    m_hw = r // 6
    m_t = r // 2 - 2 * m_hw
    return torch.cat([table[:, :m_t], table[:, n_t:n_t + m_hw], table[:, n_t + n_hw:n_t + n_hw + m_hw]], dim=1)


def apply_rope(x: torch.Tensor, table: torch.Tensor, conjugate: bool = False) -> torch.Tensor:
    """Rotate channel pairs (2p, 2p+1) of x (B, N, H, 2P) by table (N, P, 2); in fp32, cast back (dit.md §10).
    The complex product (x0 + i x1)(cos + i sin) as the reference computes it (torch's complex multiply, whose
    rounding differs from the written-out real form by an ulp on some CPUs, e.g. with AVX-512: enough to flip the
    bf16 casts before the softmax blocks' SDPA). On CUDA in inference the kernel below rotates in real numbers."""
    rotation = torch.view_as_complex(table)[:, None]
    rotation = rotation.conj() if conjugate else rotation
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# UCPE (dit.md §6.6, camera.md §7): per head, the first half of the channels is a stack of 4-vectors multiplied by
# the token's 4x4 ray matrix, the second half is rotated by the camera RoPE.

def ucpe(x: torch.Tensor, M: torch.Tensor, rope_cam: torch.Tensor, conjugate: bool = False) -> torch.Tensor:
    """x (B, N, H, D), M (B, N, 4, 4), rope_cam (N, D/4, 2) -> [M a_g for each 4-group a_g of x[..., :D/2] |
    RoPE(x[..., D/2:])]. Decoding uses M = P and the conjugate rotation."""
    B, N, H, D = x.shape
    a, b = x.split(D // 2, dim=-1)
    # (M a_g)_i = sum_j M_ij a_gj, as a broadcast product and a sum of 4, accumulated in fp32 and rounded once like
    # a matmul.
    a = a.float().unflatten(-1, (-1, 1, 4)) * M.float()[:, :, None, None]       # (B, N, H, D/8, 4, 4)
    return torch.cat([a.sum(-1).flatten(-2).to(x.dtype), apply_rope(b, rope_cam, conjugate)], dim=-1)


def rms_cap(reference: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale x down (never up) so that its per-token, per-head RMS over D does not exceed the reference's."""
    ref_rms = reference.square().mean(-1, keepdim=True).add(eps).sqrt()
    x_rms = x.square().mean(-1, keepdim=True).add(eps).sqrt()
    return x * (ref_rms / x_rms.clamp_min(eps)).clamp(max=1.0)


def chunk_stop(t: int, num_frames: int, chunk_size: int | None) -> int:
    """The frame after the last one of frame t's causal chunk (chunks: multiples of chunk_size; None: one chunk)."""
    return num_frames if chunk_size is None else min(num_frames, (t // chunk_size + 1) * chunk_size)


def frame_spans(first: int, end: int, chunk_size: int | None, part_frames: int | None = None):
    """(start, stop) spans covering frames [first, end) in order, none crossing a causal-chunk boundary (multiples
    of chunk_size) nor longer than part_frames; one span when both are None."""
    spans, t = [], first
    while t < end:
        stop = chunk_stop(t, end, chunk_size)
        stop = stop if part_frames is None else min(stop, t + part_frames)
        spans.append((t, stop))
        t = stop
    return spans


def block_causal_sdpa(q, k, v, num_frames: int, chunk_size: int | None, scale: float | None = None,
                      first_frame: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, H, n, d) tensors, scale 1/sqrt(d) by default; k and v hold num_frames
    frames, q whole frames from first_frame on. With chunk_size, the queries of frame chunk c only see the keys of
    chunks <= c: one SDPA call per chunk on a key prefix, so no N x N mask is ever built."""
    if chunk_size is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    S = k.shape[2] // num_frames
    outs = []
    for start, stop in frame_spans(first_frame, first_frame + q.shape[2] // S, chunk_size):
        keys = chunk_stop(start, num_frames, chunk_size) * S   # up to the end of the chunk
        outs.append(F.scaled_dot_product_attention(q[:, :, (start - first_frame) * S:(stop - first_frame) * S],
                                                   k[:, :, :keys], v[:, :, :keys], scale=scale))
    return torch.cat(outs, dim=2)


# --------------------------------------------------------------------------------------------------------------
# Self-attention with a camera branch (dit.md §5). One parameter layout for the softmax and the GDN variants.

class CameraSelfAttention(nn.Module):
    """Parameters shared by both self-attention variants, in the checkpoint's order, and the shared output:
    proj((main + out_proj_cam(camera)) * SiLU(output_gate(u))). The GDN gates (A_log, dt_bias, recall_gate,
    beta_proj, gate_proj) exist in softmax blocks too (loaded, never read); `conv_kernel > 0` adds the GDN
    blocks' temporal short convolutions on K (weights (C, 1, K), applied by gdn.short_conv)."""

    def __init__(self, dim: int, head_dim: int, conv_kernel: int = 0):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))
        self.register_buffer("recall_gate", torch.zeros(1))  # unused by the model, part of the checkpoint
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = RMSNorm(dim, 1e-5), RMSNorm(dim, 1e-5)
        self.beta_proj = nn.Linear(dim, self.heads)
        self.gate_proj = nn.Linear(dim, self.heads)
        self.output_gate = nn.Linear(dim, dim)
        if conv_kernel:
            self.conv_k = nn.Conv1d(dim, dim, conv_kernel, groups=dim, bias=False)
        self.q_proj_cam, self.k_proj_cam = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj_cam, self.out_proj_cam = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_norm_cam, self.k_norm_cam = RMSNorm(dim, 1e-5), RMSNorm(dim, 1e-5)
        if conv_kernel:
            self.conv_k_cam = nn.Conv1d(dim, dim, conv_kernel, groups=dim, bias=False)

    @staticmethod
    def to_rays(qc, kc, vc, camera):
        """The camera branch's UCPE encoding (dit.md §6.5, §7.2): queries with P^T, keys and values with P^-1, each
        capped to its pre-transform RMS. camera = (P, P^T, P^-1, rope_cam); q/k/v (B, N, H, D)."""
        _, P_T, P_inv, rope_cam = camera
        return (rms_cap(qc, ucpe(qc, P_T, rope_cam)), rms_cap(kc, ucpe(kc, P_inv, rope_cam)),
                rms_cap(vc, ucpe(vc, P_inv, rope_cam)))

    @fused_on_cuda
    def output(self, u: torch.Tensor, main: torch.Tensor, oc: torch.Tensor | None, camera) -> torch.Tensor:
        """The layer's output (B, n, C) from the main branch's (B, n, H, D) and the camera branch's oc (B, n, H, D)
        in ray space (or None), decoded back to world space with P and the conjugate RoPE. Both branches share one
        output gate computed from the block input u, in fp32 (dit.md §10)."""
        main = main.flatten(2).to(u.dtype)
        if oc is not None:
            P, _, _, rope_cam = camera
            if use_kernels(oc):
                decoded = head_stream(oc, rope_cam, matrix=P, conjugate=True, dtype=u.dtype)[0]
            else:
                decoded = ucpe(oc.to(u.dtype), P, rope_cam, conjugate=True)
            main = main + self.out_proj_cam(decoded.flatten(2))
        return self.proj((main * F.silu(self.output_gate(u).float())).to(u.dtype))


def camera_rows(camera, rows: slice):
    """The camera tuple (P, P^T, P^-1, rope_cam) of a range of tokens, or None."""
    return None if camera is None else tuple(m[:, rows] for m in camera[:3]) + (camera[3][rows],)


def padded_width_scale(head_dim: int) -> float:
    """The camera branch's softmax scale. The reference zero-pads the heads to a flash-attention width (112 -> 128),
    so its scale is 1/sqrt(padded width), which the released weights were trained with (dit.md §7.2). The padding
    adds nothing to q.k nor to the output: the same attention is D wide with that scale, 13% fewer FLOPs."""
    width = head_dim if head_dim in (32, 64, 128) or head_dim >= 256 else (128 if head_dim < 128 else 256)
    return width ** -0.5


class SoftmaxSelfAttention(CameraSelfAttention):
    """Softmax self-attention over all N tokens with RoPE, plus a softmax UCPE camera branch (dit.md §7).

    forward(u (B, N, C), thw, rope (N, D/2, 2), camera=(P, P^T, P^-1, rope_cam) or None, chunk_size, part_frames)
    -> (B, N, C). part_frames (the memory mode, inference): the keys and values of all frames are made part_frames
    frames at a time, then each part's queries attend to them and its output is written; the only (B, N, C)-sized
    tensors are then the two (four with the camera) keys and values and the output.
    """

    @fused_on_cuda
    def operands(self, u, rope, camera):
        """SDPA operands (B, H, n, D) of the tokens u (B, n, C), rope and camera being their rows: the main branch's
        (q, k, v) and the camera branch's (or None)."""
        B, N, C = u.shape
        H, D = self.heads, self.head_dim
        q, k, v = self.qkv(u).view(B, N, 3, H, D).unbind(2)
        # The reference runs this SDPA in bf16 even in an fp32 model (dit.md §7.1, §10).
        sdpa_dtype = torch.bfloat16 if u.dtype == torch.float32 else u.dtype
        fused = use_kernels(u)
        if fused:
            q, k = (head_stream(x, rope, norm=norm)[0] for x, norm in ((q, self.q_norm), (k, self.k_norm)))
        else:
            q = apply_rope(self.q_norm(q.reshape(B, N, C)).view(B, N, H, D), rope)
            k = apply_rope(self.k_norm(k.reshape(B, N, C)).view(B, N, H, D), rope)
        main = tuple(t.transpose(1, 2).to(sdpa_dtype) for t in (q, k, v))
        if camera is None:
            return main, None
        qc, kc, vc = (proj(u).view(B, N, H, D) for proj in (self.q_proj_cam, self.k_proj_cam, self.v_proj_cam))
        if fused:
            _, P_T, P_inv, rope_cam = camera
            rays = (head_stream(qc, rope_cam, norm=self.q_norm_cam, matrix=P_T, cap=True)[0],
                    head_stream(kc, rope_cam, norm=self.k_norm_cam, matrix=P_inv, cap=True)[0],
                    head_stream(vc, rope_cam, matrix=P_inv, cap=True)[0])
        else:
            qc = self.q_norm_cam(qc.reshape(B, N, C)).view(B, N, H, D)
            kc = self.k_norm_cam(kc.reshape(B, N, C)).view(B, N, H, D)
            rays = self.to_rays(qc, kc, vc, camera)
        # The camera branch's SDPA always runs in bf16 (dit.md §7.2), with padded_width_scale.
        return main, tuple(t.transpose(1, 2).to(torch.bfloat16) for t in rays)

    def attend(self, u, main, cam, num_frames, chunk_size, camera, first_frame=0):
        """The output rows of the tokens u (whole frames from first_frame on) from their queries main[0], cam[0]
        and the keys and values of all num_frames frames."""
        main = block_causal_sdpa(*main, num_frames, chunk_size, first_frame=first_frame).transpose(1, 2)
        if cam is not None:
            scale = padded_width_scale(self.head_dim)
            cam = block_causal_sdpa(*cam, num_frames, chunk_size, scale, first_frame).transpose(1, 2)
        return self.output(u, main, cam, camera)

    def forward(self, u, thw, rope, camera=None, chunk_size=None, part_frames=None):
        T = thw[0]
        if part_frames is None:
            return self.attend(u, *self.operands(u, rope, camera), T, chunk_size, camera)
        B, N, C = u.shape
        S = N // T
        spans = [slice(t0 * S, t1 * S) for t0, t1 in frame_spans(0, T, None, part_frames)]
        kv = None
        for rows in spans:                                  # keys and values of every frame (queries dropped)
            main, cam = self.operands(u[:, rows], rope[rows], camera_rows(camera, rows))
            part = main[1:] + (cam[1:] if cam is not None else ())
            if kv is None:
                kv = [x.new_empty(B, N, self.heads, self.head_dim) for x in part]
            for buffer, x in zip(kv, part):
                buffer[:, rows] = x.transpose(1, 2)
        kv = [buffer.transpose(1, 2) for buffer in kv]
        out = torch.empty_like(u)
        for rows in spans:  # then each part's queries: its operands made again (the memory mode's extra work)
            part_camera = camera_rows(camera, rows)
            main, cam = self.operands(u[:, rows], rope[rows], part_camera)
            cam = None if cam is None else (cam[0], *kv[2:])
            out[:, rows] = self.attend(u[:, rows], (main[0], *kv[:2]), cam, T, chunk_size, part_camera, rows.start // S)
        return out


class CrossAttention(nn.Module):
    """Image tokens attend to the text tokens; RMSNorm (eps 1e-6, over C) on q and k, no RoPE (dit.md §8.1).

    forward(x (B, N, C), y (B, L, C), mask (B, L) bool, True = keep) -> (B, N, C), in the model dtype.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)

    def forward(self, x, y, mask):
        B, N, C = x.shape
        L, H = y.shape[1], self.heads
        q = self.q_norm(self.q_linear(x)).view(B, N, H, C // H).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, L, 2, C).unbind(2)
        k = self.k_norm(k).view(B, L, H, C // H).transpose(1, 2)
        v = v.reshape(B, L, H, C // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


# --------------------------------------------------------------------------------------------------------------
# Inference kernel: a projection's per-head stream in one pass. The operands of both self-attention variants are
# chains of pointwise steps (GDN short conv, RMSNorm over C, ReLU, key scale, RoPE or UCPE, RMS cap); run op by op
# (or as Inductor fuses them) they take several passes over (B, N, C) tensors. `head_stream` reads the projection
# once and writes the operand (and the plain stream where the scan needs it): BENCHMARKS.md, the DiT step.

def use_kernels(x: torch.Tensor) -> bool:
    """The Triton inference kernels replace the readable code on CUDA tensors when no autograd graph is recorded
    (they have no backward); the CPU, the equivalence tests and training run the code as written."""
    return x.is_cuda and not torch.is_grad_enabled()


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """v rounded to the stream's dtype and back to fp32: where the code as written stores an intermediate tensor."""
    return v.to(dtype).to(tl.float32)


@triton.jit
def _stream_input(xh, taps_h, rows, d, mask, t, S, T, chunk, first_frame, sxn, K: tl.constexpr):
    """One head's input at token rows and head channels d (broadcastable index tiles), fp32; with K > 0 its
    symmetric temporal short conv (gdn.short_conv): sum over |m| < K of w_{K-1-|m|} x[t+m] inside [0, T), the
    future frames only inside t's chunk (chunks counted from the video's frame 0, the tile's first frame being
    first_frame)."""
    y = tl.load(xh + rows * sxn + d, mask=mask, other=0.0).to(tl.float32)
    if K > 0:
        y *= tl.load(taps_h + d * K + (K - 1), mask=mask, other=0.0).to(tl.float32)
        for m in tl.static_range(1, K):
            w = tl.load(taps_h + d * K + (K - 1 - m), mask=mask, other=0.0).to(tl.float32)
            past = tl.load(xh + (rows - m * S) * sxn + d, mask=mask & (t >= m), other=0.0).to(tl.float32)
            same_chunk = (first_frame + t + m) // chunk == (first_frame + t) // chunk
            ahead = mask & (t + m < T) & same_chunk
            y += w * (past + tl.load(xh + (rows + m * S) * sxn + d, mask=ahead, other=0.0).to(tl.float32))
    return y


@triton.jit
def _plain_stream(xh, stash_h, norm_h, rows, d, mask, rstd, scale, C, sxn,
                  dtype: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, RELU: tl.constexpr):
    """The stream before its rotation: (short conv, read back from the stash) -> RMSNorm -> ReLU -> scale, in fp32,
    rounded where the code as written stores a tensor."""
    if K > 0:
        y = tl.load(stash_h + rows * C + d, mask=mask, other=0.0).to(tl.float32)
    else:
        y = tl.load(xh + rows * sxn + d, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        w = tl.load(norm_h + d, mask=mask, other=0.0).to(tl.float32)
        y = _rounded(_rounded(y * rstd, dtype) * w, dtype)
    if RELU:
        y = tl.maximum(y, 0.0)
    return _rounded(y * scale, dtype)


@triton.jit
def _squares(v):
    """Per token and head: the sum of squares of a (tokens, heads, a, b) tile, kept as (tokens, heads, 1, 1)."""
    return tl.sum(tl.sum(v * v, 3, keep_dims=True), 2, keep_dims=True)


@triton.jit
def _head_stream_kernel(x, taps, norm_w, table, mat, out, plain, infl,
                        S, T, chunk, first_frame, eps, scale, sxb, sxn, sxh, stn, smb, smn, smi, smj,
                        H: tl.constexpr, D: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, RELU: tl.constexpr,
                        UCPE: tl.constexpr, CONJ: tl.constexpr, CAP: tl.constexpr, PLAIN: tl.constexpr,
                        INFL: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """One program per (block of BT tokens, batch row); tiles (tokens, heads, channels, 2 or 4), BH heads at a time
    (loads of several heads in flight, not one head's round trip after another). Pass 1 (with NORM): the RMS
    statistic over all C = H*D channels, the short conv's output (K > 0) stashed in `out`. Pass 2: the plain
    stream (stored to `plain` with PLAIN), then RoPE over each head (table (n, D/2, 2)) or UCPE (a 4x4 matrix per
    token on the first half of the head, RoPE table (n, D/4, 2) on the second), optionally RMS-capped against the
    plain head; INFL stores (|capped| / |plain|)^2 per token and head."""
    b = tl.program_id(1).to(tl.int64)
    N, C = S * T, H * D
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)[:, None, None, None]  # (BT, 1, 1, 1)
    t, tok = rows // S, rows < N
    heads = tl.arange(0, BH)[None, :, None, None]
    dtype = out.dtype.element_ty                           # the stream's dtype, where the code as written rounds
    xb, ob = x + b * sxb, out + b * N * C
    two = tl.arange(0, 2)[None, None, None, :]
    p = tl.arange(0, BD // 2)[None, None, :, None]
    dp, mp = 2 * p + two, tok & (p < D // 2)               # channel pairs (2p, 2p+1) of a head
    rstd = tl.full((BT, 1, 1, 1), 1.0, tl.float32)
    if NORM:
        ss = tl.zeros((BT, 1, 1, 1), tl.float32)
        for h0 in range(0, H, BH):
            h = h0 + heads
            mask = mp & (h < H)
            y = _rounded(_stream_input(xb + h * sxh, taps + h * D * K, rows, dp, mask, t, S, T, chunk, first_frame,
                                       sxn, K), dtype)
            if K > 0:
                tl.store(ob + h * D + rows * C + dp, y.to(dtype), mask=mask)
            ss += tl.sum(_squares(y), 1, keep_dims=True)
        rstd = tl.rsqrt(ss / C + eps)
        if K > 0:
            tl.debug_barrier()                              # the stash is read back by other threads
    if UCPE:
        g, q = tl.arange(0, BD // 8)[None, None, :, None], tl.arange(0, BD // 4)[None, None, :, None]
        four = tl.arange(0, 4)[None, None, None, :]
        da, ma = 4 * g + four, tok & (g < D // 8)                                    # 4-groups of the first half
        db, mb = D // 2 + 2 * q + two, tok & (q < D // 4)                            # pairs of the second half
        cos, sin = tl.split(tl.load(table + rows * stn + 2 * q + two, mask=mb, other=0.0))
        m_row = mat + b * smb + rows * smn + four * smi                              # M[:, j] along the last dim
    else:
        cos, sin = tl.split(tl.load(table + rows * stn + dp, mask=mp, other=0.0))
    if CONJ:
        sin = -sin
    for h0 in range(0, H, BH):
        h = h0 + heads
        xh, stash_h, norm_h, oh = xb + h * sxh, ob + h * D, norm_w + h * D, ob + h * D + rows * C
        if UCPE:
            a = _plain_stream(xh, stash_h, norm_h, rows, da, ma & (h < H), rstd, scale, C, sxn, dtype, K, NORM, RELU)
            r = _plain_stream(xh, stash_h, norm_h, rows, db, mb & (h < H), rstd, scale, C, sxn, dtype, K, NORM, RELU)
            # (M a_g)_i = sum_j M_ij a_gj for each 4-group g, as in `ucpe`, accumulated in fp32 and rounded once
            ra = tl.zeros_like(a)
            for j in tl.static_range(4):
                a_j = tl.sum(tl.where(four == j, a, 0.0), 3, keep_dims=True)
                ra += a_j * tl.load(m_row + j * smj, mask=tok, other=0.0).to(tl.float32)
            ra = _rounded(ra, dtype)
            r0, r1 = tl.split(r)
            rb = _rounded(tl.join(r0 * cos - r1 * sin, r0 * sin + r1 * cos), dtype)
            ref = _squares(a) + _squares(r)
            if CAP:                                         # rms_cap(plain, rotated), eps 1e-6
                ratio = tl.sqrt(ref / D + 1e-6) / tl.maximum(tl.sqrt((_squares(ra) + _squares(rb)) / D + 1e-6), 1e-6)
                ratio = tl.minimum(ratio, 1.0)
                ra, rb = _rounded(ra * ratio, dtype), _rounded(rb * ratio, dtype)
            if INFL:
                grown = tl.maximum(tl.sqrt(_squares(ra) + _squares(rb)), 1e-6) / tl.maximum(tl.sqrt(ref), 1e-6)
                tl.store(infl + (b * N + rows) * H + h, grown * grown, mask=tok & (h < H))
            tl.store(oh + da, ra.to(dtype), mask=ma & (h < H))
            tl.store(oh + db, rb.to(dtype), mask=mb & (h < H))
        else:
            mask = mp & (h < H)
            y = _plain_stream(xh, stash_h, norm_h, rows, dp, mask, rstd, scale, C, sxn, dtype, K, NORM, RELU)
            if PLAIN:
                tl.store(plain + b * N * C + h * D + rows * C + dp, y.to(dtype), mask=mask)
            y0, y1 = tl.split(y)
            tl.store(oh + dp, tl.join(y0 * cos - y1 * sin, y0 * sin + y1 * cos).to(dtype), mask=mask)


# Tokens and heads per program, warps: measured at the release shape on an H200 (bench/head_stream.py, BENCHMARKS.md).
HEAD_STREAM_LAUNCH = dict(tokens=1, heads=4, warps=1)


@torch.library.custom_op("nano_sana_wm::head_stream", mutates_args=())
def _head_stream_op(x: torch.Tensor, taps: Optional[torch.Tensor], num_frames: int, chunk: int, first_frame: int,
                    norm_weight: Optional[torch.Tensor], eps: float, relu: bool, scale: float, table: torch.Tensor,
                    matrix: Optional[torch.Tensor], conjugate: bool, cap: bool, keep_plain: bool, inflation: bool,
                    dtype: torch.dtype) -> list[torch.Tensor]:
    """`_head_stream_kernel` as an operator that torch.compile calls as is: [out (B, n, H, D), plain (B, n, H, D),
    both in dtype, inflation (B, n, H) fp32], the last two empty unless asked for."""
    B, N, H, D = x.shape
    out = x.new_empty(B, N, H, D, dtype=dtype)
    plain = torch.empty_like(out) if keep_plain else x.new_empty(0)
    infl = x.new_empty(B, N, H, dtype=torch.float32) if inflation else x.new_empty(0)
    table = table.contiguous()
    K = 0 if taps is None else taps.shape[-1]
    mat = table if matrix is None else matrix               # (unread without UCPE)
    BT = HEAD_STREAM_LAUNCH["tokens"]
    _head_stream_kernel[(triton.cdiv(N, BT), B)](
        x, x if taps is None else taps, x if norm_weight is None else norm_weight, table, mat, out, plain, infl,
        N // num_frames, num_frames, chunk, first_frame, eps, scale, x.stride(0), x.stride(1), x.stride(2),
        table.stride(0), *((0,) * 4 if matrix is None else matrix.stride()),
        H=H, D=D, K=K, NORM=norm_weight is not None, RELU=relu, UCPE=matrix is not None, CONJ=conjugate, CAP=cap,
        PLAIN=keep_plain, INFL=inflation, BT=BT, BH=HEAD_STREAM_LAUNCH["heads"], BD=max(16, triton.next_power_of_2(D)),
        num_warps=HEAD_STREAM_LAUNCH["warps"])
    return [out, plain, infl]


@_head_stream_op.register_fake
def _head_stream_shapes(x, taps, num_frames, chunk, first_frame, norm_weight, eps, relu, scale, table, matrix,
                        conjugate, cap, keep_plain, inflation, dtype):
    B, N, H, D = x.shape
    out = x.new_empty(B, N, H, D, dtype=dtype)
    return [out, torch.empty_like(out) if keep_plain else x.new_empty(0),
            x.new_empty(B, N, H, dtype=torch.float32) if inflation else x.new_empty(0)]


def head_stream(x, table, *, norm=None, relu=False, scale=1.0, conv=None, matrix=None, conjugate=False, cap=False,
                keep_plain=False, inflation=False, dtype=None):
    """The fused form of a per-head stream (inference, CUDA; any float dtype in Triton's interpreter), for x
    (B, n, H, D) with channels contiguous (a view of a projection's output is fine):

        x -> [short conv over frames: conv = (weight (C, 1, K), num_frames, chunk_size, first_frame), gdn.short_conv]
          -> [norm: an RMSNorm over C] -> [ReLU] -> * scale                                    = the plain stream
          -> apply_rope(., table) (matrix None) or ucpe(., matrix, table, conjugate) -> [rms_cap(plain, .)]

    x is first converted to dtype (default: x's). Returns (out, the plain stream if keep_plain, else None, both in
    dtype; (|capped| / |plain|)^2 per token and head (fp32, UCPE only) if inflation, else None). fp32 inside, rounded
    to dtype where the readable code stores a tensor; `tests/test_attention.py` holds it equal to the readable
    composition."""
    taps, num_frames, chunk_size, first_frame = (None, 1, None, 0) if conv is None else conv
    if taps is not None:
        taps = taps.view(taps.shape[0], taps.shape[-1])
        if norm is None:
            raise ValueError("conv: the fused short conv needs a norm after it")
    if x.stride(-1) != 1:
        raise ValueError(f"x: expected contiguous channels (stride 1 in the last dim), got strides {x.stride()}")
    if matrix is None and (cap or inflation):
        raise ValueError("cap, inflation: apply to the UCPE stream only; give matrix too")
    if matrix is not None and keep_plain:
        raise ValueError("keep_plain: the plain stream is kept for RoPE streams only (matrix None)")
    out, plain, infl = _head_stream_op(
        x, taps, num_frames, chunk_size or first_frame + num_frames, first_frame, None if norm is None else norm.weight,
        0.0 if norm is None else norm.eps, relu, float(scale), table, matrix, conjugate, cap, keep_plain, inflation,
        dtype or x.dtype)
    return out, plain if keep_plain else None, infl if inflation else None
