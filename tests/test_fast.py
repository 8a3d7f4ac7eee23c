"""fast.py: each CUDA inference kernel against the readable code it replaces (Triton's interpreter on the CPU, fp32),
the accelerated DiT against the DiT as written (CPU with the kernels forced on; CUDA with compiled blocks), and the
accelerated refiner stream against the stream as written."""
import copy

import pytest
import torch
import torch.nn.functional as F

import dit
import fast
import refiner as R
from attention import RMSNorm, camera_rope_table, rope_table
from fast import head_stream
from reference import (TINY_REFINER_VARIANTS, max_rel_err, randomize_, readable_stream, tiny_dit_inputs,
                       tiny_sana_wm_transformer)
from test_attention import ATOL, SELF_ATTENTION, C, D, HEADS, camera_transforms, gen, max_abs, ours_camera
from test_dit import CONFIGS, MODEL_ATOL, ours_args, ours_from


@pytest.fixture
def compile_everything(monkeypatch):
    """The tiny models' tensors are far below fast.COMPILE_MIN_ELEMENTS: compile them anyway, as the release's are."""
    monkeypatch.setattr(fast, "COMPILE_MIN_ELEMENTS", 0)


def test_accelerate_keeps_the_state_dict():
    """accelerate swaps classes in place: the same keys and tensors, every layer fast, idempotent."""
    model = ours_from(tiny_sana_wm_transformer())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slow = {type(m).__name__ for m in model.modules()}
    assert fast.accelerate(fast.accelerate(model)) is model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    swapped = {type(m).__name__ for m in model.modules()}
    assert {"Block", "GDNSelfAttention", "SoftmaxSelfAttention", "GLUMBConvTemp", "FinalLayer"} <= slow
    assert {"FastBlock", "FastGDNSelfAttention", "FastSoftmaxSelfAttention", "FastGLUMBConvTemp",
            "FastFinalLayer"} <= swapped and not swapped & {"Block", "GDNSelfAttention", "FinalLayer"}


# ---------------------------------------------------------------------------------------------------------------
# The fused per-head streams (fast.head_stream, a Triton kernel: the interpreter on the CPU, in fp32)

STREAMS = {  # the layers' streams (gdn.py, attention.py), with the chunk-causal and memory-mode short conv
    "softmax q": dict(norm=True),
    "gdn q": dict(norm=True, relu=True),
    "gdn k": dict(norm=True, relu=True, scale=0.3, conv=(None, 0)),
    "gdn k, chunks of 2": dict(norm=True, relu=True, scale=0.3, conv=(2, 0)),
    "gdn k, window from frame 3": dict(norm=True, relu=True, scale=0.3, conv=(2, 3)),
    "camera q": dict(norm=True, relu=True, matrix=1, cap=True),
    "camera k": dict(norm=True, relu=True, scale=0.3, conv=(2, 1), matrix=2, cap=True),
    "camera v": dict(matrix=2, cap=True),
    "camera decode": dict(matrix=0, conjugate=True),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_head_stream_kernel(name):
    """Each stream the layers run through the kernel equals the readable composition; the input is a strided view
    (one of three heads of a fused projection, or the (B, H, N, D) attention output transposed)."""
    case = dict(STREAMS[name])
    thw, T = (5, 2, 3), 5
    N = 30
    transforms = ours_camera(camera_transforms(thw))
    table = transforms[3] if "matrix" in case else rope_table(D, thw)
    if case.pop("norm", False):
        case["norm"] = randomize_(RMSNorm(C, 1e-5), seed=2)
    if "conv" in case:
        chunk_size, first_frame = case.pop("conv")
        case["conv"] = (torch.randn(C, 1, 4, generator=gen(4)), T, chunk_size, first_frame)
    if "matrix" in case:
        case["matrix"] = transforms[case["matrix"]]
    if "decode" in name:
        x = torch.randn(2, HEADS, N, D, generator=gen(5)).transpose(1, 2)
    else:
        x = torch.randn(2, N, 3, HEADS, D, generator=gen(5))[:, :, 1]
    out, plain, inflation = readable_stream(x, table, **case)
    got = head_stream(x, table, keep_plain="matrix" not in case, inflation="matrix" in case, **case)
    assert max_rel_err(got[0], out) <= 1e-6
    if "matrix" in case:
        assert got[1] is None and max_rel_err(got[2], inflation) <= 1e-6
    else:
        assert got[2] is None and max_rel_err(got[1], plain) <= 1e-6


@pytest.mark.parametrize("kind,chunk_size", [("softmax", None), ("gdn", None), ("gdn", 2)])
def test_self_attention_with_kernels(kind, chunk_size, monkeypatch):
    """The self-attention layers with their streams through the kernel (as on CUDA in inference, fast.accelerate)
    equal the layers as written, with the camera branch; chunk-causal for GDN (the short conv's future stops at
    chunk ends)."""
    layer = randomize_(SELF_ATTENTION[kind][1]())
    thw = (5, 2, 3)
    u = torch.randn(2, 30, C, generator=gen(3))
    rope, camera = rope_table(D, thw), ours_camera(camera_transforms(thw))
    with torch.no_grad():
        expected = layer(u, thw, rope, camera, chunk_size)
        fast.accelerate(layer)
        monkeypatch.setattr(fast, "use_kernels", lambda x: True)
        assert type(layer).__name__.startswith("Fast")
        assert max_abs(layer(u, thw, rope, camera, chunk_size), expected) <= ATOL


def test_head_stream_errors():
    x = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="conv: .* needs a norm"):
        head_stream(x, rope_table(8, (2, 1, 3)), conv=(torch.randn(16, 1, 2), 2, None, 0))
    with pytest.raises(ValueError, match="x: expected contiguous channels"):
        head_stream(x.transpose(2, 3), rope_table(8, (2, 1, 3)))
    with pytest.raises(ValueError, match="cap, inflation: .* give matrix"):
        head_stream(x, rope_table(8, (2, 1, 3)), cap=True)
    with pytest.raises(ValueError, match="keep_plain: .* RoPE streams only"):
        head_stream(x, rope_table(8, (2, 1, 3))[:, :2], matrix=torch.eye(4).expand(1, 6, 4, 4), keep_plain=True)


