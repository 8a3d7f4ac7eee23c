"""NVFP4 weights for the DiT: the paper's distilled SANA-WM runs its DiT in NVFP4 to fit small GPUs.

1. the format (E2M1 values, an E4M3 scale per 16 values, an FP32 scale per tensor): quantize/dequantize_nvfp4;
2. the matmul y = x W^T + b with W in NVFP4: dequantise, then an ordinary linear;
3. NVFP4Linear / NVFP4Conv2d (drop-ins for nn.Linear / nn.Conv2d) and quantize_model, which swaps them in.
Machinery after the marker line: the Triton dequantising matmul (sm_89+), the "small" layer set, checkpoint files
and the CLI `python quantize.py --in <dit file or release folder> --out dit_nvfp4.safetensors` (which alone
imports another project file, dit.py)."""
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


def _to_nvfp4(module: nn.Module, kernel: str) -> NVFP4Linear:
    bias = module.bias is not None
    kw = dict(bias=bias, device=module.weight.device, dtype=module.bias.dtype if bias else None, kernel=kernel)
    new = NVFP4Linear(module.in_features, module.out_features, **kw) if isinstance(module, nn.Linear) else \
        NVFP4Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, **kw)
    new.set_weight(module.weight)
    new.bias = module.bias  # the original bias itself (None when it has none)
    return new


@torch.no_grad()
def quantize_model(model: nn.Module, include=DEFAULT_INCLUDE, exclude=DEFAULT_EXCLUDE, kernel: str = "auto") -> list:
    """Replace, in place, every nn.Linear / nn.Conv2d (groups=1) whose qualified name matches a glob in
    `include` and none in `exclude` by its NVFP4 version; returns the replaced names. Each include pattern must
    match at least one such module. On the meta device only the structure changes (for loading NVFP4 files)."""
    include, exclude = _globs(include), _globs(exclude)
    candidates = [name for name, m in model.named_modules() if _quantisable(m)
                  and not any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    names = [name for name in candidates if any(fnmatch.fnmatchcase(name, p) for p in include)]
    _check_swap(model, include, exclude, candidates, names)  # every layer is checked before any is changed
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _to_nvfp4(getattr(parent, child), kernel))
    return names


# ================================================================================================================
# Machinery below this line: checks, the Triton dequantising matmul, the "small" layer set, checkpoints, the CLI.
# The format, the NVFP4 layers and quantize_model above are complete without it.
# ================================================================================================================
# The imports of the machinery alone: the reading path above needs only torch.
import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

KERNELS = ("auto", "triton", "torch")  # NVFP4Linear's matmul choices (see nvfp4_linear)

# The layer set of the CLI's --preset small (1.57 GB, under issue 8's 1.6 GB goal): also the camera projections,
# plucker_proj and the FFN temporal conv (3x1 over frames): every large layer of the blocks. This goes AGAINST the
# release's advice (the camera path's 4-bit rounding costs action-following); it is for GPUs whose memory cannot
# spare the default's 2.73 GB.
SMALL_INCLUDE = DEFAULT_INCLUDE + ("blocks.*.attn.*_proj_cam", "blocks.*.plucker_proj", "blocks.*.mlp.t_conv")
SMALL_EXCLUDE = ()
PRESETS = {"default": (DEFAULT_INCLUDE, DEFAULT_EXCLUDE), "small": (SMALL_INCLUDE, SMALL_EXCLUDE)}


@functools.cache
def _e2m1_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, device=device)  # once per device: no host-to-device copy per decode


def _check_layer(in_features: int, kernel: str) -> None:
    if in_features % BLOCK != 0:
        raise ValueError(f"in_features: must be a multiple of {BLOCK} (the NVFP4 block), got {in_features}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")


def _globs(patterns) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _check_swap(model: nn.Module, include: list, exclude: list, candidates: list[str], names: list[str]) -> None:
    for pattern in include:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            raise ValueError(f"include: pattern {pattern!r} matches no nn.Linear/nn.Conv2d of the model "
                             f"(outside exclude={exclude})")
    for name in names:
        fan_in = model.get_submodule(name).weight[0].numel()
        if fan_in % BLOCK:
            raise ValueError(f"include: cannot quantise {name!r}: its input width {fan_in} is not a multiple of "
                             f"{BLOCK} (the NVFP4 block)")


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) tensor, got shape {tuple(weight.shape)}")
    if weight.shape[1] % BLOCK != 0:
        raise ValueError(f"weight: in_features (dim 1) must be a multiple of {BLOCK} (the NVFP4 block), "
                         f"got shape {tuple(weight.shape)}")
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
    # Module.to(dtype) / .half() cast every floating tensor, but the scales are float8_e4m3fn and fp32 by
    # definition of the format: let them follow device moves only (the bias is cast as in nn.Linear).
    scales = {"weight_scale": self.weight_scale, "weight_scale_2": self.weight_scale_2}
    nn.Module._apply(self, fn, recurse)
    for name, old in scales.items():
        new = getattr(self, name)
        if new.dtype != old.dtype:
            setattr(self, name, old.to(new.device))
    return self


def _extra_repr(self) -> str:
    return f"in_features={self.in_features}, out_features={self.out_features}, " \
           f"bias={self.bias is not None}, kernel={self.kernel}"


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


