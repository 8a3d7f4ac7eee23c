"""Attention pieces of the SANA-WM DiT: RMSNorm, the 3-axis RoPE, the UCPE camera transform, the softmax
self-attention with its camera branch, and text cross-attention. The GDN variant of the self-attention lives in
gdn.py and shares the parameter layout defined here (`CameraSelfAttention`).

Layouts: tokens (B, N, C) frame-major (n = (t*h + i)*w + j); per-head tensors (B, N, H, D); RoPE tables
(N, D/2, 2) fp32 (cos, sin); camera matrices (B, N, 4, 4). CUDA kernels: fast.py; the memory mode: at the end.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """v / sqrt(mean(v^2) + eps) * weight over the last dim; the statistic is taken in fp32 (as the official code)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # promoted to fp32
        return x.to(self.weight.dtype) * self.weight


# --------------------------------------------------------------------------------------------------------------
# RoPE (paper §3.3): complex pairs split over (time, row, column); interleaved-pair convention. A table holds
# each pair's rotation as (cos, sin): the reference's complex table seen as real numbers (torch.view_as_real).

def rope_table(head_dim: int, thw: tuple[int, int, int], device=None, theta: float = 10000.0) -> torch.Tensor:
    """(N, head_dim/2, 2) fp32 (cos, sin) table: per token (t, i, j) the angles [t*inv_t | i*inv_h | j*inv_w]."""
    n_hw = head_dim // 6
    n_t = head_dim // 2 - 2 * n_hw

    def axis(n_pairs: int, length: int) -> torch.Tensor:
        # Built on the CPU in fp32 like the reference's table (identical bits everywhere), moved without a wait.
        inv = 1.0 / theta ** (torch.arange(0, 2 * n_pairs, 2, dtype=torch.float32) / (2 * n_pairs))
        angles = torch.outer(torch.arange(length), inv)
        return torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).to(device, non_blocking=True)

    T, h, w = thw
    parts = (axis(n_t, T).view(T, 1, 1, -1, 2).expand(T, h, w, -1, 2),
             axis(n_hw, h).view(1, h, 1, -1, 2).expand(T, h, w, -1, 2),
             axis(n_hw, w).view(1, 1, w, -1, 2).expand(T, h, w, -1, 2))
    return torch.cat(parts, dim=-2).reshape(T * h * w, -1, 2)


