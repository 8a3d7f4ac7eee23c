"""quantize.py: the NVFP4 format bit by bit, the Triton matmul against the torch reference, model surgery and
checkpoint round trips; FP8 (W8A8): its rounding, the Triton token quantiser and the fast matmul against the torch
reference, the FP8 layers in models, the refiner quantised as it loads, set_precision. Oracles: E2M1/E4M3 decoded
from their bit definitions, and torch's own reference for torch.float4_e2m1fn_x2 (RNE rounding + nibble packing)
and for the cuBLAS block-scale layout."""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize import (DEFAULT_EXCLUDE, DEFAULT_INCLUDE, FP8_MIN_SCALE, PRECISIONS, PRESETS, REFINER_EXCLUDE,
                      REFINER_INCLUDE, SMALL_EXCLUDE, SMALL_INCLUDE, FP8Conv2d, FP8Linear, NVFP4Conv2d, NVFP4Linear,
                      check_fp8_device, dequantize_fp8, dequantize_nvfp4, e2m1_encode, fp8_linear, fp8_linear_torch,
                      layer_precisions, model_precision, nvfp4_layer_names, nvfp4_linear_torch, nvfp4_linear_triton,
                      pack_nibbles, quantize_fp8, quantize_fp8_triton, quantize_model, quantize_nvfp4,
                      read_nvfp4_header, read_quantized_header, save_nvfp4, set_precision, unpack_nibbles)
from reference import max_rel_err


# ---------------------------------------------------------------------------------------------- oracles
def e2m1_value(code: int) -> float:
    """E2M1 from its definition: bit 3 sign, bits 2..1 exponent (bias 1, 0 = subnormal), bit 0 mantissa."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def e4m3_positive_scales() -> torch.Tensor:
    """Every positive finite float8_e4m3fn value (bits 0x01..0x7e; 0x7f is NaN), decoded by torch."""
    return torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)


def torch_fp4_reference():
    """torch's reference for float4_e2m1fn_x2 (fp32 -> RNE-saturating E2M1 codes -> pack_uint4) lives in
    torch/testing/_internal/common_quantized.py, whose module imports need the test-only package `expecttest`;
    lift just those functions out of the file."""
    path = Path(torch.__file__).parent / "testing" / "_internal" / "common_quantized.py"
    wanted = {"_n_ones", "EBITS_F32", "MBITS_F32", "F32_EXP_BIAS", "_f32_to_floatx_unpacked", "down_size",
              "pack_uint4", "FP4_EBITS", "FP4_MBITS", "_bfloat16_to_float4_e2m1fn_x2"}
    if not path.exists():
        pytest.skip(f"torch's FP4 reference file is missing: {path}")
    body = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            names = {node.name}
        elif isinstance(node, ast.Assign):
            names = {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        else:
            continue
        if names & wanted:
            body.append(node)
            wanted -= names
    if wanted:
        pytest.skip(f"torch's FP4 reference lacks {sorted(wanted)} in this torch version")
    ns = {"torch": torch, "Tensor": torch.Tensor}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
    return ns


def assert_round_to_nearest(w, packed, scale, scale_2):
    """The format's bound, checked by brute force: every block scale is the E4M3 value nearest to
    amax / (6 s2) (clamped to [2^-9, 448]; 1 for a zero block), and every value dequantises to the point of its
    block's grid {+-e2m1 * s * s2} nearest to it (up to the fp32 rounding of the dequantiser)."""
    blocks = w.double().view(w.shape[0], -1, 16)
    s2 = scale_2.double()
    amax = blocks.abs().amax(-1)
    e4m3 = e4m3_positive_scales().double()
    target = (amax / (6 * s2)).clamp(2 ** -9, 448)
    nearest = e4m3[(target[..., None] - e4m3).abs().argmin(-1)]
    got = scale.double()
    assert torch.where(amax == 0, got == 1, got == nearest).all()
    unit = (got * s2)[..., None, None]
    grid = torch.tensor([e2m1_value(c) for c in range(8)], dtype=torch.float64)
    distance = (blocks.abs()[..., None] - grid * unit).abs().amin(-1)
    deq = dequantize_nvfp4(packed, scale, scale_2).double().view_as(blocks)
    fp32_rounding = 2 ** -23 * blocks.abs() + 2 ** -149  # the dequantiser's own (v * s) * s2 in fp32
    assert ((deq - blocks).abs() <= distance + fp32_rounding).all()
    assert ((deq == 0) | (torch.sign(deq) == torch.sign(blocks))).all()
    # Where the block scale is a normal E4M3 number it is within 2^-4 of exact, so the block maximum sits at
    # most at 6 / (1 - 2^-4) = 6.4 units: the error is at most half the local E2M1 spacing (0.25 / 0.5 / 1).
    normal = (got >= 2 ** -6)[..., None]
    a = blocks.abs() / unit[..., 0]
    half_spacing = torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, 1.0)) * unit[..., 0]
    assert (~normal | (a <= 6.4)).all()
    assert (~normal | ((deq - blocks).abs() <= half_spacing + fp32_rounding)).all()


