"""The SANA-WM DiT (stage 1): a hybrid GDN / softmax diffusion transformer with dual-branch camera control.

20 blocks (every 4th softmax self-attention, the others frame-wise bidirectional GDN), each with a UCPE camera
branch, a Plücker injection after self-attention, text cross-attention and a GLUMBConv FFN with a temporal conv;
per-frame timestep AdaLN. Paper: arXiv 2605.15178. Spec: shared/reference/dit.md §1-§4, §9, §12; camera.md §5-§8.
State-dict keys and shapes equal the official checkpoint's (dit_state_dict_full.txt), so it loads strictly.

`chunk_size` (frames) turns the bidirectional model into a chunk-causal one: frames of chunk c only see frames
of chunks <= c, in every temporal operator (GDN backward scan, softmax attention, the temporal convolutions).
`part_frames` (DiT.forward) is the memory mode: the same velocity with the blocks' token-wise work done a few
frames at a time (Block.forward_in_parts).
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
from safetensors import SafetensorError, safe_open

from attention import (CrossAttention, RMSNorm, SoftmaxSelfAttention, camera_rope_table, chunk_stop, frame_spans,
                       fused_on_cuda, rope_table)
from camera import ray_matrices, se3_inverse
from gdn import GDNSelfAttention
from quantize import nvfp4_layer_names, quantize_model


@dataclass
class DiTConfig:
    """Defaults = the released SANA-WM_bidirectional transformer (dit.md §1.1)."""
    in_channels: int = 128
    num_layers: int = 20
    hidden_size: int = 2240
    num_attention_heads: int = 20           # cross-attention heads
    softmax_every_n: int = 4                # block i is softmax iff n > 0 and (i+1) % n == 0
    linear_head_dim: int = 112              # self-attention (and RoPE, camera) head dim
    t_kernel_size: int = 3                  # FFN temporal conv
    conv_kernel_size: int = 4               # GDN short conv on K (a symmetric 2K-1 tap filter in time)
    chunk_plucker_channels: int = 48
    chunk_plucker_post_attn_blocks: int = 20  # blocks i < this get plucker_proj (negative: all)
    caption_channels: int = 2304
    mlp_ratio: float = 3.0

    # Keys of the official config.json whose only supported value is the release's, and keys with no effect.
    _FIXED = {"patch_size": [1, 1, 1], "ffn_type": "GLUMBConvTemp", "k_conv_only": True, "pos_embed_type": "wan_rope",
              "qk_norm": True, "cross_norm": True, "y_norm": True, "cam_attn_compress": 1, "use_pe": True,
              "use_chunk_plucker_post_attn": True, "mlp_acts": ["silu", "silu", None], "pred_sigma": False}
    _NO_EFFECT = {"init_cam_from_base", "fp32_attention", "image_size", "learn_sigma", "mixed_precision"}

    def __post_init__(self):
        C, D = self.hidden_size, self.linear_head_dim
        if C % D or D % 8:
            raise ValueError(f"linear_head_dim: expected a multiple of 8 dividing hidden_size={C}, got {D}")
        if C % self.num_attention_heads:
            raise ValueError(f"num_attention_heads: expected a divisor of hidden_size={C}, "
                             f"got {self.num_attention_heads}")
        if self.t_kernel_size % 2 == 0:
            raise ValueError(f"t_kernel_size: expected an odd number of frames, got {self.t_kernel_size}")
        if self.conv_kernel_size < 1:
            raise ValueError(f"conv_kernel_size: expected >= 1, got {self.conv_kernel_size}")

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """From the diffusers-format config.json of the transformer; `_`-prefixed bookkeeping keys are ignored."""
        own = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_") or key in cls._NO_EFFECT:
                continue
            if key in cls._FIXED:
                if (list(value) if isinstance(value, (list, tuple)) else value) != cls._FIXED[key]:
                    raise ValueError(f"config {key}: only {cls._FIXED[key]!r} is supported, got {value!r}")
            elif key in own:
                kwargs[key] = value
            else:
                raise ValueError(f"config: unknown key {key!r}")
        return cls(**kwargs)

    def is_softmax(self, i: int) -> bool:
        return self.softmax_every_n > 0 and (i + 1) % self.softmax_every_n == 0


# --------------------------------------------------------------------------------------------------------------
# Embedders (dit.md §3.2-§3.3)

def timestep_sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t f_k) | sin(t f_k)], f_k = 10000^(-k/(dim/2)), in fp32 (dit.md §3.3)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(freq_dim, dim), nn.Linear(dim, dim)

    def forward(self, sinusoid):
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class PatchEmbed(nn.Module):
    """A per-voxel linear map (Conv3d with kernel = stride = (1,1,1)) from (B, c, T, h, w) to tokens (B, N, C)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=1)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class CaptionMlp(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_channels, dim), nn.Linear(dim, dim)

    def forward(self, y):
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.y_proj = CaptionMlp(in_channels, dim)  # the extra level mirrors the checkpoint's key names

    def forward(self, y):
        return self.y_proj(y)


