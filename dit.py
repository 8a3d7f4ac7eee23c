"""The SANA-WM DiT (stage 1): a hybrid GDN / softmax diffusion transformer with dual-branch camera control.

20 blocks (every 4th softmax self-attention, the others frame-wise bidirectional GDN), each with a UCPE camera
branch, a Plücker injection after self-attention, text cross-attention and a GLUMBConv FFN with a temporal conv;
per-frame timestep AdaLN (paper §3.2, §3.3, §5.1, Fig. 2). State-dict keys and shapes equal the official
checkpoint's, so it loads strictly.

`chunk_size` (frames) turns the bidirectional model into a chunk-causal one: frames of chunk c only see frames
of chunks <= c, in every temporal operator (GDN backward scan, softmax attention, the temporal convolutions).
Below the marked line: checks, loading, the memory mode (`part_frames`: the same layers over spans of frames).
"""
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from attention import (CrossAttention, RMSNorm, SoftmaxSelfAttention, camera_rope_table, camera_rows, chunk_stop,
                       frame_spans, rope_table, softmax_chunk, softmax_in_parts)
from camera import ray_matrices, se3_inverse
from gdn import GDNSelfAttention, check_chunk_size, gdn_chunk, gdn_in_parts
from quantize import quantize_like, stored_as_is


