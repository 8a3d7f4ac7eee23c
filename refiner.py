"""SANA-WM stage 2: the LTX-2 refiner (paper §3.4 and App. A).

A stage-1 latent (B, 128, T, h, w) is cleaned block by block by the *video* half of the LTX-2 transformer, which was
fine-tuned with a rank-384 LoRA (released merged into the dense weights) and is run for 3 Euler steps from a
truncated noise level σ = 0.909375, so the stage-1 content survives (paper App. A, Eq. 7-11). Sections: 1. config,
2. RoPE, 3. layers, 4. the sliding-window KV cache, 5. the video transformer, 6. LoRA, 7. RefinerStream, refine().
After the machinery line: the text input (Gemma-3, LTX-2's text connectors), config parsing, loading, LoRA files, audio.

    encoder = PromptEncoder.from_pretrained("release/refiner", dtype=torch.bfloat16, device="cuda")
    text, text_mask = encoder("a prompt")          # Gemma-3-12B + connectors, (1, 1024, 3840) and (1, 1024)
    del encoder                                    # free Gemma-3 before the 13 B-parameter transformer loads
    refiner = Refiner.from_pretrained("release/refiner", dtype=torch.bfloat16, device="cuda")
    latents = refine(refiner, latents, text, text_mask, fps=16, generator=torch.Generator("cuda").manual_seed(42))

Layouts: tokens (B, N, C) frame-major n = (t*h + i)*w + j; latents (B, C, T, h, w); K/V kept flat
(B, N, heads*head_dim) as the checkpoint's q/k norms act across all heads jointly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The distilled stage-2 schedule: the last three σ of LTX-2's 8-step distilled schedule, then 0 (paper App. A).
STAGE2_SIGMAS = (0.909375, 0.725, 0.421875, 0.0)


# 1. Config. Defaults = the release (LTX-2.0, paper §3.4; the release's refiner/ folder).
@dataclass
class RefinerConfig:
    """LTX-2 video transformer (`SanaWMLTX2RefinerTransformer3DModel`). The audio_* sizes only shape the parameter
    holders that `keep_audio=True` creates."""
    in_channels: int = 128
    out_channels: int = 128
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    cross_attention_dim: int = 4096
    caption_channels: int = 3840
    num_layers: int = 48
    norm_eps: float = 1e-6
    rope_type: str = "split"            # the release overrides the class default "interleaved" (LTX-2's "split" RoPE)
    rope_theta: float = 10000.0
    rope_double_precision: bool = True
    vae_scale_factors: tuple = (8, 32, 32)
    pos_embed_max_pos: int = 20         # RoPE normalisers: time in seconds / 20, pixels / 2048
    base_height: int = 2048
    base_width: int = 2048
    causal_offset: int = 1
    timestep_scale_multiplier: int = 1000
    audio_in_channels: int = 128
    audio_out_channels: int = 128
    audio_num_attention_heads: int = 32
    audio_attention_head_dim: int = 64
    audio_cross_attention_dim: int = 2048

    def __post_init__(self):
        _check_refiner_config(self)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# 2. Rotary positions. A table is (cos, sin) of the rotation angles of each rotated pair: "split" (the release):
#    (N, heads, head_dim/2), pairs (j, j + head_dim/2) inside each head; "interleaved": (N, inner/2), pairs (2i, 2i+1).
def _rope_freqs(n: int, theta: float, double_precision: bool, device) -> torch.Tensor:
    """θ_k = theta^(k/(n-1)) · π/2, k = 0..n-1, formed in float64 (if asked) then rounded to float32 (§11.1)."""
    dtype = torch.float64 if double_precision else torch.float32
    return (torch.pow(theta, torch.linspace(0.0, 1.0, n, dtype=dtype, device=device)) * math.pi / 2.0).float()


def _rope_table(angles: torch.Tensor, inner: int, heads: int, rope_type: str):
    """angles (N, k) → (cos, sin) with (inner/2 − k) identity pairs (cos 1, sin 0) in front, in the layout above."""
    pad = inner // 2 - angles.shape[-1]
    cos = F.pad(angles.cos(), (pad, 0), value=1.0)
    sin = F.pad(angles.sin(), (pad, 0), value=0.0)
    if rope_type == "split":
        cos, sin = cos.unflatten(-1, (heads, -1)), sin.unflatten(-1, (heads, -1))
    return cos, sin


def video_rope(frames, height: int, width: int, fps: float, cfg: RefinerConfig, device=None):
    """RoPE table for the tokens of latent frames `frames` (absolute indices in the whole stage-1 video), all rows
    and columns, as LTX-2's video RoPE. Each axis uses the midpoint of the voxel's pixel-space extent: time in seconds
    [max(8f+1−8, 0), 8(f+1)+1−8)/fps (the causal VAE's first frame spans one pixel frame), rows/columns
    [32y, 32y+32). Angle 3k + a = (2·frac_a − 1)·θ_k, frac = (t/20, y/2048, x/2048). Computed in float32."""
    st, sy, sx = cfg.vae_scale_factors
    f = torch.as_tensor(frames, dtype=torch.float32).to(device, non_blocking=True)  # (device= would wait for the GPU)
    t0 = (f * st + cfg.causal_offset - st).clamp(min=0) / float(fps)
    t1 = ((f + 1) * st + cfg.causal_offset - st).clamp(min=0) / float(fps)
    y = torch.arange(height, dtype=torch.float32, device=device)
    x = torch.arange(width, dtype=torch.float32, device=device)
    frac_t = (t0 + t1) / 2.0 / cfg.pos_embed_max_pos
    frac_y = (y * sy + (y + 1) * sy) / 2.0 / cfg.base_height
    frac_x = (x * sx + (x + 1) * sx) / 2.0 / cfg.base_width
    frac = torch.stack(torch.meshgrid(frac_t, frac_y, frac_x, indexing="ij"), dim=-1).reshape(-1, 3)   # (N, 3)
    n = cfg.inner_dim // 6
    theta = _rope_freqs(n, cfg.rope_theta, cfg.rope_double_precision, device)
    angles = ((frac[:, :, None] * 2 - 1) * theta).transpose(1, 2).flatten(1)     # (N, 3n), index 3k + axis
    return _rope_table(angles, cfg.inner_dim, cfg.num_attention_heads, cfg.rope_type)


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotate the pairs of x (B, N, inner) by the table `rope` (layout told by its rank, see above); in float32,
    as the reference does, then back to x's dtype."""
    cos, sin = rope
    xf = x.float()
    if cos.dim() == 3:      # split: (x_j, x_{j+D/2}) per head
        x1, x2 = xf.unflatten(-1, (cos.shape[1], 2, -1)).unbind(-2)
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-2)
    else:                   # interleaved: (x_{2i}, x_{2i+1})
        x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.flatten(2).to(x.dtype)


