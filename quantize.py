"""NVFP4 and FP8 weights for the transformers: the paper's distilled SANA-WM runs its DiT in NVFP4 to fit small GPUs.

1. the format (E2M1 values, an E4M3 scale per 16 values, an FP32 scale per tensor): quantize/dequantize_nvfp4;
2. the matmul y = x W^T + b with W in NVFP4: dequantise, then an ordinary linear;
3. NVFP4Linear / NVFP4Conv2d (drop-ins for nn.Linear / nn.Conv2d) and quantize_model, which swaps them in.
Right after the marker line, FP8 (W8A8: E4M3 weights and tokens, a scale per row) and FP8Linear; then the machinery:
Triton kernels (NVFP4 matmul, FP8 token quantiser), the layer sets, checkpoint files and the CLI `python quantize.py
--in <release> --out q.safetensors [--precision fp8] [--model refiner]` (which alone imports dit.py / refiner.py)."""
import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

# 1. The format ---------------------------------------------------------------------------------------------
# E2M1 (4 bits): 1 sign bit (bit 3), 2 exponent bits (bits 2..1, bias 1), 1 mantissa bit (bit 0); no inf/NaN.
# Exponent 0 is subnormal (0 or 0.5), so the 8 magnitudes, by the low 3 bits of the code, are
#     code  0    1    2    3    4    5    6    7
#     value 0    0.5  1    1.5  2    3    4    6
# Rounding is to nearest, ties to the even code (mantissa bit 0), saturating at +-6 (there is no inf).
# E4M3 (torch.float8_e4m3fn), which holds the block scales: 4 exponent bits (bias 7), 3 mantissa bits, no inf;
# largest 448, smallest normal 2^-6, smallest subnormal 2^-9.
# Two-level scaling of a weight W (out, in): blocks of 16 consecutive values along the input (contraction)
# dimension of one output row share an E4M3 scale s; the whole tensor shares an fp32 scale s2.
#     s2 = amax(|W|) / (6 * 448)            -> the largest block scale lands exactly on E4M3's top, 448
#     s  = amax(|block|) / (6 * s2)         -> the block's largest value lands on E2M1's top, 6
#     W  ~= e2m1 * s * s2
# Two E2M1 codes share a byte, the first (even input index) in the LOW nibble: the layout of
# torch.float4_e2m1fn_x2 and of cuBLAS/ModelOpt FP4 data.
BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0 ** -9
# value of each 4-bit code; codes 8..15 are the negatives of 0..7 (code 8 is -0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# midpoints between neighbouring magnitudes: above midpoint k the nearest magnitude is code k+1
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scales) to E2M1 codes (uint8 in 0..15), RNE, saturating."""
    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for k, mid in enumerate(E2M1_MIDPOINTS):
        # An exact tie between codes k and k+1 goes to the even one: up only when k+1 is even (k odd).
        # Everything above 5 counts past the last midpoint: saturation at 6.
        code += (a >= mid) if k % 2 == 1 else (a > mid)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 in 0..15) -> fp32 values."""
    return _e2m1_table(code.device)[code.long()]  # torch.tensor(E2M1_VALUES), made once per device