# ---------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("scale_2", [1.0, 2.0 ** -20])
def test_every_representable_value_round_trips_exactly(scale_2):
    # One 16-block per E4M3 scale s, holding all 16 signed E2M1 values times s; the row with s = 448 holds
    # 6 * 448 * scale_2, so the tensor scale is exactly scale_2 and every block scale is exactly s.
    codes = torch.randperm(16, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    values = torch.tensor([e2m1_value(c) for c in codes.tolist()])
    scales = e4m3_positive_scales()
    w = values[None, :] * scales.float()[:, None] * scale_2
    packed, scale, s2 = quantize_nvfp4(w)
    assert s2.item() == scale_2
    assert torch.equal(scale.view(torch.uint8), scales.view(torch.uint8)[:, None])
    assert torch.equal(unpack_nibbles(packed), codes.expand(len(scales), 16))
    deq = dequantize_nvfp4(packed, scale, s2)
    assert torch.equal(deq, w) and torch.equal(torch.signbit(deq), torch.signbit(w))  # -0 stays -0


def test_ties_round_to_nearest_even_and_saturate():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    even = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])  # the neighbour whose code is even
    assert torch.equal(e2m1_encode(ties), torch.tensor([0, 2, 2, 4, 4, 6, 6], dtype=torch.uint8))
    assert torch.equal(e2m1_encode(-ties), torch.tensor([8, 10, 10, 12, 12, 14, 14], dtype=torch.uint8))
    above, below = torch.nextafter(ties, torch.tensor(10.0)), torch.nextafter(ties, torch.tensor(0.0))
    assert torch.equal(e2m1_encode(above), torch.arange(1, 8, dtype=torch.uint8))
    assert torch.equal(e2m1_encode(below), torch.arange(0, 7, dtype=torch.uint8))
    assert torch.equal(e2m1_encode(torch.tensor([6.0, 7.0, 1e30, -1e30])),
                       torch.tensor([7, 7, 7, 15], dtype=torch.uint8))
    # Through the full quantiser: a block whose scale is exactly 1 (tensor scale 1, fixed by a 6*448 row).
    w = torch.zeros(2, 16)
    w[0, 0] = 6 * 448.0
    w[1, :8] = torch.cat([torch.tensor([6.0]), ties])
    w[1, 8:] = -w[1, :8]
    deq = dequantize_nvfp4(*quantize_nvfp4(w))
    assert torch.equal(deq[1], torch.cat([torch.tensor([6.0]), even, torch.tensor([-6.0]), -even]))


def test_rounding_and_nibble_order_match_torch_float4_reference():
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2")
    ref = torch_fp4_reference()
    g = torch.Generator().manual_seed(1)
    # bf16-exact values: a spread over and past E2M1's range, every tie and its neighbours, signed zeros
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([torch.randn(4000, generator=g) * 3, ties, -ties, ties * 1.01, ties * 0.99,
                   torch.tensor([0.0, -0.0, 6.0, -6.0, 7.0, -100.0, 1e-30])]).bfloat16()
    x = x[: x.numel() // 2 * 2]
    codes = e2m1_encode(x.float())
    assert torch.equal(codes, ref["_f32_to_floatx_unpacked"](x.float(), 2, 1))
    fp4 = ref["_bfloat16_to_float4_e2m1fn_x2"](x)
    assert fp4.dtype == torch.float4_e2m1fn_x2
    assert torch.equal(pack_nibbles(codes), fp4.view(torch.uint8))
    assert torch.equal(pack_nibbles(codes)[0] & 0xF, codes[0])  # first value in the low nibble
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def test_random_round_trip_is_round_to_nearest():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    w[5, 17] = 40.0  # an outlier sets the tensor scale
    assert_round_to_nearest(w, *quantize_nvfp4(w))
    # bf16 in, bf16 out: the same codes as from the fp32 copy
    p16, s16, s2_16 = quantize_nvfp4(w.bfloat16())
    assert torch.equal(s16.view(torch.uint8), quantize_nvfp4(w.bfloat16().float())[1].view(torch.uint8))
    assert dequantize_nvfp4(p16, s16, s2_16, torch.bfloat16).dtype == torch.bfloat16


def test_zero_huge_and_subnormal_blocks():
    # all zero: block scales 1, codes 0
    packed, scale, scale_2 = quantize_nvfp4(torch.zeros(3, 32))
    assert (packed == 0).all() and (scale.float() == 1).all() and scale_2.item() > 0
    assert (dequantize_nvfp4(packed, scale, scale_2) == 0).all()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 64, generator=g)
    w[0, 16:32] = 0                                  # a zero block inside a normal tensor -> scale 1
    w[1, :16] = torch.randn(16, generator=g) * 1e-5  # block scale ~2^-8: an E4M3 subnormal
    w[2, :16] = torch.randn(16, generator=g) * 1e-7  # block scale below 2^-9: clamped, values -> ~0
    w[3, :16] = torch.randn(16, generator=g) * 1e-42  # fp32 subnormal weights
    packed, scale, scale_2 = quantize_nvfp4(w)
    assert scale[0, 1].float() == 1 and (dequantize_nvfp4(packed, scale, scale_2)[0, 16:32] == 0).all()
    assert 2 ** -9 <= scale[1, 0].float() < 2 ** -6 and scale[2, 0].float() == 2 ** -9
    assert_round_to_nearest(w, packed, scale, scale_2)
    # huge tensor (near the fp32 maximum) and a tensor of only fp32 subnormals
    for w in (torch.randn(4, 32, generator=g) * 1e37, torch.randn(4, 32, generator=g) * 1e-40):
        packed, scale, scale_2 = quantize_nvfp4(w)
        deq = dequantize_nvfp4(packed, scale, scale_2)
        assert torch.isfinite(deq).all() and torch.isfinite(scale.float()).all()
        assert_round_to_nearest(w, packed, scale, scale_2)
        assert max_rel_err(deq, w) < 0.2


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.randn(4, 24))
    with pytest.raises(ValueError, match="2-D"):
        quantize_nvfp4(torch.randn(32))
    with pytest.raises(ValueError, match="finite"):
        quantize_nvfp4(torch.full((2, 16), float("inf")))
    with pytest.raises(ValueError, match="in_features"):
        NVFP4Linear(40, 8)
    packed, scale, scale_2 = quantize_nvfp4(torch.randn(4, 32))
    with pytest.raises(ValueError, match="scale"):
        dequantize_nvfp4(packed, scale[:, :1], scale_2)
    with pytest.raises(ValueError, match="x: expected last dim 32"):
        nvfp4_linear_triton(torch.randn(2, 16), packed, scale, scale_2)
    with pytest.raises(ValueError, match="kernel"):
        NVFP4Linear(32, 8, kernel="fast")