# 3. Layers. Module nesting mirrors the checkpoint keys (to_out.0, ff.net.0.proj, ff.net.2, linear_1/linear_2).
def text_bias(text_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The cross-attention's bias from the (B, L) 0/1 text mask: additive −10000 over the padded text keys."""
    return None if text_mask is None else ((1 - text_mask.to(dtype)) * -10000.0)[:, None, None, :]


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMSNorm of the blocks: mean of squares in float32, product in float32, back to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Attention(nn.Module):
    """LTX-2 attention: q/k RMSNorm (with weight) across all heads jointly, optional RoPE on q and k, SDPA."""

    def __init__(self, query_dim: int, kv_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_q = nn.RMSNorm(inner, eps=1e-6)     # LTX-2 never passes its norm_eps here: always 1e-6
        self.norm_k = nn.RMSNorm(inner, eps=1e-6)
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def qkv(self, x: torch.Tensor, context: torch.Tensor):
        return self.norm_q(self.to_q(x)), self.norm_k(self.to_k(context)), self.to_v(context)

    def attend(self, q, k, v, bias=None) -> torch.Tensor:
        """q (B, Nq, inner), k/v (B, Nk, inner), bias additive, broadcastable to (B, heads, Nq, Nk)."""
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)   # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
        return self.to_out[0](o.transpose(1, 2).flatten(2))

    def forward(self, x, context=None, rope=None, bias=None) -> torch.Tensor:
        q, k, v = self.qkv(x, x if context is None else context)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return self.attend(q, k, v, bias)


class FeedForward(nn.Module):
    """Linear dim→4·dim, GELU(tanh), Linear 4·dim→dim."""

    def __init__(self, dim: int):
        super().__init__()
        # net.1 is the reference's (parameter-free) dropout slot, kept so the second Linear is named net.2.
        self.net = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(dim, 4 * dim)}), nn.Identity(),
                                  nn.Linear(4 * dim, dim)])

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0]["proj"](x), approximate="tanh"))


class MLP(nn.Module):
    """linear_2(act(linear_1(x))): the timestep embedder (SiLU) and the caption projection (GELU tanh)."""

    def __init__(self, dim_in: int, dim: int, act: str):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)
        self.act = nn.SiLU() if act == "silu" else nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def timestep_sincos(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t·f_j), sin(t·f_j)], f_j = 10000^(−j/(dim/2)), in float32 (as LTX-2)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNSingle(nn.Module):
    """PixArt-α adaLN-single: e = MLP(sincos(t)); modulation = Linear(SiLU(e)) with n·dim outputs."""

    def __init__(self, dim: int, n_mod: int):
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": MLP(256, dim, "silu")})
        self.linear = nn.Linear(dim, n_mod * dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype):
        e = self.emb["timestep_embedder"](timestep_sincos(t).to(dtype))
        return self.linear(F.silu(e)), e


# 4. The sliding-window KV cache (paper App. A). Per layer: the sink's K (pre-RoPE, re-rotated for every window
#    to sit just before the history) and V, and the post-RoPE K/V of the most recent refined frames. Its size is
#    bounded by sink + kv_max_frames − sink frames, so the cost of refinement is linear in video length.
@dataclass
class LayerKV:
    sink_k: torch.Tensor | None = None      # (B, sink tokens, inner), normed, before RoPE
    sink_v: torch.Tensor | None = None
    hist_k: torch.Tensor | None = None      # (B, history tokens, inner), after RoPE at its own absolute frames
    hist_v: torch.Tensor | None = None


class WindowKVCache:
    def __init__(self, num_layers: int, sink_frames: int = 0):
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.sink_frames = sink_frames      # latent frames in the sink
        self.sink_rope = None               # RoPE table of the sink at its current (sliding) position

    def window(self, layer: LayerKV, k: torch.Tensor, v: torch.Tensor):
        """K/V the current block attends to: [sink (rotated now); history; current block]."""
        _check_sink(self, layer)
        ks, vs = [apply_rope(layer.sink_k.to(k.dtype), self.sink_rope)], [layer.sink_v.to(v.dtype)]
        if layer.hist_k is not None:
            ks.append(layer.hist_k.to(k.dtype))
            vs.append(layer.hist_v.to(v.dtype))
        return torch.cat([*ks, k], dim=1), torch.cat([*vs, v], dim=1)

    def trim_history(self, keep_tokens: int):
        for layer in self.layers:
            layer.hist_k, layer.hist_v = layer.hist_k[:, -keep_tokens:], layer.hist_v[:, -keep_tokens:]