@pytest.mark.gpu
def test_head_stream_bf16_on_cuda():
    """In bf16 at the release head size the kernel is within bf16 rounding of the readable streams run eagerly
    (which round every intermediate to bf16; the kernel keeps fp32 between the points where they store)."""
    thw, Dh, H = (6, 4, 10), 112, 4
    B, N = 1, 240
    with torch.no_grad():
        rope = rope_table(Dh, thw, "cuda")
        rope_cam = camera_rope_table(rope, Dh).contiguous()
        P = (torch.eye(4) + 0.3 * torch.randn(B, N, 4, 4, generator=gen(1))).cuda().bfloat16()
        norm = randomize_(RMSNorm(H * Dh, 1e-5)).cuda().bfloat16()
        x = torch.randn(B, N, 3, H, Dh, generator=gen(2)).cuda().bfloat16()[:, :, 0]
        conv = (torch.randn(H * Dh, 1, 4, generator=gen(3)).cuda().bfloat16(), thw[0], None, 0)
        for case in (dict(table=rope, norm=norm, relu=True, conv=conv, scale=0.1),
                     dict(table=rope_cam, norm=norm, relu=True, conv=conv, scale=0.1, matrix=P, cap=True),
                     dict(table=rope_cam, matrix=P, conjugate=True)):
            out, plain, inflation = readable_stream(x, **case)
            got, got_plain, _ = head_stream(x, **case, keep_plain="matrix" not in case)
            assert max_rel_err(got.float(), out.float()) <= 1e-2
            if got_plain is not None:
                assert max_rel_err(got_plain.float(), plain.float()) <= 1e-2


# ---------------------------------------------------------------------------------------------------------------
# The FFN's kernel and operator

@pytest.mark.parametrize("K,T,chunk_size", [(3, 5, None), (3, 5, 2), (5, 4, 3), (5, 2, None), (3, 1, None)])
def test_temporal_residual_gemm_form(K, T, chunk_size):
    """The inference form of the FFN's temporal residual (one matrix product per tap over frame-shifted token rows)
    equals the conv2d form, including chunk boundaries and videos shorter than the filter."""
    B, S = 2, 6
    conv = torch.nn.Conv2d(C, C, (K, 1), padding=(K // 2, 0), bias=False)
    z = torch.randn(B, T * S, C, generator=gen(0))
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen(1)) / C ** 0.5)
        expected = dit.temporal_residual(z.view(B, T, S, C).permute(0, 3, 1, 2), conv, chunk_size)
        got = fast._temporal_residual_op(z, conv.weight, T, chunk_size or T)
    assert max_rel_err(got, expected.permute(0, 2, 3, 1).reshape(B, T * S, C)) <= 1e-6