# ---------------------------------------------------------------------------------------------- matmul
def test_triton_kernel_matches_torch_reference():
    # Several tiles along every axis, a K tail (80 = 64 + 16), a batch of token dims, bias on and off.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(150, 80, generator=g) / 9
    b = torch.randn(150, generator=g)
    packed, scale, scale_2 = quantize_nvfp4(w)
    x = torch.randn(3, 47, 80, generator=g)
    w_deq = dequantize_nvfp4(packed, scale, scale_2).double()
    for bias in (b, None):
        ref = F.linear(x.double(), w_deq, None if bias is None else bias.double())
        out = nvfp4_linear_triton(x, packed, scale, scale_2, bias)
        assert out.shape == (3, 47, 150) and out.dtype == torch.float32
        assert max_rel_err(out, ref) < 1e-5
        assert max_rel_err(nvfp4_linear_torch(x, packed, scale, scale_2, bias), ref) < 1e-5
    # fp16 activations (bf16 needs a GPU: Triton 3.9's interpreter multiplies bf16 dot operands as raw bits):
    # exact products, fp32 accumulation, one rounding to fp16 at the end
    x16 = x[:, :5].half()
    out = nvfp4_linear_triton(x16, packed, scale, scale_2, b.half())
    assert out.dtype == torch.float16
    assert max_rel_err(out, F.linear(x16.double(), w_deq, b.half().double())) < 2 ** -11


def test_module_kernels_agree():
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(64, 40)
    nn.init.normal_(lin.weight, generator=g)
    layer = NVFP4Linear(64, 40, kernel="triton")
    layer.set_weight(lin.weight)
    layer.bias = lin.bias
    x = torch.randn(2, 9, 64, generator=g)
    y_triton = layer(x)
    layer.kernel = "torch"
    assert max_rel_err(y_triton, layer(x)) < 1e-5
    assert max_rel_err(layer(x), lin(x)) < 0.2  # and it is still the same layer, to 4-bit accuracy
    # .to(dtype) casts the bias like nn.Linear but leaves the format's tensors alone
    reference = layer(x.bfloat16().float())
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and layer.weight.dtype == torch.uint8
    assert layer.weight_scale.dtype == torch.float8_e4m3fn and layer.weight_scale_2.dtype == torch.float32
    assert max_rel_err(layer(x.bfloat16()), reference) < 2 ** -7


# ---------------------------------------------------------------------------------------------- models
class Tiny(nn.Module):
    """A miniature DiT tree with the release's module names (the release checkpoint's), C = 32."""

    def __init__(self, C=32, n_blocks=2):
        super().__init__()
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(TinyBlock(C) for _ in range(n_blocks))
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(C, 16)

    def forward(self, x):  # x (B, C, T, h, w)
        B, C, T, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tok = tok + block(tok, (T, h, w)) * self.t_block(tok.mean(1, keepdim=True))[..., :C]
        return self.final_layer.linear(tok)