# 5. The LTX-2 video transformer (video stream only).
class RefinerBlock(nn.Module):
    """x += gate·SelfAttn(RMS(x)·(1+scale)+shift); x += CrossAttn(RMS(x), text); x += gate·FF(RMS(x)·(1+s)+sh)."""

    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        d = cfg.inner_dim
        self.eps = cfg.norm_eps
        self.attn1 = Attention(d, d, cfg.num_attention_heads, cfg.attention_head_dim)
        self.attn2 = Attention(d, cfg.cross_attention_dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.ff = FeedForward(d)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d ** 0.5)

    def self_attention(self, h, rope, kv: LayerKV | None, cache: WindowKVCache | None, capture: str | None):
        """Queries: the current block only. capture="sink" records this forward's pre-RoPE K/V as the sink (no
        prefix); with a cache otherwise the keys are [sink; history; current], and capture="history" appends this
        block's post-RoPE K/V to the history (after they have been attended to)."""
        q, k, v = self.attn1.qkv(h, h)
        if capture == "sink":
            kv.sink_k, kv.sink_v = k, v
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        keys, values = k, v
        if cache is not None and capture != "sink":
            keys, values = cache.window(kv, k, v)
            if capture == "history":
                kv.hist_k = k if kv.hist_k is None else torch.cat([kv.hist_k, k], dim=1)
                kv.hist_v = v if kv.hist_v is None else torch.cat([kv.hist_v, v], dim=1)
        return self.attn1.attend(q, keys, values)

    def forward(self, x, text, text_bias, temb, rope, kv=None, cache=None, capture=None):
        mod = self.scale_shift_table + temb.unflatten(-1, (6, -1))            # (B, 1 or N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(2)
        h = rms_norm(x, self.eps) * (1 + scale_msa) + shift_msa
        x = x + self.self_attention(h, rope, kv, cache, capture) * gate_msa
        x = x + self.attn2(rms_norm(x, self.eps), text, bias=text_bias)    # no modulation, no gate
        h = rms_norm(x, self.eps) * (1 + scale_mlp) + shift_mlp
        return x + self.ff(h) * gate_mlp