def depthwise_glu_case(dtype, device):
    """A channels-last input as the FFN passes it, with a width that is not a power of two, and its weights."""
    n, c2, h, w = 3, 2 * 70, 9, 11  # 99 pixels: two tiles of 64, the second partial
    s = torch.randn(n, h, w, c2, generator=gen(0)).to(device, dtype).permute(0, 3, 1, 2)
    weight, bias = torch.randn(c2, 1, 3, 3, generator=gen(1)), torch.randn(c2, generator=gen(2))
    return s, weight.to(device, dtype), bias.to(device, dtype)


def test_depthwise_glu_kernel():
    """The Triton depthwise conv + GLU (Triton's interpreter on the CPU, fp32) equals the conv2d form."""
    s, weight, bias = depthwise_glu_case(torch.float32, "cpu")
    with torch.no_grad():
        value, gate = F.conv2d(s, weight, bias, padding=1, groups=s.shape[1]).chunk(2, dim=1)
        expected = value * F.silu(gate)
        got = fast._depthwise_glu_op(s, weight, bias).permute(0, 3, 1, 2)
    assert max_rel_err(got, expected) <= 1e-5


@pytest.mark.gpu
def test_depthwise_glu_kernel_bf16_on_cuda():
    """In bf16 the kernel rounds where the reference does (conv output, SiLU(gate), product), with fp32 accumulation:
    against the exact result (float64 from the same bf16 inputs) it is as close as cuDNN's conv + GLU, and within
    bf16 rounding. (Triton's interpreter truncates to bf16 instead of rounding: a GPU test.)"""
    s, weight, bias = depthwise_glu_case(torch.bfloat16, "cuda")
    with torch.no_grad():
        got = fast.depthwise_glu(s, weight, bias)
        value, gate = F.conv2d(s, weight, bias, padding=1, groups=s.shape[1]).chunk(2, dim=1)
        cudnn = value * F.silu(gate)
        value, gate = F.conv2d(*(t.cpu().double() for t in (s, weight, bias)), padding=1,
                               groups=s.shape[1]).chunk(2, dim=1)
        exact = value * F.silu(gate)
    err, err_cudnn = max_rel_err(got.cpu().double(), exact), max_rel_err(cudnn.cpu().double(), exact)
    assert err <= 1e-2 and err <= 1.5 * err_cudnn


# ---------------------------------------------------------------------------------------------------------------
# The accelerated DiT

def test_accelerated_dit_with_kernels(monkeypatch):
    """The accelerated DiT with its kernels on (as on CUDA; the interpreter here), whole video and memory mode:
    the same velocity as the model as written, bidirectional and chunk-causal, 9 frames so that the GDN parts'
    windows start inside the video (the kernel's short conv gets first_frame)."""
    overrides, thw, _ = CONFIGS["varied"]
    ours = ours_from(tiny_sana_wm_transformer(**overrides))
    args = ours_args(tiny_dit_inputs(thw=(9, *thw[1:]), in_channels=6, caption_channels=24))
    with torch.no_grad():
        expected = {chunk_size: ours(*args, chunk_size=chunk_size) for chunk_size in (None, 4)}
        fast.accelerate(ours)
        monkeypatch.setattr(fast, "use_kernels", lambda x: True)
        # Fewer, larger programs than the GPU's launch: the interpreter's time goes by the program.
        monkeypatch.setitem(fast.HEAD_STREAM_LAUNCH, "tokens", 16)
        for chunk_size, part_frames in ((None, None), (None, 2), (4, None), (4, 3)):
            got = ours(*args, chunk_size=chunk_size, part_frames=part_frames)
            assert max_abs(got, expected[chunk_size]) <= MODEL_ATOL


@pytest.mark.gpu
def test_kernels_on_cuda_equal_the_code_as_written(compile_everything):
    """On CUDA in inference the accelerated DiT's streams run through the kernels and its blocks are compiled; the
    tiny DiT's velocity equals the model as written, fp32, at the whole-model tolerance."""
    theirs = tiny_sana_wm_transformer()
    written = ours_from(theirs).cuda()
    ours = fast.accelerate(ours_from(theirs).cuda())
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in ours_args(tiny_dit_inputs())]
    with torch.no_grad():
        assert max_abs(ours(*args), written(*args)) <= MODEL_ATOL