class TinyBlock(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.plucker_proj = nn.Linear(C, C)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(C, 3 * C, bias=False)
        self.attn.proj, self.attn.output_gate = nn.Linear(C, C), nn.Linear(C, C)
        self.attn.beta_proj = nn.Linear(C, 2)
        self.attn.q_proj_cam, self.attn.out_proj_cam = nn.Linear(C, C), nn.Linear(C, C)
        self.cross_attn = nn.Module()
        self.cross_attn.q_linear, self.cross_attn.kv_linear = nn.Linear(C, C), nn.Linear(C, 2 * C)
        self.cross_attn.proj = nn.Linear(C, C)
        self.mlp = nn.Module()
        self.mlp.inverted_conv, self.mlp.depth_conv, self.mlp.point_conv = nn.Module(), nn.Module(), nn.Module()
        self.mlp.inverted_conv.conv = nn.Conv2d(C, 6 * C, 1)
        self.mlp.depth_conv.conv = nn.Conv2d(6 * C, 6 * C, 3, padding=1, groups=6 * C)
        self.mlp.point_conv.conv = nn.Conv2d(3 * C, C, 1, bias=False)
        self.mlp.t_conv = nn.Conv2d(C, C, (3, 1), padding=(1, 0), bias=False)

    def forward(self, tok, thw):
        T, h, w = thw
        a = self.attn
        q, k, v = a.qkv(tok).chunk(3, -1)
        u = a.proj(torch.softmax(q @ k.transpose(1, 2) / 6, -1) @ v * F.silu(a.output_gate(tok)))
        u = u + a.out_proj_cam(a.q_proj_cam(tok)) + self.plucker_proj(tok) + a.beta_proj(tok).sum(-1, True)
        c = self.cross_attn
        kc, vc = c.kv_linear(tok[:, :5]).chunk(2, -1)
        u = u + c.proj(torch.softmax(c.q_linear(u) @ kc.transpose(1, 2), -1) @ vc)
        B, N, C = u.shape
        z = u.view(B, T, h, w, C).permute(0, 1, 4, 2, 3).reshape(B * T, C, h, w)
        z = self.mlp.depth_conv.conv(F.silu(self.mlp.inverted_conv.conv(z)))
        val, gate = z.chunk(2, 1)
        z = self.mlp.point_conv.conv(val * F.silu(gate))
        z = z.view(B, T, C, h * w).transpose(1, 2)
        z = z + self.mlp.t_conv(z)
        return u + z.permute(0, 2, 3, 1).reshape(B, N, C)


def tiny_model(seed=6):
    torch.manual_seed(seed)
    model = Tiny()
    for p in model.parameters():  # O(1) activations everywhere: no path hides behind a tiny init
        nn.init.normal_(p, std=1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1)
    return model.eval()


def dequantised_copy(model: nn.Module) -> nn.Module:
    """The float model whose weights are the NVFP4 layers' dequantised weights: what quantisation should equal."""
    float_model = tiny_model()  # same seed: the weights before quantisation
    for name, m in model.named_modules():
        if isinstance(m, NVFP4Linear):
            target = float_model.get_submodule(name)
            w = dequantize_nvfp4(m.weight, m.weight_scale, m.weight_scale_2)
            target.weight.data = w.view(target.weight.shape)
    return float_model


@torch.no_grad()
def test_quantize_model_default_layers_and_equivalence():
    model = tiny_model()
    x = torch.randn(2, 32, 3, 2, 4)
    names = quantize_model(model, kernel="torch")
    expected = [f"blocks.{i}.{n}" for i in range(2) for n in
                ("attn.qkv", "attn.proj", "attn.output_gate", "cross_attn.q_linear", "cross_attn.kv_linear",
                 "cross_attn.proj", "mlp.inverted_conv.conv", "mlp.point_conv.conv")]
    assert sorted(names) == sorted(expected)
    for name, m in model.named_modules():
        if name in expected:
            assert isinstance(m, NVFP4Conv2d if "conv" in name else NVFP4Linear)
        else:
            assert not isinstance(m, NVFP4Linear), name
    # the camera path, plucker_proj, t_block, final layer and t_conv stayed float
    assert type(model.blocks[0].attn.q_proj_cam) is nn.Linear and type(model.blocks[1].plucker_proj) is nn.Linear
    assert type(model.t_block[1]) is nn.Linear and type(model.blocks[0].mlp.t_conv) is nn.Conv2d
    assert max_rel_err(model(x), dequantised_copy(model)(x)) < 1e-5
    with pytest.raises(ValueError, match="matches no"):
        quantize_model(tiny_model(), include=("blocks.*.attn.nothing",))
    with pytest.raises(ValueError, match="blocks.0.attn.qkv"):  # already NVFP4: no longer a candidate
        quantize_model(model, include=("blocks.0.attn.qkv",))


@torch.no_grad()
def test_quantize_everything_in_blocks():
    # include every block layer: camera path, beta_proj and the (3,1) temporal conv too; depth_conv (grouped)
    # is not a candidate
    model = tiny_model()
    names = quantize_model(model, include=("blocks.*",), exclude=(), kernel="triton")
    assert "blocks.0.mlp.t_conv" in names and "blocks.1.attn.q_proj_cam" in names
    assert not any("depth_conv" in n for n in names)
    x = torch.randn(1, 32, 3, 2, 4)
    assert max_rel_err(model(x), dequantised_copy(model)(x)) < 1e-5
    # a layer whose input width is not a multiple of 16 names itself
    bad = nn.Module()
    bad.blocks = nn.ModuleList([nn.Linear(32, 8), nn.Linear(24, 8)])
    with pytest.raises(ValueError, match="blocks.1.*24 is not a multiple of 16"):
        quantize_model(bad, include=("blocks.*",), exclude=())
    assert type(bad.blocks[0]) is nn.Linear  # nothing was replaced


@torch.no_grad()
def test_checkpoint_round_trip_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    names = quantize_model(model, exclude=DEFAULT_EXCLUDE)
    path = tmp_path / "tiny_nvfp4.safetensors"
    assert save_nvfp4(model, str(path)) == sorted(names)
    assert read_nvfp4_header(str(path)) == {"format": "nvfp4", "group_size": 16, "layers": sorted(names)}
    state_dict = load_file(str(path))
    key = "blocks.0.mlp.inverted_conv.conv"
    assert state_dict[f"{key}.weight"].dtype == torch.uint8 and state_dict[f"{key}.weight"].shape == (192, 16)
    assert state_dict[f"{key}.weight_scale"].dtype == torch.float8_e4m3fn
    assert state_dict[f"{key}.weight_scale"].shape == (192, 2)
    assert state_dict[f"{key}.weight_scale_2"].dtype == torch.float32 and state_dict[f"{key}.weight_scale_2"].dim() == 0
    assert nvfp4_layer_names(state_dict) and not nvfp4_layer_names(tiny_model().state_dict())
    # the loader's recipe: structure on the meta device, then a strict, assigning load
    with torch.device("meta"):
        loaded = Tiny()
    quantize_model(loaded, include=nvfp4_layer_names(state_dict), exclude=())
    loaded.load_state_dict(state_dict, strict=True, assign=True)
    x = torch.randn(1, 32, 2, 2, 2)
    assert torch.equal(loaded.eval()(x), model(x))
    with pytest.raises(RuntimeError, match="weight_scale"):
        tiny_model().load_state_dict(state_dict, strict=True)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    assert read_nvfp4_header(str(tmp_path / "plain.safetensors")) is None


# ---------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_triton_bf16_on_gpu_matches_torch():
    g = torch.Generator(device="cuda").manual_seed(7)
    w = torch.randn(2240, 2240, device="cuda", generator=g) / 50
    packed, scale, scale_2 = quantize_nvfp4(w)
    x = torch.randn(1000, 2240, device="cuda", generator=g).bfloat16()
    b = torch.randn(2240, device="cuda", generator=g).bfloat16()
    ref = F.linear(x.double(), dequantize_nvfp4(packed, scale, scale_2).double(), b.double())
    assert max_rel_err(nvfp4_linear_triton(x, packed, scale, scale_2, b), ref) < 2 ** -8


# ---------------------------------------------------------------------------------------------- the tiny DiT
def tiny_dit():
    from dit import DiT, DiTConfig
    from reference import TINY_DIT, randomize_

    torch.manual_seed(0)
    cfg = DiTConfig(**{k: v for k, v in TINY_DIT.items() if k != "patch_size"})
    return randomize_(DiT(cfg), seed=1).eval()


def tiny_dit_args(thw=(3, 4, 6)):
    from reference import tiny_dit_inputs

    inputs = tiny_dit_inputs(batch=1, thw=thw)
    return (inputs["hidden_states"], inputs["timestep"][:, 0], inputs["encoder_hidden_states"][:, 0],
            inputs["encoder_attention_mask"], inputs["camera_conditions"], inputs["chunk_plucker"])


def dequantised_tiny_dit(model: nn.Module, names: list[str]) -> nn.Module:
    """The float tiny DiT whose quantised layers hold their dequantised weights: what `model` should equal."""
    float_model = tiny_dit()
    for name in names:
        m, target = model.get_submodule(name), float_model.get_submodule(name).weight
        target.copy_(dequantize_nvfp4(m.weight, m.weight_scale, m.weight_scale_2).view_as(target))
    return float_model


@torch.no_grad()
def test_tiny_dit_quantises_and_equals_its_dequantised_self():
    model = tiny_dit()
    names = quantize_model(model, kernel="triton")
    assert len(names) == 8 * 4
    assert not any(k in n for n in names for k in ("cam", "plucker", "t_block", "final", "mlp.t_conv"))
    args = tiny_dit_args()
    out = model(*args)
    assert max_rel_err(out, dequantised_tiny_dit(model, names)(*args)) < 1e-5  # measured 6.4e-6 (fp32 sum order)


@torch.no_grad()
def test_tiny_dit_small_preset_quantises_temporal_conv_and_camera_path():
    # The FFN temporal conv (3x1 over frames) runs through dit.temporal_residual, chunk-causal included.
    model = tiny_dit()
    names = quantize_model(model, SMALL_INCLUDE, SMALL_EXCLUDE, kernel="torch")
    assert len(names) == 14 * 4 and isinstance(model.blocks[2].mlp.t_conv, NVFP4Conv2d)
    assert {"blocks.0.mlp.t_conv", "blocks.3.attn.k_proj_cam", "blocks.1.plucker_proj"} <= set(names)
    float_model = dequantised_tiny_dit(model, names)
    args = tiny_dit_args(thw=(5, 2, 3))
    for chunk_size in (None, 2):
        out = model(*args, chunk_size=chunk_size)
        assert max_rel_err(out, float_model(*args, chunk_size=chunk_size)) < 1e-5  # measured 0 (kernel="torch")


def test_release_dit_weight_bytes():
    """Weight bytes of the release-size DiT per layer set, counted on the meta device (nothing allocated): the
    "weights GB" column of BENCHMARKS.md (5.32 / 2.73 / 2.01 / 1.57) and issue 8's goal, <= 1.6 GB."""
    from dit import DiT, DiTConfig

    def weight_bytes(include=(), exclude=()):
        with torch.device("meta"):
            model = DiT(DiTConfig()).to(torch.bfloat16)
        if include:
            quantize_model(model, include, exclude)
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())

    assert weight_bytes() == 5_323_600_936
    assert weight_bytes(DEFAULT_INCLUDE, DEFAULT_EXCLUDE) == 2_726_993_576
    camera = DEFAULT_INCLUDE + ("blocks.*.attn.*_proj_cam", "blocks.*.plucker_proj")  # bench's "nvfp4 +camera"
    assert weight_bytes(camera) == 2_005_713_976
    assert weight_bytes(SMALL_INCLUDE, SMALL_EXCLUDE) == 1_572_946_056 <= 1.6e9


