"""The LTX-2 video VAE that SANA-WM works in: 32x spatial and 8x temporal compression to 128 channels.

SANA-WM (arXiv 2605.15178) uses the released LTX-2 VAE unchanged: the first frame is encoded to condition
generation, and the final latents are decoded to up to 961 frames at 704x1280, tile by tile. The streaming
release's ltx2_causal_vae/ is this VAE with a causal decoder (decoder_causal=True), which decodes a video piece
by piece while it is generated (CausalDecodeStream, after the machinery line) and encodes its first frame untiled.
Config: the release's vae/config.json (paper §3.1, §5.1: the LTX-2 VAE, 128 latent channels). Blocks,
encoder, decoder, latent normalisation and tiling as in the LTX-2 VAE and SANA-WM's official loader.

Layouts: videos and latents are (B, C, T, H, W). A video is in [-1, 1] with T = 1 + 8k frames and H, W
multiples of 32; its latent is (B, 128, 1 + (T - 1)/8, H/32, W/32).
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

# (temporal, height, width) strides of the re-sampling layers (as in the LTX-2 VAE)
STRIDES = {"spatial": (1, 2, 2), "temporal": (2, 1, 1), "spatiotemporal": (2, 2, 2)}


@dataclass
class VAEConfig:
    """The release vae/config.json (paper §3.1, §5.1); field names are the diffusers ones."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 128
    patch_size: int = 4
    block_out_channels: tuple[int, ...] = (256, 512, 1024, 2048)
    layers_per_block: tuple[int, ...] = (4, 6, 6, 2, 2)  # one per down block, the last one for the mid block
    downsample_type: tuple[str, ...] = ("spatial", "temporal", "spatiotemporal", "spatiotemporal")
    # The decoder lists run from the output side: the decoder uses block_out_channels, layers_per_block and
    # upsample_factor reversed (so layers_per_block[-1] is its mid block), but upsample_type in this order.
    decoder_block_out_channels: tuple[int, ...] = (256, 512, 1024)
    decoder_layers_per_block: tuple[int, ...] = (5, 5, 5, 5)
    upsample_type: tuple[str, ...] = ("spatiotemporal", "spatiotemporal", "spatiotemporal")
    upsample_factor: tuple[int, ...] = (2, 2, 2)  # channel reduction of each upsampler
    encoder_causal: bool = True
    decoder_causal: bool = False  # the release decoder pads time symmetrically (diffusers' default is True)
    encoder_spatial_padding_mode: str = "zeros"
    decoder_spatial_padding_mode: str = "reflect"
    scaling_factor: float = 1.0

    def __post_init__(self):
        _check_config(self)  # the architecture's consistency checks, after the machinery line

    @property
    def spatial_compression_ratio(self) -> int:  # 4 * 2 * 2 * 2 = 32 for the release, not diffusers' 64
        return self.patch_size * math.prod(STRIDES[k][1] for k in self.downsample_type)

    @property
    def temporal_compression_ratio(self) -> int:  # 2 * 2 * 2 = 8 for the release, not diffusers' 16
        return math.prod(STRIDES[k][0] for k in self.downsample_type)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From a diffusers AutoencoderKLLTX2Video config.json (parsed after the machinery line)."""
        return _config_from_dict(d)


@dataclass(frozen=True)
class Tiling:
    """Tile sizes of tiled encode/decode (official loader), in pixels and pixel frames. The defaults are SANA-WM's:
    the model was trained on latents of the VAE run with exactly these tiles."""
    size: int = 512  # spatial tile edge
    stride: int = 448  # distance between spatial tiles; size - stride pixels are blended
    frames: int = 96  # temporal tile length (a window is frames + 1)
    frame_stride: int = 64  # distance between temporal tiles; frames - frame_stride frames are blended


SANA_WM_TILING = Tiling()


# ------------------------------------------------------------------------------------------------------------
# Building blocks (the LTX-2 VAE's)

def pixnorm(x: torch.Tensor) -> torch.Tensor:
    """RMS over channels at every location, eps 1e-8, no affine weight, in the input dtype (§3.1)."""
    return x / torch.sqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


def space_to_depth(x: torch.Tensor, s: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*a*b*c, T/a, H/b, W/c), channel ((ch*a + i_t)*b + i_h)*c + i_w (§3.4)."""
    B, C, T, H, W = x.shape
    a, b, c = s
    x = x.view(B, C, T // a, a, H // b, b, W // c, c).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, C * a * b * c, T // a, H // b, W // c)


def depth_to_space(x: torch.Tensor, s: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of space_to_depth."""
    B, C, T, H, W = x.shape
    a, b, c = s
    x = x.view(B, C // (a * b * c), a, b, c, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, C // (a * b * c), T * a, H * b, W * c)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p), channel (c*p + i_w)*p + i_h: width sub-index first (§3.7)."""
    B, C, T, H, W = x.shape
    x = x.view(B, C, T, H // p, p, W // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(B, C * p * p, T, H // p, W // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of patchify."""
    B, C, T, H, W = x.shape
    x = x.view(B, C // (p * p), p, p, T, H, W).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(B, C // (p * p), T, H * p, W * p)


class CausalConv3d(nn.Module):
    """3x3x3 conv whose time axis is padded by repeating edge frames, never zeros (§3.2): causal = two copies
    of frame 0 in front, otherwise one copy of each end frame. H and W are padded by 1 in `pad_mode`.

    A streamed causal decode (SANA-WM's streaming release) passes `cache`, one dict for all convs of the decoder:
    a conv that has seen earlier frames of the stream puts its input's last 2 frames in front instead of
    copies of frame 0, which makes a video decoded piece by piece equal to one decode of the whole."""

    def __init__(self, c_in: int, c_out: int, causal: bool, pad_mode: str):
        super().__init__()
        self.causal = causal
        self.conv = nn.Conv3d(c_in, c_out, 3, padding=(0, 1, 1), padding_mode=pad_mode)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        first = x[:, :, :1]
        if not self.causal:
            return self.conv(torch.cat([first, x, x[:, :, -1:]], dim=2))
        x = torch.cat([cache[self] if cache and self in cache else torch.cat([first, first], dim=2), x], dim=2)
        if cache is not None:
            cache[self] = x[:, :, -2:]  # what the next piece of the stream puts in front
        return self.conv(x)


class ResBlock(nn.Module):
    """x + conv2(silu(pixnorm(conv1(silu(pixnorm(x)))))) at constant width (§3.3)."""

    def __init__(self, c: int, causal: bool, pad_mode: str):
        super().__init__()
        self.conv1 = CausalConv3d(c, c, causal, pad_mode)
        self.conv2 = CausalConv3d(c, c, causal, pad_mode)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(pixnorm(x), inplace=True), cache)
        h = self.conv2(F.silu(pixnorm(h), inplace=True), cache)
        return h.add_(x)  # the conv output is a fresh tensor: add in place to save one activation


class Downsampler(nn.Module):
    """Space-to-depth of a conv plus space-to-depth of the input averaged over groups of channels (§3.5)."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int], causal: bool, pad_mode: str):
        super().__init__()
        self.stride = stride
        self.group = c_in * math.prod(stride) // c_out
        self.conv = CausalConv3d(c_in, c_out // math.prod(stride), causal, pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # s_t - 1 copies of frame 0 in front make 1 + 2k frames even; both branches see them (none when s_t = 1)
        if self.stride[0] > 1:
            x = torch.cat([x[:, :, :self.stride[0] - 1], x], dim=2)
        residual = space_to_depth(x, self.stride).unflatten(1, (-1, self.group)).mean(2)
        return space_to_depth(self.conv(x), self.stride) + residual


class Upsampler(nn.Module):
    """Depth-to-space of a conv (c -> c*prod(s)/u) plus depth-to-space of the input with its channel block
    tiled prod(s)/u times; the first s_t - 1 frames of both are dropped, so T -> s_t*T - (s_t - 1) (§3.6).
    In a streamed decode only the stream's first piece drops them (its conv has no cached frames yet)."""

    def __init__(self, c_in: int, stride: tuple[int, int, int], factor: int, causal: bool, pad_mode: str):
        super().__init__()
        self.stride = stride
        self.repeats = math.prod(stride) // factor
        self.conv = CausalConv3d(c_in, c_in * math.prod(stride) // factor, causal, pad_mode)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        drop = 0 if cache and self.conv in cache else self.stride[0] - 1
        h = depth_to_space(self.conv(x, cache), self.stride)[:, :, drop:]
        residual = depth_to_space(x, self.stride)[:, :, drop:]
        # out channel j gets residual channel j mod (C / repeats): broadcast instead of materialising the repeat
        B, C, T, H, W = h.shape
        h.view(B, self.repeats, C // self.repeats, T, H, W).add_(residual.unsqueeze(1))
        return h


class MidBlock(nn.Module):
    def __init__(self, c: int, n_layers: int, causal: bool, pad_mode: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(c, causal, pad_mode) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x


class DownBlock(MidBlock):
    """ResNets at the input width, then a downsampler to c_out (§4)."""

    def __init__(self, c_in: int, c_out: int, n_layers: int, stride, causal: bool, pad_mode: str):
        super().__init__(c_in, n_layers, causal, pad_mode)
        self.downsamplers = nn.ModuleList([Downsampler(c_in, c_out, stride, causal, pad_mode)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamplers[0](super().forward(x))


class UpBlock(MidBlock):
    """An upsampler from c_in to c_in/factor channels, then ResNets at that width (§5)."""

    def __init__(self, c_in: int, n_layers: int, stride, factor: int, causal: bool, pad_mode: str):
        super().__init__(c_in // factor, n_layers, causal, pad_mode)
        self.upsamplers = nn.ModuleList([Upsampler(c_in, stride, factor, causal, pad_mode)])

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        return super().forward(self.upsamplers[0](x, cache), cache)


class Encoder(nn.Module):
    """Video -> latent+1 channels: the posterior mean and one log-variance map (§4)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mode = (cfg.encoder_causal, cfg.encoder_spatial_padding_mode)
        self.patch_size = cfg.patch_size
        c = cfg.latent_channels  # the first width equals the latent width in diffusers' construction
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size ** 2, c, *mode)
        self.down_blocks = nn.ModuleList()
        for c_out, n, kind in zip(cfg.block_out_channels, cfg.layers_per_block, cfg.downsample_type):
            self.down_blocks.append(DownBlock(c, c_out, n, STRIDES[kind], *mode))
            c = c_out
        self.mid_block = MidBlock(c, cfg.layers_per_block[-1], *mode)
        self.conv_out = CausalConv3d(c, cfg.latent_channels + 1, *mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(patchify(x, self.patch_size))
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(pixnorm(self.mid_block(x)), inplace=True))


class Decoder(nn.Module):
    """Latent -> video in [-1, 1] (not clamped), no timestep conditioning, no noise injection (§5)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mode = (cfg.decoder_causal, cfg.decoder_spatial_padding_mode)
        self.patch_size = cfg.patch_size
        self.reflect = cfg.decoder_spatial_padding_mode == "reflect"
        layers = cfg.decoder_layers_per_block[::-1]
        c = cfg.decoder_block_out_channels[-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, c, *mode)
        self.mid_block = MidBlock(c, layers[0], *mode)
        self.up_blocks = nn.ModuleList()
        for n, kind, factor in zip(layers[1:], cfg.upsample_type, cfg.upsample_factor[::-1]):
            self.up_blocks.append(UpBlock(c, n, STRIDES[kind], factor, *mode))
            c //= factor
        self.conv_out = CausalConv3d(c, cfg.out_channels * cfg.patch_size ** 2, *mode)

    def forward(self, z: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """z (B, C, T, h, w) -> (B, 3, 1 + 8(T - 1), 32h, 32w). A causal decoder also decodes a video piece by
        piece with one `cache` dict (empty at first, see CausalConv3d): later pieces give 8T frames."""
        if self.reflect and min(z.shape[-2:]) < 2:
            raise ValueError(f"z: reflect padding needs at least 2 latent pixels per side, got a "
                             f"{z.shape[-2]}x{z.shape[-1]} latent (or tile); choose a size or Tiling.stride "
                             f"that leaves no 1-pixel edge tile")
        x = self.mid_block(self.conv_in(z, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return unpatchify(self.conv_out(F.silu(pixnorm(x), inplace=True), cache), self.patch_size)


# ------------------------------------------------------------------------------------------------------------

class VAE(nn.Module):
    """The LTX-2 video autoencoder: encode -> posterior mean, decode -> video; normalise for the DiT (§6).

    The VAE is frozen in SANA-WM, so encode/decode run without autograd. Inputs are moved to the weights'
    device and dtype, as the reference pipeline does. By default both tile as SANA-WM's official loader does;
    `tiling=None` runs the network on the whole input at once."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latents_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latents_std", torch.ones(cfg.latent_channels))

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tiling: Tiling | None = SANA_WM_TILING, return_logvar: bool = False):
        """video (B, 3, 1 + 8k, H, W) in [-1, 1], H and W multiples of 32 -> posterior mean
        (B, 128, 1 + k, H/32, W/32); with return_logvar also the log-variance, one map for all channels,
        clamped to [-30, 20] (§4)."""
        cfg = self.cfg
        r, rt = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
        if video.dim() != 5 or video.shape[1] != cfg.in_channels:
            raise ValueError(f"video: expected (B, {cfg.in_channels}, T, H, W), got {tuple(video.shape)}")
        T, H, W = video.shape[2:]
        if (T - 1) % rt or H % r or W % r:
            raise ValueError(f"video: expected 1 + {rt}k frames and H, W multiples of {r}, got T={T}, H={H}, W={W}")
        video = video.to(self.latents_mean)
        moments = self.encoder(video) if tiling is None else _tiled_encode(self, video, tiling)
        # channel `latent_channels` is the one log-variance map; diffusers copies it to 128 channels before
        # tiling, but blending is per channel, so copying it afterwards gives the same result
        mean, logvar = moments[:, :cfg.latent_channels], moments[:, cfg.latent_channels:]
        if return_logvar:
            return mean, logvar.clamp(-30.0, 20.0).expand_as(mean)
        return mean

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiling: Tiling | None = SANA_WM_TILING) -> torch.Tensor:
        """z (B, 128, T, h, w) -> video (B, 3, 1 + 8(T - 1), 32h, 32w), nominally in [-1, 1], not clamped."""
        z = _check_latents(self, z)
        return self.decoder(z) if tiling is None else _tiled_decode(self, z, tiling)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior mean -> the DiT's latent space: per channel (z - mean) * scaling_factor / std (§6)."""
        mean, std = (b.view(1, -1, 1, 1, 1).to(z) for b in (self.latents_mean, self.latents_std))
        return (z - mean) * self.cfg.scaling_factor / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of normalize: z / scaling_factor * std + mean."""
        mean, std = (b.view(1, -1, 1, 1, 1).to(z) for b in (self.latents_mean, self.latents_std))
        return z / self.cfg.scaling_factor * std + mean

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu",
                        config: VAEConfig | None = None) -> "VAE":
        """Load the release vae/ folder or a single .safetensors file (the loader is after the machinery line)."""
        return _load(cls, path, dtype, device, config)


# ================================================================================================================
# Machinery below this line: config checks and parsing, tiled encode/decode (bounded memory; decode_pieces hands
# the decoded video on piece by piece), the streamed causal decode and loading.
# The VAE above is complete without it.
# ================================================================================================================

def _check_config(cfg: VAEConfig) -> None:
    """The lists of a VAEConfig agree with each other and with the release's layer rules."""
    def fail(what):
        raise ValueError(f"VAEConfig: {what}")

    n_enc, n_dec = len(cfg.block_out_channels), len(cfg.decoder_block_out_channels)
    if len(cfg.layers_per_block) != n_enc + 1 or len(cfg.downsample_type) != n_enc:
        fail("layers_per_block needs len(block_out_channels) + 1 entries and downsample_type one per block")
    if not (len(cfg.decoder_layers_per_block) == n_dec + 1 and len(cfg.upsample_type) == n_dec
            and len(cfg.upsample_factor) == n_dec):
        fail("decoder_layers_per_block needs len(decoder_block_out_channels) + 1 entries, "
             "upsample_type and upsample_factor one per block")
    for kind in cfg.downsample_type + cfg.upsample_type:
        if kind not in STRIDES:
            fail(f"re-sampling type {kind!r} is not one of {sorted(STRIDES)}")
    c = cfg.latent_channels
    for c_out, kind in zip(cfg.block_out_channels, cfg.downsample_type):
        n = math.prod(STRIDES[kind])
        if c_out % n or (c * n) % c_out:
            fail(f"a {kind} downsampler {c} -> {c_out} channels does not split into whole groups")
        c = c_out
    c = cfg.decoder_block_out_channels[-1]
    for c_block, kind, u in zip(cfg.decoder_block_out_channels[::-1], cfg.upsample_type,
                                cfg.upsample_factor[::-1]):
        # otherwise diffusers inserts a channel-changing ResNet (a LayerNorm shortcut), not in the release
        if c_block != c or c % u or math.prod(STRIDES[kind]) % u:
            fail(f"decoder block of {c_block} channels cannot follow {c} channels with upsample_factor {u}")
        c //= u
    enc = [math.prod(s) for s in zip(*(STRIDES[k] for k in cfg.downsample_type))]
    dec = [math.prod(s) for s in zip(*(STRIDES[k] for k in cfg.upsample_type))]
    if enc != dec or enc[1] != enc[2]:
        fail(f"encoder strides {enc} and decoder strides {dec} (t, h, w) must agree and be square")


def _check_latents(vae: VAE, z: torch.Tensor) -> torch.Tensor:
    """z checked as decode takes it, on the weights' device and dtype (as the reference pipeline moves it)."""
    if z.dim() != 5 or z.shape[1] != vae.cfg.latent_channels:
        raise ValueError(f"z: expected (B, {vae.cfg.latent_channels}, T, h, w), got {tuple(z.shape)}")
    return z.to(vae.latents_mean)


def _config_from_dict(d: dict) -> VAEConfig:
    """From a diffusers AutoencoderKLLTX2Video config.json. Keys starting with '_' are bookkeeping. Keys
    that switch on features the release does not use must hold the release value."""
    release_only = {"down_block_types": "LTX2VideoDownBlock3D", "spatio_temporal_scaling": True,
                    "decoder_spatio_temporal_scaling": True, "decoder_inject_noise": False,
                    "upsample_residual": True, "timestep_conditioning": False, "patch_size_t": 1}
    names = {f.name for f in fields(VAEConfig)}
    kwargs, ratios = {}, {}
    for key, value in d.items():
        if key.startswith("_") or key == "resnet_norm_eps":  # eps of the LayerNorm shortcut: absent here
            continue
        if key in release_only:
            if any(v != release_only[key] for v in (value if isinstance(value, (list, tuple)) else [value])):
                raise ValueError(f"config {key}={value!r}: only {release_only[key]!r} is supported")
        elif key in ("spatial_compression_ratio", "temporal_compression_ratio"):
            ratios[key] = value
        elif key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(f"config key {key!r} is not a field of VAEConfig")
    cfg = VAEConfig(**kwargs)
    for key, value in ratios.items():
        # derived from the architecture here; diffusers derives 64 / 16 when they are null, which breaks
        # its tiling (diffusers would derive 64/16), so a stated value must be the true one
        if value is not None and value != getattr(cfg, key):
            raise ValueError(f"config {key}={value}: this architecture compresses by {getattr(cfg, key)}")
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Tiling (official loader). A tile's leading overlap is blended linearly with the trailing overlap of the tile
# before it; the reference does this in place, so a tile's trailing overlap, when a later tile reads it, has
# already been blended with the tiles above/left of it. We keep exactly that: each tile is blended first, its
# trailing overlaps are copied afterwards, and only those strips (not whole tiles) are kept for the next tiles.
# Finished parts go straight into one preallocated output, so memory is bounded by the tile size.

def _spans(n: int, window: int, step: int) -> list[tuple[int, int]]:
    """(start, length) of the windows every `step` over an axis of length n, as the reference places them."""
    return [(start, min(window, n - start)) for start in range(0, n, step)]


def _tail(y: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """A copy of the last n entries along dim (the part a later tile blends with)."""
    n = min(n, y.shape[dim])
    return y.narrow(dim, y.shape[dim] - n, n).clone()


def _blend_(tail: torch.Tensor, y: torch.Tensor, n: int, dim: int) -> None:
    """y[i] = tail[-n + i] * (1 - i/n) + y[i] * (i/n) for i < n = min(n, both lengths), in place on y."""
    n = min(n, tail.shape[dim], y.shape[dim])
    shape = [1] * y.dim()
    shape[dim] = n
    # ramp in float64 cast to >= fp32, the values of the reference's Python-float weights
    w = (torch.arange(n, dtype=torch.float64, device=y.device) / n).view(shape)
    w = w.to(torch.promote_types(y.dtype, torch.float32))
    head = y.narrow(dim, 0, n)
    head.copy_(tail.narrow(dim, tail.shape[dim] - n, n) * (1 - w) + head * w)


def _tile_space(x, net, window: int, step: int, keep: int, blend: int, out_hw: tuple[int, int]):
    """Run `net` on window x window tiles every `step` (input units) in raster order; each output tile is
    blended with the tile above, then the tile to its left, over `blend` rows/columns, and its top-left
    keep x keep block is written out (§7.2, §7.3)."""
    out = above = None
    cols = _spans(x.shape[-1], window, step)
    for i, (r0, nr) in enumerate(_spans(x.shape[-2], window, step)):
        bottoms, right = [], None
        for j, (c0, nc) in enumerate(cols):
            y = net(x[..., r0:r0 + nr, c0:c0 + nc])
            if i > 0:
                _blend_(above[j], y, blend, dim=-2)
            if j > 0:
                _blend_(right, y, blend, dim=-1)
            if out is None:
                out = y.new_empty(*y.shape[:-2], *out_hw)
            piece = y[..., :keep, :keep]
            out[..., i * keep:i * keep + piece.shape[-2], j * keep:j * keep + piece.shape[-1]] = piece
            bottoms.append(_tail(y, blend, -2))
            right = _tail(y, blend, -1)
            del y, piece  # free this tile before the next one is computed
        above = bottoms
    return out


def _tile_time(x, fn, window: int, step: int, keep: int, blend: int, out_len: int):
    """Run `fn` on windows of `window` frames every `step` (input units) and write the frames each keeps
    (_time_pieces) into one output of out_len frames."""
    out, pos = None, 0
    for piece in _time_pieces(x, fn, window, step, keep, blend):
        if out is None:
            out = piece.new_empty(*piece.shape[:2], out_len, *piece.shape[3:])
        out[:, :, pos:pos + piece.shape[2]] = piece
        pos += piece.shape[2]
        del piece  # free this window before the next one is computed
    return out


def _time_pieces(x, fn, window: int, step: int, keep: int, blend: int):
    """Run `fn` on windows of `window` frames every `step` (input units) and yield the frames each keeps, in
    order. Every window after the first drops its first output frame, the one that repeats the previous window's
    last kept frame, is blended with the previous window over `blend` frames and keeps `keep` frames; the first
    keeps keep + 1 (§7.4). A yielded piece is final: the next window blends into its own first frames, with a copy
    of this one's tail.

    Decode differs from the reference here on purpose: diffusers drops a decoded window's
    *last* frame instead, so from the first seam on its output lags one frame behind (a window starting at
    latent 8m begins at pixel frame 64m, yet is placed from 64m + 1) and the true last frame is lost.
    Dropping the first frame, as its encoder does, keeps every frame in place; output frames before the
    first seam (the first frame_stride + 1) are identical to the reference. tests/test_vae.py shows both.
    """
    tail = None
    for k, (t0, nt) in enumerate(_spans(x.shape[2], window, step)):
        if k > 0 and nt == 1:
            break  # one input frame gives one output frame, which is dropped (the reference computes it anyway)
        y = fn(x[:, :, t0:t0 + nt])
        if k > 0:
            y = y[:, :, 1:]
            _blend_(tail, y, blend, dim=2)
        tail = _tail(y, blend, 2)
        yield y[:, :, :keep + (k == 0)]
        del y  # with the caller's piece, frees this window before the next one is computed


def _check_tiling(cfg: VAEConfig, tiling: Tiling) -> None:
    r, rt = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    if not (0 < tiling.stride <= tiling.size and tiling.size % r == 0 and tiling.stride % r == 0
            and 0 < tiling.frame_stride <= tiling.frames and tiling.frames % rt == 0
            and tiling.frame_stride % rt == 0):
        raise ValueError(f"tiling: expected 0 < stride <= size, multiples of {r} pixels, and 0 < "
                         f"frame_stride <= frames, multiples of {rt} frames; got {tiling}")


def _tiled_encode(vae: VAE, video: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """The encoder's moments of `video`, tile by tile as SANA-WM runs it (§7)."""
    cfg = vae.cfg
    r, rt = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    _check_tiling(cfg, tiling)
    T, H, W = video.shape[2:]

    def space(x):
        if x.shape[-2] > tiling.size or x.shape[-1] > tiling.size:
            return _tile_space(x, vae.encoder, tiling.size, tiling.stride, tiling.stride // r,
                               (tiling.size - tiling.stride) // r, (H // r, W // r))
        return vae.encoder(x)

    if T > tiling.frames:
        return _tile_time(video, space, tiling.frames + 1, tiling.frame_stride, tiling.frame_stride // rt,
                          (tiling.frames - tiling.frame_stride) // rt, 1 + (T - 1) // rt)
    return space(video)


def _tiled_decode(vae: VAE, z: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """The decoded video of `z`, tile by tile as SANA-WM runs it (§7)."""
    space, temporal = _decode_tiles(vae, z, tiling)
    if temporal is None:
        return space(z)
    return _tile_time(z, space, *temporal, 1 + (z.shape[2] - 1) * vae.cfg.temporal_compression_ratio)


def _decode_tiles(vae: VAE, z: torch.Tensor, tiling: Tiling):
    """The tiled decode's pieces: (space, temporal), space(window) decoding latent frames tile by tile in space,
    temporal the (window, step, keep, blend) of _time_pieces, or None when z fits one temporal window."""
    cfg = vae.cfg
    r, rt = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    _check_tiling(cfg, tiling)
    T, h, w = z.shape[2:]
    window, step = tiling.size // r, tiling.stride // r

    def space(x):
        if x.shape[-2] > window or x.shape[-1] > window:
            return _tile_space(x, vae.decoder, window, step, tiling.stride, tiling.size - tiling.stride,
                               (h * r, w * r))
        return vae.decoder(x)

    if T > tiling.frames // rt:
        return space, (tiling.frames // rt + 1, tiling.frame_stride // rt, tiling.frame_stride,
                       tiling.frames - tiling.frame_stride)
    return space, None


@torch.no_grad()
def decode_pieces(vae: VAE, z: torch.Tensor, tiling: Tiling | None = SANA_WM_TILING):
    """vae.decode(z, tiling) as consecutive pieces of frames, in order: (B, 3, n, H, W) each, the frames of one
    temporal window as soon as they are final (one piece when z fits one window, or tiling=None). Concatenated they
    are vae.decode(z, tiling) bit for bit; a caller that hands each piece on (generate.py: uint8 frames to the host)
    never holds the whole decoded video on the device."""
    z = _check_latents(vae, z)
    if tiling is None:
        yield vae.decoder(z)
        return
    space, temporal = _decode_tiles(vae, z, tiling)
    if temporal is None:
        yield space(z)
    else:
        yield from _time_pieces(z, space, *temporal)


# ------------------------------------------------------------------------------------------------------------
# Streamed causal decoding (SANA-WM streaming release)

class CausalDecodeStream:
    """Decodes one video piece by piece while it is generated, as SANA-WM's streaming release does: every
    call's latent frames go through the causal decoder one at a time, and every temporal conv keeps the last 2
    frames of its input for the next one (CausalConv3d). The pieces together equal `vae.decode(z,
    tiling=None)` of the whole latent: the stream's first latent frame gives 1 pixel frame, every later one 8
    (the release decodes a first piece of 4 latent frames to 25 pixel frames, then pieces of 3 to 24 each).

    decode(z) takes z as VAE.decode does: de-normalised, (B, C, n, h, w) with n >= 1 and the same B, h, w
    for the whole video; reset() starts the next video. Nothing is tiled: one latent frame at a time bounds
    the memory, as in the official code. The cache is a plain dict of tensors owned by the stream, and the
    decoder always runs eagerly: the official code refuses to compile it, as the compiled decoder corrupts
    its cache between pieces."""

    def __init__(self, vae: VAE):
        if not vae.cfg.decoder_causal:
            raise ValueError("vae: a streamed decode needs a causal decoder (decoder_causal=True, as in the "
                             "streaming release's ltx2_causal_vae/); this one pads time on both sides")
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the cached frames: the next decode starts a new video."""
        self.cache: dict = {}
        self.size: tuple[int, int, int] | None = None  # (B, h, w) of the video being decoded

    @torch.no_grad()
    @torch.compiler.disable
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The next n latent frames -> their pixel frames (B, 3, 8n, 32h, 32w), 1 + 8(n - 1) for the first
        piece of a video."""
        cfg = self.vae.cfg
        if z.dim() != 5 or z.shape[1] != cfg.latent_channels or z.shape[2] == 0:
            raise ValueError(f"z: expected (B, {cfg.latent_channels}, n >= 1, h, w), got {tuple(z.shape)}")
        size = (z.shape[0], *z.shape[3:])
        if self.size not in (None, size):
            raise ValueError(f"z: this video is decoded at (B, h, w) = {self.size}, got {size}; call reset() "
                             f"to start another video")
        self.size = size
        z = z.to(self.vae.latents_mean)
        return torch.cat([self.vae.decoder(z[:, :, t:t + 1], self.cache) for t in range(z.shape[2])], dim=2)


# ------------------------------------------------------------------------------------------------------------
# Loading

def _load(cls, path, dtype: torch.dtype, device, config: VAEConfig | None) -> VAE:
    """Load the release vae/ folder (diffusers layout: config.json and one .safetensors file, or shards listed
    by a *.safetensors.index.json) or a single .safetensors file, strictly, with diffusers' key names. A file,
    or a folder without config.json, uses `config` (default: the release). Tensors are converted one at a
    time and assigned to a model built on the meta device, so the weights exist once."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            files = sorted({path / f for f in json.loads(indexes[0].read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise ValueError(f"path: expected one *.safetensors file or an index in {path}, "
                                 f"found {[f.name for f in files]}")
        if (path / "config.json").is_file():
            config = VAEConfig.from_dict(json.loads((path / "config.json").read_text()))
    else:
        raise ValueError(f"path: expected the release vae/ folder or a .safetensors file, got {path}")
    cfg = config or VAEConfig()
    with torch.device("meta"):
        model = cls(cfg)
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"path: {file} is not a readable safetensors file ({e})") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in sorted(expected.keys() & state.keys())
             if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the weights do not match the VAE config: missing {missing}, "
                         f"unexpected {unexpected}, wrong shapes {wrong}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