NVFP4Linear._apply, NVFP4Linear.extra_repr = _apply_keeping_format, _extra_repr


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
# Checkpoint files: ModelOpt-style keys (`<layer>.weight` uint8, `<layer>.weight_scale` float8_e4m3fn,
# `<layer>.weight_scale_2` fp32) plus a JSON header in the safetensors metadata.
#
# Loading an NVFP4 file into a model (the recipe for a model's from_pretrained; read the file's tensors without
# casting them: the packed weights are uint8, the scales float8_e4m3fn and fp32 by definition):
#     layers = nvfp4_layer_names(state_dict)            # [] for a bf16 file
#     if layers: quantize_model(model, include=layers, exclude=())   # works on a meta-device model
#     model.load_state_dict(state_dict, strict=True, assign=True)
# ------------------------------------------------------------------------------------------------------------
HEADER_KEY = "nvfp4"


def nvfp4_layer_names(state_dict) -> list[str]:
    """Names of the NVFP4 layers in a state dict (those with `<layer>.weight_scale_2`); [] for a float file."""
    suffix = ".weight_scale_2"
    return sorted(k[: -len(suffix)] for k in state_dict if k.endswith(suffix))


def save_nvfp4(model: nn.Module, path: str) -> list[str]:
    """Write a quantised model's state dict to safetensors with the header {format, group_size, layers}."""
    from safetensors.torch import save_file

    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    layers = nvfp4_layer_names(state_dict)
    if not layers:
        raise ValueError("model: has no NVFP4 layers; run quantize_model first")
    header = {"format": "nvfp4", "group_size": BLOCK, "layers": layers}
    save_file(state_dict, path, metadata={"format": "pt", HEADER_KEY: json.dumps(header)})
    return layers


def read_nvfp4_header(path: str) -> dict | None:
    """The JSON header of a safetensors file written by save_nvfp4, or None for another file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        text = (f.metadata() or {}).get(HEADER_KEY)
    return None if text is None else json.loads(text)


def _dit_path(src: str) -> Path:
    path = Path(src)
    if path.is_dir() and (path / "dit").is_dir():  # the release folder: dit/, vae/, refiner/
        path = path / "dit"
    return path


def check_output(src: str, dst: str):
    """Refuse a `dst` that would overwrite what `src` reads (the same file under any path) or land in the DiT
    folder it loads (whose every *.safetensors the next load reads as weights), or that cannot be written (a
    missing folder, a folder in the way)."""
    path, out = _dit_path(src), Path(dst)
    if out.exists() and path.exists() and out.samefile(path):
        raise ValueError(f"--out {dst}: is the input file {src}; write elsewhere")
    if path.is_dir() and out.resolve().parent == path.resolve():
        raise ValueError(f"--out {dst}: is inside the DiT folder {path} that --in reads (it would overwrite or join "
                         f"its weights); write elsewhere")
    if not out.parent.is_dir():
        raise ValueError(f"--out {dst}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--out {dst}: is a folder; give a .safetensors file name")


def quantize_checkpoint(src: str, dst: str, include=DEFAULT_INCLUDE, exclude=DEFAULT_EXCLUDE,
                        device: str = "cpu") -> list[str]:
    """Load the DiT from `src` (a safetensors file, a DiT folder, or the release folder holding dit/) in bf16,
    quantise it, write `dst` (through a temporary file renamed when complete: a failure leaves no partial file)."""
    from dit import DiT  # the only project import, and only here: the format itself needs no model

    check_output(src, dst)
    model = DiT.from_pretrained(_dit_path(src), dtype=torch.bfloat16, device=device)
    quantize_model(model, include, exclude)
    out = Path(dst)
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    try:
        layers = save_nvfp4(model, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return layers


def main(argv=None) -> None:
    parser = _Parser(description="Quantise the SANA-WM DiT weights to NVFP4.")
    parser.add_argument("--in", dest="src", required=True, help="DiT safetensors file or release folder")
    parser.add_argument("--out", required=True, help="output safetensors file (its folder must exist; never the input)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="layer set: default (camera path kept bf16, as the release advises) or small "
                             "(camera path and temporal conv too, against the release's advice: for small GPUs)")
    parser.add_argument("--include", nargs="+", help="module-name globs (replace the preset's)")
    parser.add_argument("--exclude", nargs="*", help="module-name globs (replace the preset's)")
    parser.add_argument("--device", default="cpu", help="where to quantise (cpu or cuda)")
    try:
        args = parser.parse_args(argv)
        include, exclude = PRESETS[args.preset]
        include = include if args.include is None else args.include
        exclude = exclude if args.exclude is None else args.exclude
        try:
            device = torch.device(args.device)
        except RuntimeError as e:  # an unknown device name
            raise ValueError(f"--device {args.device}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu")
        layers = quantize_checkpoint(args.src, args.out, include, exclude, args.device)
    except (ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, even for a key list
        sys.exit(2)
    print(f"wrote {args.out}: {len(layers)} NVFP4 layers")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as the CLI's other refusals: one line on stderr, exit code 2."""

    def error(self, message):
        raise ValueError(message)


if __name__ == "__main__":
    main()