@pytest.mark.parametrize("preset,precision,n_layers", [("default", "nvfp4", 32), ("small", "nvfp4", 56),
                                                      ("default", "fp8", 32)])
@torch.no_grad()
def test_cli_round_trip_through_dit_checkpoint(tmp_path, capsys, preset, precision, n_layers):
    import json

    from dit import DiT
    from reference import TINY_DIT
    from safetensors.torch import load_file, save_file

    from quantize import main

    dit_dir = tmp_path / "release" / "dit"  # the release folder layout: dit/, vae/, refiner/
    dit_dir.mkdir(parents=True)
    model = tiny_dit().to(torch.bfloat16)
    save_file(model.state_dict(), str(dit_dir / "diffusion_pytorch_model.safetensors"))
    (dit_dir / "config.json").write_text(json.dumps({**TINY_DIT, "_class_name": "SanaWMTransformer3DModel"}))
    out = tmp_path / f"dit_{precision}.safetensors"
    main(["--in", str(tmp_path / "release"), "--out", str(out), "--preset", preset, "--precision", precision])
    assert f"{n_layers} {precision.upper()} layers" in capsys.readouterr().out
    state_dict = load_file(str(out))
    assert read_quantized_header(str(out)) == {"format": precision, "layers": sorted(layer_precisions(state_dict)),
                                              **({"group_size": 16} if precision == "nvfp4" else {})}
    assert set(layer_precisions(state_dict).values()) == {precision}
    assert ("blocks.0.mlp.t_conv.weight_scale" in state_dict) == (preset == "small")
    # DiT.from_pretrained loads the file transparently (quantised weights and scales keep their dtypes), strictly
    loaded = DiT.from_pretrained(out, dtype=torch.bfloat16, config=model.config)
    quantize_model(model, *PRESETS[preset], precision=precision)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731 (no fp8 equal)
    assert all(t.dtype == expected[k].dtype and torch.equal(bits(t), bits(expected[k]))
               for k, t in loaded.state_dict().items())
    x, timestep, text, text_mask, raymap, plucker = tiny_dit_args()
    args = (x.bfloat16(), timestep, text.bfloat16(), text_mask, raymap, plucker.bfloat16())
    assert torch.equal(loaded(*args, chunk_size=2), model(*args, chunk_size=2))
    # errors: one line on stderr, exit code 2
    with pytest.raises(SystemExit) as e:
        main(["--in", str(tmp_path / "missing"), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: path") and err.count("\n") == 1


def _release(root: Path) -> Path:
    """A release folder whose dit/ holds the tiny DiT (bf16, diffusers layout); returns its weights file."""
    import json

    from reference import TINY_DIT
    from safetensors.torch import save_file

    dit_dir = root / "release" / "dit"
    dit_dir.mkdir(parents=True)
    save_file(tiny_dit().to(torch.bfloat16).state_dict(), str(dit_dir / "diffusion_pytorch_model.safetensors"))
    (dit_dir / "config.json").write_text(json.dumps({**TINY_DIT, "_class_name": "SanaWMTransformer3DModel"}))
    return dit_dir / "diffusion_pytorch_model.safetensors"


def _cli_error(argv, capsys) -> str:
    from quantize import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_refuses_bad_outputs_before_loading(tmp_path, capsys, monkeypatch):
    """--out over the input (any spelling of its path, or inside the DiT folder --in reads), in a missing folder or
    a folder itself, --device cuda without a GPU, argparse's own errors: one line, exit 2, no model loaded."""
    import dit

    weights = _release(tmp_path)
    before = weights.read_bytes()

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded for an --out that should have been refused first")
    monkeypatch.setattr(dit.DiT, "from_pretrained", loaded)
    release, dit_dir = tmp_path / "release", tmp_path / "release" / "dit"
    cases = [
        (["--in", str(weights), "--out", str(weights)], ["--out", "is the input file"]),
        (["--in", str(weights), "--out", str(dit_dir / ".." / "dit" / weights.name)], ["--out", "is the input"]),
        (["--in", str(release), "--out", str(weights)], ["--out", "inside the DiT folder"]),
        (["--in", str(release), "--out", str(dit_dir / "nvfp4.safetensors")], ["--out", "inside the DiT folder"]),
        (["--in", str(dit_dir), "--out", str(dit_dir / "nvfp4.safetensors")], ["--out", "inside the DiT folder"]),
        (["--in", str(release), "--out", str(tmp_path / "missing" / "o.safetensors")], ["--out", "does not exist"]),
        (["--in", str(release), "--out", str(tmp_path)], ["--out", "is a folder"]),
        (["--in", str(release), "--out", str(tmp_path / "o.safetensors"), "--device", "nodevice"], ["--device"]),
        (["--in", str(release)], ["--out", "required"]),
        (["--in", str(release), "--out", str(tmp_path / "o.safetensors"), "--preset", "tiny"], ["--preset"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--in", str(release), "--out", str(tmp_path / "o.safetensors"), "--device", "cuda"],
                      ["--device cuda", "no CUDA device"]))
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    for argv, words in cases:
        err = _cli_error(argv, capsys)
        assert all(w in err for w in words), (argv, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing and weights.read_bytes() == before


def test_cli_failed_write_leaves_no_file(tmp_path, capsys, monkeypatch):
    """The file is written under a temporary name and renamed when complete: a failure while writing leaves
    neither the output nor the temporary file."""
    import quantize

    _release(tmp_path)

    def full_disk(model, path):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(quantize, "save_quantized", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    err = _cli_error(["--in", str(tmp_path / "release"), "--out", str(out / "o.safetensors")], capsys)
    assert "No space left on device" in err and list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------- FP8 (W8A8)
def e4m3_grid() -> torch.Tensor:
    """Every finite float8_e4m3fn value, ascending (decoded by torch)."""
    positive = e4m3_positive_scales().float()
    return torch.cat([-positive.flip(0), torch.zeros(1), positive])


def e4m3_ties_row() -> torch.Tensor:
    """448 (so the row's scale is exactly 1) then every midpoint between neighbouring positive E4M3 values,
    subnormals included, negated every other one: each must round to the neighbour with the even code."""
    positive = torch.cat([torch.zeros(1), e4m3_positive_scales().float()])
    midpoints = (positive[1:] + positive[:-1]) / 2
    signs = torch.ones(len(midpoints))
    signs[1::2] = -1.0
    return torch.cat([torch.tensor([448.0]), midpoints * signs])


def test_fp8_rows_round_to_the_nearest_e4m3_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-30, 30, 64)[:, None]
    x[5] = 0.0
    values, scale = quantize_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (64,)
    amax, nonzero = x.abs().amax(1), torch.arange(64) != 5
    assert torch.equal(scale[nonzero], amax[nonzero] / 448) and scale[5] == FP8_MIN_SCALE
    assert not values[5].float().any()
    assert torch.equal(values.float().abs().amax(1)[nonzero], torch.full((63,), 448.0))  # each row's top is 448
    # every value is a nearest E4M3 value to x / s (an oracle from the whole grid, by distance)
    y = x / scale[:, None]
    grid = e4m3_grid()
    nearest = grid[(y[..., None] - grid).abs().argmin(-1)]
    assert torch.equal((values.float() - y).abs(), (nearest - y).abs())
    # exact ties go to the even code; dequantisation multiplies back
    ties = e4m3_ties_row()
    tied, tie_scale = quantize_fp8(ties[None])
    assert tie_scale.item() == 1.0 and not (tied.view(torch.uint8)[0, 1:] & 1).any()
    assert ((tied.float()[0, 1:] - ties[1:]).abs() == (grid[None] - ties[1:, None]).abs().min(1).values).all()
    assert torch.equal(dequantize_fp8(values, scale), values.float() * scale[:, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_triton_quantiser_is_bit_equal_to_torch(dtype):
    """The one-pass Triton kernel (Triton's interpreter here) against quantize_fp8: the same scales and E4M3 bits,
    for rows of many magnitudes, an all-zero row of -0.0 and 0.0, the ties row, a width (200) that is no power of
    two, rows further apart than their width (a view)."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 200, generator=g) * torch.logspace(-4, 4, 40)[:, None]
    rows[3] = 0.0
    rows[3, ::2] = -0.0
    ties = e4m3_ties_row()
    rows[7, :len(ties)] = ties
    x = torch.zeros(40, 256, dtype=dtype)[:, :200]
    x.copy_(rows)
    ref_values, ref_scale = quantize_fp8(x)
    values, scale = quantize_fp8_triton(x)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(values.view(torch.uint8), ref_values.view(torch.uint8))
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        quantize_fp8_triton(x[None])


@torch.no_grad()
def test_fp8_linear_fast_path_equals_the_reference():
    """fp8_linear's "triton" path (Triton's interpreter, then PyTorch's CPU torch._scaled_mm) and the torch reference
    against the definition in fp64: tokens quantised, both operands dequantised, multiplied, the bias added."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(48, 64, generator=g) / 8, torch.randn(48, generator=g)
    weight, scale = quantize_fp8(w)
    x = torch.randn(2, 7, 64, generator=g) * 3
    x8, x_scale = quantize_fp8(x)
    product = (x8.double() * x_scale.double()[..., None]) @ (weight.double() * scale.double()[:, None]).T
    for bias in (b, None):
        expected = product + (0 if bias is None else bias.double())
        for kernel in ("triton", "torch"):
            out = fp8_linear(x, weight, scale, bias, kernel)
            assert out.shape == (2, 7, 48) and out.dtype == torch.float32
            assert max_rel_err(out, expected) < 1e-6, kernel  # fp32 sums in another order
    # bf16 activations: the same, rounded once to bf16
    xb = x.bfloat16()
    fast, ref = fp8_linear(xb, weight, scale, b.bfloat16(), "triton"), fp8_linear_torch(xb, weight, scale, b.bfloat16())
    assert fast.dtype == ref.dtype == torch.bfloat16 and max_rel_err(fast, ref) <= 2 ** -8
    with pytest.raises(ValueError, match="last dim 64"):
        fp8_linear(x[..., :32], weight, scale, b, "torch")
    with pytest.raises(ValueError, match="weight, scale"):
        fp8_linear(x, w, scale, b, "torch")


def test_fp8_is_refused_below_sm89(monkeypatch):
    from types import SimpleNamespace

    gpu = SimpleNamespace(name="NVIDIA A100", major=8, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    with pytest.raises(ValueError, match="fp8: torch._scaled_mm needs an sm_89\\+ GPU .*NVIDIA A100 is sm_80"):
        check_fp8_device("cuda")
    gpu.minor = 9  # Ada
    check_fp8_device("cuda")


@pytest.mark.gpu
@torch.no_grad()
def test_fp8_on_gpu_eager_and_compiled():
    """At a DiT shape on an sm_89+ GPU: the Triton quantiser bit-equal to torch's, the layer (torch._scaled_mm)
    equal to the reference up to bf16's rounding, and the same inside torch.compile without a graph break."""
    g = torch.Generator(device="cuda").manual_seed(7)
    layer = FP8Linear(2240, 6720, device="cuda", dtype=torch.bfloat16)
    layer.set_weight(torch.randn(6720, 2240, device="cuda", generator=g) / 50)
    layer.bias.copy_(torch.randn(6720, device="cuda", generator=g))
    x = torch.randn(3, 1000, 2240, device="cuda", generator=g).bfloat16()
    values, scale = quantize_fp8_triton(x.view(-1, 2240))
    ref_values, ref_scale = quantize_fp8(x.view(-1, 2240))
    assert torch.equal(scale, ref_scale) and torch.equal(values.view(torch.uint8), ref_values.view(torch.uint8))
    eager = layer(x)
    assert max_rel_err(eager, fp8_linear_torch(x, layer.weight, layer.weight_scale, layer.bias)) <= 2 ** -7
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), eager)


@torch.no_grad()
def test_fp8_layers_in_a_model():
    """quantize_model(precision="fp8") swaps the same default layers as NVFP4 (linears, 1x1 convs as FP8Conv2d);
    the fast and the reference kernels agree; .to(dtype) keeps the format; wider convs are refused."""
    model = tiny_model()
    x = torch.randn(2, 32, 3, 2, 4)
    float_out = model(x)
    names = quantize_model(model, kernel="triton", precision="fp8")
    assert len(names) == 16 and model_precision(model) == "fp8"
    for name in names:
        assert type(model.get_submodule(name)) is (FP8Conv2d if "conv" in name else FP8Linear)
    fast = model(x)
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.kernel = "torch"
    assert max_rel_err(fast, model(x)) < 1e-5
    assert max_rel_err(model(x), float_out) < 0.2  # W8A8 against the float model, width 32: measured 8.3e-2
    layer = model.blocks[0].mlp.inverted_conv.conv
    assert layer.weight.shape == (192, 32) and layer.weight_scale.shape == (192,)
    model.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.dtype == torch.float32
    with pytest.raises(ValueError, match="t_conv.*to FP8: a \\(3, 1\\) conv"):
        quantize_model(tiny_model(), SMALL_INCLUDE, SMALL_EXCLUDE, precision="fp8")
    with pytest.raises(ValueError, match="precision: expected one of"):
        quantize_model(tiny_model(), precision="int8")


@torch.no_grad()
def test_set_precision():
    """None and the held precision change nothing; a float model is quantised; a quantised one refuses another
    precision (bf16 included)."""
    model = tiny_model()
    assert model_precision(model) == "bf16"
    assert set_precision(model, None, DEFAULT_INCLUDE, DEFAULT_EXCLUDE) == []
    assert set_precision(model, "bf16", DEFAULT_INCLUDE, DEFAULT_EXCLUDE) == []
    assert len(set_precision(model, "nvfp4", DEFAULT_INCLUDE, DEFAULT_EXCLUDE)) == 16
    assert model_precision(model) == "nvfp4"
    assert set_precision(model, "nvfp4", DEFAULT_INCLUDE, DEFAULT_EXCLUDE) == []
    for other in ("fp8", "bf16"):
        with pytest.raises(ValueError, match=f"precision {other}: the model holds nvfp4 layers"):
            set_precision(model, other, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    with pytest.raises(ValueError, match="precision: expected bf16, nvfp4 or fp8"):
        set_precision(model, "fp4", DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    quantize_model(model, include=("blocks.*.attn.q_proj_cam",), exclude=(), precision="fp8")
    with pytest.raises(ValueError, match="model: holds both NVFP4 and FP8 layers"):
        model_precision(model)


@torch.no_grad()
def test_tiny_dit_in_fp8():
    """The DiT's default layer set in FP8: the fast path (Triton's interpreter + CPU _scaled_mm) equals the torch
    reference through the whole model, chunk-causal included; the error against the float DiT is reported."""
    float_model = tiny_dit()
    model = tiny_dit()
    names = quantize_model(model, kernel="triton", precision="fp8")
    assert len(names) == 8 * 4
    args = tiny_dit_args()
    fast = model(*args, chunk_size=2)
    for name in names:
        model.get_submodule(name).kernel = "torch"
    assert max_rel_err(fast, model(*args, chunk_size=2)) < 1e-5
    error = max_rel_err(model(*args), float_model(*args))
    print(f"tiny DiT, FP8 (W8A8) against float: max rel err {error:.2e}")
    assert error < 0.1  # measured 2.7e-2


# ---------------------------------------------------------------------------------------------- the refiner
def _refiner_release(root: Path):
    """(the tiny refiner with its audio branch, the release refiner/ folder holding it as transformer/)."""
    import json

    import refiner as R
    from reference import TINY_REFINER, randomize_
    from safetensors.torch import save_file

    model = randomize_(R.Refiner(R.RefinerConfig.from_dict(TINY_REFINER), keep_audio=True), seed=3).eval()
    folder = root / "release" / "refiner" / "transformer"
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**TINY_REFINER, "_class_name": "SanaWMLTX2RefinerModel"}))
    return model, root / "release" / "refiner"


def _state_bits(model: nn.Module) -> dict:
    return {k: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for k, t in model.state_dict().items()}


@pytest.mark.parametrize("precision", PRECISIONS)
@torch.no_grad()
def test_refiner_quantised_as_it_loads_and_through_quantize_py(tmp_path, capsys, precision):
    """Refiner.from_pretrained(precision=) quantises the blocks' linears as it reads them: the same tensors as
    loading in float and quantising after; quantize.py --model refiner writes a file that loads strictly (with
    its config) into the same model; the file's format is kept and another precision refused."""
    import refiner as R

    from quantize import main

    _, folder = _refiner_release(tmp_path)
    loaded = R.Refiner.from_pretrained(folder, dtype=torch.float32, precision=precision)
    after = R.Refiner.from_pretrained(folder, dtype=torch.float32)
    names = quantize_model(after, REFINER_INCLUDE, REFINER_EXCLUDE, precision=precision)
    assert len(names) == 10 * 2 and not any("audio" in n for n in names) and model_precision(loaded) == precision
    assert {k: t.dtype for k, t in loaded.state_dict().items()} == {k: t.dtype for k, t in after.state_dict().items()}
    assert all(torch.equal(t, _state_bits(after)[k]) for k, t in _state_bits(loaded).items())

    out = tmp_path / f"refiner_{precision}.safetensors"
    main(["--in", str(tmp_path / "release"), "--out", str(out), "--model", "refiner", "--precision", precision])
    assert f"20 {precision.upper()} layers" in capsys.readouterr().out
    assert read_quantized_header(str(out))["layers"] == sorted(names)
    from_file = R.Refiner.from_pretrained(out, dtype=torch.bfloat16, config=loaded.cfg)  # the CLI reads bf16
    bf16 = _state_bits(R.Refiner.from_pretrained(folder, dtype=torch.bfloat16, precision=precision))
    assert from_file.state_dict().keys() == bf16.keys()
    assert all(torch.equal(t, bf16[k]) for k, t in _state_bits(from_file).items())
    assert model_precision(R.Refiner.from_pretrained(out, config=loaded.cfg, precision=precision)) == precision
    for other in ("bf16",) + tuple(p for p in PRECISIONS if p != precision):
        with pytest.raises(ValueError, match=f"precision {other}: the model holds {precision} layers"):
            R.Refiner.from_pretrained(out, config=loaded.cfg, precision=other)
    with pytest.raises(ValueError, match="config: .* its own config.json"):
        R.Refiner.from_pretrained(folder, config=loaded.cfg)


@torch.no_grad()
def test_refiner_runs_in_nvfp4_and_fp8():
    """refine() with the refiner's blocks in NVFP4 equals it with their dequantised weights; in FP8 the fast path
    equals the reference; both stay close to float (the errors are printed: reported, not targets)."""
    import copy

    import refiner as R
    from reference import TINY_REFINER, randomize_

    g = torch.Generator().manual_seed(4)
    base = randomize_(R.Refiner(R.RefinerConfig.from_dict(TINY_REFINER)), seed=3).eval()
    z = torch.randn(1, 8, 7, 2, 3, generator=g)
    text, mask = torch.randn(1, 16, 16, generator=g), torch.ones(1, 16, dtype=torch.int64)
    run = lambda m: R.refine(m, z, text, mask, fps=16, generator=torch.Generator().manual_seed(42))  # noqa: E731
    reference = run(base)
    nvfp4, fp8 = copy.deepcopy(base), copy.deepcopy(base)
    names = quantize_model(nvfp4, REFINER_INCLUDE, REFINER_EXCLUDE, kernel="triton")
    dequantised = copy.deepcopy(base)
    for name in names:
        m = nvfp4.get_submodule(name)
        dequantised.get_submodule(name).weight.copy_(dequantize_nvfp4(m.weight, m.weight_scale, m.weight_scale_2))
    out_nvfp4 = run(nvfp4)
    assert max_rel_err(out_nvfp4, run(dequantised)) < 1e-5
    quantize_model(fp8, REFINER_INCLUDE, REFINER_EXCLUDE, kernel="triton", precision="fp8")
    out_fp8 = run(fp8)
    for name in names:
        fp8.get_submodule(name).kernel = "torch"
    assert max_rel_err(out_fp8, run(fp8)) < 1e-5
    errors = {p: max_rel_err(out, reference) for p, out in (("nvfp4", out_nvfp4), ("fp8", out_fp8))}
    print("tiny refiner, refine() against float: " + ", ".join(f"{p} {e:.2e}" for p, e in errors.items()))
    assert errors["fp8"] < errors["nvfp4"] < 0.1  # measured fp8 3.6e-3, nvfp4 1.0e-2