# --------------------------------------------------------------------------------------------------------------
# FFN (dit.md §9)

def temporal_residual(x: torch.Tensor, conv: nn.Module, chunk_size: int | None,
                      part_frames: int | None = None) -> torch.Tensor:
    """x + conv(x) for x (B, C, T, S) and `conv` a zero-padded 'same' conv over T: (C, C, K, 1) weights, padding
    (K//2, 0), K odd (nn.Conv2d, or a drop-in such as quantize.NVFP4Conv2d). With chunk_size each chunk is
    convolved as if the video ended with it (earlier frames still seen), so nothing leaks backwards. part_frames:
    the output is made that many frames at a time (the memory mode)."""
    T = x.shape[2]
    spans = frame_spans(0, T, chunk_size, part_frames)
    if len(spans) == 1:
        return x + conv(x)
    p, out = conv.padding[0], torch.empty_like(x)
    for start, stop in spans:
        lo, hi = max(0, start - p), min(chunk_stop(start, T, chunk_size), stop + p)  # (the chunk's stop: video ends)
        # The conv's own zero padding at `hi` ends the video there (or hi - stop = p frames are only context); the
        # p frames before `start` are only context (before frame 0 the padding is the video's own).
        out[:, :, start:stop] = x[:, :, start:stop] + conv(x[:, :, lo:hi])[:, :, start - lo:stop - lo]
    return out


@torch.library.custom_op("nano_sana_wm::temporal_residual", mutates_args=())
def _temporal_residual_op(z: torch.Tensor, weight: torch.Tensor, num_frames: int, chunk: int) -> torch.Tensor:
    """temporal_residual in the token layout: z (B, N, C) frame-major, weight (C, C, K, 1), chunk = chunk_size (or
    num_frames) -> z + conv(z). Each tap is one matrix product over frame-shifted rows, out[t] += z[t + d] W_d^T
    (d = k - K//2), accumulated in place by cuBLAS: no transposes to (B, C, T, S) and back, no cuDNN layout
    conversions (BENCHMARKS.md). Past taps cross chunk boundaries (earlier frames are seen); future taps stop at
    the chunk's last frame. An operator, so that torch.compile calls it as is."""
    B, N, C = z.shape
    T, K = num_frames, weight.shape[2]
    S, p = N // T, K // 2
    taps = weight[:, :, :, 0].transpose(0, 1)               # (C_in, C_out, K): tap k is taps[:, :, k]
    out = torch.empty_like(z)
    for b in range(B):
        zb, ob = z[b], out[b]
        torch.addmm(zb, zb, taps[:, :, p], out=ob)          # residual + centre tap, one rounding
        for k in range(K):
            d = k - p
            if d < 0 and T + d > 0:                         # frames t >= -d read frame t + d
                ob[-d * S:].addmm_(zb[:(T + d) * S], taps[:, :, k])
            elif d > 0:
                for start, stop in frame_spans(0, T, chunk):
                    if stop - start > d:                    # frames t < stop - d of the chunk read t + d
                        ob[start * S:(stop - d) * S].addmm_(zb[(start + d) * S:stop * S], taps[:, :, k])
    return out


@_temporal_residual_op.register_fake
def _temporal_residual_shape(z, weight, num_frames, chunk):
    return torch.empty_like(z)


def _conv(*args, **kwargs) -> nn.Module:
    return nn.ModuleDict({"conv": nn.Conv2d(*args, **kwargs)})  # `.conv` mirrors the checkpoint's key names