class Refiner(nn.Module):
    """The LTX-2 video transformer: one forward predicts the flow velocity of one AR block of tokens. `keep_audio`
    adds LTX-2's audio modules as parameter holders for strict loading, never read (see `_add_audio_holders`)."""

    def __init__(self, cfg: RefinerConfig | None = None, keep_audio: bool = False):
        super().__init__()
        cfg = cfg or RefinerConfig()
        self.cfg = cfg
        d = cfg.inner_dim
        self.proj_in = nn.Linear(cfg.in_channels, d)
        self.time_embed = AdaLNSingle(d, 6)
        self.caption_projection = MLP(cfg.caption_channels, d, "gelu_tanh")
        self.transformer_blocks = nn.ModuleList([RefinerBlock(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d ** 0.5)
        self.proj_out = nn.Linear(d, cfg.out_channels)
        if keep_audio:
            _add_audio_holders(self, cfg)

    def rope(self, frames, height: int, width: int, fps: float):
        return video_rope(frames, height, width, fps, self.cfg, device=self.proj_in.weight.device)

    def forward(self, tokens, timestep, text, rope, text_mask=None, cache: WindowKVCache | None = None,
                capture: str | None = None) -> torch.Tensor:
        """tokens (B, N, in_channels); timestep (B,) or (B, N), already ×1000; text (B, L, caption_channels);
        rope = self.rope(frames, h, w, fps) for the tokens' frames; text_mask (B, L) 0/1 or None.
        cache + capture: None = attend to [sink; history; current] (or only the block without a cache),
        "sink" = record pre-RoPE K/V as the sink, "history" = attend and append post-RoPE K/V to the history.
        Returns the velocity (B, N, out_channels)."""
        _check_forward(self, cache, capture)
        B = tokens.shape[0]
        bias = text_bias(text_mask, tokens.dtype)
        x = self.proj_in(tokens)
        temb, e = self.time_embed(timestep.flatten(), x.dtype)
        temb, e = temb.view(B, -1, temb.shape[-1]), e.view(B, -1, e.shape[-1])  # (B, 1 or N, ·): per sample/token
        text = self.caption_projection(text)
        for i, block in enumerate(self.transformer_blocks):
            kv = cache.layers[i] if cache is not None else None
            x = block(x, text, bias, temb, rope, kv, cache, capture)
        shift, scale = (self.scale_shift_table + e[:, :, None]).unbind(2)
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
        return self.proj_out(x)


# 6. LoRA (paper App. A: rank 384). y = W x + b + (alpha/rank)·B(A(x)), B
#    starting at zero so a fresh adapter changes nothing. The release ships the adapters merged into W, so loading
#    it needs none of this; it is here to fine-tune further and to exchange adapters (PEFT key names).
LORA_TARGETS = (r"transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
                r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)")


class LoRALinear(nn.Module):
    """A Linear plus a rank-r adapter. It takes over the wrapped Linear's own weight and bias (no copy), so the
    state-dict keys stay `<name>.weight/.bias` and the adapter adds `<name>.lora_A.weight`, `<name>.lora_B.weight`."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.weight, self.bias = linear.weight, linear.bias
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.scale = self.alpha / self.rank
        w = linear.weight
        self.lora_A = nn.Linear(w.shape[1], rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False                 # merge() folds B·A into W (after the machinery line)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + self.lora_B(self.lora_A(x)) * self.scale


def add_lora(model: nn.Module, rank: int = 384, alpha: float | None = None, targets: str = LORA_TARGETS) -> list:
    """Wrap every nn.Linear whose full name matches `targets` (default: the 4 self-attention, 4 cross-attention and
    2 feed-forward linears of each transformer block) in a LoRALinear; returns the wrapped names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
    if not names:
        raise ValueError(f"no nn.Linear of the model matches targets={targets!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


# 7. The refinement loop (paper App. A, Eq. 7-11): truncated-σ flow matching, 3 Euler steps, chunk-causal blocks over a
#    sliding window [sink | ≤ kv_max_frames − sink history frames | current block]. Its two model calls,
#    capture_sink and block_velocity, are also the window that train.refiner_loss trains on.
def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, T, h, w) → (B, T·h·w, C), frame-major."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    return tokens.transpose(1, 2).unflatten(2, (frames, height, width))


def capture_sink(refiner: Refiner, sink: torch.Tensor, text, text_mask, fps: float):
    """The attention sink: the clean stage-1 frames 0..k−1 (B, C, k, h, w), in the model dtype, run once at σ = 0;
    every layer keeps their K/V before RoPE in a fresh cache. Returns (cache, the sink's velocity tokens)."""
    B, _, k, h, w = sink.shape
    cache = WindowKVCache(len(refiner.transformer_blocks), k)
    t = torch.zeros(B, dtype=torch.float32, device=sink.device)
    return cache, refiner(pack(sink), t, text, refiner.rope(range(k), h, w, fps), text_mask, cache, "sink")


def block_velocity(refiner: Refiner, cache: WindowKVCache, x: torch.Tensor, sigma: float, start: int, text,
                   text_mask, fps: float, history: int = 0, capture: str | None = None) -> torch.Tensor:
    """The velocity (B, C, n, h, w) of x, the frames start..start+n−1 at noise level σ (in the model dtype), at
    their absolute RoPE positions. They attend to [sink; the last `history` refined frames; x], the sink rotated
    to the frames just before the history (it slides with the window). capture as in Refiner.forward."""
    B, _, n, h, w = x.shape
    off = start - history - cache.sink_frames
    cache.sink_rope = refiner.rope(range(off, off + cache.sink_frames), h, w, fps)
    t = torch.full((B,), float(sigma) * refiner.cfg.timestep_scale_multiplier, dtype=torch.float32, device=x.device)
    v = refiner(pack(x), t, text, refiner.rope(range(start, start + n), h, w, fps), text_mask, cache, capture)
    return unpack(v, n, h, w)


class RefinerStream:
    """refine()'s loop one block per call, for stage-1 chunks as they arrive (paper App. A): the clean sink frames
    (B, C, k, h, w) are captured once; each `refine(block)` refines the next frames in order (from `next_frame`),
    with one ε from `generator`, and appends their K/V to the history. Arguments as refine()'s."""

    @torch.no_grad()
    def __init__(self, refiner: Refiner, sink, text, text_mask=None, *, fps: float, block_size: int = 3,
                 kv_max_frames: int = 11, sigmas=STAGE2_SIGMAS, generator: torch.Generator | None = None):
        sig = _check_stream(refiner.cfg, sink, text, text_mask, fps, block_size, sigmas)   # float32, as the reference
        self.sigmas, self.dts = sig.tolist(), (sig[1:] - sig[:-1]).tolist()    # Euler steps formed in float32
        self.refiner, self.dtype, self.sink_shape = refiner, refiner.proj_in.weight.dtype, sink.shape
        self.cond = (text.to(self.dtype), text_mask, fps)     # what every forward takes besides the block
        self.block_size, self.max_hist = block_size, kv_max_frames - sink.shape[2]    # history frames kept
        self.generator = torch.Generator(sink.device).manual_seed(42) if generator is None else generator
        self.cache, _ = capture_sink(refiner, sink.to(self.dtype), *self.cond)
        self.next_frame, self.hist = sink.shape[2], 0   # absolute latent frame of the next block; history frames

    @torch.no_grad()
    def refine(self, block: torch.Tensor) -> torch.Tensor:
        """The next stage-1 block (B, C, n ≤ block_size, h, w) → refined, same shape, in the refiner's dtype."""
        _check_block(self, block)
        s, n, sig, dtype = self.next_frame, block.shape[2], self.sigmas, self.dtype
        noise = torch.randn(block.shape, generator=self.generator, device=self.generator.device, dtype=dtype)
        # x_σ0 = (1 − σ0)·x0 + σ0·ε with x0 = the stage-1 block: the truncated start keeps the stage-1 content.
        x = ((1.0 - sig[0]) * block.to(dtype).float() + sig[0] * noise.to(block.device).float()).to(dtype)
        for i in range(len(sig) - 1):
            v = block_velocity(self.refiner, self.cache, x, sig[i], s, *self.cond, self.hist)
            # x̂0 = x − σ·v rounded to the model dtype, Euler on the velocity (x − x̂0)/σ in float32, as the reference.
            x0 = (x.float() - v.float() * sig[i]).to(dtype)
            x = (x.float() + self.dts[i] * ((x.float() - x0.float()) / sig[i])).to(dtype)
        # (b) Append the refined block's post-RoPE K/V (seen with the same prefix) to the history; trim it.
        block_velocity(self.refiner, self.cache, x, 0.0, s, *self.cond, self.hist, capture="history")
        self.next_frame, self.hist = s + n, self.hist + n
        if 0 < self.max_hist < self.hist:          # kv_max_frames <= sink: never trimmed, as the reference
            self.cache.trim_history(self.max_hist * block.shape[3] * block.shape[4])   # h·w tokens per frame
            self.hist = self.max_hist
        return x


@torch.no_grad()
def refine(refiner: Refiner, latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None, *,
           fps: float, sink_size: int = 1, block_size: int = 3, kv_max_frames: int = 11,
           sigmas=STAGE2_SIGMAS, generator: torch.Generator | None = None) -> torch.Tensor:
    """Refine a stage-1 latent (B, C, T, h, w) (normalised LTX-2 VAE space) with a RefinerStream: same shape, refiner's
    dtype, frames < sink_size kept (decode, then drop the first `sink_size` pixel frames and the first pose, as the
    official pipeline does). generator: default seed 42 on the latents' device (CUDA and CPU streams differ). One 80 GB
    GPU, bf16, 704×1280: free PromptEncoder (24 GB) before loading the Refiner (26.1 GB); KV cache ≤ 7.6 GB."""
    _check_refine(refiner.cfg, latents, sink_size)
    stream = RefinerStream(refiner, latents[:, :, :sink_size], text, text_mask, fps=fps, block_size=block_size,
                           kv_max_frames=kv_max_frames, sigmas=sigmas, generator=generator)
    blocks = latents[:, :, sink_size:].split(block_size, dim=2)     # in order; the last may be shorter
    return torch.cat([latents[:, :, :sink_size].to(stream.dtype), *[stream.refine(b) for b in blocks]], dim=2)


# ================================================================================================================
# Machinery below this line: the text input (Gemma-3 and LTX-2's text connectors, whose output refine() takes),
# config parsing and checks, loading, LoRA merging and files, the audio parameter holders.
# The refiner above is complete without it.
# ================================================================================================================
import dataclasses  # noqa: E402  (the imports of the machinery alone)
from pathlib import Path  # noqa: E402


# The text input (LTX-2's text path): Gemma-3 hidden states → masked range norm (twice) → text_proj_in → registers
# → 2 RoPE transformer blocks → RMSNorm.
@dataclass
class ConnectorsConfig:
    """LTX-2.0 text connectors (`LTX2TextConnectors`, per_modality_projections=False)."""
    caption_channels: int = 3840
    text_proj_in_factor: int = 49       # Gemma-3-12B hidden states: embeddings + 48 layers
    video_connector_num_attention_heads: int = 30
    video_connector_attention_head_dim: int = 128
    video_connector_num_layers: int = 2
    video_connector_num_learnable_registers: int = 128
    audio_connector_num_attention_heads: int = 30
    audio_connector_attention_head_dim: int = 128
    audio_connector_num_layers: int = 2
    audio_connector_num_learnable_registers: int = 128
    connector_rope_base_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_double_precision: bool = True
    rope_type: str = "split"

    def __post_init__(self):
        _check_connectors_config(self)


def text_rope(length: int, cfg: ConnectorsConfig, device=None):
    """1-D RoPE of the video connector (§4e): position i → frac i/4096, angles (2·frac − 1)·θ_k."""
    inner = cfg.video_connector_num_attention_heads * cfg.video_connector_attention_head_dim
    frac = torch.arange(length, dtype=torch.float32, device=device) / cfg.connector_rope_base_seq_len
    theta = _rope_freqs(inner // 2, cfg.rope_theta, cfg.rope_double_precision, device)
    angles = (frac[:, None] * 2 - 1) * theta
    return _rope_table(angles, inner, cfg.video_connector_num_attention_heads, cfg.rope_type)


def masked_range_norm(h: torch.Tensor, mask: torch.Tensor, scale: float = 8.0, eps: float = 1e-6) -> torch.Tensor:
    """h (B, L, C, layers), mask (B, L) bool → (B, L, C·layers), flat index c·layers + l; per batch item and layer:
    scale·(h − mean)/(max − min + eps) over the valid tokens, zero at padding (§4.4). The sum is in h's dtype, but
    dividing by the float32 count promotes the mean, and so the result, to float32 until the final cast, as in the
    reference."""
    B, L, C, _ = h.shape
    m = mask[:, :, None, None]
    count = (mask.sum(1) * C).view(B, 1, 1, 1).float() + eps
    mean = h.masked_fill(~m, 0.0).sum(dim=(1, 2), keepdim=True) / count
    lo = h.masked_fill(~m, float("inf")).amin(dim=(1, 2), keepdim=True)
    hi = h.masked_fill(~m, float("-inf")).amax(dim=(1, 2), keepdim=True)
    y = ((h - mean) / (hi - lo + eps) * scale).flatten(2)
    return y.masked_fill(~mask[:, :, None], 0.0).to(h.dtype)


class ConnectorBlock(nn.Module):
    """x += SelfAttn(RMS(x)) with 1-D RoPE; x += FF(RMS(x)). No masking: registers replaced the padding."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)

    def forward(self, x, rope):
        x = x + self.attn1(F.rms_norm(x, (x.shape[-1],), eps=1e-6), rope=rope)
        return x + self.ff(F.rms_norm(x, (x.shape[-1],), eps=1e-6))


class Connector(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, layers: int, registers: int):
        super().__init__()
        self.learnable_registers = nn.Parameter(torch.rand(registers, dim) * 2 - 1)
        self.transformer_blocks = nn.ModuleList([ConnectorBlock(dim, heads, head_dim) for _ in range(layers)])

    def forward(self, x, mask, rope):
        """Move the valid tokens to the front (order kept) and fill position i ≥ n with register i mod R (§4.5d)."""
        B, L, _ = x.shape
        R = self.learnable_registers.shape[0]
        if L % R:
            raise ValueError(f"text length {L} must be a multiple of the {R} learnable registers")
        order = torch.argsort((~mask).int(), dim=1, stable=True)
        front = torch.gather(x, 1, order[:, :, None].expand_as(x))
        valid = torch.arange(L, device=x.device)[None, :, None] < mask.sum(1)[:, None, None]
        x = torch.where(valid, front, self.learnable_registers.repeat(L // R, 1).to(x.dtype))
        for block in self.transformer_blocks:
            x = block(x, rope)
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


class TextConnectors(nn.Module):
    """LTX-2.0 text connectors. Only the video connector is run; `keep_audio=True` also holds the audio connector's
    parameters (the reference runs it and discards its output)."""

    def __init__(self, cfg: ConnectorsConfig | None = None, keep_audio: bool = False):
        super().__init__()
        cfg = cfg or ConnectorsConfig()
        self.cfg = cfg
        c = cfg.caption_channels
        self.text_proj_in = nn.Linear(c * cfg.text_proj_in_factor, c, bias=False)
        sides = ("video", "audio") if keep_audio else ("video",)
        for side in sides:
            get = lambda name: getattr(cfg, f"{side}_connector_{name}")   # noqa: E731
            setattr(self, f"{side}_connector", Connector(c, get("num_attention_heads"), get("attention_head_dim"),
                                                         get("num_layers"), get("num_learnable_registers")))

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor):
        """hidden_states (B, L, caption_channels, text_proj_in_factor): the text encoder's per-layer states
        (embeddings first), left-padded; mask (B, L) 0/1. Returns (text (B, L, C), text_mask (B, L) all ones).

        The masked range norm runs twice, as in diffusers 0.42.1: the SANA-WM refiner normalises when it packs the
        Gemma states (in the text encoder's dtype), and the LTX-2 connectors normalise again internally."""
        B, L = mask.shape
        mask = _check_text_input(self.cfg, hidden_states, mask)
        x = masked_range_norm(hidden_states, mask).to(self.text_proj_in.weight.dtype)
        x = masked_range_norm(x.unflatten(2, (self.cfg.caption_channels, -1)), mask)
        x = self.video_connector(self.text_proj_in(x), mask, text_rope(L, self.cfg, x.device))
        return x, torch.ones(B, L, dtype=torch.int64, device=x.device)
    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", keep_audio=False) -> "TextConnectors":
        folder = _component_dir(path, "connectors")
        cfg = ConnectorsConfig.from_dict(_read_json(folder / "config.json"))
        return _load(cls, (cfg,), folder, sorted(folder.glob("*.safetensors")), dtype, device, keep_audio)

class PromptEncoder:
    """Prompt → refiner text embeddings: Gemma-3 tokenizer (left padding to 1024, BOS) → Gemma-3 → connectors.
    Gemma-3 comes from `transformers` (an optional dependency, imported when loading)."""

    def __init__(self, tokenizer, text_encoder, connectors: TextConnectors, max_length: int = 1024):
        self.tokenizer, self.text_encoder, self.connectors, self.max_length = (tokenizer, text_encoder,
                                                                              connectors, max_length)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str]):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        device = self.connectors.text_proj_in.weight.device
        tok = self.tokenizer([p.strip() for p in prompts], padding="max_length", padding_side="left",
                             max_length=self.max_length, truncation=True, add_special_tokens=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        # The inner Gemma3Model gives the same 49 hidden states as the full model without the 262k-way LM head.
        # Position ids are the default 0..L-1 (not shifted for the left padding), as in the reference (§11.8).
        states = self.text_encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return self.connectors(torch.stack(states, dim=-1), mask)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", max_length: int = 1024,
                        text_encoder=None) -> "PromptEncoder":
        """Release `refiner/` folder: tokenizer/ (or the tokenizer files inside text_encoder/), text_encoder/
        (Gemma3ForConditionalGeneration), connectors/. text_encoder: Gemma-3's folder when it lies elsewhere (the
        streaming release's gemma3_12b/ beside refiner_diffusers/), its tokenizer files inside it."""
        try:
            from transformers import AutoTokenizer, Gemma3ForConditionalGeneration
        except ImportError as err:
            raise ImportError("the refiner's text encoder (Gemma-3) needs `transformers`: "
                              "pip install 'transformers>=4.56'") from err
        path = Path(path)
        text_dir = path / "text_encoder" if text_encoder is None else Path(text_encoder)
        tok_dir = path / "tokenizer" if text_encoder is None and (path / "tokenizer").is_dir() else text_dir
        if not text_dir.is_dir():
            raise ValueError(f"path must be the release refiner/ folder with text_encoder/, got {path}")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        gemma = Gemma3ForConditionalGeneration.from_pretrained(text_dir, dtype=dtype).to(device).eval()
        return cls(tokenizer, gemma, TextConnectors.from_pretrained(path, dtype, device), max_length)


# Config parsing and checks ---------------------------------------------------------------------------------------
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


# Keys whose value is fixed by LTX-2.0 (the only layout the refiner forward supports), and keys that
# change nothing on the video path: audio-only settings without parameters, LTX-2.3-only switches.
_FIXED = {
    RefinerConfig: dict(patch_size=1, patch_size_t=1, audio_patch_size=1, audio_patch_size_t=1,
                        activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
                        norm_elementwise_affine=False, attention_bias=True, attention_out_bias=True, ff_bias=True,
                        audio_ff_bias=True, gated_attn=False, cross_attn_mod=False, audio_gated_attn=False,
                        audio_cross_attn_mod=False, perturbed_attn=False, use_prompt_embeddings=True,
                        use_keyframes_abs_pos_embedding=False),
    ConnectorsConfig: dict(per_modality_projections=False, proj_bias=False, video_gated_attn=False,
                           audio_gated_attn=False, causal_temporal_positioning=False)}
_IGNORED = {
    RefinerConfig: {"audio_scale_factor", "audio_pos_embed_max_pos", "audio_sampling_rate", "audio_hop_length",
                    "cross_attn_timestep_scale_multiplier", "use_prompt_adaln_single"},
    ConnectorsConfig: {"video_hidden_dim", "audio_hidden_dim"}}   # read by the LTX-2.3 per-modality projections


def _config_from_dict(cls, d: dict):
    """Build `cls` from a release config.json: known fields are read, fixed keys must hold the one value this
    implementation supports (else ValueError), ignored keys change nothing on the video path."""
    fixed, ignored = _FIXED[cls], _IGNORED[cls]
    if "rope_type" not in d:     # diffusers would fall back to its class default "interleaved", the release is "split"
        raise ValueError(f"{cls.__name__} config has no rope_type: expected 'split' (the release) or 'interleaved'")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key in _BOOKKEEPING or key in ignored:
            continue
        if key in fixed:
            if value != fixed[key]:
                raise ValueError(f"config {key}={value!r} is not supported by {cls.__name__}: expected {fixed[key]!r}")
        elif key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(f"unknown {cls.__name__} config key {key!r}")
    return cls(**kwargs)


RefinerConfig.from_dict = ConnectorsConfig.from_dict = classmethod(_config_from_dict)


def _check_refiner_config(cfg: RefinerConfig) -> None:
    if cfg.rope_type not in ("split", "interleaved"):
        raise ValueError(f"rope_type must be 'split' or 'interleaved', got {cfg.rope_type!r}")
    if cfg.cross_attention_dim != cfg.inner_dim:
        raise ValueError(f"cross_attention_dim must equal heads*head_dim={cfg.inner_dim} (the caption "
                         f"projection's width), got {cfg.cross_attention_dim}")


def _check_connectors_config(cfg: ConnectorsConfig) -> None:
    if cfg.rope_type not in ("split", "interleaved"):
        raise ValueError(f"rope_type must be 'split' or 'interleaved', got {cfg.rope_type!r}")
    for side in ("video", "audio"):
        width = (getattr(cfg, f"{side}_connector_num_attention_heads")
                 * getattr(cfg, f"{side}_connector_attention_head_dim"))
        if width != cfg.caption_channels:
            raise ValueError(f"{side} connector heads*head_dim must equal caption_channels="
                             f"{cfg.caption_channels}, got {width}")


def _check_sink(cache: WindowKVCache, layer: LayerKV) -> None:
    if layer.sink_k is None or cache.sink_rope is None:
        raise ValueError("the cache holds no sink yet: run a forward with capture='sink' and set sink_rope")


def _check_forward(model: Refiner, cache: WindowKVCache | None, capture: str | None) -> None:
    if capture not in (None, "sink", "history"):
        raise ValueError(f"capture must be None, 'sink' or 'history', got {capture!r}")
    if capture is not None and cache is None:
        raise ValueError(f"capture={capture!r} needs a WindowKVCache")
    if cache is not None and len(cache.layers) != len(model.transformer_blocks):
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(model.transformer_blocks)}")


def _check_text_input(cfg: ConnectorsConfig, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask as bool, after checking the connectors' input."""
    B, L = mask.shape
    if hidden_states.shape[:2] != (B, L) or hidden_states.shape[2:] != (cfg.caption_channels,
                                                                          cfg.text_proj_in_factor):
        raise ValueError(f"hidden_states must be (B, L, {cfg.caption_channels}, "
                         f"{cfg.text_proj_in_factor}) matching mask {tuple(mask.shape)}, "
                         f"got {tuple(hidden_states.shape)}")
    mask = mask.bool()
    n = mask.sum(1, keepdim=True)
    if not torch.equal(mask, torch.arange(L, device=mask.device)[None] >= L - n):
        raise ValueError("mask must be left-padded (valid tokens last), as the Gemma-3 tokenizer pads")
    return mask


def _check_refine(cfg: RefinerConfig, latents, sink_size) -> None:
    if latents.dim() != 5 or latents.shape[1] != cfg.in_channels:
        raise ValueError(f"latents must be (B, {cfg.in_channels}, T, h, w), got {tuple(latents.shape)}")
    T = latents.shape[2]
    if not 1 <= sink_size < T:
        raise ValueError(f"sink_size must be in [1, T={T}), got {sink_size}")


def _check_stream(cfg: RefinerConfig, sink, text, text_mask, fps, block_size, sigmas) -> torch.Tensor:
    """The σ as float32 (as the reference's scheduler holds them), after checking the stream's arguments."""
    if sink.dim() != 5 or sink.shape[1] != cfg.in_channels or sink.shape[2] < 1:
        raise ValueError(f"sink must be (B, {cfg.in_channels}, k >= 1, h, w), got {tuple(sink.shape)}")
    B = sink.shape[0]
    if text.dim() != 3 or text.shape[0] != B or text.shape[2] != cfg.caption_channels:
        raise ValueError(f"text must be (B={B}, L, {cfg.caption_channels}), got {tuple(text.shape)}")
    if text_mask is not None and text_mask.shape != text.shape[:2]:
        raise ValueError(f"text_mask: expected (B, L) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    sig = torch.tensor(sigmas, dtype=torch.float32)
    if sig.dim() != 1 or len(sig) < 2 or sig[-1] != 0 or not bool((sig[:-1] > sig[1:]).all()):
        raise ValueError(f"sigmas must decrease strictly and end at 0, got {tuple(sigmas)}")
    return sig


def _check_block(stream: RefinerStream, block) -> None:
    """Blocks come in order with block_size frames each, so a shorter one can only be the video's last."""
    B, C, k, h, w = stream.sink_shape
    if (stream.next_frame - k) % stream.block_size:
        raise ValueError(f"block: the previous block had fewer than block_size={stream.block_size} frames, so it "
                         f"was the last; frames {stream.next_frame}.. cannot follow it")
    if block.dim() != 5 or block.shape[:2] != (B, C) or block.shape[3:] != (h, w) or block.shape[2] < 1:
        raise ValueError(f"block must be (B={B}, {C}, n, {h}, {w}) like the sink, got {tuple(block.shape)}")
    if block.shape[2] > stream.block_size:
        raise ValueError(f"block has {block.shape[2]} frames, more than block_size={stream.block_size}")


# Loading: build on the meta device, check every key and shape of the files against the full (audio included)
# layout, read only what the module holds, load_state_dict(strict=True, assign=True). A file written by quantize.py
# (the video transformer only) loads with its NVFP4 or FP8 layers; a float one can be quantised as it is read.

def _read_json(path: Path) -> dict:
    import json
    if not path.is_file():
        raise ValueError(f"missing config file {path}")
    return json.loads(path.read_text())


def _component_dir(path, name: str) -> Path:
    path = Path(path)
    return path / name if (path / name / "config.json").is_file() else path


def _load(cls, args, where: Path, files: list[Path], dtype, device, keep_audio: bool, precision: str | None = None,
          audio_in_files: bool = True):
    """The model from the safetensors `files` of `where` (holding the audio branch too unless audio_in_files=False).
    precision
    (the Refiner only): the blocks' linears (quantize.REFINER_INCLUDE) in "bf16", "nvfp4" or "fp8", a float file's
    quantised layer by layer as it is read (quantize.set_precision); None = as the files hold them."""
    from safetensors import SafetensorError, safe_open

    from quantize import REFINER_EXCLUDE, REFINER_INCLUDE, quantize_like, quantized_state, set_precision, stored_as_is
    if not files:
        raise ValueError(f"no .safetensors files in {where}")
    found = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                found.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"path: {file} is not a readable safetensors file ({e})") from e
    with torch.device("meta"):
        model = cls(*args, keep_audio=keep_audio)
        full = model if keep_audio or not audio_in_files else cls(*args, keep_audio=True)
    quantize_like(model, found)                             # the files' own NVFP4 / FP8 layers
    if full is not model:
        quantize_like(full, found)
    expected = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {found[k]} vs model {expected[k]}" for k in set(found) & set(expected)
                   if found[k] != expected[k])
    if missing or unexpected or wrong:
        show = lambda xs: ", ".join(xs[:20]) + (f" ... ({len(xs)} in all)" if len(xs) > 20 else "")  # noqa: E731
        raise ValueError(f"{where} does not match {cls.__name__}: missing keys [{show(missing)}]; "
                         f"unexpected keys [{show(unexpected)}]; wrong shapes [{show(wrong)}]")
    # The layers to quantise as they are read (on the meta model; none without a precision).
    to_quantise = {f"{name}.weight": name for name in set_precision(model, precision, REFINER_INCLUDE, REFINER_EXCLUDE)}
    wanted, state = set(model.state_dict()) | set(to_quantise), {}
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in set(f.keys()) & wanted:
                t = f.get_tensor(key)
                if key in to_quantise:
                    state.update(quantized_state(model, to_quantise[key], t.to(dtype)))
                else:
                    state[key] = t if stored_as_is(key, t) else t.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@classmethod
def _refiner_from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", keep_audio: bool = False,
                             precision: str | None = None, config: RefinerConfig | None = None) -> Refiner:
    """Load the release `refiner/` folder (or its `transformer/` subfolder). By default the 2 295 audio-branch
    tensors (5.8 B parameters, 11.7 GB in bf16) are checked but not read; `keep_audio=True` keeps them. `path` may
    also be a file written by quantize.py (`--model refiner`: the video transformer, no config: `config`, default
    the release's). precision: the blocks' linears in "bf16", "nvfp4" or "fp8" (a float checkpoint quantised layer
    by layer as it is read: never the whole bf16 model in memory); None = as the checkpoint holds them."""
    path = Path(path)
    if path.is_file():
        return _load(cls, (config or RefinerConfig(),), path, [path], dtype, device, keep_audio, precision, False)
    if config is not None:
        raise ValueError(f"config: {path} is a folder with its own config.json; pass config only with a file")
    folder = _component_dir(path, "transformer")
    cfg = RefinerConfig.from_dict(_read_json(folder / "config.json"))
    return _load(cls, (cfg,), folder, sorted(folder.glob("*.safetensors")), dtype, device, keep_audio, precision)