@dataclass
class DiTConfig:
    """Defaults = the released SANA-WM_bidirectional transformer (paper §5.1, App. C.1; the release config)."""
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
    # Where the releases' code differs (defaults: diffusers 0.42.1's; OFFICIAL_SWITCHES: NVlabs' own code):
    camera_rms_cap: bool = True             # the camera branch caps q/k/v to their pre-UCPE RMS
    softmax_scale_width: int | None = None  # softmax logits * 1/sqrt(this); None: 1/sqrt(D) main, 1/sqrt(128) camera
    camera_k_halo: bool = True              # streaming: the camera K short conv reads the previous chunk's frames

    def __post_init__(self):
        check_config(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """From the diffusers-format config.json of the transformer (`config_from_dict`)."""
        return config_from_dict(cls, d)

    def is_softmax(self, i: int) -> bool:
        return self.softmax_every_n > 0 and (i + 1) % self.softmax_every_n == 0


# --------------------------------------------------------------------------------------------------------------
# Embedders (the release's: patch, timestep MLP, caption MLP)

def timestep_sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t f_k) | sin(t f_k)], f_k = 10000^(-k/(dim/2)), in fp32 (as the official code)."""
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


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        # y_proj.fc1 / y_proj.fc2: the checkpoint's key names
        self.y_proj = nn.ModuleDict(dict(fc1=nn.Linear(in_channels, dim), fc2=nn.Linear(dim, dim)))

    def forward(self, y):
        return self.y_proj.fc2(F.gelu(self.y_proj.fc1(y), approximate="tanh"))


# --------------------------------------------------------------------------------------------------------------
# FFN (paper Fig. 2 Mix-FFN, App. C.1; layout as in the release)

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


def _conv(*args, **kwargs) -> nn.Module:
    return nn.ModuleDict({"conv": nn.Conv2d(*args, **kwargs)})  # `.conv` mirrors the checkpoint's key names


class GLUMBConvTemp(nn.Module):
    """Per frame: 1x1 conv (C -> 2F) + SiLU, 3x3 depthwise conv, GLU (value * SiLU(gate)), 1x1 conv (F -> C);
    then a residual full C -> C temporal conv: z + t_conv(z)."""

    def __init__(self, dim: int, hidden: int, t_kernel: int):
        super().__init__()
        self.inverted_conv = _conv(dim, 2 * hidden, 1)
        self.depth_conv = _conv(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point_conv = _conv(hidden, dim, 1, bias=False)
        self.t_conv = nn.Conv2d(dim, dim, (t_kernel, 1), padding=(t_kernel // 2, 0), bias=False)

    def per_frame(self, images):
        """(n, C, h, w) -> (n, C, h, w): 1x1 conv + SiLU, depthwise conv + GLU, 1x1 conv."""
        value, gate = self.depth_conv.conv(F.silu(self.inverted_conv.conv(images))).chunk(2, dim=1)
        return self.point_conv.conv(value * F.silu(gate))

    def forward(self, m, thw, chunk_size=None):
        """m (B, N, C) -> (B, N, C)."""
        B, N, C = m.shape
        T, h, w = thw
        z = self.per_frame(m.reshape(B * T, h, w, C).permute(0, 3, 1, 2))
        z = temporal_residual(z.reshape(B, T, C, h * w).permute(0, 2, 1, 3), self.t_conv, chunk_size)
        return z.permute(0, 2, 3, 1).reshape(B, N, C)


# --------------------------------------------------------------------------------------------------------------
# Block and final layer (paper Fig. 2, §3.3; per-frame AdaLN as in the release)

def modulate(x, shift, scale, T):
    """Per-frame AdaLN: LN(x) (no affine, eps 1e-6) * (1 + scale) + shift, with shift/scale (B, T, 1, C)."""
    B, N, C = x.shape
    return (F.layer_norm(x, (C,), eps=1e-6).view(B, T, N // T, C) * (1 + scale) + shift).view(B, N, C)


def gated(gate, x):
    """gate (B, T, 1, C) per frame times x (B, N, C)."""
    B, N, C = x.shape
    return (gate * x.view(B, gate.shape[1], -1, C)).view(B, N, C)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, softmax: bool, plucker: bool):
        super().__init__()
        C = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.zeros(6, C))
        if plucker:
            self.plucker_proj = nn.Linear(C, C)
        switches = dict(rms_cap=cfg.camera_rms_cap, scale_width=cfg.softmax_scale_width)
        if softmax:
            self.attn = SoftmaxSelfAttention(C, cfg.linear_head_dim, **switches)
        else:
            self.attn = GDNSelfAttention(C, cfg.linear_head_dim, cfg.conv_kernel_size, **switches)
        self.cross_attn = CrossAttention(C, cfg.num_attention_heads)
        self.mlp = GLUMBConvTemp(C, int(C * cfg.mlp_ratio), cfg.t_kernel_size)

    def forward(self, x, y, text_mask, t6, thw, rope, camera=None, plucker=None, chunk_size=None):
        T = thw[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + t6).chunk(6, 2)
        a = self.attn(modulate(x, shift_msa, scale_msa, T), thw, rope, camera, chunk_size)
        x = self.after_attention(x, gated(gate_msa, a), y, text_mask, plucker)
        return x + gated(gate_mlp, self.mlp(modulate(x, shift_mlp, scale_mlp, T), thw, chunk_size))

    def after_attention(self, x, a, y, text_mask, plucker):
        """The frame-local middle of the block: the gated attention output a, the Plücker injection (ungated,
        paper §3.3 Fine Branch: plucker = (Plücker tokens (B, n, 48), the DiT's embedder weight and bias)) and the
        text cross-attention (no norm or modulation before it, as in the release)."""
        x = x + a
        if plucker is not None and hasattr(self, "plucker_proj"):
            x = x + self.plucker_map(*plucker[1:])(plucker[0])
        return x + self.cross_attn(x, y, text_mask)

    def plucker_map(self, w_e, b_e):
        """p -> plucker_proj(plucker_embedder(p)) for the embedder's weight (C, 48) and bias (C,)."""
        return lambda p: self.plucker_proj(F.linear(p, w_e, b_e))


class FinalLayer(nn.Module):
    """Per-frame modulation by the timestep embedding (not SiLU'd, table rows [shift, scale]), then Linear."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x, temb):  # temb (B, T, 1, C)
        shift, scale = (self.scale_shift_table + temb).chunk(2, dim=2)
        return self.linear(modulate(x, shift, scale, temb.shape[1]))


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
        self.raymap_embedder = PatchEmbed(3, C)  # dead in the released config (computed, unused); kept for loading
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
        frames at a time (`block_in_parts`): the same velocity in about half the activation memory, slower
        (BENCHMARKS.md). None: all frames at once, the fastest.
        """
        cfg, dtype = self.config, self.dtype
        B, T, h, w = _check_inputs(cfg, x, timestep, text, text_mask, raymap, plucker, chunk_size, part_frames)
        thw, C = (T, h, w), cfg.hidden_size
        text, text_mask = crop_text(text, text_mask)
        x = self.x_embedder(x.to(dtype))
        # The reference truncates timesteps to integers before the sinusoid (as the official code): 998.26 -> 998.
        temb = self.t_embedder(timestep_sinusoid(timestep.long().float().flatten()).to(dtype))  # (B*T, C)
        t6 = self.t_block(temb).view(B, T, 6, C)
        y = self.attention_y_norm(self.y_embedder(text.to(dtype)))
        rope = rope_table(cfg.linear_head_dim, thw, x.device)

        camera = None
        if raymap is not None:
            # The pipeline hands the camera to the model in the model dtype; the geometry runs in it (as official).
            P = ray_matrices(raymap.to(dtype), thw)
            camera = (P, P.transpose(-1, -2), se3_inverse(P), camera_rope_table(rope, cfg.linear_head_dim))
        pl = None
        if plucker is not None:  # embedded inside each block (Block.plucker_map: fast.py folds the two maps)
            embed = self.plucker_embedder.proj
            pl = (plucker.to(dtype).flatten(2).transpose(1, 2).contiguous(), embed.weight.flatten(1), embed.bias)

        mask = text_mask != 0
        if part_frames is not None:
            x = x.contiguous()  # updated in place by the blocks
        for block in self.blocks:
            if part_frames is None:
                x = block(x, y, mask, t6, thw, rope, camera, pl, chunk_size)
            else:
                x = block_in_parts(block, x, y, mask, t6, thw, rope, camera, pl, chunk_size, part_frames)
        x = self.final_layer(x, temb.view(B, T, 1, C))
        return x.view(B, T, h, w, -1).permute(0, 4, 1, 2, 3)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, device="cpu",
                        config: DiTConfig | None = None) -> "DiT":
        """Load the native release file (one .safetensors, with an unused `pos_embed`), a diffusers-format
        directory (config.json + *.safetensors, sharded with an index) or the streaming release's torch pickle
        (sana_dit/model.pt or its folder; any file not named *.safetensors is read as one, tensors only).
        A single file or a directory without config.json uses `config` (default: the release). Built on the meta
        device; tensors are assigned. A file written by quantize.py loads too: its quantised layers become NVFP4 or
        FP8 modules first."""
        return load_pretrained(cls, path, dtype, device, config)


# ================================================================================================================
# Machinery below this line: text cropping, input checks, loading, and the memory mode's driver. The model above is
# complete without it.
# ================================================================================================================

# The switches as the official releases' own code runs them (NVlabs/Sana): no camera RMS cap (its fused camera
# preparation returns the UCPE output as it is; the cap survives only in diffusers' port), softmax logits at 1/sqrt(D)
# with D = 112 in both branches (its current code; the streaming release's first code padded to 128), the camera K
# conv reading the previous chunk. The bidirectional release keeps DiTConfig's defaults, diffusers 0.42.1's.
OFFICIAL_SWITCHES = dict(camera_rms_cap=False, softmax_scale_width=112, camera_k_halo=True)


# Keys of the official config.json whose only supported value is the release's, and keys with no effect.
CONFIG_FIXED = {"patch_size": [1, 1, 1], "ffn_type": "GLUMBConvTemp", "k_conv_only": True, "pos_embed_type": "wan_rope",
                "qk_norm": True, "cross_norm": True, "y_norm": True, "cam_attn_compress": 1, "use_pe": True,
                "use_chunk_plucker_post_attn": True, "mlp_acts": ["silu", "silu", None], "pred_sigma": False}
CONFIG_NO_EFFECT = {"init_cam_from_base", "fp32_attention", "image_size", "learn_sigma", "mixed_precision"}


def check_config(cfg: DiTConfig) -> None:
    C, D = cfg.hidden_size, cfg.linear_head_dim
    if C % D or D % 8:
        raise ValueError(f"linear_head_dim: expected a multiple of 8 dividing hidden_size={C}, got {D}")
    if C % cfg.num_attention_heads:
        raise ValueError(f"num_attention_heads: expected a divisor of hidden_size={C}, got {cfg.num_attention_heads}")
    if cfg.t_kernel_size % 2 == 0:
        raise ValueError(f"t_kernel_size: expected an odd number of frames, got {cfg.t_kernel_size}")
    if cfg.conv_kernel_size < 1:
        raise ValueError(f"conv_kernel_size: expected >= 1, got {cfg.conv_kernel_size}")


def config_from_dict(cls, d: dict) -> DiTConfig:
    """A DiTConfig from the diffusers-format config.json of the transformer; `_`-prefixed bookkeeping keys are
    ignored, keys fixed in the release must hold the release's value."""
    own = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_") or key in CONFIG_NO_EFFECT:
            continue
        if key in CONFIG_FIXED:
            if (list(value) if isinstance(value, (list, tuple)) else value) != CONFIG_FIXED[key]:
                raise ValueError(f"config {key}: only {CONFIG_FIXED[key]!r} is supported, got {value!r}")
        elif key in own:
            kwargs[key] = value
        else:
            raise ValueError(f"config: unknown key {key!r}")
    return cls(**kwargs)


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


def _check_inputs(cfg, x, timestep, text, text_mask, raymap, plucker, chunk_size, part_frames=None):
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
    check_chunk_size(chunk_size)
    if part_frames is not None and (not isinstance(part_frames, int) or part_frames < 1):
        raise ValueError(f"part_frames: expected None or a positive int (latent frames), got {part_frames!r}")
    if part_frames is not None and torch.is_grad_enabled():
        raise ValueError("part_frames: the memory mode is for inference; run it under torch.no_grad()")
    return B, T, h, w


# --------------------------------------------------------------------------------------------------------------
# Loading (find the files, read them, check keys and shapes, assign).

def load_pretrained(cls, path, dtype, device, config):
    """DiT.from_pretrained's work: config, then the model on the meta device, quantised layers (NVFP4 or FP8) swapped
    in where the file holds them (quantize.quantize_like), then the tensors assigned."""
    cfg_dict, files = find_checkpoint(path)
    if cfg_dict is not None and config is not None:
        raise ValueError(f"config: {path} has its own config.json; pass config only for a file or folder "
                         f"without one")
    cfg = DiTConfig.from_dict(cfg_dict) if cfg_dict is not None else (config or DiTConfig())
    state = {}
    for file in files:
        state.update(read_safetensors(file, dtype, device) if file.suffix == ".safetensors"
                     else read_torch_checkpoint(file, dtype, device))
    for key in UNUSED_RELEASE_KEYS:
        state.pop(key, None)
    with torch.device("meta"):
        model = cls(cfg)
        quantize_like(model, state)
    load_strict(model, state)
    return model.eval()


# Tensors of the official module tree that this model does not have: a resolution-dependent positional table that
# RoPE makes unused, and the null caption used only for training's caption dropout.
UNUSED_RELEASE_KEYS = ("pos_embed", "y_embedder.y_embedding")
STREAMING_CHECKPOINT = "model.pt"  # the streaming release's sana_dit/ holds one torch pickle of this name


def find_checkpoint(path) -> tuple[dict | None, list[Path]]:
    """(config.json contents or None, checkpoint files) of a single file or a directory: its safetensors files
    (sharded with an index, or not), else its model.pt (the streaming release's sana_dit/)."""
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
    if not files and (path / STREAMING_CHECKPOINT).is_file():
        files = [path / STREAMING_CHECKPOINT]
    if not files:
        raise ValueError(f"path: no .safetensors file or {STREAMING_CHECKPOINT} in {path}")
    return config, files


def _cast(key: str, t: torch.Tensor, dtype, device, copy: bool = False) -> torch.Tensor:
    """t on device in dtype, except the quantised layers' weights and scales (quantize.stored_as_is), which keep
    their dtype. copy: a new tensor even where nothing changes."""
    kept = stored_as_is(key, t)
    return t.to(device=device, copy=copy) if kept else t.to(device=device, dtype=dtype, copy=copy)


def read_safetensors(file: Path, dtype, device) -> dict:
    """All tensors of the file, each cast to dtype on device as it is read (never two copies of the model)."""
    state = {}
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = _cast(key, f.get_tensor(key), dtype, device)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint: {file} is not a readable safetensors file ({e})") from None
    return state


def read_torch_checkpoint(file: Path, dtype, device) -> dict:
    """The model tensors of a torch pickle such as the streaming release's sana_dit/model.pt, cast to dtype on
    device one at a time.

    Read with torch.load(weights_only=True) only: tensors, containers and numbers are rebuilt, any other object is
    refused (a checkpoint needs no code, and unpickling one could run any). A zip-format file (torch.save's default)
    is memory-mapped, so the parts not used here (a distillation critic, optimizer states) are never read.
    Containers, as the official loaders accept them: the dict under `generator` (the distillation trainer's save:
    {"generator": ..., "step": ..., "denoising_step_list": ..., "critic": ...}), else under `model` or
    `state_dict`, else the dict itself; a leading `model.` is stripped from every name."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; the reason is the line after "WeightsUnpickler error:".
        reason = str(e).split("WeightsUnpickler error:")[-1].split("Please use")[0].split("\n\nCheck")[0]
        raise ValueError(f"checkpoint: {file} holds more than tensors, so torch.load(weights_only=True) refused "
                         f"it: {' '.join(reason.split())}") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"checkpoint: {file} is not a readable torch checkpoint ({e})") from None
    containers = ("generator", "model", "state_dict")
    expected = f"a dict of name -> tensor, or one under {' / '.join(map(repr, containers))}"
    if isinstance(obj, dict):
        obj = next((obj[name] for name in containers if name in obj), obj)
    if not isinstance(obj, dict) or not obj:
        got = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"checkpoint: {file}: expected {expected}, got {got}")
    not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint: {file}: expected {expected}; these entries are not tensors: "
                         f"{', '.join(not_tensors[:10])}{' ...' * (len(not_tensors) > 10)}")
    state = {}
    for key, t in obj.items():
        name = key.removeprefix("model.")
        if name in state:
            raise ValueError(f"checkpoint: {file} holds both {name!r} and 'model.{name}'")
        # A copy, so no parameter stays backed by the memory-mapped file (rewriting it would change or fault it).
        state[name] = _cast(name, t, dtype, device, copy=True)
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


# --------------------------------------------------------------------------------------------------------------
# The memory mode (DiT.forward's part_frames): the same layers run over spans of part_frames frames, each layer
# with the state of the other frames it needs (README: "Running blocks over spans of frames").

FFN_MAX_ELEMENTS = 1 << 28  # the FFN's 2F-wide hidden tensors stay under 0.5 GiB (bf16) each: split over frames


def ffn_middle_in_parts(mlp: GLUMBConvTemp, m, thw, part_frames=None):
    """The FFN's per-frame middle (B*T, C, h, w) of m (B, N, C), run at most part_frames frames (and
    FFN_MAX_ELEMENTS hidden values) at a time and written into one tensor (channels-last, like m's frames)."""
    B, N, C = m.shape
    T, h, w = thw
    images = m.reshape(B * T, h, w, C).permute(0, 3, 1, 2)
    frames_per_call = max(1, FFN_MAX_ELEMENTS // (mlp.inverted_conv.conv.out_channels * h * w))
    frames_per_call = min(frames_per_call, part_frames or frames_per_call)
    z = torch.empty_like(images)
    for start in range(0, B * T, frames_per_call):
        z[start:start + frames_per_call] = mlp.per_frame(images[start:start + frames_per_call])
    return z


def ffn_in_parts(mlp: GLUMBConvTemp, m, thw, chunk_size, part_frames=None):
    """mlp(m, thw, chunk_size) with its middle in parts (ffn_middle_in_parts) and its temporal conv in spans with
    halo frames."""
    B, N, C = m.shape
    T, h, w = thw
    z = ffn_middle_in_parts(mlp, m, thw, part_frames)
    z = temporal_residual(z.view(B, T, C, h * w).permute(0, 2, 1, 3), mlp.t_conv, chunk_size, part_frames)
    return z.permute(0, 2, 3, 1).reshape(B, N, C)


@torch.no_grad()
def block_in_parts(block: Block, x, y, text_mask, t6, thw, rope, camera, plucker, chunk_size, part_frames):
    """block(x, ...) for the memory mode (inference): x is updated in place, and the token-wise work (projections,
    attention queries, cross-attention, FFN) runs part_frames frames at a time, so the (B, N, C)-sized tensors
    alive at once are x, the block input u and the attention's keys and values (or the GDN query streams, per-frame
    terms and states) and output, then the FFN's input, middle and output; no (B, N, 6C) FFN tensor exists."""
    B, N, C = x.shape
    T, S = thw[0], N // thw[0]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (block.scale_shift_table + t6).chunk(6, 2)
    spans = frame_spans(0, T, None, part_frames)
    in_parts = gdn_in_parts if isinstance(block.attn, GDNSelfAttention) else softmax_in_parts
    a = in_parts(block.attn, modulate(x, shift_msa, scale_msa, T), thw, rope, camera, chunk_size, part_frames)
    for t0, t1 in spans:
        rows = slice(t0 * S, t1 * S)
        part_plucker = None if plucker is None else (plucker[0][:, rows], *plucker[1:])
        x[:, rows] = block.after_attention(x[:, rows], gated(gate_msa[:, t0:t1], a[:, rows]), y, text_mask,
                                           part_plucker)
    del a
    m = ffn_in_parts(block.mlp, modulate(x, shift_mlp, scale_mlp, T), thw, chunk_size, part_frames)
    for t0, t1 in spans:
        x[:, t0 * S:t1 * S] += gated(gate_mlp[:, t0:t1], m[:, t0 * S:t1 * S])
    return x


# The DiT's text input: the release's prompt recipe (Gemma-2-2b-it hidden states with the chi prefix).
# generate.py and train.py encode prompts with it.

TEXT_LENGTH = 300  # text tokens the DiT cross-attends to (the official text recipe)

# The release's prompt prefix ("chi prompt"): SANA-WM was trained with these lines, joined by "\n", in front of
# every user prompt. They are data of the release and must stay exactly as they are, the trailing space included.
CHI_PROMPT = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:',  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",  # noqa: E501
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
])


