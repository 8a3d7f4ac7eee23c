"""Frame-wise Gated DeltaNet (paper §3.2, Eq. 3): the bidirectional gated delta rule over latent frames,
and the GDN self-attention layer of the DiT around it (paper §3.2, Eq. 3, 5; §3.3, Eq. 6).

One DxD state per (batch, head) is updated once per latent frame by all S tokens of that frame jointly:

    S_t = g_t S_{t-1} + sum_s beta_{t,s} (v_s - g_t S_{t-1} k~_s) k~_s^T          (numerator, rotated keys)
    z_t = g_t z_{t-1} + sum_s beta_{t,s} (1   - g_t z_{t-1}^T k_s) k_s              (normaliser, plain keys)
    out[t,s] = (S_t + S^b_t) q~_s / ((z_t + z^b_t)^T q_s + eps)

with a forward scan inclusive of frame t and a backward (reversed-time) scan S^b_t exclusive of it. Chunk-causal
option (paper: "the reversed-time scan is reset at chunk boundaries"): with chunk_size = c the backward state is
reset at the last frame of every chunk [jc, (j+1)c), so frame t only sees future frames of its own chunk.

Read `gdn_recurrent` (the recurrence as written above), then the layer. Below the marked line, the same function
computed fast: as a linear recurrence in DxD space (torch) and as Triton kernels (CUDA), with the backward for
training, and the memory mode's driver.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from attention import CameraSelfAttention, apply_rope, camera_rows, chunk_stop, frame_spans

BACKENDS = ("auto", "torch", "triton", "reference")


def check_chunk_size(chunk_size) -> None:
    """None, a positive int, or a tuple of chunk starts from 0, increasing (attention.chunk_stop)."""
    if chunk_size is None or (isinstance(chunk_size, int) and chunk_size >= 1):
        return
    if (isinstance(chunk_size, tuple) and chunk_size and chunk_size[0] == 0
            and all(isinstance(s, int) for s in chunk_size) and all(a < b for a, b in zip(chunk_size, chunk_size[1:]))):
        return
    raise ValueError(f"chunk_size: expected None, a positive int (frames) or increasing chunk starts from 0, "
                     f"got {chunk_size!r}")


def _fp32(x):
    """Upcast to float32 for the scan math (as official); float64 stays float64 (the tests' exact reference)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_end(t, T, chunk_size):
    """True if frame t is the last frame of its chunk: the backward scan starts afresh there."""
    return chunk_stop(t, T, chunk_size) == t + 1


# ---------------------------------------------------------------------------------------------------------------
# The recurrence (paper Eq. 3), one frame at a time: the definition every faster form below is tested against.

def gdn_recurrent(q_rot, k_rot, v, beta, decay, q=None, k=None, *, chunk_size=None, eps=1e-8):
    """Bidirectional frame-wise gated delta rule, one frame at a time, float32 state (same arguments as gdn_scan)."""
    B, N, H, D, T = _check_args(q_rot, k_rot, v, beta, decay, q, k, chunk_size, "reference")
    S = N // T
    frames = lambda x: _fp32(x).unflatten(1, (T, S))        # (B, T, S, H, D), float32 math  # noqa: E731
    qr, kr, vv, b, g = frames(q_rot), frames(k_rot), frames(v), frames(beta), _fp32(decay)
    streams = [(kr, vv, qr)]                                # numerator: rotated q/k, the real values
    if q is not None:                                       # normaliser: plain q/k, "value" 1 (one state row)
        streams.append((frames(k), torch.ones_like(vv[..., :1]), frames(q)))

    def step(state, keys, values, t):
        # state (B, H, R, D). S_t = g S_{t-1} + sum_s beta_s (v_s - g S_{t-1} k_s) k_s^T, all tokens of frame t
        # read the same decayed state g S_{t-1}.
        decayed = g[:, t, :, None, None] * state
        delta = (values[:, t] - torch.einsum("bhij,bshj->bshi", decayed, keys[:, t])) * b[:, t, :, :, None]
        return decayed + torch.einsum("bshi,bshj->bhij", delta, keys[:, t])

    outs = []
    for keys, values, queries in streams:
        zero = torch.zeros(B, H, values.shape[-1], D, dtype=vv.dtype, device=v.device)
        fwd, state = [], zero                               # forward: S_t includes frame t
        for t in range(T):
            state = step(state, keys, values, t)
            fwd.append(state)
        bwd, state = [None] * T, zero                       # backward: S^b_t holds frames t+1.. of t's chunk
        for t in reversed(range(T)):
            state = zero if _chunk_end(t, T, chunk_size) else step(state, keys, values, t + 1)
            bwd[t] = state
        read = torch.stack([f + r for f, r in zip(fwd, bwd)], 1)            # (B, T, H, R, D)
        outs.append(torch.einsum("bthij,btshj->btshi", read, queries))      # num_fwd + num_bwd
    out = outs[0] if q is None else outs[0] / (outs[1] + eps)               # den broadcast over D
    return out.flatten(1, 2).to(v.dtype)


def gdn_scan(q_rot, k_rot, v, beta, decay, q=None, k=None, *, chunk_size=None, eps=1e-8, backend="auto"):
    """Bidirectional frame-wise gated delta rule (paper Eq. 3; numerator only for the camera branch, as official).

    q_rot, k_rot, v, q, k: (B, N, H, D), N = T*S tokens frame-major, any strides (views of a fused projection
    are fine); beta: (B, N, H) per token; decay: (B, T, H) per frame. All math in float32 (as the official code); the
    result is (B, N, H, D) in v.dtype.
    With q and k (plain, for the normaliser): (num_fwd + num_bwd) / (den_fwd + den_bwd + eps).
    Without them: num_fwd + num_bwd.
    chunk_size (frames): None = fully bidirectional (the release); otherwise the backward scan is reset at
    chunk boundaries, so frame t of chunk c only sees the future frames inside chunk c.
    backend: "auto" (Triton on CUDA tensors, torch otherwise), "torch", "triton", "reference".
    """
    _check_args(q_rot, k_rot, v, beta, decay, q, k, chunk_size, backend)
    if backend == "auto":  # (the Triton scan takes chunks of one size)
        backend = "triton" if v.is_cuda and not isinstance(chunk_size, tuple) else "torch"
    if backend == "reference":
        return gdn_recurrent(q_rot, k_rot, v, beta, decay, q, k, chunk_size=chunk_size, eps=eps)
    if backend == "torch":
        return _gdn_torch(q_rot, k_rot, v, beta, decay, q, k, chunk_size, eps)
    return _scan_op(q_rot, k_rot, v, beta, decay, q, k, decay.shape[1] if chunk_size is None else chunk_size, eps)[0]


# ---------------------------------------------------------------------------------------------------------------
# The GDN self-attention layer (paper Eq. 3, 5, 6): gates, the temporal short conv on K, norms, ReLU kernel, key
# scaling, RoPE on the numerator stream, the UCPE camera branch; parameters and output from CameraSelfAttention.

def short_conv(x: torch.Tensor, weight: torch.Tensor, num_frames: int, chunk_size: int | None = None,
               first_frame: int = 0):
    """Depthwise temporal filter of x (B, N, C) with taps weight (C, 1, K), per spatial position (paper Fig. 2):
    y[t] = sum_m w_{K-1-m} x[t-m] + sum_m w_{K-1-m} x[t+m] - w_{K-1} x[t] (m = 0..K-1), zero outside [0, T), i.e.
    the symmetric filter [w_0 .. w_{K-1} .. w_0]. Computed as the reference does (a causal conv forwards, one on
    the reversed sequence, minus the shared centre tap) so bf16 rounds alike. With chunk_size the reversed pass
    runs per chunk: a frame reads no frame of a later chunk. x may be frames first_frame.. of a longer video (the
    chunks are counted from its frame 0)."""
    B, N, C = x.shape
    T, K = num_frames, weight.shape[-1]
    z = x.view(B, T, N // T, C).permute(0, 2, 3, 1).reshape(-1, C, T)  # (B*S, C, T)

    def causal(s):
        return F.conv1d(s, weight, groups=C, padding=K - 1)[..., :s.shape[-1]]

    pieces = [stop - start for start, stop in frame_spans(first_frame, first_frame + T, chunk_size)]
    backward = torch.cat([causal(c.flip(-1)).flip(-1) for c in z.split(pieces, dim=-1)], dim=-1)
    y = causal(z) + backward - z * weight[:, 0, -1:]
    return y.view(B, N // T, C, T).permute(0, 3, 1, 2).reshape(B, N, C)


class GDNSelfAttention(CameraSelfAttention):
    """Frame-wise bidirectional GDN self-attention with a UCPE camera branch (paper §3.2, Eq. 3, 5; Fig. 2).

    forward(u (B, N, C), thw, rope (N, D/2, 2), camera=(P, P^T, P^-1, rope_cam) or None, chunk_size) -> (B, N, C).
    """

    def __init__(self, dim: int, head_dim: int, conv_kernel: int = 4, **switches):
        super().__init__(dim, head_dim, conv_kernel, **switches)

    def gates(self, u, num_frames):
        """§6.1 gates from the block input u (B, n, C) of num_frames whole frames, in fp32: beta (B, n, H) per token,
        decay (B, num_frames, H) per frame (from the frame mean)."""
        B, N, C = u.shape
        beta = self.beta_proj(u).sigmoid()
        g = self.gate_proj(u.view(B, num_frames, N // num_frames, C).mean(2)).float()
        return beta, torch.exp(-self.A_log.float().exp() * F.softplus(g + self.dt_bias.float()))

    def key_scale(self, tokens_per_frame):
        return self.head_dim ** -0.5 * tokens_per_frame ** -0.5  # keeps k.q ~ 1 whatever the frame size (§6.2)

    def main_streams(self, u, num_frames, rope, chunk_size, first_frame=0):
        """§6.2 (q_rot, k_rot, v, q, k) of the tokens u (B, n, C) of num_frames whole frames from first_frame on
        (rope: their rows): short conv on K before the norms, ReLU kernel, RoPE only on the numerator stream."""
        B, N, C = u.shape
        H, D = self.heads, self.head_dim
        q, k, v = self.qkv(u).view(B, N, 3, H, D).unbind(2)
        k = short_conv(k.reshape(B, N, C), self.conv_k.weight, num_frames, chunk_size, first_frame)
        q = F.relu(self.q_norm(q.reshape(B, N, C))).view(B, N, H, D)
        k = F.relu(self.k_norm(k)).view(B, N, H, D) * self.key_scale(N // num_frames)
        return apply_rope(q, rope), apply_rope(k, rope), v, q, k

    def camera_streams(self, u, num_frames, camera, beta, chunk_size, first_frame=0):
        """§6.5 (qh, kh, vh, beta_cam) of the same tokens (camera: their rows; beta from `gates`)."""
        B, N, C = u.shape
        T, S, H, D = num_frames, N // num_frames, self.heads, self.head_dim
        qc = F.relu(self.q_norm_cam(self.q_proj_cam(u))).view(B, N, H, D)
        kc = short_conv(self.k_proj_cam(u), self.conv_k_cam.weight, T, chunk_size, first_frame)
        kc = F.relu(self.k_norm_cam(kc)).view(B, N, H, D) * self.key_scale(S)
        vc = self.v_proj_cam(u).view(B, N, H, D)
        norm_before = torch.linalg.vector_norm(kc, dim=-1).clamp_min(1e-6)
        qh, kh, vh = self.to_rays(qc, kc, vc, camera)
        inflation = (torch.linalg.vector_norm(kh, dim=-1).clamp_min(1e-6) / norm_before) ** 2
        # Whatever energy UCPE still adds to the keys is taken out of the write strength, one divisor per frame.
        divisor = inflation.view(B, T, S, H).mean(2, keepdim=True).clamp_min(1.0)
        return qh, kh, vh, (beta.view(B, T, S, H) / divisor).view(B, N, H)

    def forward(self, u, thw, rope, camera=None, chunk_size=None):
        B, N, C = u.shape
        T = thw[0]
        beta, decay = self.gates(u, T)
        q_rot, k_rot, v, q, k = self.main_streams(u, T, rope, chunk_size)
        main = gdn_scan(q_rot, k_rot, v, beta, decay, q, k, chunk_size=chunk_size)
        del q_rot, k_rot, v, q, k
        cam = None
        if camera is not None:  # made after the main scan, whose inputs are then free
            qh, kh, vh, beta_cam = self.camera_streams(u, T, camera, beta, chunk_size)
            cam = gdn_scan(qh, kh, vh, beta_cam, decay, chunk_size=chunk_size)  # numerator only
        return self.output(u, main, cam, camera)


# ================================================================================================================
# Machinery below this line: argument checks; the scan as a linear recurrence in DxD space (torch) and as Triton
# kernels (CUDA) with their backward; the three stages one at a time and the memory mode's driver. The component
# above is complete without it.
# ================================================================================================================

def _check_args(q_rot, k_rot, v, beta, decay, q, k, chunk_size, backend):
    if v.dim() != 4:
        raise ValueError(f"v: expected (B, N, H, D), got shape {tuple(v.shape)}")
    B, N, H, D = v.shape
    if (q is None) != (k is None):
        raise ValueError("q, k: give both (normalised output) or neither (numerator only)")
    for name, x in (("q_rot", q_rot), ("k_rot", k_rot)) + ((("q", q), ("k", k)) if q is not None else ()):
        if tuple(x.shape) != (B, N, H, D):
            raise ValueError(f"{name}: expected shape {(B, N, H, D)} like v, got {tuple(x.shape)}")
    if tuple(beta.shape) != (B, N, H):
        raise ValueError(f"beta: expected shape {(B, N, H)} (one gate per token and head), got {tuple(beta.shape)}")
    if decay.dim() != 3 or decay.shape[0] != B or decay.shape[2] != H or decay.shape[1] < 1:
        raise ValueError(f"decay: expected (B={B}, T, H={H}) per frame, got {tuple(decay.shape)}")
    T = decay.shape[1]
    if N % T != 0:
        raise ValueError(f"decay: T={T} frames must divide the N={N} tokens")
    check_chunk_size(chunk_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return B, N, H, D, T


# The DxD linear-recurrence form. Per frame (in parallel over frames)
#     M_t = K~_t^T diag(beta_t) K~_t,   U_t = V_t^T diag(beta_t) K~_t,   A_t = g_t (I - M_t)   (A_t symmetric)
# so that S_t = S_{t-1} A_t + U_t; the scan is then T small DxD products, the output one product per frame. The
# normaliser is one more state row: z^T_t = z^T_{t-1} A^z_t + u^z_t, A^z from plain keys and u^z_t = K_t^T beta_t
# (the same rule with value 1). A span of frames composes into one affine map of the state: the form that lets the
# scan run in parts of frames (the memory mode) and, later, across chunks and ranks.

def _frame_terms(k_rot, v, beta, k, T):
    """Per-frame M (B,H,T,NA,D,D) and U (B,H,T,R,D) of the linear recurrence (module docstring), float32."""
    f = lambda x: _fp32(x).unflatten(1, (T, -1))            # (B, T, S, H, D)  # noqa: E731
    kr, vv, b = f(k_rot), f(v), f(beta)
    M = [torch.einsum("btshi,btsh,btshj->bhtij", kr, b, kr)]
    U = [torch.einsum("btshi,btsh,btshj->bhtij", vv, b, kr)]
    if k is not None:
        kk = f(k)
        M.append(torch.einsum("btshi,btsh,btshj->bhtij", kk, b, kk))
        U.append(torch.einsum("btsh,btshj->bhtj", b, kk)[:, :, :, None])
    return torch.stack(M, 3), torch.cat(U, 3)


def _apply_transition(X, M, g, D):
    """X A_t for a batch of states X (..., R, D): rows < D use A_t = g(I - M_t[0]), row D uses A^z_t."""
    XA = X[..., :D, :] - X[..., :D, :] @ M[..., 0, :, :]
    if X.shape[-2] > D:
        XA = torch.cat([XA, X[..., D:, :] - X[..., D:, :] @ M[..., 1, :, :]], -2)
    return g[..., None, None] * XA


def _scan_torch(M, U, g, chunk_size):
    """States read by each frame, X (2,B,H,T,R,D): forward inclusive, backward exclusive (reset per chunk)."""
    T = U.shape[2]
    D = U.shape[-1]
    fwd, state = [], torch.zeros_like(U[:, :, 0])
    for t in range(T):
        state = _apply_transition(state, M[:, :, t], g[:, :, t], D) + U[:, :, t]
        fwd.append(state)
    bwd, state = [None] * T, torch.zeros_like(U[:, :, 0])
    for t in reversed(range(T)):
        if _chunk_end(t, T, chunk_size):
            state = torch.zeros_like(state)
        else:
            state = _apply_transition(state, M[:, :, t + 1], g[:, :, t + 1], D) + U[:, :, t + 1]
        bwd[t] = state
    return torch.stack([torch.stack(fwd, 2), torch.stack(bwd, 2)])


def _read_out(X, q_rot, q, T, eps):
    """out[t,s] from the summed state (S_t + S^b_t): numerator q~ product, optional normaliser division."""
    Hs = X[0] + X[1]
    D = q_rot.shape[-1]
    num = torch.einsum("bhtij,btshj->btshi", Hs[..., :D, :], _fp32(q_rot).unflatten(1, (T, -1)))
    if q is None:
        return num.flatten(1, 2)
    den = torch.einsum("bhtj,btshj->btsh", Hs[..., D, :], _fp32(q).unflatten(1, (T, -1)))
    return (num / (den[..., None] + eps)).flatten(1, 2)


def _gdn_torch(q_rot, k_rot, v, beta, decay, q, k, chunk_size, eps):
    T = decay.shape[1]
    M, U = _frame_terms(k_rot, v, beta, k, T)
    X = _scan_torch(M, U, _fp32(decay).transpose(1, 2), chunk_size)
    return _read_out(X, q_rot, q, T, eps).to(v.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA; Triton's interpreter on CPU in the tests): the same three stages as the torch form
# ---------------------------------------------------------------------------------------------------------------

# Float32 dots without losing float32 accuracy on tensor cores. Plain "tf32" would leave ~5e-4 relative error in
# every product. Two ways:
# - "tf32x3": three tf32 passes (hi*hi + hi*lo + lo*hi), used for state x state products (the scan) and for
#   inputs that are not bf16;
# - bf16 inputs (the release) are exact in bf16, so only the float32 operand needs cutting into bf16 pieces
#   (`_dot_split`): 2 pieces are exact for key*beta (a product of two bf16 numbers has 16 significant bits),
#   3 pieces leave ~2^-24 relative error; each piece is one bf16 tensor-core product, float32 accumulation.
DOT_PRECISION = "tf32x3"
# Launch parameters (tokens per tile, state rows per program, warps, pipeline stages), measured at the release
# shape on an H200 (BENCHMARKS.md); every one fits Hopper's 227 KB of shared memory for bf16 and float32 inputs.
LAUNCH = dict(gram_tokens=64, gram_stages=2, scan_rows=16, scan_warps=8, scan_stages=3, read_tokens=128,
              read_stages=3, read_bwd_tokens=128, read_bwd_stages=1, frame_bwd_tokens=128, frame_bwd_stages=1)
# float32 inputs go through "tf32x3" products, whose float32 tiles take more shared memory: smaller tiles.
LAUNCH_FP32 = dict(LAUNCH, gram_tokens=32, gram_stages=2, read_tokens=32, read_stages=1, read_bwd_tokens=32,
                   frame_bwd_tokens=64)


def _launch(name, pieces):
    return (LAUNCH if pieces else LAUNCH_FP32)[name]


@triton.jit
def _dot_split(a, b, acc, PIECES: tl.constexpr, MMA_BF16: tl.constexpr):
    """acc + a @ b, `a` exactly representable in bf16, `b` float32 cut into PIECES bf16 pieces b_1 + b_2 (+ b_3).
    MMA_BF16=False (Triton's interpreter, which has no bf16 dot) multiplies the same pieces in float32."""
    rest = b
    for _ in tl.static_range(PIECES):
        piece = rest.to(tl.bfloat16)
        rest = rest - piece.to(tl.float32)
        if MMA_BF16:
            acc = tl.dot(a.to(tl.bfloat16), piece, acc)
        else:
            acc = tl.dot(a.to(tl.float32), piece.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _dot(a, b, acc, PIECES: tl.constexpr, MMA_BF16: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b in float32 accuracy: bf16 pieces if PIECES > 0 (a exact in bf16), else `PREC` dots."""
    if PIECES > 0:
        acc = _dot_split(a, b, acc, PIECES, MMA_BF16)
    else:
        acc = tl.dot(a.to(tl.float32), b, acc, input_precision=PREC)
    return acc


@triton.jit
def _frame_gram_kernel(L, R, beta, out, colsum, T, S, H, D,
                       slb, sln, slh, sld, srb, srn, srh, srd, sbb, sbn, sbh, so_frame, so_row, cs_frame,
                       SAME: tl.constexpr, COLSUM: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                       PIECES: tl.constexpr, MMA_BF16: tl.constexpr, PREC: tl.constexpr):
    """One program per (b, h, t): out = L_t^T diag(beta_t) R_t (D x D) over the frame's S tokens; with COLSUM
    also colsum = R_t^T beta_t (the normaliser's u^z_t). Gives M_t (L = R = keys) and U_t (L = values)."""
    pid = tl.program_id(0).to(tl.int64)                     # = (b*H + h)*T + t, the row of M / U
    t, h, b = pid % T, (pid // T) % H, pid // (T * H)
    d = tl.arange(0, BD)
    dmask = d < D
    acc = tl.zeros((BD, BD), tl.float32)
    cs = tl.zeros((BD,), tl.float32)
    for s0 in range(0, S, BS):
        s = s0 + tl.arange(0, BS)
        n = t * S + s
        m2 = (s < S)[:, None] & dmask[None, :]
        r = tl.load(R + b * srb + n[:, None] * srn + h * srh + d[None, :] * srd, mask=m2, other=0.0)
        bt = tl.load(beta + b * sbb + n * sbn + h * sbh, mask=s < S, other=0.0).to(tl.float32)
        rb = r.to(tl.float32) * bt[:, None]
        if SAME:
            lt = r
        else:
            lt = tl.load(L + b * slb + n[:, None] * sln + h * slh + d[None, :] * sld, mask=m2, other=0.0)
        acc = _dot(tl.trans(lt), rb, acc, PIECES, MMA_BF16, PREC)
        if COLSUM:
            cs += tl.sum(rb, 0)
    tl.store(out + pid * so_frame + d[:, None] * so_row + d[None, :], acc, mask=dmask[:, None] & dmask[None, :])
    if COLSUM:
        tl.store(colsum + pid * cs_frame + d, cs, mask=dmask)


@triton.jit
def _state_scan_kernel(M, U, g, X, T, D, R, NA, chunk, s_dir,
                       GRAD: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """The sequential part. Program (b*h, row block, direction) carries BV state rows through all T frames,
    using X A_t = g_t (X - X M_t). Row block ceil(D/BV) is the normaliser row D (transition M^z, NA index 1).

    Forward (GRAD=0): direction 0 is the inclusive forward scan    X_t = X_{t-1} A_t + U_t, stored after;
                      direction 1 the exclusive backward scan       store X, then X <- X A_t + U_t  (t = T-1..0),
                      reset to 0 at each chunk's last frame.
    Adjoint (GRAD=1, U = dL/d(summed state), A_t symmetric so A_t^T = A_t):
                      direction 0: G_t = dH_t + G_{t+1} A_{t+1}     (t = T-1..0: X <- X + dH_t, store, X <- X A_t)
                      direction 1: G^b_t = dH_t + G^b_{t-1} A_t     (t = 0..T-1, reset at each chunk's first frame).
    """
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    dr = tl.program_id(2)
    is_z = blk == tl.cdiv(D, BV)
    rows = tl.where(is_z, D, blk * BV) + tl.arange(0, BV)
    rmask = rows < tl.where(is_z, D + 1, D)
    # The state is kept as two column halves [x_a | x_b] and M_t as four blocks, so no 128x128 float32 tile
    # has to sit in registers: x M = [x_a M_aa + x_b M_ba | x_a M_ab + x_b M_bb].
    ca = tl.arange(0, BD // 2)
    cb = BD // 2 + ca
    ma, mb = ca < D, cb < D
    if GRAD:
        reverse = dr == 0
        mode = 2 - 2 * dr                                   # 2: add-store-multiply, 0: multiply-add-store
    else:
        reverse = dr == 1
        mode = dr                                           # 0: multiply-add-store, 1: store-multiply-add
    use_reset = dr == 1
    pre = (mode == 2).to(tl.float32)
    m_base = M + bh * T * NA * D * D + is_z.to(tl.int64) * D * D
    u_base = U + bh * T * R * D
    x_base = X + dr * s_dir + bh * T * R * D
    tile_a, tile_b = rows[:, None] * D + ca[None, :], rows[:, None] * D + cb[None, :]
    mask_a, mask_b = rmask[:, None] & ma[None, :], rmask[:, None] & mb[None, :]
    state_a = tl.zeros((BV, BD // 2), tl.float32)
    state_b = tl.zeros((BV, BD // 2), tl.float32)
    for i in range(T):
        t = tl.where(reverse, T - 1 - i, i)
        first = tl.where(reverse, (t + 1) % chunk == 0, t % chunk == 0)     # first frame of a chunk, scan order
        keep = 1.0 - (use_reset & first).to(tl.float32)
        m_t = m_base + t * NA * D * D
        m_aa = tl.load(m_t + ca[:, None] * D + ca[None, :], mask=ma[:, None] & ma[None, :], other=0.0)
        m_ab = tl.load(m_t + ca[:, None] * D + cb[None, :], mask=ma[:, None] & mb[None, :], other=0.0)
        m_ba = tl.load(m_t + cb[:, None] * D + ca[None, :], mask=mb[:, None] & ma[None, :], other=0.0)
        m_bb = tl.load(m_t + cb[:, None] * D + cb[None, :], mask=mb[:, None] & mb[None, :], other=0.0)
        u_a = tl.load(u_base + t * R * D + tile_a, mask=mask_a, other=0.0)
        u_b = tl.load(u_base + t * R * D + tile_b, mask=mask_b, other=0.0)
        g_t = tl.load(g + bh * T + t)
        x_a = state_a * keep + pre * u_a
        x_b = state_b * keep + pre * u_b
        xm_a = tl.dot(x_b, m_ba, tl.dot(x_a, m_aa, input_precision=PREC), input_precision=PREC)
        xm_b = tl.dot(x_b, m_bb, tl.dot(x_a, m_ab, input_precision=PREC), input_precision=PREC)
        state_a = g_t * (x_a - xm_a) + (1.0 - pre) * u_a
        state_b = g_t * (x_b - xm_b) + (1.0 - pre) * u_b
        tl.store(x_base + t * R * D + tile_a, tl.where(mode == 0, state_a, x_a), mask=mask_a)
        tl.store(x_base + t * R * D + tile_b, tl.where(mode == 0, state_b, x_b), mask=mask_b)


@triton.jit
def _read_out_kernel(X, Qr, Q, out, T, S, H, D, R, s_dir, eps,
                     sqb, sqn, sqh, sqd, szb, szn, szh, szd, sob, son, soh, sod,
                     NORM: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                     PIECES: tl.constexpr, MMA_BF16: tl.constexpr, PREC: tl.constexpr):
    """One program per (b, h, t): H = X[0] + X[1] (the summed read state), then for each token tile
    num = Q~ H^T and, with NORM, out = num / (Q h_z + eps)."""
    pid = tl.program_id(0).to(tl.int64)
    t, h, b = pid % T, (pid // T) % H, pid // (T * H)
    d = tl.arange(0, BD)
    dmask = d < D
    x = X + pid * R * D
    hmask = dmask[:, None] & dmask[None, :]
    hs = tl.load(x + d[:, None] * D + d[None, :], mask=hmask, other=0.0)
    hs += tl.load(x + s_dir + d[:, None] * D + d[None, :], mask=hmask, other=0.0)
    if NORM:
        hz = tl.load(x + D * D + d, mask=dmask, other=0.0) + tl.load(x + s_dir + D * D + d, mask=dmask, other=0.0)
    for s0 in range(0, S, BS):
        s = s0 + tl.arange(0, BS)
        n = t * S + s
        m2 = (s < S)[:, None] & dmask[None, :]
        qr = tl.load(Qr + b * sqb + n[:, None] * sqn + h * sqh + d[None, :] * sqd, mask=m2, other=0.0)
        num = _dot(qr, tl.trans(hs), tl.zeros((BS, BD), tl.float32), PIECES, MMA_BF16, PREC)
        if NORM:
            qz = tl.load(Q + b * szb + n[:, None] * szn + h * szh + d[None, :] * szd, mask=m2, other=0.0)
            num = num / (tl.sum(qz.to(tl.float32) * hz[None, :], 1) + eps)[:, None]
        tl.store(out + b * sob + n[:, None] * son + h * soh + d[None, :] * sod, num.to(out.dtype.element_ty), mask=m2)


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _frame_terms_triton(k_rot, v, beta, k, T):
    """M (B,H,T,NA,D,D) and U (B,H,T,R,D) as in `_frame_terms`, by `_frame_gram_kernel`."""
    B, N, H, D = v.shape
    NA, R = (1, D) if k is None else (2, D + 1)
    M = torch.empty(B, H, T, NA, D, D, device=v.device, dtype=torch.float32)
    U = torch.empty(B, H, T, R, D, device=v.device, dtype=torch.float32)
    # bf16 keys/values: cut key*beta into bf16 pieces (exact with 2 when beta is bf16 too), else tf32x3.
    exact = all(x.dtype == torch.bfloat16 for x in (k_rot, v) + (() if k is None else (k,)))
    pieces = (2 if beta.dtype == torch.bfloat16 else 3) if exact else 0
    common = dict(T=T, S=N // T, H=H, D=D, sbb=beta.stride(0), sbn=beta.stride(1), sbh=beta.stride(2),
                  BS=_launch("gram_tokens", pieces), BD=_block_d(D), PIECES=pieces, MMA_BF16=v.is_cuda,
                  PREC=DOT_PRECISION, num_warps=4, num_stages=_launch("gram_stages", pieces))
    jobs = [(k_rot, k_rot, M, None), (v, k_rot, U, None)]    # M_t from rotated keys, U_t = V^T B K~
    if k is not None:                                       # M^z_t and u^z_t (row D of U) from plain keys
        jobs.append((k, k, M[:, :, :, 1], U[:, :, :, D]))
    for left, right, dst, colsum in jobs:
        _frame_gram_kernel[(B * H * T,)](
            left, right, beta, dst, U if colsum is None else colsum, **common,
            slb=left.stride(0), sln=left.stride(1), slh=left.stride(2), sld=left.stride(3),
            srb=right.stride(0), srn=right.stride(1), srh=right.stride(2), srd=right.stride(3),
            so_frame=dst.stride(2), so_row=D, cs_frame=U.stride(2),
            SAME=left is right, COLSUM=colsum is not None)
    return M, U


def _scan_triton(M, U, g, chunk, grad):
    """X (2,B,H,T,R,D): the forward and backward states (grad=False) or their adjoints (grad=True)."""
    B, H, T, R, D = U.shape
    X = torch.empty((2,) + tuple(U.shape), device=U.device, dtype=torch.float32)
    BV = LAUNCH["scan_rows"]
    grid = (B * H, triton.cdiv(D, BV) + (R > D), 2)
    _state_scan_kernel[grid](M, U, g, X, T, D, R, M.shape[3], chunk, X.stride(0), GRAD=grad, BV=BV,
                             BD=max(32, _block_d(D)),                   # halves of >= 16 columns for tl.dot
                             PREC=DOT_PRECISION, num_warps=LAUNCH["scan_warps"], num_stages=LAUNCH["scan_stages"])
    return X


def _read_out_triton(X, q_rot, q, eps, dtype):
    _, B, H, T, R, D = X.shape
    N = q_rot.shape[1]
    out = torch.empty(B, N, H, D, device=q_rot.device, dtype=dtype)
    qz = q_rot if q is None else q
    pieces = 3 if q_rot.dtype == torch.bfloat16 else 0     # bf16 q~ times float32 state in 3 bf16 pieces
    _read_out_kernel[(B * H * T,)](X, q_rot, qz, out, T, N // T, H, D, R, X.stride(0), eps,
                                   *q_rot.stride(), *qz.stride(), *out.stride(),
                                   NORM=q is not None, BS=_launch("read_tokens", pieces), BD=_block_d(D),
                                   PIECES=pieces, MMA_BF16=q_rot.is_cuda, PREC=DOT_PRECISION, num_warps=8,
                                   num_stages=_launch("read_stages", pieces))
    return out


@triton.jit
def _read_out_bwd_kernel(Hs, Qr, Q, dO, dQr, dQ, dH, T, S, H, D, R, eps,
                         sqb, sqn, sqh, sqd, szb, szn, szh, szd, sob, son, soh, sod,
                         NORM: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                         PIECES: tl.constexpr, MMA_BF16: tl.constexpr, PREC: tl.constexpr):
    """Backward of `_read_out_kernel`, one program per (b, h, t), Hs = X[0] + X[1]: per token
    dq~ = H^T dout / den (dout being the bf16-exact operand), dq = dden h_z; per frame dH = sum_s dnum_s q~_s^T
    (accumulated transposed, q~ being the bf16-exact operand) and dh_z = sum_s dden_s q_s.
    dQr/dQ/dO share the strides `so*` (fresh contiguous tensors)."""
    pid = tl.program_id(0).to(tl.int64)
    t, h, b = pid % T, (pid // T) % H, pid // (T * H)
    d = tl.arange(0, BD)
    dmask = d < D
    x = Hs + pid * R * D
    hmask = dmask[:, None] & dmask[None, :]
    if NORM:
        hz = tl.load(x + D * D + d, mask=dmask, other=0.0)
        dhz = tl.zeros((BD,), tl.float32)
    dh_t = tl.zeros((BD, BD), tl.float32)                   # dH transposed: [j, i] = sum_s q~[s, j] dnum[s, i]
    for s0 in range(0, S, BS):
        # the summed state, re-read per tile (from L2): kept with its pieces it would overflow shared memory
        hs = tl.load(x + d[:, None] * D + d[None, :], mask=hmask, other=0.0)
        s = s0 + tl.arange(0, BS)
        n = t * S + s
        m2 = (s < S)[:, None] & dmask[None, :]
        tok = b * sob + n[:, None] * son + h * soh + d[None, :] * sod
        qr = tl.load(Qr + b * sqb + n[:, None] * sqn + h * sqh + d[None, :] * sqd, mask=m2, other=0.0)
        dout = tl.load(dO + tok, mask=m2, other=0.0)
        dqr = _dot(dout, hs, tl.zeros((BS, BD), tl.float32), PIECES, MMA_BF16, PREC)
        dnum = dout.to(tl.float32)
        if NORM:
            num = _dot(qr, tl.trans(hs), tl.zeros((BS, BD), tl.float32), PIECES, MMA_BF16, PREC)
            qz = tl.load(Q + b * szb + n[:, None] * szn + h * szh + d[None, :] * szd, mask=m2, other=0.0)
            qz = qz.to(tl.float32)
            den = tl.sum(qz * hz[None, :], 1) + eps
            dden = -tl.sum(dnum * num, 1) / (den * den)
            dnum = dnum / den[:, None]
            dqr = dqr / den[:, None]
            tl.store(dQ + tok, (dden[:, None] * hz[None, :]).to(dQ.dtype.element_ty), mask=m2)
            dhz += tl.sum(dden[:, None] * qz, 0)
        tl.store(dQr + tok, dqr.to(dQr.dtype.element_ty), mask=m2)
        dh_t = _dot(tl.trans(qr), dnum, dh_t, PIECES, MMA_BF16, PREC)
    out = dH + pid * R * D
    tl.store(out + d[None, :] * D + d[:, None], dh_t, mask=hmask)
    if NORM:
        tl.store(out + D * D + d, dhz, mask=dmask)


@triton.jit
def _frame_bwd_kernel(K, V, beta, dM, dU, dK, dV, dbeta, T, S, H, D, sm_frame, su_frame,
                      skb, skn, skh, skd, svb, svn, svh, svd, sbb, sbn, sbh, sob, son, soh, sod, sdb, sdn, sdh,
                      Z: tl.constexpr, ACCUMULATE: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                      PIECES: tl.constexpr, MMA_BF16: tl.constexpr, PREC: tl.constexpr):
    """Backward of the per-frame terms M = K^T diag(b) K, U = V^T diag(b) K, one program per (b, h, t):
    W = K dM + V dU, dK = b (W + K dM^T), dV = b (K dU^T), db = rowsum(K * W). Z: the normaliser stream
    (values 1, dU a row vector du^z, no dV). ACCUMULATE adds db to what dbeta holds (the other stream's).
    dK and dV share the strides `so*` (fresh contiguous tensors)."""
    pid = tl.program_id(0).to(tl.int64)
    t, h, b = pid % T, (pid // T) % H, pid // (T * H)
    d = tl.arange(0, BD)
    dmask = d < D
    hmask = dmask[:, None] & dmask[None, :]
    for s0 in range(0, S, BS):
        # dM, dU re-read per tile (from L2): kept with their pieces they would overflow shared memory
        dm = tl.load(dM + pid * sm_frame + d[:, None] * D + d[None, :], mask=hmask, other=0.0)
        if Z:
            du = tl.load(dU + pid * su_frame + d, mask=dmask, other=0.0)
        else:
            du = tl.load(dU + pid * su_frame + d[:, None] * D + d[None, :], mask=hmask, other=0.0)
        s = s0 + tl.arange(0, BS)
        n = t * S + s
        m2 = (s < S)[:, None] & dmask[None, :]
        kt = tl.load(K + b * skb + n[:, None] * skn + h * skh + d[None, :] * skd, mask=m2, other=0.0)
        bt = tl.load(beta + b * sbb + n * sbn + h * sbh, mask=s < S, other=0.0).to(tl.float32)
        w = _dot(kt, dm, tl.zeros((BS, BD), tl.float32), PIECES, MMA_BF16, PREC)
        if Z:
            w += du[None, :]
        else:
            vt = tl.load(V + b * svb + n[:, None] * svn + h * svh + d[None, :] * svd, mask=m2, other=0.0)
            w = _dot(vt, du, w, PIECES, MMA_BF16, PREC)
            dv = _dot(kt, tl.trans(du), tl.zeros((BS, BD), tl.float32), PIECES, MMA_BF16, PREC)
            tl.store(dV + b * sob + n[:, None] * son + h * soh + d[None, :] * sod,
                     (bt[:, None] * dv).to(dV.dtype.element_ty), mask=m2)
        dk = _dot(kt, tl.trans(dm), w, PIECES, MMA_BF16, PREC)
        tl.store(dK + b * sob + n[:, None] * son + h * soh + d[None, :] * sod,
                 (bt[:, None] * dk).to(dK.dtype.element_ty), mask=m2)
        db = tl.sum(kt.to(tl.float32) * w, 1)
        pb = dbeta + b * sdb + n * sdn + h * sdh
        if ACCUMULATE:
            db += tl.load(pb, mask=s < S, other=0.0)
        tl.store(pb, db, mask=s < S)


def _gdn_backward(dout, q_rot, k_rot, v, beta, decay, q, k, M, X, chunk, eps):
    """Gradients of the scan, with H = X[0] + X[1] the summed state read by a frame:
      read-out  num_s = H q~_s, out_s = num_s / den_s:   dq~_s = H^T dnum_s,  dH = sum_s dnum_s q~_s^T,
                dnum_s = dout_s / den_s,  dden_s = -dout_s.num_s / den_s^2,  dq_s = dden_s h_z,  dh_z = sum_s dden_s q_s
                                                                                 (`_read_out_bwd_kernel`)
      scan      S_t = S_{t-1} A_t + U_t and S^b_{t-1} = S^b_t A_t + U_t (same chunk) both feed H_t:
                G_t = dH_t + G_{t+1} A_{t+1},  G^b_t = dH_t + G^b_{t-1} A_t      (`_state_scan_kernel`, GRAD=1)
                dU_t = G_t + G^b_{t-1},  dA_t = S_{t-1}^T G_t + (S^b_t)^T G^b_{t-1}       (torch, DxD per frame)
      frame     A_t = g_t (I - M_t):  dg_t = <dA_t, I - M_t>,  dM_t = -g_t dA_t          (torch, DxD per frame)
                M = K^T diag(b) K, U = V^T diag(b) K:  W = K dM + V dU,
                dK = b (W + K dM^T),  dV = b (K dU^T),  db = rowsum(K * W)  (normaliser: V = 1, plain keys)
                                                                                 (`_frame_bwd_kernel`)"""
    B, N, H, D = v.shape
    T = decay.shape[1]
    S = N // T
    R = X.shape[-2]
    norm = q is not None
    dout = dout.contiguous()
    bd = _block_d(D)
    cuda = v.is_cuda
    exact = lambda *xs: 3 if all(x.dtype == torch.bfloat16 for x in xs) else 0  # noqa: E731
    pieces = exact(q_rot, dout)

    # read-out
    dq_rot = torch.empty(B, N, H, D, device=v.device, dtype=q_rot.dtype)
    dq = torch.empty(B, N, H, D, device=v.device, dtype=q.dtype) if norm else None
    dH = torch.empty(B, H, T, R, D, device=v.device, dtype=torch.float32)
    qz = q if norm else q_rot
    _read_out_bwd_kernel[(B * H * T,)](
        X[0] + X[1], q_rot, qz, dout, dq_rot, dq if norm else dq_rot, dH, T, S, H, D, R, eps,
        *q_rot.stride(), *qz.stride(), *dout.stride(), NORM=norm, BS=_launch("read_bwd_tokens", pieces), BD=bd,
        PIECES=pieces, MMA_BF16=cuda, PREC=DOT_PRECISION, num_warps=8, num_stages=_launch("read_bwd_stages", pieces))

    # adjoint scan, then the DxD algebra of each frame
    g = _fp32(decay).transpose(1, 2).contiguous()
    G = _scan_triton(M, dH, g, chunk, grad=True)
    # G^b_{t-1} reaches frame t's terms only when t-1 and t share a chunk; S_{-1} = 0.
    same_chunk = (torch.arange(T, device=v.device) % chunk != 0).float()[:, None, None]
    Gb_prev = torch.cat([torch.zeros_like(G[1][:, :, :1]), G[1][:, :, :-1]], 2) * same_chunk
    S_prev = torch.cat([torch.zeros_like(X[0][:, :, :1]), X[0][:, :, :-1]], 2)
    dU = (G[0] + Gb_prev).contiguous()
    rows = [slice(0, D), slice(D, D + 1)][:M.shape[3]]      # numerator rows, then the normaliser row
    dA = torch.stack([S_prev[..., r, :].transpose(-1, -2) @ G[0][..., r, :]
                      + X[1][..., r, :].transpose(-1, -2) @ Gb_prev[..., r, :] for r in rows], 3)
    dg = (dA * (torch.eye(D, device=v.device) - M)).sum((-3, -2, -1))
    dM = (-g[..., None, None, None] * dA).contiguous()     # (B, H, T, NA, D, D)

    # per-frame terms: numerator stream, then the normaliser stream adds its share of dbeta
    dk_rot = torch.empty(B, N, H, D, device=v.device, dtype=k_rot.dtype)
    dv = torch.empty(B, N, H, D, device=v.device, dtype=v.dtype)
    dk = torch.empty(B, N, H, D, device=v.device, dtype=k.dtype) if norm else None
    dbeta = torch.empty(B, N, H, device=v.device, dtype=torch.float32)
    streams = [(k_rot, v, dM[:, :, :, 0], dU, dk_rot, False)]
    if norm:
        streams.append((k, k, dM[:, :, :, 1], dU[:, :, :, D], dk, True))
    for i, (keys, values, dm, du, dkeys, z) in enumerate(streams):
        p = exact(keys, values)
        _frame_bwd_kernel[(B * H * T,)](
            keys, values, beta, dm, du, dkeys, dv, dbeta, T, S, H, D, dm.stride(2), du.stride(2),
            *keys.stride(), *values.stride(), *beta.stride(), *dv.stride(), *dbeta.stride(),
            Z=z, ACCUMULATE=i > 0, BS=_launch("frame_bwd_tokens", p), BD=bd, PIECES=p, MMA_BF16=cuda,
            PREC=DOT_PRECISION, num_warps=8, num_stages=_launch("frame_bwd_stages", p))
    return dq_rot, dk_rot, dv, dbeta.to(beta.dtype), dg.transpose(1, 2).to(decay.dtype), dq, dk


# The Triton scan as one operator (torch.library): torch.compile sees it as an opaque call with known output shapes
# (`_scan_shapes`), and autograd differentiates it with `_gdn_backward`. It also returns the per-frame M and the
# states X, which the backward reuses.
@torch.library.custom_op("nano_sana_wm::gdn_scan", mutates_args=())
def _scan_op(q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, decay: torch.Tensor,
             q: Optional[torch.Tensor], k: Optional[torch.Tensor], chunk: int, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _fp32(decay).transpose(1, 2).contiguous()           # (B, H, T)
    M, U = _frame_terms_triton(k_rot, v, beta, k, decay.shape[1])
    X = _scan_triton(M, U, g, chunk, grad=False)
    return _read_out_triton(X, q_rot, q, eps, v.dtype), M, X


@_scan_op.register_fake
def _scan_shapes(q_rot, k_rot, v, beta, decay, q, k, chunk, eps):
    B, N, H, D = v.shape
    T = decay.shape[1]
    NA, R = (1, D) if k is None else (2, D + 1)
    return (v.new_empty(B, N, H, D), v.new_empty(B, H, T, NA, D, D, dtype=torch.float32),
            v.new_empty(2, B, H, T, R, D, dtype=torch.float32))


def _scan_op_setup(ctx, inputs, output):
    q_rot, k_rot, v, beta, decay, q, k, chunk, eps = inputs
    ctx.save_for_backward(q_rot, k_rot, v, beta, decay, q, k, output[1], output[2])
    ctx.chunk, ctx.eps = chunk, eps


@torch.library.custom_op("nano_sana_wm::gdn_scan_backward", mutates_args=())
def _scan_backward_op(dout: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor,
                      beta: torch.Tensor, decay: torch.Tensor, q: Optional[torch.Tensor], k: Optional[torch.Tensor],
                      M: torch.Tensor, X: torch.Tensor, chunk: int, eps: float) -> list[torch.Tensor]:
    """Gradients for (q_rot, k_rot, v, beta, decay, q, k); an empty tensor stands for q's and k's when absent."""
    grads = _gdn_backward(dout, q_rot, k_rot, v, beta, decay, q, k, M, X, chunk, eps)
    return [dout.new_empty(0) if grad is None else grad.contiguous() for grad in grads]


@_scan_backward_op.register_fake
def _scan_backward_shapes(dout, q_rot, k_rot, v, beta, decay, q, k, M, X, chunk, eps):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) if x is not None else dout.new_empty(0)
            for x in (q_rot, k_rot, v, beta, decay, q, k)]


def _scan_op_backward(ctx, dout, dM, dX):                   # M and X are saved for the backward, not trained
    saved = ctx.saved_tensors                               # unpacked once (activation checkpointing allows no more)
    grads = _scan_backward_op(dout, *saved, ctx.chunk, ctx.eps)
    return tuple(grads[:5]) + ((None, None) if saved[5] is None else tuple(grads[5:])) + (None, None)


_scan_op.register_autograd(_scan_op_backward, setup_context=_scan_op_setup)


# The three stages one at a time, for inference in parts of frames (the DiT's memory mode): the per-frame terms are
# independent across frames, so those of consecutive parts are concatenated (dim 2) before the states are scanned,
# and a part's output needs only its frames' states. Triton on CUDA when no autograd graph is recorded (these kernel
# launches have no backward), torch otherwise: the CPU, and training across ranks (parallel.py), which scans in
# stages too.

def _kernels(x):
    return x.is_cuda and not torch.is_grad_enabled()


def frame_terms(k_rot, v, beta, k=None, *, num_frames):
    """Stage 1: per-frame M (B,H,T,NA,D,D) and U (B,H,T,R,D), float32, of num_frames whole frames of tokens."""
    return (_frame_terms_triton if _kernels(v) else _frame_terms)(k_rot, v, beta, k, num_frames)


def scan_states(M, U, decay, chunk_size=None):
    """Stage 2: the states X (2,B,H,T,R,D) read by each frame, from all frames' terms and decay (B, T, H)."""
    g = _fp32(decay).transpose(1, 2).contiguous()
    if _kernels(U) and not isinstance(chunk_size, tuple):
        return _scan_triton(M, U, g, decay.shape[1] if chunk_size is None else chunk_size, grad=False)
    return _scan_torch(M, U, g, chunk_size)


def read_out(X, q_rot, q=None, eps=1e-8):
    """Stage 3: the output (B, n, H, D) in q_rot's dtype of the tokens q_rot (and q) of X's frames."""
    if _kernels(X):
        return _read_out_triton(X.contiguous(), q_rot, q, eps, q_rot.dtype)
    return _read_out(X, q_rot, q, X.shape[3], eps).to(q_rot.dtype)


@torch.no_grad()
def gdn_in_parts(layer: GDNSelfAttention, u, thw, rope, camera, chunk_size, part_frames):
    """layer(u, ...) in parts (the memory mode, inference): each part's streams (with the frames the short conv
    reaches on either side) give its frames' scan terms, and only its queries are kept; then the states of all
    frames; then each part reads out its output. Kept whole: the query streams (two with the camera), the output,
    and per frame the terms, then the states (fp32 DxD: ~5 MB per frame with the camera at the release size, about
    the size of the frame's tokens in the four (B, N, C) tensors above)."""
    B, N, C = u.shape
    T, S = thw[0], N // thw[0]
    reach = layer.conv_k.weight.shape[-1] - 1
    spans = frame_spans(0, T, None, part_frames)
    terms, decays, queries = [], [], []                # terms: [M, U] of all frames per stream (main, camera)
    for t0, t1 in spans:
        lo, hi = max(0, t0 - reach), min(T, t1 + reach)
        rows, own = slice(lo * S, hi * S), slice((t0 - lo) * S, (t1 - lo) * S)
        # All the short conv needs of where the part lies: with uniform chunks, few values to compile for.
        first = lo % chunk_size if isinstance(chunk_size, int) else (lo if chunk_size else 0)
        beta, decay = layer.gates(u[:, rows], hi - lo)
        decays.append(decay[:, t0 - lo:t1 - lo])
        _, k_rot, v, q, k = (x[:, own] for x in layer.main_streams(u[:, rows], hi - lo, rope[rows], chunk_size,
                                                                  first))
        part_terms = [frame_terms(k_rot, v, beta[:, own], k, num_frames=t1 - t0)]
        queries.append([q.clone()])                     # RoPE'd again at the read-out
        if camera is not None:
            qh, kh, vh, beta_cam = (x[:, own] for x in layer.camera_streams(
                u[:, rows], hi - lo, camera_rows(camera, rows), beta, chunk_size, first))
            part_terms.append(frame_terms(kh, vh, beta_cam, num_frames=t1 - t0))
            queries[-1].append(qh.clone())
        if not terms:
            terms = [[x.new_empty(*x.shape[:2], T, *x.shape[3:]) for x in pair] for pair in part_terms]
        for whole, pair in zip(terms, part_terms):
            whole[0][:, :, t0:t1], whole[1][:, :, t0:t1] = pair
        del whole, pair, part_terms                     # (so that the terms die with `terms`' entries below)
    decay = torch.cat(decays, 1)
    states = [scan_states(*terms.pop(0), decay, chunk_size) for _ in range(len(terms))]  # each freed when used
    out = torch.empty_like(u)
    for (t0, t1), query in zip(spans, queries):
        rows = slice(t0 * S, t1 * S)
        main = read_out(states[0][:, :, :, t0:t1], apply_rope(query[0], rope[rows]), query[0])
        cam = read_out(states[1][:, :, :, t0:t1], query[1]) if camera is not None else None
        out[:, rows] = layer.output(u[:, rows], main, cam, camera_rows(camera, rows))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Streaming: one chunk of frames with the state of the chunks before it (README: "Running blocks over spans of
# frames"). The forward scans start from the states after the previous chunk's last frame, the backward scans stay
# inside the chunk (chunk-causal), the short convs read the previous frames.

def carry_in(M, U, decay, state):
    """The per-frame terms of a span with the incoming forward state folded into its first frame:
    S_0 = S_in A_0 + U_0, so the span's scan from zero is the scan from S_in (the affine form of the recurrence)."""
    if state is None:
        return U
    U = U.clone()
    U[:, :, 0] += _apply_transition(state, M[:, :, 0], _fp32(decay[:, 0]), U.shape[-1])
    return U


@torch.no_grad()
def gdn_chunk(layer: GDNSelfAttention, u, thw, rope, camera, halo=None, states=None, camera_halo=True):
    """layer(u, ...) for one chunk of frames of a longer video. halo: the layer input u of the up to K-1 frames
    before the chunk (their K feed the short convs; None for the first chunk); rope and camera: the rows of the
    halo frames and the chunk's. states: (main, camera) forward states after the previous chunk (fp32
    (B, H, D+1, D) with the normaliser row, and (B, H, D, D)), None for the first chunk. camera_halo: whether the
    camera K conv reads the halo too (the official code's current behaviour) or stays inside the chunk.
    Returns (out (B, n, C), the forward states after the chunk's last frame)."""
    B, N, C = u.shape
    T, S = thw[0], N // thw[0]
    h = 0 if halo is None else halo.shape[1] // S
    wide, own = (u, slice(None)) if h == 0 else (torch.cat([halo, u], 1), slice(h * S, None))
    # The halo frames are an earlier chunk; as uniform chunks of h frames where the chunk is no longer (the
    # streaming model's 3 + 3), the form the CUDA kernels take.
    chunks = None if h == 0 else (h if T <= h else (0, h))
    beta_wide, decay = layer.gates(wide, h + T)
    beta, decay = beta_wide[:, own], decay[:, h:]
    q_rot, k_rot, v, q, k = (x[:, own] for x in layer.main_streams(wide, h + T, rope, chunks))
    M, U = frame_terms(k_rot, v, beta, k, num_frames=T)
    X = scan_states(M, carry_in(M, U, decay, None if states is None else states[0]), decay)
    main, out_states = read_out(X, q_rot, q), [X[0, :, :, -1].clone()]   # (not a view keeping all states alive)
    cam = None
    if camera is not None:
        own_camera = camera if h == 0 else camera_rows(camera, own)
        if camera_halo:
            qh, kh, vh, beta_cam = (x[:, own] for x in layer.camera_streams(wide, h + T, camera, beta_wide, chunks))
        else:
            qh, kh, vh, beta_cam = layer.camera_streams(u, T, own_camera, beta, None)
        M, U = frame_terms(kh, vh, beta_cam, num_frames=T)
        X = scan_states(M, carry_in(M, U, decay, None if states is None else states[1]), decay)
        cam = read_out(X, qh)
        out_states.append(X[0, :, :, -1].clone())
        camera = own_camera
    return layer.output(u, main, cam, camera), tuple(out_states)