Refiner.from_pretrained = _refiner_from_pretrained


# LoRA merging and adapter files ----------------------------------------------------------------------------------
@torch.no_grad()
def _lora_merge(self: LoRALinear):
    """W += (alpha/rank)·B·A (formed in float32); forward then uses W alone."""
    if self.merged:
        raise ValueError("adapter is already merged")
    self.weight += (self.scale * self.lora_B.weight.float() @ self.lora_A.weight.float()).to(self.weight.dtype)
    self.merged = True


@torch.no_grad()
def _lora_unmerge(self: LoRALinear):
    if not self.merged:
        raise ValueError("adapter is not merged")
    self.weight -= (self.scale * self.lora_B.weight.float() @ self.lora_A.weight.float()).to(self.weight.dtype)
    self.merged = False

LoRALinear.merge, LoRALinear.unmerge = _lora_merge, _lora_unmerge


def save_lora(model: nn.Module, path):
    """Write only the adapter tensors (`*.lora_A.weight`, `*.lora_B.weight`) and rank/alpha (file metadata)."""
    from safetensors.torch import save_file
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not adapters:
        raise ValueError("model has no LoRALinear adapters to save")
    if len({(m.rank, m.alpha) for m in adapters.values()}) != 1:
        raise ValueError("save_lora writes one rank/alpha per file; the adapters differ")
    first = next(iter(adapters.values()))
    tensors = {f"{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach().contiguous()
               for n, m in adapters.items() for ab in "AB"}
    save_file(tensors, str(path), metadata={"rank": str(first.rank), "alpha": str(first.alpha)})