def _gemma(tokenizer, text_encoder, text: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (the training convention; Gemma's tokenizer pads left by default) final hidden states."""
    tokens = tokenizer([text], max_length=length, padding="max_length", padding_side="right", truncation=True,
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    # last_hidden_state is the output of Gemma's final RMSNorm, the same tensor as hidden_states[-1].
    return text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """User prompt -> ((1, 300, D) text tokens, (1, 300) mask), with the chi prefix in front.

    The prefixed prompt is padded to len(prefix tokens) + 298, then BOS and the last 299 positions are kept: BOS,
    the prefix's last token, up to 298 prompt tokens and right padding. The rest of the prefix only acts through
    Gemma's attention (the official text recipe).
    """
    length = len(tokenizer.encode(CHI_PROMPT)) + TEXT_LENGTH - 2  # encode() counts the BOS it adds
    hidden, mask = _gemma(tokenizer, text_encoder, CHI_PROMPT + prompt, length)
    keep = [0] + list(range(length - TEXT_LENGTH + 1, length))
    return hidden[:, keep], mask[:, keep]


@torch.no_grad()
def encode_negative_prompt(tokenizer, text_encoder, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative prompt is encoded as it is, without the chi prefix, to 300 tokens (the official text recipe)."""
    return _gemma(tokenizer, text_encoder, negative_prompt, TEXT_LENGTH)


# Loading Gemma-2-2b-it (a separate download: the release does not bundle it), for generate.py and train.py.

def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("the Gemma text encoders need `transformers`: pip install 'transformers>=4.56'") from None
    return transformers


RELEASE_LAYOUT = "dit/, vae/, refiner/ and Gemma-2-2b-it in text_encoder/ (or --text_encoder)"
GEMMA2_DOWNLOAD = ("the SANA-WM release does not include Gemma-2-2b-it: download Efficient-Large-Model/gemma-2-2b-it "
                   "from the Hugging Face hub and pass its folder with --text_encoder")


def check_model_folder(folder: str, what: str, flag: str = "--weights"):
    """A transformers/diffusers model folder: config.json + *.safetensors, else an error naming what is missing."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag}: {folder}/ is missing ({what}; the release layout is {RELEASE_LAYOUT})")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{flag}: {os.path.join(folder, 'config.json')} is missing")
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise FileNotFoundError(f"{flag}: no *.safetensors in {folder}/ ({what} weights)")


def tokenizer_folder(text_dir: str, flag: str) -> str:
    """Where a text encoder's tokenizer files are: inside its folder (a hub download) or in a sibling tokenizer/
    (the diffusers release layout); inside wins, so a stray tokenizer/ beside a downloaded model is not read."""
    places = (text_dir, os.path.join(os.path.dirname(os.path.normpath(text_dir)), "tokenizer"))
    for place in places:
        if any(os.path.isfile(os.path.join(place, f)) for f in ("tokenizer.json", "tokenizer.model")):
            return place
    raise FileNotFoundError(f"{flag}: no tokenizer.json or tokenizer.model in {places[0]}/ or {places[1]}/")


def text_encoder_folder(weights: str, text_encoder: str | None) -> tuple[str, str]:
    """(Gemma-2's folder, the flag to name in its errors): --text_encoder, else <weights>/text_encoder/."""
    if text_encoder is not None:
        if not os.path.isdir(text_encoder):
            raise FileNotFoundError(f"--text_encoder: no such folder {text_encoder!r} ({GEMMA2_DOWNLOAD})")
        return text_encoder, "--text_encoder"
    default = os.path.join(weights, "text_encoder")
    if not os.path.isdir(default):
        raise FileNotFoundError(f"--text_encoder: not given and {default}/ is missing; {GEMMA2_DOWNLOAD}")
    return default, "--weights"


def load_gemma2(weights: str, dtype: torch.dtype, device, text_encoder: str | None = None):
    """(tokenizer, Gemma-2 decoder) from text_encoder, default <weights>/text_encoder, checked first."""
    text_dir, flag = text_encoder_folder(weights, text_encoder)
    check_model_folder(text_dir, "Gemma-2-2b-it", flag)
    transformers = require_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder(text_dir, flag))
    # AutoModel gives the Gemma-2 decoder without the LM head (only hidden states are needed).
    return tokenizer, transformers.AutoModel.from_pretrained(text_dir, dtype=dtype).to(device).eval()


# --------------------------------------------------------------------------------------------------------------
# Streaming (the official streaming release's stage 1): the video made chunk by chunk, each chunk's forward reading
# caches of the chunks before it instead of recomputing them (README: "Running blocks over spans of frames"):
# GDN blocks the forward scan states and the short convs' halo, softmax blocks the keys and values of a window of
# chunks, every FFN the temporal conv's halo. Caches are written only by a pass over the finished chunk at t = 0.

@dataclass
class StreamCache:
    """What the next chunk reads of the chunks before it. frames: latent frames cached so far (the next chunk
    starts there); chunks: (start, stop) of each; blocks: per block a dict of its entries (u: the attention input
    of the last frames, for the GDN short convs; states: GDN forward states; kv: per chunk its softmax keys and
    values; z: the FFN's last frames before its temporal conv)."""
    frames: int = 0
    chunks: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    rope: torch.Tensor | None = None  # the RoPE table of frames 0.. (grown as the video grows, built once per size)

    def window(self, size: int, sink: bool) -> list[int]:
        """The cached chunks a new chunk's softmax queries see: all (size <= 0), else the last `size` - 1 chunks
        and, with sink, chunk 0 (the image frame's chunk) too, as the official streaming sampler (2, sink on)."""
        c = len(self.chunks)
        if size <= 0 or (sink and c < size):
            return list(range(c))
        return [0] + list(range(c - size + 1, c)) if sink else list(range(max(c - size, 0), c))


def span_camera(dit: DiT, raymap, plucker, rope, hw, window, frames):
    """The blocks' camera inputs (DiT.forward's `camera` and `plucker` tuples, or None) of a span of a longer video:
    the UCPE ray matrices of the frames window = (lo, hi) (rope: their rows), the Plücker tokens of frames = (start,
    end). raymap (B, T', 20) and plucker (B, 48, T', h, w) are the whole video's."""
    camera = pl = None
    if raymap is not None:
        lo, hi = window
        P = ray_matrices(raymap[:, lo:hi].to(dit.dtype), (hi - lo, *hw))
        camera = (P, P.transpose(-1, -2), se3_inverse(P), camera_rope_table(rope, dit.config.linear_head_dim))
    if plucker is not None:
        start, end = frames
        embed = dit.plucker_embedder.proj
        pl = (plucker[:, :, start:end].to(dit.dtype).flatten(2).transpose(1, 2).contiguous(), embed.weight.flatten(1),
              embed.bias)
    return camera, pl


def ffn_chunk(mlp: GLUMBConvTemp, m, thw, halo=None):
    """mlp(m, ...) for one chunk: its temporal conv reads the previous frames' z (halo, (B, C, p, S); None for the
    first chunk) and nothing after the chunk. Returns (out (B, N, C), the chunk's z (B, C, T, S))."""
    B, N, C = m.shape
    T, h, w = thw
    z = mlp.per_frame(m.reshape(B * T, h, w, C).permute(0, 3, 1, 2)).reshape(B, T, C, h * w).permute(0, 2, 1, 3)
    p = 0 if halo is None else halo.shape[2]
    wide = z if p == 0 else torch.cat([halo, z], 2)
    out = temporal_residual(wide, mlp.t_conv, None if p == 0 else (0, p))[:, :, p:]
    return out.permute(0, 2, 3, 1).reshape(B, N, C), z


def _last_frames(halo, x, dim: int, frames: int, tokens: int):
    """A copy of the last `frames` frames (`tokens` rows each along `dim`) of [halo ; x]: the next chunk's halo."""
    wide = x if halo is None else torch.cat([halo, x], dim)
    return wide.narrow(dim, max(0, wide.shape[dim] - frames * tokens), min(wide.shape[dim], frames * tokens)).clone()


@torch.no_grad()
def forward_chunk(dit: DiT, x, timestep, text, text_mask, raymap=None, plucker=None, *, cache: StreamCache,
                  save: bool = False, window: int = -1, sink: bool = True):
    """The velocity (B, 128, f, h, w) of the chunk x (B, 128, f, h, w) of latent frames [cache.frames,
    cache.frames + f) of a video whose earlier chunks `cache` holds: the chunk-causal DiT's output on those frames
    (equal to DiT.forward over the whole video so far with those chunks, tested), reading the caches. timestep
    (B, f) per frame; raymap (B, T', 20) and plucker (B, 48, T', h, w): the whole video's (T' >= the chunk's end),
    or None. save: also append this chunk to `cache` (run it on the finished chunk at t = 0). window, sink: the
    softmax keys and values seen, StreamCache.window. The text is read as given (generate.stream_sample crops
    its padding once, dit.crop_text)."""
    cfg, dtype = dit.config, dit.dtype
    B, _, f, h, w = x.shape
    start = cache.frames
    end, S, C = start + f, h * w, cfg.hidden_size
    reach = min(cfg.conv_kernel_size - 1, start)            # halo frames of the GDN short convs
    lo = start - reach
    x = dit.x_embedder(x.to(dtype))
    temb = dit.t_embedder(timestep_sinusoid(timestep.long().float().flatten()).to(dtype))
    t6 = dit.t_block(temb).view(B, f, 6, C)
    y, mask = dit.attention_y_norm(dit.y_embedder(text.to(dtype))), text_mask != 0
    if cache.rope is None or cache.rope.shape[0] < end * S:  # grown 64 frames ahead: rebuilt every 64 frames
        cache.rope = rope_table(cfg.linear_head_dim, (end + 64, h, w), x.device)
    rope = cache.rope[lo * S:end * S]                       # absolute positions: halo + chunk
    own = slice(reach * S, None)
    camera, pl = span_camera(dit, raymap, plucker, rope, (h, w), (lo, end), (start, end))
    if not cache.blocks:
        cache.blocks = [{"kv": []} for _ in dit.blocks]
    visible = cache.window(window, sink)
    for block, entry in zip(dit.blocks, cache.blocks):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (block.scale_shift_table + t6).chunk(6, 2)
        u = modulate(x, shift_msa, scale_msa, f)
        if isinstance(block.attn, GDNSelfAttention):
            a, states = gdn_chunk(block.attn, u, (f, h, w), rope, camera, entry.get("u"), entry.get("states"),
                                  cfg.camera_k_halo)
        else:
            a, kv = softmax_chunk(block.attn, u, rope[own], camera_rows(camera, own),
                                  [entry["kv"][i] for i in visible])
        x = block.after_attention(x, gated(gate_msa, a), y, mask, pl)
        m, z = ffn_chunk(block.mlp, modulate(x, shift_mlp, scale_mlp, f), (f, h, w), entry.get("z"))
        x = x + gated(gate_mlp, m)
        if save:  # (copies: views would keep whole projections and scans alive)
            if isinstance(block.attn, GDNSelfAttention):
                entry.update(u=_last_frames(entry.get("u"), u, 1, cfg.conv_kernel_size - 1, S), states=states)
            else:
                entry["kv"].append(tuple(None if t is None else t.clone() for t in kv))
            entry["z"] = _last_frames(entry.get("z"), z, 2, cfg.t_kernel_size // 2, 1)
    if save:
        cache.chunks.append((start, end))
        cache.frames = end
        keep = set(cache.window(window, sink)) if window > 0 else None   # what later chunks can still see
        for entry in cache.blocks:
            entry["kv"] = [kv if keep is None or i in keep else None for i, kv in enumerate(entry["kv"])]
    x = dit.final_layer(x, temb.view(B, f, 1, C))
    return x.view(B, f, h, w, -1).permute(0, 4, 1, 2, 3)