def camera_rope_table(table: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The RoPE for the second half of a camera head (D/4 pairs): the first frequencies of each axis section
    of the full table, in the same (time, row, column) split for rope dim D/2 (as the official code)."""
    n_hw, r = head_dim // 6, head_dim // 2
    n_t = head_dim // 2 - 2 * n_hw
    m_hw = r // 6
    m_t = r // 2 - 2 * m_hw
    return torch.cat([table[:, :m_t], table[:, n_t:n_t + m_hw], table[:, n_t + n_hw:n_t + n_hw + m_hw]], dim=1)


def apply_rope(x: torch.Tensor, table: torch.Tensor, conjugate: bool = False) -> torch.Tensor:
    """Rotate channel pairs (2p, 2p+1) of x (B, N, H, 2P) by table (N, P, 2); in fp32, cast back (as the official code).
    The complex product (x0 + i x1)(cos + i sin) as the reference computes it (torch's complex multiply, whose
    rounding differs from the written-out real form by an ulp on some CPUs, e.g. with AVX-512: enough to flip the
    bf16 casts before the softmax blocks' SDPA). On CUDA in inference the kernel below rotates in real numbers."""
    rotation = torch.view_as_complex(table)[:, None]
    rotation = rotation.conj() if conjugate else rotation
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# UCPE (paper §3.3, Eq. 6): per head, the first half of the channels is a stack of 4-vectors multiplied by
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


def chunk_stop(t: int, num_frames: int, chunk_size) -> int:
    """The frame after the last one of frame t's causal chunk. chunk_size: None (one chunk), an int (multiples of
    it), or the chunks' first frames (a tuple from 0; SANA-WM's chunk-causal releases: (0, 4, 7, ...))."""
    if chunk_size is None:
        return num_frames
    if isinstance(chunk_size, int):
        return min(num_frames, (t // chunk_size + 1) * chunk_size)
    return min([s for s in chunk_size if s > t] + [num_frames])


def frame_spans(first: int, end: int, chunk_size, part_frames: int | None = None):
    """(start, stop) spans covering frames [first, end) in order, none crossing a causal-chunk boundary
    (chunk_stop) nor longer than part_frames; one span when both are None."""
    spans, t = [], first
    while t < end:
        stop = chunk_stop(t, end, chunk_size)
        stop = stop if part_frames is None else min(stop, t + part_frames)
        spans.append((t, stop))
        t = stop
    return spans


def block_causal_sdpa(q, k, v, num_frames: int, chunk_size, scale: float | None = None,
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
# Self-attention with a camera branch (paper §3.3, Fig. 2). One parameter layout for the softmax and the GDN variants.

class CameraSelfAttention(nn.Module):
    """Parameters shared by both self-attention variants, in the checkpoint's order, and the shared output:
    proj((main + out_proj_cam(camera)) * SiLU(output_gate(u))). The GDN gates (A_log, dt_bias, recall_gate,
    beta_proj, gate_proj) exist in softmax blocks too (loaded, never read); `conv_kernel > 0` adds the GDN
    blocks' temporal short convolutions on K (weights (C, 1, K), applied by gdn.short_conv). Two switches where
    the official releases differ (dit.DiTConfig): rms_cap (the camera branch's RMS cap) and scale_width (softmax
    logits scaled by 1/sqrt(scale_width); None: 1/sqrt(D) main, padded_width_scale camera)."""

    def __init__(self, dim: int, head_dim: int, conv_kernel: int = 0, rms_cap: bool = True,
                 scale_width: int | None = None):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.rms_cap, self.scale_width = rms_cap, scale_width
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

    def to_rays(self, qc, kc, vc, camera):
        """The camera branch's UCPE encoding (paper Eq. 6): queries with P^T, keys and values with P^-1, each
        capped to its pre-transform RMS (if rms_cap). camera = (P, P^T, P^-1, rope_cam); q/k/v (B, N, H, D)."""
        _, P_T, P_inv, rope_cam = camera
        cap = rms_cap if self.rms_cap else (lambda plain, x: x)
        return cap(qc, ucpe(qc, P_T, rope_cam)), cap(kc, ucpe(kc, P_inv, rope_cam)), cap(vc, ucpe(vc, P_inv, rope_cam))

    def output(self, u: torch.Tensor, main: torch.Tensor, oc: torch.Tensor | None, camera) -> torch.Tensor:
        """The layer's output (B, n, C) from the main branch's (B, n, H, D) and the camera branch's oc (B, n, H, D)
        in ray space (or None), decoded back to world space with P and the conjugate RoPE. Both branches share one
        output gate computed from the block input u, in fp32 (as the official code)."""
        main = main.flatten(2).to(u.dtype)
        if oc is not None:
            P, _, _, rope_cam = camera
            main = main + self.out_proj_cam(ucpe(oc.to(u.dtype), P, rope_cam, conjugate=True).flatten(2))
        return self.proj((main * F.silu(self.output_gate(u).float())).to(u.dtype))


def padded_width_scale(head_dim: int) -> float:
    """The camera branch's softmax scale: the reference zero-pads heads to a flash-attention width (112 -> 128), so
    its scale is 1/sqrt(padded width); the same attention D wide with that scale has 13% fewer FLOPs."""
    width = head_dim if head_dim in (32, 64, 128) or head_dim >= 256 else (128 if head_dim < 128 else 256)
    return width ** -0.5


class SoftmaxSelfAttention(CameraSelfAttention):
    """Softmax self-attention over all N tokens with RoPE, plus a softmax UCPE camera branch (paper §3.2, §5.1).
    forward(u (B, N, C), thw, rope (N, D/2, 2), camera=(P, P^T, P^-1, rope_cam) or None, chunk_size) -> (B, N, C).
    A span of frames reads the keys and values of every frame it sees: `operands` makes them, `attend` reads them."""

    def operands(self, u, rope, camera):
        """SDPA operands (B, H, n, D) of the tokens u (B, n, C), rope and camera being their rows: the main branch's
        (q, k, v) and the camera branch's (or None)."""
        B, N, C = u.shape
        H, D = self.heads, self.head_dim
        q, k, v = self.qkv(u).view(B, N, 3, H, D).unbind(2)
        # The reference runs this SDPA in bf16 even in an fp32 model (as the official code).
        sdpa_dtype = torch.bfloat16 if u.dtype == torch.float32 else u.dtype
        q = apply_rope(self.q_norm(q.reshape(B, N, C)).view(B, N, H, D), rope)
        k = apply_rope(self.k_norm(k.reshape(B, N, C)).view(B, N, H, D), rope)
        main = tuple(t.transpose(1, 2).to(sdpa_dtype) for t in (q, k, v))
        if camera is None:
            return main, None
        qc, kc, vc = (proj(u).view(B, N, H, D) for proj in (self.q_proj_cam, self.k_proj_cam, self.v_proj_cam))
        qc = self.q_norm_cam(qc.reshape(B, N, C)).view(B, N, H, D)
        kc = self.k_norm_cam(kc.reshape(B, N, C)).view(B, N, H, D)
        rays = self.to_rays(qc, kc, vc, camera)
        # The camera branch's SDPA always runs in bf16 (as the official code), with padded_width_scale.
        return main, tuple(t.transpose(1, 2).to(torch.bfloat16) for t in rays)

    def attend(self, u, main, cam, num_frames, chunk_size, camera, first_frame=0):
        """The output rows of the tokens u (whole frames from first_frame on) from their queries main[0], cam[0]
        and the keys and values of all num_frames frames."""
        width = self.scale_width
        main = block_causal_sdpa(*main, num_frames, chunk_size, width and width ** -0.5, first_frame).transpose(1, 2)
        if cam is not None:
            scale = padded_width_scale(self.head_dim) if width is None else width ** -0.5
            cam = block_causal_sdpa(*cam, num_frames, chunk_size, scale, first_frame).transpose(1, 2)
        return self.output(u, main, cam, camera)

    def forward(self, u, thw, rope, camera=None, chunk_size=None):
        return self.attend(u, *self.operands(u, rope, camera), thw[0], chunk_size, camera)


class CrossAttention(nn.Module):
    """Image tokens attend to the text tokens; RMSNorm (eps 1e-6, over C) on q and k, no RoPE (as the release).

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


# ================================================================================================================
# Machinery below this line: the memory mode's driver of the softmax layer. The component above is complete
# without it. (The span design it follows: the "Running blocks over spans of frames" section of README.md.)
# ================================================================================================================

def camera_rows(camera, rows: slice):
    """The camera tuple (P, P^T, P^-1, rope_cam) of a range of tokens, or None."""
    return None if camera is None else tuple(m[:, rows] for m in camera[:3]) + (camera[3][rows],)


@torch.no_grad()
def softmax_in_parts(layer: SoftmaxSelfAttention, u, thw, rope, camera, chunk_size, part_frames):
    """layer(u, ...) with the token-wise work part_frames frames at a time (the memory mode, inference): the span
    state of a softmax layer is the keys and values of every frame, so they are made first, part by part (queries
    dropped); then each part's queries attend to them and its output is written. The only (B, N, C)-sized tensors
    are the two (four with the camera) keys and values and the output."""
    B, N, C = u.shape
    T = thw[0]
    S = N // T
    spans = [slice(t0 * S, t1 * S) for t0, t1 in frame_spans(0, T, None, part_frames)]
    kv = None
    for rows in spans:
        main, cam = layer.operands(u[:, rows], rope[rows], camera_rows(camera, rows))
        part = main[1:] + (cam[1:] if cam is not None else ())
        if kv is None:
            kv = [x.new_empty(B, N, layer.heads, layer.head_dim) for x in part]
        for buffer, x in zip(kv, part):
            buffer[:, rows] = x.transpose(1, 2)
    kv = [buffer.transpose(1, 2) for buffer in kv]
    out = torch.empty_like(u)
    for rows in spans:  # then each part's queries: its operands made again (the memory mode's extra work)
        part_camera = camera_rows(camera, rows)
        main, cam = layer.operands(u[:, rows], rope[rows], part_camera)
        cam = None if cam is None else (cam[0], *kv[2:])
        out[:, rows] = layer.attend(u[:, rows], (main[0], *kv[:2]), cam, T, chunk_size, part_camera, rows.start // S)
    return out


def chunk_starts(num_frames: int, size: int = 3, merge_short_last: bool = True) -> tuple[int, ...]:
    """SANA-WM's causal chunks (the chunk-causal teacher's and the streaming model's): the first chunk holds the
    image frame and `size` more, then `size` frames each, [0, size+1), [size+1, 2 size+1), ...; a last chunk
    shorter than `size` joins the one before (the teacher's rule; for num_frames = size*k + 1, the streaming
    sampler's lengths, no chunk is short). Returns the chunks' first frames, the form chunk_size takes."""
    if num_frames < 1 or size < 1:
        raise ValueError(f"num_frames, size: expected positive ints, got {num_frames}, {size}")
    starts = [0] + list(range(size + 1, num_frames, size))
    if merge_short_last and len(starts) > 1 and num_frames - starts[-1] < size:
        starts.pop()
    return tuple(starts)


@torch.no_grad()
def softmax_chunk(layer: SoftmaxSelfAttention, u, rope, camera, past=()):
    """layer(u, ...) for one chunk of frames of a longer video (streaming): its queries attend, without a mask, to
    the keys and values of the cached chunks `past` (each (K, V, K_cam, V_cam) as `operands` made them, at their
    own absolute positions) and its own. rope, camera: the chunk's rows. Returns (out, the chunk's own (K, V,
    K_cam, V_cam)) for the cache (the camera pair None without camera)."""
    main, cam = layer.operands(u, rope, camera)
    own = main[1:] + (cam[1:] if cam is not None else (None, None))
    keys = [torch.cat([p[i] for p in past] + [own[i]], dim=2) if own[i] is not None else None for i in range(4)]
    cam = None if cam is None else (cam[0], keys[2], keys[3])
    return layer.attend(u, (main[0], keys[0], keys[1]), cam, 1, None, camera), own