def load_lora(model: nn.Module, path) -> list:
    """Wrap the Linears named in the file (rank/alpha from its metadata) and load its tensors, every one of which
    must find its adapter with the right shape; layers already wrapped must hold unmerged adapters of the file's
    rank/alpha. Returns the wrapped names."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "rank" not in meta or "alpha" not in meta:
        raise ValueError(f"{path} has no rank/alpha metadata: not written by save_lora")
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    modules = dict(model.named_modules())
    for k in tensors:
        name, _, rest = k.rpartition(".lora_")
        if rest not in ("A.weight", "B.weight") or not isinstance(modules.get(name), (nn.Linear, LoRALinear)):
            raise ValueError(f"{path}: key {k} is not <a Linear layer of this model>.lora_A/B.weight")
    names = sorted({k.rpartition(".lora_")[0] for k in tensors})
    for n in names:   # an existing adapter keeps its own rank/alpha, and a merged one is never read by forward
        m = modules[n]
        if isinstance(m, LoRALinear) and (m.merged or (m.rank, m.alpha) != (rank, alpha)):
            raise ValueError(f"{path}: rank {rank}, alpha {alpha} cannot load into the adapter {n} (rank {m.rank}, "
                             f"alpha {m.alpha}, {'merged' if m.merged else 'not merged'})")
    fresh = [n for n in names if isinstance(modules[n], nn.Linear)]
    if fresh:
        add_lora(model, rank, alpha, targets="|".join(map(re.escape, fresh)))
    own = {f"{n}.lora_{ab}.weight": getattr(model.get_submodule(n), f"lora_{ab}").weight for n in names for ab in "AB"}
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise ValueError(f"{path} does not match the model's adapters (keys or shapes differ)")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])
    return names


# The audio parameter holders (keep_audio=True) -------------------------------------------------------------------
def _add_audio_holders(model: Refiner, cfg: RefinerConfig):
    """LTX-2's audio stream and audio↔video cross-attention, as parameter holders only (keep_audio=True). They are
    built from the same layer classes so every name and shape equals the checkpoint's; Refiner.forward never calls
    them (the SANA-WM refiner runs the video stream only)."""
    d, da = cfg.inner_dim, cfg.audio_num_attention_heads * cfg.audio_attention_head_dim
    ha, hd = cfg.audio_num_attention_heads, cfg.audio_attention_head_dim
    model.audio_proj_in = nn.Linear(cfg.audio_in_channels, da)
    model.audio_caption_projection = MLP(cfg.caption_channels, da, "gelu_tanh")
    model.audio_time_embed = AdaLNSingle(da, 6)
    model.av_cross_attn_video_scale_shift = AdaLNSingle(d, 4)
    model.av_cross_attn_audio_scale_shift = AdaLNSingle(da, 4)
    model.av_cross_attn_video_a2v_gate = AdaLNSingle(d, 1)
    model.av_cross_attn_audio_v2a_gate = AdaLNSingle(da, 1)
    model.audio_scale_shift_table = nn.Parameter(torch.zeros(2, da))
    model.audio_proj_out = nn.Linear(da, cfg.audio_out_channels)
    for block in model.transformer_blocks:
        block.audio_attn1 = Attention(da, da, ha, hd)
        block.audio_attn2 = Attention(da, cfg.audio_cross_attention_dim, ha, hd)
        block.audio_to_video_attn = Attention(d, da, ha, hd)
        block.video_to_audio_attn = Attention(da, d, ha, hd)
        block.audio_ff = FeedForward(da)
        block.audio_scale_shift_table = nn.Parameter(torch.zeros(6, da))
        block.video_a2v_cross_attn_scale_shift_table = nn.Parameter(torch.zeros(5, d))
        block.audio_a2v_cross_attn_scale_shift_table = nn.Parameter(torch.zeros(5, da))