@pytest.mark.gpu
def test_memory_mode_on_cuda(compile_everything):
    """On CUDA the accelerated memory mode runs the three Triton scan stages one at a time and the stream kernels:
    the same velocity as the compiled whole-video step (fp32, the whole-model tolerance); 9 frames, so that parts'
    windows start inside the video."""
    overrides, thw, _ = CONFIGS["varied"]
    theirs = tiny_sana_wm_transformer(**overrides)
    ours = fast.accelerate(ours_from(theirs).cuda())
    inputs = tiny_dit_inputs(thw=(9, *thw[1:]), in_channels=6, caption_channels=24)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in ours_args(inputs)]
    with torch.no_grad():
        for chunk_size, part_frames in ((None, 1), (None, 2), (2, 3), (4, 3)):
            whole = ours(*args, chunk_size=chunk_size)
            assert max_abs(ours(*args, chunk_size=chunk_size, part_frames=part_frames), whole) <= MODEL_ATOL


@pytest.mark.gpu
def test_compiled_blocks_on_cuda_equal_eager(compile_everything):
    """On CUDA in inference the accelerated DiT's blocks run through torch.compile (fast.compiled_on_cuda); the
    tiny DiT gives the same velocity as with the same code run eagerly (force_eager), at the whole-model fp32
    tolerance."""
    theirs = tiny_sana_wm_transformer()
    ours = fast.accelerate(ours_from(theirs).cuda())
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in ours_args(tiny_dit_inputs())]
    with torch.no_grad():
        fused = ours(*args)
        with torch.compiler.set_stance("force_eager"):
            eager = ours(*args)
    assert max_abs(fused, eager) <= MODEL_ATOL


def check_cached_chunks(ours, written, device):
    """ours' cached chunks (4+3+3 frames) == written's chunk-causal forward over the whole video so far, fp32."""
    overrides, (_, h, w), _ = CONFIGS["varied"]
    x, _, text, mask, raymap, plucker = (a.to(device) for a in ours_args(tiny_dit_inputs(
        thw=(10, h, w), in_channels=6, caption_channels=24)))
    starts, cache = (0, 4, 7), dit.StreamCache()
    with torch.no_grad():
        for s, e in zip(starts, (4, 7, 10)):
            t = torch.rand(2, e - s, generator=gen(s)).to(device) * 1000
            got = dit.forward_chunk(ours, x[:, :, s:e], t, text, mask, raymap, plucker, cache=cache)
            expected = written(x[:, :, :e], torch.cat([t.new_zeros(2, s), t], 1), text, mask, raymap[:, :e],
                               plucker[:, :, :e], chunk_size=tuple(c for c in starts if c < e))[:, :, s:]
            assert max_abs(got, expected) <= MODEL_ATOL
            dit.forward_chunk(ours, x[:, :, s:e], t.new_zeros(2, e - s), text, mask, raymap, plucker, cache=cache,
                              save=True)


def tiny_pair(kernel, device="cpu"):
    """(accelerated, as written) copies of one tiny DiT with a short conv of `kernel` taps."""
    theirs = tiny_sana_wm_transformer(**dict(CONFIGS["varied"][0], conv_kernel_size=kernel))
    return fast.accelerate(ours_from(theirs).to(device)), ours_from(theirs).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [3, 4])
def test_streaming_chunks_on_cuda(compile_everything, kernel):
    """The accelerated DiT's cached chunk-by-chunk forward on CUDA (kernels, compiled pieces) equals the
    chunk-causal forward over the whole video so far, fp32, at the whole-model tolerance; 4+3+3 frames; a short
    conv of 3 taps (its halo a chunk of its own) and the release's 4 (the halo read by the kernel)."""
    ours, _ = tiny_pair(kernel, "cuda")
    check_cached_chunks(ours, ours, "cuda")