def pack_nibbles(code: torch.Tensor) -> torch.Tensor:
    """(..., 2n) codes -> (..., n) bytes; element 2j in the low nibble, 2j+1 in the high nibble."""
    return code[..., 0::2] | (code[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2n) codes (inverse of pack_nibbles)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_nvfp4(weight: torch.Tensor):
    """W (out, in) -> (packed uint8 (out, in/2), scale float8_e4m3fn (out, in/16), scale_2 fp32 scalar)."""
    _check_weight(weight)
    out_features, in_features = weight.shape
    w = weight.detach().float()  # scales and rounding decisions in fp32, whatever the weight dtype
    # A tensor of zeros (or of fp32 subnormals) would give s2 = 0; the smallest normal fp32 keeps 1/s2 finite
    # and changes nothing else (zero blocks get scale 1 below).
    scale_2 = (w.abs().amax() / (E2M1_MAX * E4M3_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
    blocks = w.reshape(out_features, in_features // BLOCK, BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    # Tiny block scales are clamped up to E4M3's smallest subnormal to stay nonzero (such a block rounds on a grid
    # coarser than ideal); 448 is the top by construction, clamped only against fp32 rounding (E4M3 has no inf).
    scale = (block_amax / (E2M1_MAX * scale_2)).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX)
    scale = torch.where(block_amax == 0, torch.ones_like(scale), scale).to(torch.float8_e4m3fn)
    # Divide by the *stored* (rounded) scale, so dequantisation reproduces the nearest representable value. The
    # block maximum can land slightly above 6 after the scale's rounding: it saturates to 6.
    code = e2m1_encode(blocks / (scale.float()[..., None] * scale_2))
    return pack_nibbles(code.view(out_features, in_features)), scale, scale_2


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed, scale, scale_2) -> W (out, in) in `dtype`: W = e2m1 * scale * scale_2, computed in fp32."""
    _check_nvfp4(packed, scale, scale_2)
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    values = e2m1_decode(unpack_nibbles(packed)).view(out_features, in_features // BLOCK, BLOCK)
    # value * scale is exact in fp32 (2 x 4 significant bits); scale_2 adds the only rounding.
    w = values * scale.float()[..., None] * scale_2.float().reshape(())
    return w.view(out_features, in_features).to(dtype)


# 2. The matmul y = x W^T + b with W in NVFP4 ---------------------------------------------------------------
def nvfp4_linear_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantise the whole weight (fp32, then x's dtype), then an ordinary linear."""
    return F.linear(x, dequantize_nvfp4(packed, scale, scale_2, x.dtype), bias)


# 3. Modules and model surgery ------------------------------------------------------------------------------
class NVFP4Linear(nn.Module):
    """Drop-in for nn.Linear with the weight in NVFP4. State dict: weight (uint8, out x in/2), weight_scale
    (float8_e4m3fn, out x in/16), weight_scale_2 (fp32 scalar), bias (as the original linear's).

    `kernel` picks the matmul (see nvfp4_linear). Module.to(dtype) casts the bias only, as the format says."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None, kernel: str = "auto"):
        super().__init__()
        _check_layer(in_features, kernel)
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // BLOCK, device=device,
                                                        dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale_2", torch.ones((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantise a float weight (out, in) into this module's buffers (no-op shapes on the meta device)."""
        if not weight.is_meta:
            self.weight, self.weight_scale, self.weight_scale_2 = quantize_nvfp4(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2, self.bias, self.kernel)


class NVFP4Conv2d(NVFP4Linear):
    """Drop-in for nn.Conv2d (groups=1, zero padding) with the weight (out, in, kh, kw) flattened to
    (out, in*kh*kw) and quantised as a linear. A 1x1 conv is a linear over channels: the NVFP4 matmul; other
    kernels dequantise the weight and run an ordinary conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, device=None, dtype=None, kernel: str = "auto"):
        kernel_size = _pair(kernel_size)
        super().__init__(in_channels * kernel_size[0] * kernel_size[1], out_channels, bias, device, dtype, kernel)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)

    def set_weight(self, weight: torch.Tensor) -> None:
        super().set_weight(weight.reshape(weight.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            return NVFP4Linear.forward(self, x.movedim(1, -1)).movedim(-1, 1)
        w = dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2, x.dtype)
        w = w.view(self.out_features, self.in_channels, *self.kernel_size)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)


# Layer sets. Weight bytes of the release DiT (2.6B parameters, 5.32 GB in bf16; tests/test_quantize.py counts
# them): NVFP4 costs 0.5625 bytes per weight (half a byte plus one E4M3 scale per 16) instead of 2.
# default (2.73 GB): the blocks' attention, cross-attention and FFN 1x1 convs (the release's module names). Embedders,
# t_block, the final layer, the FFN temporal conv and the camera path (the *_cam projections, plucker_proj) stay in
# bf16: the official release found that quantising the camera path kills action-following.
DEFAULT_INCLUDE = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.attn.output_gate",
                   "blocks.*.cross_attn.q_linear", "blocks.*.cross_attn.kv_linear", "blocks.*.cross_attn.proj",
                   "blocks.*.mlp.inverted_conv.conv", "blocks.*.mlp.point_conv.conv")
DEFAULT_EXCLUDE = ("*_cam", "*plucker*")


def _quantisable(module: nn.Module) -> bool:  # what NVFP4Linear / NVFP4Conv2d replace exactly
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1
                                         and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


def _quantized_layer(module: nn.Module, kernel: str, precision: str) -> nn.Module:
    linear, conv = (NVFP4Linear, NVFP4Conv2d) if precision == "nvfp4" else (FP8Linear, FP8Conv2d)  # FP8: below
    bias = module.bias is not None
    kw = dict(bias=bias, device=module.weight.device, dtype=module.bias.dtype if bias else None, kernel=kernel)
    new = linear(module.in_features, module.out_features, **kw) if isinstance(module, nn.Linear) else \
        conv(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
             module.dilation, **kw)
    new.set_weight(module.weight)
    new.bias = module.bias  # the original bias itself (None when it has none)
    return new


@torch.no_grad()
def quantize_model(model: nn.Module, include=DEFAULT_INCLUDE, exclude=DEFAULT_EXCLUDE, kernel: str = "auto",
                   precision: str = "nvfp4") -> list:
    """Replace, in place, every nn.Linear / nn.Conv2d (groups=1) named by a glob in `include` and none in `exclude`
    by its NVFP4 (or precision="fp8": FP8) version; returns their names. Each include pattern must match at least
    one such module. On the meta device only the structure changes (for loading quantised files)."""
    include, exclude = _globs(include), _globs(exclude)
    candidates = [name for name, m in model.named_modules() if _quantisable(m)
                  and not any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    names = [name for name in candidates if any(fnmatch.fnmatchcase(name, p) for p in include)]
    _check_swap(model, include, exclude, candidates, names, precision)  # all checked before any is changed
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _quantized_layer(getattr(parent, child), kernel, precision))
    return names


# ================================================================================================================
# Machinery below this line: first the second format, FP8 (its reference in plain torch, as sections 1-3 for
# NVFP4), then checks, the Triton kernels, the layer sets, checkpoints, the CLI. The NVFP4 format, its layers and
# quantize_model above are complete without it.
# ================================================================================================================

# ------------------------------------------------------------------------------------------------------------
# FP8 (W8A8): the format, the matmul and the layers, in plain torch (the reading path above is full).
# E4M3 as in section 1 (largest 448, no inf). Every row of a tensor gets one fp32 scale: the weight (out, in) per
# output channel, once; an activation (tokens, in) per token, at every call:
#     s[r] = max(amax(|T[r, :]|) / 448, FP8_MIN_SCALE),    T8[r, :] = e4m3(clamp(T[r, :] / s[r], -448, 448))
# (to nearest, ties to even), so each row's largest value lands on E4M3's top. Then y[t, o] = (x8[t] . w8[o]) *
# s_x[t] * s_w[o] + b[o]. The product of two E4M3 values is exact in fp32, so the tensor cores' FP8 matmul
# (torch._scaled_mm, sm_89+: Ada, Hopper) is the fp32 matmul of the dequantised operands up to the order of its
# sums: that matmul is the reference. Which layers are FP8 is the layer sets' business (below): as the official
# releases, the blocks' linears, the camera path, embedders and final layers staying in bf16.
# ------------------------------------------------------------------------------------------------------------
FP8_MIN_SCALE = torch.finfo(torch.float32).tiny  # the scale of an all-zero row (its values stay 0)


def quantize_fp8(t: torch.Tensor):
    """T (..., n) -> (E4M3 values (..., n), fp32 scales (...)): one scale per row, computed in fp32."""
    t = t.float()
    scale = (t.abs().amax(-1) / E4M3_MAX).clamp_min(FP8_MIN_SCALE)
    return (t / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(E4M3 values (..., n), scales (...)) -> T (..., n) in `dtype`: values * scale, in fp32."""
    return (values.float() * scale.float()[..., None]).to(dtype)


def fp8_linear_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: x quantised per token, both operands dequantised, an fp32 linear; the result in x's dtype."""
    w = dequantize_fp8(weight, scale)
    y = F.linear(dequantize_fp8(*quantize_fp8(x)), w, None if bias is None else bias.float())
    return y.to(x.dtype)


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear with the weight in FP8 and its input quantised per token at every call. State dict:
    weight (float8_e4m3fn, out x in), weight_scale (fp32, out), bias (as the original linear's).

    `kernel` picks the matmul (see fp8_linear). Module.to(dtype) casts the bias only, as the format says."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None, kernel: str = "auto"):
        super().__init__()
        _check_fp8_layer(in_features, out_features, kernel)
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantise a float weight (out, in) (a conv's (out, in, 1, 1) flattened) into the buffers (no-op on meta)."""
        if not weight.is_meta:
            _check_weight(weight.flatten(1))
            self.weight, self.weight_scale = quantize_fp8(weight.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.kernel)


class FP8Conv2d(FP8Linear):
    """Drop-in for a 1x1 nn.Conv2d (stride 1, no padding), a linear over channels: the weight (out, in, 1, 1) held
    as (out, in). A wider conv has no matrix of tokens to quantise row by row; quantize_model refuses it for FP8."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, dilation=1,
                 bias: bool = True, device=None, dtype=None, kernel: str = "auto"):
        if (_pair(kernel_size), _pair(stride), _pair(padding)) != ((1, 1), (1, 1), (0, 0)):
            raise ValueError(f"kernel_size, stride, padding: FP8Conv2d is a 1x1 conv (stride 1, no padding), got "
                             f"{kernel_size}, {stride}, {padding}")
        super().__init__(in_channels, out_channels, bias, device, dtype, kernel)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, C, h, w): channels-last, the token rows are a view
        return FP8Linear.forward(self, x.movedim(1, -1)).movedim(-1, 1)


# ------------------------------------------------------------------------------------------------------------
# Machinery: checks, the layer sets, the layers' dispatch, the Triton kernels, checkpoints, the CLI
# ------------------------------------------------------------------------------------------------------------
# The imports of the machinery alone: the formats above need only torch.
import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402  (torch.library reads the custom operator's schema from typing's names)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

KERNELS = ("auto", "triton", "torch")  # the layers' matmul choices (see nvfp4_linear, fp8_linear)
PRECISIONS = ("nvfp4", "fp8")  # quantize_model's formats; "bf16" names a model or file without them

# The layer set of the CLI's --preset small (1.57 GB, under issue 8's 1.6 GB goal): also the camera projections,
# plucker_proj and the FFN temporal conv (3x1 over frames): every large layer of the blocks. This goes AGAINST the
# release's advice (the camera path's 4-bit rounding costs action-following); it is for GPUs whose memory cannot
# spare the default's 2.73 GB. NVFP4 only: FP8 takes linears and 1x1 convs (W8A8 needs a matrix of tokens).
SMALL_INCLUDE = DEFAULT_INCLUDE + ("blocks.*.attn.*_proj_cam", "blocks.*.plucker_proj", "blocks.*.mlp.t_conv")
SMALL_EXCLUDE = ()
PRESETS = {"default": (DEFAULT_INCLUDE, DEFAULT_EXCLUDE), "small": (SMALL_INCLUDE, SMALL_EXCLUDE)}
# The refiner's layer set (refiner.py's names), as the official code quantises it: every linear of the blocks'
# self-attention, text cross-attention and feed-forward; proj_in, proj_out, the timestep embedder and the caption
# projection stay in bf16.
REFINER_INCLUDE = ("transformer_blocks.*.attn1.*", "transformer_blocks.*.attn2.*", "transformer_blocks.*.ff.*")
REFINER_EXCLUDE = ()


@functools.cache
def _e2m1_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, device=device)  # once per device: no host-to-device copy per decode


def _check_layer(in_features: int, kernel: str) -> None:
    if in_features % BLOCK != 0:
        raise ValueError(f"in_features: must be a multiple of {BLOCK} (the NVFP4 block), got {in_features}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")


def _check_fp8_layer(in_features: int, out_features: int, kernel: str) -> None:
    if in_features % 16 or out_features % 16:
        raise ValueError(f"in_features, out_features: FP8's matmul (torch._scaled_mm) needs multiples of 16, got "
                         f"{in_features}, {out_features}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")


def _globs(patterns) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _check_swap(model: nn.Module, include: list, exclude: list, candidates: list[str], names: list[str],
                precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    for pattern in include:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            raise ValueError(f"include: pattern {pattern!r} matches no nn.Linear/nn.Conv2d of the model "
                             f"(outside exclude={exclude})")
    for name in names:
        module = model.get_submodule(name)
        fan_in, fan_out = module.weight[0].numel(), module.weight.shape[0]
        if fan_in % BLOCK:
            raise ValueError(f"include: cannot quantise {name!r}: its input width {fan_in} is not a multiple of "
                             f"{BLOCK} (the NVFP4 block, FP8's matmul tile)")
        if precision == "fp8" and isinstance(module, nn.Conv2d) and \
                (module.kernel_size, module.stride, module.padding) != ((1, 1), (1, 1), (0, 0)):
            raise ValueError(f"include: cannot quantise {name!r} to FP8: a {module.kernel_size} conv; FP8 takes "
                             f"linears and 1x1 convs (the activation quantised per token needs a matrix of tokens)")
        if precision == "fp8" and fan_out % 16:
            raise ValueError(f"include: cannot quantise {name!r} to FP8: its output width {fan_out} is not a "
                             f"multiple of 16 (FP8's matmul tile)")


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) tensor, got shape {tuple(weight.shape)}")
    if weight.shape[1] % BLOCK != 0:
        raise ValueError(f"weight: in_features (dim 1) must be a multiple of {BLOCK} (the NVFP4 block, FP8's "
                         f"matmul tile), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        raise ValueError("weight: expected finite floating-point values")


def _check_nvfp4(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed: expected a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    expected = (packed.shape[0], packed.shape[1] * 2 // BLOCK)
    if scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != expected or packed.shape[1] % (BLOCK // 2):
        raise ValueError(f"scale: expected float8_e4m3fn of shape {expected} for packed {tuple(packed.shape)}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if scale_2.numel() != 1 or scale_2.dtype != torch.float32:
        raise ValueError(f"scale_2: expected one fp32 value, got {scale_2.dtype} {tuple(scale_2.shape)}")


@torch.compiler.disable  # inside a compiled DiT block (fast.compiled_on_cuda) this stays an eager call
def nvfp4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
                 bias: torch.Tensor | None, kernel: str) -> torch.Tensor:
    """NVFP4Linear's matmul. kernel: "auto" = the Triton kernel on CUDA (sm_89+, for the FP8 scale loads), the
    torch matmul elsewhere; "triton" / "torch" force one."""
    if kernel == "auto":
        fast = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
        kernel = "triton" if fast and x.dtype in (torch.bfloat16, torch.float16, torch.float32) else "torch"
    if kernel == "triton":
        return nvfp4_linear_triton(x, packed, scale, scale_2, bias)
    return nvfp4_linear_torch(x, packed, scale, scale_2, bias)


def _apply_keeping_format(self, fn, recurse=True):
    # Module.to(dtype) / .half() cast every floating tensor (float8 ones too), but the quantised weights and their
    # scales have their dtypes by definition of the format: let them follow device moves only (the bias is cast as
    # in nn.Linear).
    kept = {name: getattr(self, name) for name in self.format_tensors}
    nn.Module._apply(self, fn, recurse)
    for name, old in kept.items():
        new = getattr(self, name)
        if new.dtype != old.dtype:
            setattr(self, name, old.to(new.device))
    return self


def _extra_repr(self) -> str:
    return f"in_features={self.in_features}, out_features={self.out_features}, " \
           f"bias={self.bias is not None}, kernel={self.kernel}"


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


NVFP4Linear._apply = FP8Linear._apply = _apply_keeping_format
NVFP4Linear.extra_repr = FP8Linear.extra_repr = _extra_repr
NVFP4Linear.format_tensors, FP8Linear.format_tensors = ("weight_scale", "weight_scale_2"), ("weight", "weight_scale")


# ------------------------------------------------------------------------------------------------------------
# The Triton matmul: y = x W^T + b with W dequantised tile by tile inside the matmul
# ------------------------------------------------------------------------------------------------------------
def _matmul_configs() -> list:
    """Tile shapes: on a GPU the first launch per (M, N, K) times them all and keeps the fastest; Triton's CPU
    interpreter gets one small shape."""
    if not torch.cuda.is_available():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                  (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4))]


@triton.autotune(configs=_matmul_configs(), key=["M", "N", "K"])
@triton.jit
def _nvfp4_matmul_kernel(x_ptr, w_ptr, s_ptr, s2_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                         HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # One program computes a (BLOCK_M tokens) x (BLOCK_N outputs) tile of y. Programs walk the tiles in groups
    # of GROUP_M row-tiles so that neighbours reuse the same weight tiles from L2.
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_m, pid_n = tl.swizzle2d(pid // n_tiles_n, pid % n_tiles_n, tl.cdiv(M, BLOCK_M), n_tiles_n, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)  # M * K can pass 2^31 for long videos
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        # The weight tile as stored, (BLOCK_N rows) x (BLOCK_K/2 bytes), contiguous along k so the loads coalesce.
        # Byte j of a row holds input 2j in its low nibble and 2j+1 in its high one: joining the two nibbles on a
        # new last axis and flattening puts the codes back in input order.
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_ptr + cols[:, None] * (K // 2) + kb[None, :],
                       mask=(cols[:, None] < N) & (kb[None, :] < K // 2), other=0).to(tl.int32)
        code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K))
        # E2M1 decode (section 1). The low 3 bits c = (e, m) of a normal code (e >= 1) shifted into an fp32's
        # exponent/mantissa fields, with the exponent rebiased from 1 to 127, are 2^(e-1) * (1 + m/2) exactly;
        # the subnormal codes 0 and 1 are 0 and 0.5. Bit 3 is the sign.
        c = code & 7
        normal = ((c << 22) + (126 << 23)).to(tl.float32, bitcast=True)
        magnitude = tl.where(c < 2, 0.5 * c.to(tl.float32), normal)
        value = tl.where(code >= 8, -magnitude, magnitude)
        # One E4M3 scale per GROUP consecutive inputs of a row.
        kg = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        scale = tl.load(s_ptr + cols[:, None] * (K // GROUP) + kg[None, :],
                        mask=(cols[:, None] < N) & (kg[None, :] < K // GROUP), other=0.0).to(tl.float32)
        value = tl.reshape(tl.reshape(value, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * scale[:, :, None],
                           (BLOCK_N, BLOCK_K))
        # value * scale has at most 2 + 4 significant bits and lies in [2^-10, 2688]: exact in bf16 and fp16,
        # so the tensor cores see the dequantised weight without rounding. fp32 accumulation.
        w = value.to(x.dtype)
        # "ieee" only matters for fp32 activations (no TF32); bf16/fp16 products are exact in fp32 anyway.
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    acc = acc * tl.load(s2_ptr)  # the per-tensor scale, once per output instead of once per weight
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def _check_linear_input(x, packed, scale, scale_2) -> tuple[int, int]:
    """(out_features N, in_features K) after checking the NVFP4 tensors and that x is (..., K) in bf16/fp16/fp32."""
    _check_nvfp4(packed, scale, scale_2)
    N, K = packed.shape[0], packed.shape[1] * 2
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dim {K} (in_features), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x: expected bf16, fp16 or fp32, got {x.dtype}")
    return N, K


def nvfp4_linear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, W dequantised tile by tile inside a Triton matmul; x (..., in) bf16/fp16/fp32."""
    N, K = _check_linear_input(x, packed, scale, scale_2)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _nvfp4_matmul_kernel[grid](x2, packed, scale, scale_2, bias if bias is not None else y, y, M, N, K,
                               x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, GROUP=BLOCK)
    return y.view(*x.shape[:-1], N)


# ------------------------------------------------------------------------------------------------------------
# FP8's fast path: the activation quantised by one Triton pass over it, then torch._scaled_mm
# ------------------------------------------------------------------------------------------------------------
# Quantising the activations with separate eager kernels (abs, amax, divide, clamp, cast: a pass over the
# activation each) cost more than the FP8 matmul saves (issue 22: 0.48-1.18x bf16 at the DiT's shapes); one pass
# reads the bf16 row once and writes one byte a value and a scale.

def check_fp8_device(device) -> None:
    """Refuse a CUDA device on which torch._scaled_mm has no FP8 tensor cores (below sm_89: Ada, Hopper)."""
    props = torch.cuda.get_device_properties(device)  # (constant to torch.compile: no graph break)
    if (props.major, props.minor) < (8, 9):
        raise ValueError(f"fp8: torch._scaled_mm needs an sm_89+ GPU (Ada, Hopper); {props.name} is "
                         f"sm_{props.major}{props.minor}: use bf16 or nvfp4 there")


def _check_fp8_input(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, kernel: str) -> None:
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or scale.shape != weight.shape[:1] \
            or scale.dtype != torch.float32:
        raise ValueError(f"weight, scale: expected float8_e4m3fn (out, in) and fp32 (out,), got {weight.dtype} "
                         f"{tuple(weight.shape)} and {scale.dtype} {tuple(scale.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (in_features), got shape {tuple(x.shape)}")
    if kernel != "torch" and x.is_cuda:
        check_fp8_device(x.device)
    if kernel != "torch" and x.is_cuda and x.dtype != torch.bfloat16:
        raise ValueError(f"x: the FP8 matmul on CUDA takes bf16 activations (torch._scaled_mm's row-wise scales), "
                         f"got {x.dtype}")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               kernel: str) -> torch.Tensor:
    """FP8Linear's matmul. kernel: "auto" = "triton" on CUDA (refused clearly below sm_89 or for activations not
    in bf16), the torch reference elsewhere; "triton" = `quantize_fp8_triton` then torch._scaled_mm (on the CPU:
    Triton's interpreter and PyTorch's CPU _scaled_mm, for the tests); "torch" = fp8_linear_torch."""
    kernel = ("triton" if x.is_cuda else "torch") if kernel == "auto" else kernel
    _check_fp8_input(x, weight, scale, kernel)
    if kernel == "torch":
        return fp8_linear_torch(x, weight, scale, bias)
    # Inside a compiled block (fast.compiled_on_cuda) an operator, called as it is; eagerly a direct call.
    return (_fp8_linear_op if torch.compiler.is_compiling() else _fp8_linear_launch)(x, weight, scale, bias)


def _fp8_linear_launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x W^T + b: x's tokens quantised (quantize_fp8_triton), then one torch._scaled_mm (fp32 accumulation; the
    row scales and the bias applied to the accumulator; the result rounded once to x's dtype)."""
    N, K = weight.shape
    values, x_scale = quantize_fp8_triton(x.reshape(-1, K))
    y = torch._scaled_mm(values, weight.t(), scale_a=x_scale[:, None], scale_b=scale[None, :], bias=bias,
                         out_dtype=x.dtype)
    return y.view(*x.shape[:-1], N)


_fp8_linear_op = torch.library.custom_op("nano_sana_wm::fp8_linear", _fp8_linear_launch, mutates_args=())


@_fp8_linear_op.register_fake
def _fp8_linear_shape(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@triton.jit
def _e4m3_nearest(y):
    """y (fp32, |y| <= 448) rounded to the nearest E4M3 value, ties to even, kept in fp32 so that the cast after it
    is exact (Triton's CPU interpreter rounds fp32 -> E4M3 casts wrongly where the rounding carries into the next
    power of two). In y's binade [2^e, 2^(e+1)), e >= -6 (below, the subnormals share 2^-6's spacing), E4M3 values
    are 2^(e-3) apart, the fp32 spacing of 2^(e+20): adding that and subtracting it again rounds |y| there."""
    bits = y.to(tl.int32, bitcast=True)
    binade = tl.maximum((bits >> 23) & 0xFF, 127 - 6)  # biased fp32 exponent
    magic = ((binade + 20) << 23).to(tl.float32, bitcast=True)
    rounded = (tl.abs(y) + magic) - magic
    return tl.where(bits < 0, -rounded, rounded)  # the sign bit: -0 stays -0


@triton.jit
def _fp8_rows_kernel(x_ptr, values_ptr, scale_ptr, K, stride_xm, min_scale, BLOCK: tl.constexpr):
    """One program per row (token): the row read once into registers, its amax, scale and E4M3 values as
    quantize_fp8 computes them (fp32, correctly rounded divisions), one byte written a value."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 0), 448.0), min_scale)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    tl.store(values_ptr + row * K + cols, _e4m3_nearest(y).to(values_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_fp8_triton(x: torch.Tensor):
    """quantize_fp8 of the rows of x (M, K), bf16/fp16/fp32, in one Triton pass (CUDA; any device in Triton's
    interpreter): (E4M3 values (M, K), fp32 scales (M,))."""
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x: expected a 2-D bf16/fp16/fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    values = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)  # the whole row in registers: 16 to 64 values a thread at the models' widths
    _fp8_rows_kernel[(M,)](x, values, scale, K, x.stride(0), FP8_MIN_SCALE, BLOCK=block,
                           num_warps=min(16, max(1, block // 1024)))
    return values, scale


# ------------------------------------------------------------------------------------------------------------
# Checkpoint files: a model's state dict as it is, with ModelOpt-style keys for the quantised layers,
#     NVFP4: `<layer>.weight` uint8 (out, in/2), `<layer>.weight_scale` float8_e4m3fn (out, in/16),
#            `<layer>.weight_scale_2` fp32 (a scalar);
#     FP8:   `<layer>.weight` float8_e4m3fn (out, in), `<layer>.weight_scale` fp32 (out,);
# (a 1x1 conv's weight flattened to (out, in)), every other tensor (biases included) as in the float model; one
# format per file, named with its layers in a JSON header in the safetensors metadata, under the format's name:
# {"format": "nvfp4" | "fp8", "layers": [...], NVFP4 also "group_size": 16}.
#
# Loading a file into a model (the models' from_pretrained; tensors for which `stored_as_is` holds keep their dtype,
# the others are cast to the model's):
#     quantize_like(model, state_dict.keys())          # on the meta device: the file's quantised layers swapped in
#     model.load_state_dict(state_dict, strict=True, assign=True)
# Quantising a float file as it is read (the refiner's from_pretrained: never the whole float model in memory):
#     names = set_precision(model, "fp8", include, exclude)   # on the meta device
#     for each name: state_dict.update(quantized_state(model, name, <its float weight>)) in place of the weight
# ------------------------------------------------------------------------------------------------------------
def layer_precisions(keys) -> dict[str, str]:
    """{layer name: "nvfp4" | "fp8"} of the quantised layers among a state dict's keys: NVFP4 layers hold
    `<layer>.weight_scale_2`, FP8 layers `<layer>.weight_scale` alone; {} for a float file."""
    keys, suffix = set(keys), ".weight_scale"
    return {k[:-len(suffix)]: "nvfp4" if k + "_2" in keys else "fp8" for k in keys if k.endswith(suffix)}


def nvfp4_layer_names(state_dict) -> list[str]:
    """Names of the NVFP4 layers in a state dict (those with `<layer>.weight_scale_2`); [] for a float file."""
    return sorted(name for name, precision in layer_precisions(state_dict).items() if precision == "nvfp4")


def _one_precision(precisions, what: str) -> str:
    precisions = set(precisions)
    if len(precisions) > 1:
        raise ValueError(f"{what}: holds both NVFP4 and FP8 layers; expected one format")
    return precisions.pop() if precisions else "bf16"


def stored_as_is(key: str, t: torch.Tensor) -> bool:
    """Whether a loader keeps a checkpoint tensor's dtype instead of casting it to the model's: the quantised
    weights (uint8, float8_e4m3fn) and their scales (float8_e4m3fn, fp32) have the format's dtypes."""
    return t.dtype in (torch.uint8, torch.float8_e4m3fn) or key.endswith((".weight_scale", ".weight_scale_2"))


def quantize_like(model: nn.Module, keys) -> str:
    """Swap into `model` (on the meta device, before a strict load) the quantised layers of a file with these
    state-dict keys; returns the file's precision ("bf16" for a float file)."""
    layers = layer_precisions(keys)
    precision = _one_precision(layers.values(), "checkpoint")
    if layers:
        quantize_model(model, include=sorted(layers), exclude=(), precision=precision)
    return precision


def model_precision(model: nn.Module) -> str:
    """"nvfp4" or "fp8" for a model holding such layers, "bf16" for one holding none (whatever its float dtype)."""
    return _one_precision({"nvfp4" if isinstance(m, NVFP4Linear) else "fp8" for m in model.modules()
                           if isinstance(m, (NVFP4Linear, FP8Linear))}, "model")


def set_precision(model: nn.Module, precision: str | None, include, exclude, kernel: str = "auto") -> list[str]:
    """Bring a model's layer set (include, exclude) to `precision` in place: "bf16" (unquantised), "nvfp4" or
    "fp8"; None leaves the model as it is. A model without quantised layers is quantised (on the meta device only
    its structure changes); one with some must hold `precision` already (quantising a quantised weight again only
    loses more). Returns the names it quantised ([] when none)."""
    if precision not in (None, "bf16") + PRECISIONS:
        raise ValueError(f"precision: expected bf16, nvfp4 or fp8, got {precision!r}")
    held = model_precision(model)
    if precision is None or precision == held:
        return []
    if held != "bf16":
        raise ValueError(f"precision {precision}: the model holds {held} layers (a quantised checkpoint); load a bf16 "
                         f"checkpoint to run it in {precision}")
    return quantize_model(model, include, exclude, kernel, precision)


@torch.no_grad()
def quantized_state(model: nn.Module, name: str, weight: torch.Tensor) -> dict:
    """The state-dict entries of `model`'s quantised layer `name` (as quantize_model made it; the meta device is
    fine) holding the float `weight`: what a loader reading a float file puts in place of `<name>.weight`."""
    layer = model.get_submodule(name)
    layer.set_weight(weight)
    return {f"{name}.{key}": t for key, t in layer.named_buffers()}


def checkpoint_precision(files) -> str:
    """The precision of a checkpoint from its files' keys alone (no tensor is read): a quantize.py file's format,
    "bf16" for float ones (torch pickles included: quantize.py writes safetensors only)."""
    from safetensors import SafetensorError, safe_open

    keys = []
    for file in map(str, files):
        if file.endswith(".safetensors"):
            try:
                with safe_open(file, framework="pt") as f:
                    keys += list(f.keys())
            except (SafetensorError, OSError) as e:
                raise ValueError(f"checkpoint: {file} is not a readable safetensors file ({e})") from None
    return _one_precision(layer_precisions(keys).values(), "checkpoint")


def save_quantized(model: nn.Module, path: str) -> list[str]:
    """Write a quantised model's state dict to safetensors with its header (above); returns the quantised layers."""
    from safetensors.torch import save_file

    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    layers = sorted(layer_precisions(state_dict))
    precision = _one_precision(layer_precisions(state_dict).values(), "model")
    if precision == "bf16":
        raise ValueError("model: has no NVFP4 or FP8 layers; run quantize_model first")
    header = {"format": precision, "layers": layers, **({"group_size": BLOCK} if precision == "nvfp4" else {})}
    save_file(state_dict, path, metadata={"format": "pt", precision: json.dumps(header)})
    return layers


save_nvfp4 = save_quantized  # its name from before FP8 (issue 8)


def read_quantized_header(path: str) -> dict | None:
    """The JSON header of a safetensors file written by save_quantized, or None for another file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    text = next((metadata[p] for p in PRECISIONS if p in metadata), None)
    return None if text is None else json.loads(text)


def read_nvfp4_header(path: str) -> dict | None:
    """The header of an NVFP4 file written by save_quantized, or None for another file."""
    header = read_quantized_header(path)
    return header if header is not None and header["format"] == "nvfp4" else None


MODELS = {"dit": "DiT", "refiner": "refiner"}  # the CLI's --model: the stage-1 DiT or the stage-2 refiner (LTX-2)


def _source(src: str, model: str) -> Path:
    """The file or folder holding `model`'s weights that `src` names: the release folder (dit/, vae/, refiner/),
    the model's own folder (for the refiner: refiner/ or its transformer/), or a file."""
    path = Path(src)
    if path.is_dir() and (path / model).is_dir():  # the release folder
        path = path / model
    if model == "refiner" and path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    return path


def check_output(src: str, dst: str, model: str = "dit"):
    """Refuse a `dst` that would overwrite what `src` reads (the same file under any path) or land in the model's
    folder it loads (whose every *.safetensors the next load reads as weights), or that cannot be written (a
    missing folder, a folder in the way)."""
    path, out = _source(src, model), Path(dst)
    if out.exists() and path.exists() and out.samefile(path):
        raise ValueError(f"--out {dst}: is the input file {src}; write elsewhere")
    if path.is_dir() and out.resolve().parent == path.resolve():
        raise ValueError(f"--out {dst}: is inside the {MODELS[model]} folder {path} that --in reads (it would "
                         f"overwrite or join its weights); write elsewhere")
    if not out.parent.is_dir():
        raise ValueError(f"--out {dst}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--out {dst}: is a folder; give a .safetensors file name")


def quantize_checkpoint(src: str, dst: str, include=DEFAULT_INCLUDE, exclude=DEFAULT_EXCLUDE, device: str = "cpu",
                        precision: str = "nvfp4", model: str = "dit") -> list[str]:
    """Load the DiT or the refiner (`model`) from `src` (the release folder, the model's folder or file) in bf16,
    quantise its layers (include, exclude) to `precision`, write `dst` (through a temporary file renamed when
    complete: a failure leaves no partial file). The refiner's file (the video transformer only) loads with
    Refiner.from_pretrained(dst) (config: the release's unless given)."""
    check_output(src, dst, model)
    if model == "refiner":  # the project imports, only here: the formats themselves need no model
        from refiner import Refiner as Model
    else:
        from dit import DiT as Model
    loaded = Model.from_pretrained(_source(src, model), dtype=torch.bfloat16, device=device)
    quantize_model(loaded, include, exclude, precision=precision)
    out = Path(dst)
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    try:
        layers = save_quantized(loaded, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return layers


def main(argv=None) -> None:
    parser = _Parser(description="Quantise the SANA-WM DiT or refiner weights to NVFP4 or FP8.")
    parser.add_argument("--in", dest="src", required=True,
                        help="the release folder, or the model's folder (dit/; refiner/ or its transformer/) or file")
    parser.add_argument("--out", required=True, help="output safetensors file (its folder must exist; never the input)")
    parser.add_argument("--model", choices=sorted(MODELS), default="dit",
                        help="dit: the stage-1 DiT; refiner: the stage-2 LTX-2 refiner (its blocks' linears)")
    parser.add_argument("--precision", choices=PRECISIONS, default="nvfp4",
                        help="nvfp4: 4-bit weights (W4A16 on Hopper); fp8: E4M3 weights and activations (W8A8, "
                             "torch._scaled_mm on sm_89+; linears and 1x1 convs only)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="the DiT's layer set: default (camera path kept bf16, as the release advises) or small "
                             "(camera path and temporal conv too, against the release's advice: for small GPUs)")
    parser.add_argument("--include", nargs="+", help="module-name globs (replace the preset's)")
    parser.add_argument("--exclude", nargs="*", help="module-name globs (replace the preset's)")
    parser.add_argument("--device", default="cpu", help="where to quantise (cpu or cuda)")
    try:
        args = parser.parse_args(argv)
        if args.model == "refiner" and args.preset != "default":
            raise ValueError(f"--preset {args.preset}: the DiT's; the refiner has one layer set (its blocks' linears)")
        include, exclude = PRESETS[args.preset] if args.model == "dit" else (REFINER_INCLUDE, REFINER_EXCLUDE)
        include = include if args.include is None else args.include
        exclude = exclude if args.exclude is None else args.exclude
        try:
            device = torch.device(args.device)
        except RuntimeError as e:  # an unknown device name
            raise ValueError(f"--device {args.device}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu")
        layers = quantize_checkpoint(args.src, args.out, include, exclude, args.device, args.precision, args.model)
    except (ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, even for a key list
        sys.exit(2)
    print(f"wrote {args.out}: {len(layers)} {args.precision.upper()} layers")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as the CLI's other refusals: one line on stderr, exit code 2."""

    def error(self, message):
        raise ValueError(message)


if __name__ == "__main__":
    main()