def depthwise_glu(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The FFN's middle (dit.md §9) after the SiLU: the 3x3 depthwise conv (zero padding 1, weight (2F, 1, 3, 3),
    bias (2F,)) and the GLU value * SiLU(gate) of its two channel halves; s (n, 2F, h, w) -> (n, F, h, w).
    On CUDA in inference, one Triton kernel (`_depthwise_glu_kernel`): the FFN's widest tensor is read once and
    only the half-width result written (a depthwise conv kernel and the GLU's pointwise ops are three passes)."""
    if bias is None:
        bias = s.new_zeros(s.shape[1])
    trained = torch.is_grad_enabled() and any(t.requires_grad for t in (s, weight, bias))
    if s.is_cuda and not trained:                           # the kernel has no backward
        return _depthwise_glu_op(s, weight, bias).permute(0, 3, 1, 2)   # channels-last (n, F, h, w)
    value, gate = F.conv2d(s, weight, bias, padding=1, groups=s.shape[1]).chunk(2, dim=1)
    return value * F.silu(gate)


@triton.jit
def _depthwise_glu_kernel(hidden, taps, bias, out, h, w, half, ssn, ssh, ssw, ssc, BP: tl.constexpr, BC: tl.constexpr):
    """One program per (image n, block of BP pixels p in row-major order, block of BC value channels c): the nine
    taps as nine shifted loads of the input tile (value channels c and gate channels half + c; the overlapping
    loads hit the cache), fp32 accumulation, then the GLU with the reference's roundings (conv output, SiLU(gate),
    product)."""
    n = tl.program_id(2).to(tl.int64)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    c = tl.program_id(0) * BC + tl.arange(0, BC)           # neighbouring programs share the pixels' cache lines
    cmask, pmask = c < half, p < h * w
    i, j = p // w, p % w
    value = tl.zeros((BP, BC), tl.float32) + tl.load(bias + c, mask=cmask, other=0.0)[None, :]
    gate = tl.zeros((BP, BC), tl.float32) + tl.load(bias + half + c, mask=cmask, other=0.0)[None, :]
    for di in tl.static_range(3):
        for dj in tl.static_range(3):
            row, col = i + di - 1, j + dj - 1
            m = (pmask & (row >= 0) & (row < h) & (col >= 0) & (col < w))[:, None] & cmask[None, :]
            src = hidden + n * ssn + (row * ssh + col * ssw)[:, None] + c[None, :] * ssc
            tap = taps + (3 * di + dj) * 2 * half + c
            value += tl.load(src, mask=m, other=0.0).to(tl.float32) * tl.load(tap, mask=cmask, other=0.0)[None, :]
            gate += (tl.load(src + half * ssc, mask=m, other=0.0).to(tl.float32)
                     * tl.load(tap + half, mask=cmask, other=0.0)[None, :])
    dtype = out.dtype.element_ty
    value, gate = value.to(dtype).to(tl.float32), gate.to(dtype).to(tl.float32)
    result = value * (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out + (n * h * w + p)[:, None] * half + c[None, :], result.to(dtype), mask=pmask[:, None] & cmask[None, :])


@torch.library.custom_op("nano_sana_wm::depthwise_glu", mutates_args=())
def _depthwise_glu_op(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """depthwise_glu's kernel as an operator that torch.compile calls as is; returns (n, h, w, F) contiguous."""
    n, c2, h, w = s.shape
    out = s.new_empty(n, h, w, c2 // 2)
    taps = weight.view(c2, 9).T.float().contiguous()        # (9, 2F): tap 3*di + dj of every channel
    BP, BC = 64, 32  # 0.79 ms at the release's 22-frame part on an H200, 0.87 with 64 x 64 (BENCHMARKS.md)
    _depthwise_glu_kernel[(triton.cdiv(c2 // 2, BC), triton.cdiv(h * w, BP), n)](
        s, taps, bias.float().contiguous(), out, h, w, c2 // 2, s.stride(0), s.stride(2), s.stride(3), s.stride(1),
        BP=BP, BC=BC, num_warps=4)
    return out


@_depthwise_glu_op.register_fake
def _depthwise_glu_shape(s, weight, bias):
    n, c2, h, w = s.shape
    return s.new_empty(n, h, w, c2 // 2)


class GLUMBConvTemp(nn.Module):
    """Per frame: 1x1 conv (C -> 2F) + SiLU, 3x3 depthwise conv, GLU (value * SiLU(gate)), 1x1 conv (F -> C);
    then a residual full C -> C temporal conv: z + t_conv(z)."""

    MAX_CONV_ELEMENTS = 1 << 28  # split over frames: the 2F-wide hidden tensors stay under 0.5 GiB (bf16) each

    def __init__(self, dim: int, hidden: int, t_kernel: int):
        super().__init__()
        self.inverted_conv = _conv(dim, 2 * hidden, 1)
        self.depth_conv = _conv(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point_conv = _conv(hidden, dim, 1, bias=False)
        self.t_conv = nn.Conv2d(dim, dim, (t_kernel, 1), padding=(t_kernel // 2, 0), bias=False)

    def per_frame(self, images):
        """(n, C, h, w) -> (n, C, h, w): 1x1 conv + SiLU, depthwise conv + GLU, 1x1 conv."""
        depth = self.depth_conv.conv
        hidden = F.silu(self.inverted_conv.conv(images))
        return self.point_conv.conv(depthwise_glu(hidden, depth.weight, depth.bias))

    def forward(self, m, thw, chunk_size=None, part_frames=None):
        """m (B, N, C) -> (B, N, C); part_frames: at most that many frames at a time (the memory mode)."""
        B, N, C = m.shape
        T, h, w = thw
        images = m.reshape(B * T, h, w, C).permute(0, 3, 1, 2)
        frames_per_call = max(1, self.MAX_CONV_ELEMENTS // (self.inverted_conv.conv.out_channels * h * w))
        frames_per_call = min(frames_per_call, part_frames or frames_per_call)
        if frames_per_call >= B * T:
            z = self.per_frame(images)
        else:                                               # parts written into one tensor, no concatenation
            z = torch.empty_like(images)
            for start in range(0, B * T, frames_per_call):
                z[start:start + frames_per_call] = self.per_frame(images[start:start + frames_per_call])
        conv = self.t_conv
        if part_frames is None and type(conv) is nn.Conv2d and not (   # the operator has no backward
                torch.is_grad_enabled() and (z.requires_grad or conv.weight.requires_grad)):
            # z is channels-last: the permute and reshape are a view in token order
            return _temporal_residual_op(z.permute(0, 2, 3, 1).reshape(B, N, C), conv.weight, T, chunk_size or T)
        z = temporal_residual(z.view(B, T, C, h * w).permute(0, 2, 1, 3), conv, chunk_size, part_frames)
        return z.permute(0, 2, 3, 1).reshape(B, N, C)


# --------------------------------------------------------------------------------------------------------------
# Block and final layer (dit.md §4, §3.5)

@fused_on_cuda
def _modulate(x, shift, scale, T):
    """Per-frame AdaLN: LN(x) (no affine, eps 1e-6) * (1 + scale) + shift, with shift/scale (B, T, 1, C)."""
    B, N, C = x.shape
    return (F.layer_norm(x, (C,), eps=1e-6).view(B, T, N // T, C) * (1 + scale) + shift).view(B, N, C)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, softmax: bool, plucker: bool):
        super().__init__()
        C = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.zeros(6, C))
        if plucker:
            self.plucker_proj = nn.Linear(C, C)
        if softmax:
            self.attn = SoftmaxSelfAttention(C, cfg.linear_head_dim)
        else:
            self.attn = GDNSelfAttention(C, cfg.linear_head_dim, cfg.conv_kernel_size)
        self.cross_attn = CrossAttention(C, cfg.num_attention_heads)
        self.mlp = GLUMBConvTemp(C, int(C * cfg.mlp_ratio), cfg.t_kernel_size)

    @fused_on_cuda
    def forward(self, x, y, text_mask, t6, thw, rope, camera=None, plucker=None, chunk_size=None):
        B, N, C = x.shape
        T = thw[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + t6).chunk(6, 2)
        a = self.attn(_modulate(x, shift_msa, scale_msa, T), thw, rope, camera, chunk_size)
        x = x + (gate_msa * a.view(B, T, N // T, C)).view(B, N, C)
        if plucker is not None and hasattr(self, "plucker_proj"):
            x = x + self.plucker_map(*plucker[1:])(plucker[0])  # ungated (dit.md §4, camera.md §8)
        x = x + self.cross_attn(x, y, text_mask)  # no norm / modulation before cross-attention (dit.md §12.4)
        m = self.mlp(_modulate(x, shift_mlp, scale_mlp, T), thw, chunk_size)
        return x + (gate_mlp * m.view(B, T, N // T, C)).view(B, N, C)

    def plucker_map(self, w_e, b_e):
        """p -> plucker_proj(plucker_embedder(p)) (camera.md §8) on Plücker tokens p (B, n, 48), given the embedder's
        weight (C, 48) and bias (C,). Both maps are linear, so for a dense plucker_proj their product is one 48 -> C
        map (W_b W_e, W_b b_e + b_b), made once here in fp32: the (B, N, C) embedding never exists and each block
        reads 48 channels a token instead of C (the same function; in bf16 the embedding's rounding is skipped)."""
        proj = self.plucker_proj
        if type(proj) is not nn.Linear:                     # e.g. an NVFP4 layer: embed, then project
            return lambda p: proj(F.linear(p, w_e, b_e))
        w_b = proj.weight.float()
        weight, bias = (w_b @ w_e.float()).to(w_e.dtype), (w_b @ b_e.float() + proj.bias.float()).to(w_e.dtype)
        return lambda p: F.linear(p, weight, bias)

    @torch.no_grad()
    def forward_in_parts(self, x, y, text_mask, t6, thw, rope, camera, plucker, chunk_size, part_frames):
        """forward() for the memory mode (inference): x is updated in place, and the token-wise work (projections,
        attention queries, cross-attention, FFN) runs part_frames frames at a time, so the (B, N, C)-sized tensors
        alive at once are x, the block input u and the attention's keys and values (or the
        GDN query streams, per-frame terms and states) and output, then the FFN's input, middle and output; no
        (B, N, 6C) FFN tensor exists. Not compiled as a whole (the parts would unroll into one huge graph); on CUDA
        its pointwise pieces are (`fused_on_cuda`)."""
        B, N, C = x.shape
        T, S = thw[0], N // thw[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + t6).chunk(6, 2)
        spans = frame_spans(0, T, None, part_frames)
        a = self.attn(_modulate(x, shift_msa, scale_msa, T), thw, rope, camera, chunk_size, part_frames)
        to_plucker = self.plucker_map(*plucker[1:]) if plucker is not None and hasattr(self, "plucker_proj") else None
        for t0, t1 in spans:
            part = x[:, t0 * S:t1 * S]                      # a view: the updates land in x
            part += (gate_msa[:, t0:t1] * a[:, t0 * S:t1 * S].view(B, t1 - t0, S, C)).view(B, -1, C)
            if to_plucker is not None:
                part += to_plucker(plucker[0][:, t0 * S:t1 * S])
            part += self.cross_attn(part, y, text_mask)
        del a
        m = self.mlp(_modulate(x, shift_mlp, scale_mlp, T), thw, chunk_size, part_frames)
        for t0, t1 in spans:
            x[:, t0 * S:t1 * S] += (gate_mlp[:, t0:t1] * m[:, t0 * S:t1 * S].view(B, t1 - t0, S, C)).view(B, -1, C)
        return x


class FinalLayer(nn.Module):
    """Per-frame modulation by the timestep embedding (not SiLU'd, table rows [shift, scale]), then Linear."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.linear = nn.Linear(dim, out_channels)

    @fused_on_cuda
    def forward(self, x, temb):  # temb (B, T, 1, C)
        shift, scale = (self.scale_shift_table + temb).chunk(2, dim=2)
        return self.linear(_modulate(x, shift, scale, temb.shape[1]))


# --------------------------------------------------------------------------------------------------------------
# The model

class DiT(nn.Module):
    """Embed latents, text, timesteps and camera; run the blocks; project back to a velocity per latent voxel.
    Weights: `DiT.from_pretrained(path)`; `DiT(cfg)` alone has placeholder initial values."""

    def __init__(self, cfg: DiTConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or DiTConfig()
        C = cfg.hidden_size
        self.t_embedder = TimestepEmbedder(C)
        self.attention_y_norm = RMSNorm(C, 1e-5)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.x_embedder = PatchEmbed(cfg.in_channels, C)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, C)
        self.plucker_embedder = PatchEmbed(cfg.chunk_plucker_channels, C)
        self.raymap_embedder = PatchEmbed(3, C)  # dead in the released config (camera.md §6.4); kept for loading
        n_pl = cfg.chunk_plucker_post_attn_blocks
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_softmax(i), n_pl < 0 or i < n_pl)
                                    for i in range(cfg.num_layers))
        self.final_layer = FinalLayer(C, cfg.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def forward(self, x, timestep, text, text_mask, raymap=None, plucker=None, chunk_size=None, part_frames=None):
        """Flow velocity (B, 128, T, h, w) for noisy latents x (B, 128, T, h, w).

        timestep (B, T) per frame in [0, 1000]; text (B, L, 2304) Gemma-2 hidden states; text_mask (B, L),
        nonzero = keep; raymap (B, T, 20) and plucker (B, 48, T, h, w) from camera.prepare_camera (each optional);
        chunk_size: frames per causal chunk, None = the released bidirectional model.
        part_frames: the memory mode (inference only): the blocks do their token-wise work part_frames latent
        frames at a time (Block.forward_in_parts): the same velocity in about half the activation memory, slower
        (BENCHMARKS.md). None: all frames at once, the fastest.
        """
        cfg, dtype = self.config, self.dtype
        B, T, h, w = _check_inputs(cfg, x, timestep, text, text_mask, raymap, plucker, chunk_size)
        if part_frames is not None and (not isinstance(part_frames, int) or part_frames < 1):
            raise ValueError(f"part_frames: expected None or a positive int (latent frames), got {part_frames!r}")
        if part_frames is not None and torch.is_grad_enabled():
            raise ValueError("part_frames: the memory mode is for inference; run it under torch.no_grad()")
        thw, C = (T, h, w), cfg.hidden_size
        text, text_mask = crop_text(text, text_mask)
        x = self.x_embedder(x.to(dtype))
        # The reference truncates timesteps to integers before the sinusoid (dit.md §12.1): 998.26 -> 998.
        temb = self.t_embedder(timestep_sinusoid(timestep.long().float().flatten()).to(dtype))  # (B*T, C)
        t6 = self.t_block(temb).view(B, T, 6, C)
        y = self.attention_y_norm(self.y_embedder(text.to(dtype)))
        rope = rope_table(cfg.linear_head_dim, thw, x.device)

        camera = None
        if raymap is not None:
            # The pipeline hands the camera to the model in the model dtype; the geometry runs in it (camera.md §9.2).
            P = ray_matrices(raymap.to(dtype), thw)
            camera = (P, P.transpose(-1, -2), se3_inverse(P), camera_rope_table(rope, cfg.linear_head_dim))
        pl = None
        if plucker is not None:  # embedded inside each block (Block.plucker_map)
            embed = self.plucker_embedder.proj
            pl = (plucker.to(dtype).flatten(2).transpose(1, 2), embed.weight.flatten(1), embed.bias)

        mask = text_mask != 0
        if part_frames is not None:
            x = x.contiguous()  # updated in place by the blocks
        for block in self.blocks:
            if part_frames is None:
                x = block(x, y, mask, t6, thw, rope, camera, pl, chunk_size)
            else:
                x = block.forward_in_parts(x, y, mask, t6, thw, rope, camera, pl, chunk_size, part_frames)
        x = self.final_layer(x, temb.view(B, T, 1, C))
        return x.view(B, T, h, w, -1).permute(0, 4, 1, 2, 3)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, device="cpu",
                        config: DiTConfig | None = None) -> "DiT":
        """Load the native release file (one .safetensors, with an unused `pos_embed`) or a diffusers-format
        directory (config.json + *.safetensors, sharded with an index). A single file or a directory without
        config.json uses `config` (default: the release). Built on the meta device; tensors are assigned.
        An NVFP4 file written by quantize.py loads too: its quantised layers become NVFP4 modules first."""
        cfg_dict, files = find_checkpoint(path)
        if cfg_dict is not None and config is not None:
            raise ValueError(f"config: {path} has its own config.json; pass config only for a file or folder "
                             f"without one")
        cfg = DiTConfig.from_dict(cfg_dict) if cfg_dict is not None else (config or DiTConfig())
        state = read_safetensors(files, dtype, device, drop={"pos_embed"})
        with torch.device("meta"):
            model = cls(cfg)
            nvfp4_layers = nvfp4_layer_names(state)
            if nvfp4_layers:
                quantize_model(model, include=nvfp4_layers, exclude=())
        load_strict(model, state)
        return model.eval()


TEXT_MULTIPLE = 64  # cropped text lengths: few distinct shapes, so few compiled graphs of the blocks


def crop_text(text, text_mask):
    """text and text_mask without the tail of tokens masked in every batch row, kept to a multiple of TEXT_MULTIPLE.
    Exact: a masked key gets zero attention weight, so cross-attention over the valid prefix is the same (a
    120-token prompt padded to 300 costs 0.6 instead of 1.3 ms per call at 961 frames). Waits for the mask."""
    L = text.shape[1]
    valid = text_mask.ne(0).any(0)
    last = int((valid * torch.arange(1, L + 1, device=valid.device)).max())  # 1 + index of the last valid token
    keep = min(L, -(-(last or L) // TEXT_MULTIPLE) * TEXT_MULTIPLE)          # (no valid token at all: keep all)
    return text[:, :keep], text_mask[:, :keep]


def _check_inputs(cfg, x, timestep, text, text_mask, raymap, plucker, chunk_size):
    if x.dim() != 5 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"x: expected (B, {cfg.in_channels}, T, h, w), got {tuple(x.shape)}")
    B, _, T, h, w = x.shape
    expected = {"timestep": (timestep, (B, T)), "text": (text, (B, None, cfg.caption_channels)),
                "text_mask": (text_mask, (B, text.shape[1] if text.dim() == 3 else None)),
                "raymap": (raymap, (B, T, 20)), "plucker": (plucker, (B, cfg.chunk_plucker_channels, T, h, w))}
    for name, (t, shape) in expected.items():
        if t is not None and (t.dim() != len(shape) or any(s not in (None, n) for s, n in zip(shape, t.shape))):
            raise ValueError(f"{name}: expected shape {tuple('L' if s is None else s for s in shape)}, "
                             f"got {tuple(t.shape)}")
    # A NaN or infinite timestep would be cast to an arbitrary integer noise level and give a finite but wrong
    # velocity. The check reads one bit back from the device, a sync; forward already waits for the GPU in
    # crop_text (the text mask), so this adds one tiny reduction, not a second stall of the queue.
    if not bool(torch.isfinite(timestep).all()):
        raise ValueError("timestep: expected finite values in [0, 1000], got NaN or infinity")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or a positive int (frames), got {chunk_size!r}")
    return B, T, h, w


# --------------------------------------------------------------------------------------------------------------
# Loading (find the files, read them, check keys and shapes, assign).

def find_checkpoint(path) -> tuple[dict | None, list[Path]]:
    """(config.json contents or None, safetensors files) of a single file or a directory."""
    path = Path(path)
    if path.is_file():
        return None, [path]
    if not path.is_dir():
        raise ValueError(f"path: no such file or directory: {path}")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"path: no .safetensors file in {path}")
    return config, files


def read_safetensors(files, dtype, device, drop=()) -> dict:
    """All tensors of the files, each cast to dtype on device as it is read (never two copies of the model).
    The packed parts of NVFP4 layers (uint8 values, float8 block scales, fp32 `weight_scale_2`) keep their dtype."""
    state = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key not in drop:
                        t = f.get_tensor(key)
                        packed = t.dtype in (torch.uint8, torch.float8_e4m3fn) or key.endswith(".weight_scale_2")
                        state[key] = t if packed else t.to(dtype)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint: {file} is not a readable safetensors file ({e})") from None
    return state


def load_strict(model: nn.Module, state: dict) -> None:
    """load_state_dict(strict=True, assign=True), after a check that lists every key and shape problem."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError("checkpoint does not match the model:" +
                         "".join(f"\n  {title} ({len(items)}): {', '.join(items[:20])}{' ...' * (len(items) > 20)}"
                                 for title, items in (("missing", missing), ("unexpected", unexpected),
                                                      ("wrong shape", shapes)) if items))
    model.load_state_dict(state, strict=True, assign=True)