def test_streaming_chunks_with_kernels(monkeypatch):
    """The accelerated DiT's cached chunks with the kernels on (the interpreter here; the release's 4-tap short
    conv, whose halo the kernel reads as an earlier chunk) equal the chunk-causal forward as written."""
    monkeypatch.setattr(fast, "use_kernels", lambda x: True)
    monkeypatch.setitem(fast.HEAD_STREAM_LAUNCH, "tokens", 16)
    check_cached_chunks(*tiny_pair(4), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# The refiner in the stream (fast.accelerate_refiner)

def refiner_streams(variant="spec", kv_max_frames=6, device="cpu", dtype=torch.float32):
    """Two RefinerStreams over copies of one tiny random refiner (batch 2, a text mask with padding), the same
    generator seed, and the stage-1 latents of 1 sink + 3 + 3 + 3 + 2 frames (the last block partial)."""
    cfg = R.RefinerConfig.from_dict(TINY_REFINER_VARIANTS[variant][0])
    model = randomize_(R.Refiner(cfg), seed=5).eval().to(device, dtype)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, cfg.in_channels, 12, 2, 3, generator=g).to(device, dtype)
    text = torch.randn(2, 5, cfg.caption_channels, generator=g).to(device, dtype)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)
    streams = [R.RefinerStream(m, z[:, :, :1], text, mask, fps=16, kv_max_frames=kv_max_frames,
                               generator=torch.Generator(device).manual_seed(42))
               for m in (model, copy.deepcopy(model))]
    return streams, z


REFINER_BLOCKS = [(1, 4), (4, 7), (7, 10), (10, 12)]


@pytest.mark.parametrize("variant,kv_max_frames,accelerate_at", [
    ("spec", 6, 0),      # history of 5 frames: trimmed after blocks 2, 3 and 4, kept history moved in pieces
    ("other", 3, 1),     # interleaved RoPE; history of 2 frames, trimmed after every block; accelerated mid-stream
    ("spec", 1, 2),      # kv_max_frames <= sink: the history is never trimmed, the buffers grow
])
def test_accelerated_refiner_stream_equals_the_stream_as_written(variant, kv_max_frames, accelerate_at, monkeypatch):
    """The accelerated stream (window buffers, text K/V made once; on the CPU nothing compiled: torch.compile would
    raise) gives the stream as written's blocks and history bit for bit (torch.equal), fp32, batch 2 with a text
    mask, the history trimmed and the last block partial."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled on the CPU"))
    (written, ours), z = refiner_streams(variant, kv_max_frames)
    projections = []
    ours.refiner.caption_projection.register_forward_hook(lambda *args: projections.append(1))
    for i, (s, e) in enumerate(REFINER_BLOCKS):
        if i == accelerate_at:
            assert fast.accelerate_refiner(ours) is ours
            projections.clear()
        assert torch.equal(ours.refine(z[:, :, s:e]), written.refine(z[:, :, s:e]))
        for a, b in zip(ours.cache.layers, written.cache.layers):
            assert torch.equal(a.hist_k, b.hist_k) and torch.equal(a.hist_v, b.hist_v)
    assert isinstance(ours.cache, fast.WindowBuffers) and type(ours.refiner).__name__ == "FastRefiner"
    assert len(projections) == 1                                # the text projected once, by the first forward


def test_accelerate_refiner_keeps_the_model():
    """accelerate_refiner swaps classes in place (the same state dict; idempotent), and the swapped refiner runs
    as written under any other cache: refine() equals the copy as written's."""
    (written, ours), z = refiner_streams()
    before = {k: v.clone() for k, v in ours.refiner.state_dict().items()}
    cache = fast.accelerate_refiner(ours).cache
    assert fast.accelerate_refiner(ours).cache is cache
    after = ours.refiner.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {type(b).__name__ for b in ours.refiner.transformer_blocks} == {"FastRefinerBlock"}
    text, mask, fps = written.cond
    refined = [R.refine(stream.refiner, z, text, mask, fps=fps) for stream in (ours, written)]
    assert torch.equal(*refined)


def refiner_stream_error(device, dtype):
    """rel L2 of the accelerated stream's blocks against the stream as written's, the largest over the blocks."""
    (written, ours), z = refiner_streams(device=device, dtype=dtype)
    fast.accelerate_refiner(ours)
    errors = []
    for s, e in REFINER_BLOCKS:
        a, b = ours.refine(z[:, :, s:e]).double(), written.refine(z[:, :, s:e]).double()
        errors.append(((a - b).norm() / b.norm()).item())
    return max(errors)


@pytest.mark.gpu
def test_accelerated_refiner_stream_on_cuda():
    """On CUDA the accelerated stream's pointwise pieces are compiled: fp32 within the whole-model tolerance of the
    stream as written; bf16 within bf16 rounding (the fused pieces keep fp32 where the eager ops round to bf16)."""
    assert refiner_stream_error("cuda", torch.float32) <= MODEL_ATOL
    assert refiner_stream_error("cuda", torch.bfloat16) <= 1e-2
