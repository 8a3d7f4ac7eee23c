"""Speed on CUDA, apart from the paper's code: Triton inference kernels, custom operators and compiled blocks,
swapped into a built model by `accelerate`.

The model files (attention.py, gdn.py, dit.py) hold the components as the paper describes them; that code is what
the CPU, the tests and training run. For inference on CUDA, `accelerate(model)` gives the model's layers fast
subclasses of their own classes (the same parameters, state-dict keys and results up to rounding), the way
quantize.quantize_model swaps layers:

    FastSoftmaxSelfAttention, FastGDNSelfAttention   the per-head operand streams in one kernel (`head_stream`)
    FastGLUMBConvTemp                                 depthwise conv + GLU in one kernel, the temporal conv as
                                                      per-tap matrix products in the token layout
    FastBlock, FastFinalLayer                         compiled (torch.compile fuses the fp32 pointwise islands),
                                                      the Plücker embedder folded into each block's projection

and `accelerate_refiner(stream)` does the same for the LTX-2 refiner in the stream (refiner.RefinerStream): its K/V
window kept in place in per-layer buffers, the text's cross-attention K/V made once, the pointwise pieces compiled.

Each fast method falls back to the readable one when autograd records (the kernels have no backward) or the
tensors are not on CUDA, and each kernel is tested against the readable code it replaces (tests/, the Triton
interpreter on the CPU). gdn.py keeps its own Triton scan (with a backward: training uses it). generate.py and the
benchmarks call `accelerate` (and `accelerate_refiner`); measured speed: BENCHMARKS.md.
"""
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from attention import CameraSelfAttention, SoftmaxSelfAttention, frame_spans
from dit import Block, FinalLayer, GLUMBConvTemp, ffn_in_parts, ffn_middle_in_parts
from gdn import GDNSelfAttention
from refiner import (LayerKV, Refiner, RefinerBlock, RefinerStream, WindowKVCache, _check_forward, apply_rope,
                     rms_norm, text_bias)

RECOMPILE_LIMIT = 64  # compiled graphs per function (compiled_on_cuda); Dynamo's default is 8
# Below this many elements in its first tensor a call runs eagerly: a compiled call costs ~1 ms of CPU (its guards),
# more than fusing saves on small inputs; the streaming chunks (2,640 tokens) are launch-bound (BENCHMARKS.md).
COMPILE_MIN_ELEMENTS = 1 << 24


def use_kernels(x: torch.Tensor) -> bool:
    """The Triton inference kernels replace the readable code on CUDA tensors when no autograd graph is recorded
    (they have no backward); the CPU, the equivalence tests and training run the code as written."""
    return x.is_cuda and not torch.is_grad_enabled()


def compiled_on_cuda(fn=None, *, min_elements: Optional[int] = None):
    """Run fn through torch.compile when its tensors live on CUDA and no autograd graph is recorded (inference);
    elsewhere (the CPU, the tests, training) as written. A call whose first tensor has fewer than `min_elements`
    elements runs eagerly too (default: COMPILE_MIN_ELEMENTS, read at each call). As a decorator, bare or
    `@compiled_on_cuda(min_elements=...)`.

    Applied to the block, and to the pieces of it that the memory mode (dit.block_in_parts) calls one part at a
    time (inlined when called from a compiled block): its fp32 islands (as the official code: casts, modulation, gating,
    the GDN gates) are chains of pointwise ops, each one pass over memory when run op by op. Compiled, each chain
    is one kernel between the matmuls, attention kernels and GDN scans (BENCHMARKS.md: the step time).
    Inside a fused kernel the intermediate values stay fp32 where the code as written rounds them to bf16 between
    ops (Inductor's default): the compiled step is a little more precise than the reference, not bit-equal. The
    first call at a new shape compiles (seconds to a minute), for each of the model's shapes anew (every size,
    batch, camera on or off and block kind is one graph: up to RECOMPILE_LIMIT of them). Training stays
    eager: compiling the blocks' backward (through the GDN operator and activation checkpointing) did not finish
    an 81-frame training step within five minutes on an H200, and was not pursued."""
    if fn is None:
        return functools.partial(compiled_on_cuda, min_elements=min_elements)
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():                   # called from compiled code: inlined there
            return fn(*args, **kwargs)
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        least = COMPILE_MIN_ELEMENTS if min_elements is None else min_elements
        if first is None or not first.is_cuda or torch.is_grad_enabled() or first.numel() < least:
            return fn(*args, **kwargs)
        if compiled is None:  # made on first use, so that importing the module stays cheap
            # Sizes as constants (symbolic ones slow the indexing). No layout optimisation: made for conv nets, it
            # stores 4-d tensors channels-last, and our (B, N, H, D) heads would get the tokens innermost.
            compiled = torch.compile(fn, dynamic=False, options={"layout_optimization": False})
        # Dynamo's default of 8 graphs per function would send the blocks back to eager after four video sizes.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)
    return run


# ----------------------------------------------------------------------------------------------------------------
# The fast layers

class _FastOutput:
    """The camera branch's decoding (UCPE with P and the conjugate RoPE) by the kernel, then the shared output."""

    @compiled_on_cuda
    def output(self, u, main, oc, camera):
        if oc is None or not use_kernels(oc):
            return CameraSelfAttention.output(self, u, main, oc, camera)
        P, _, _, rope_cam = camera
        decoded = head_stream(oc, rope_cam, matrix=P, conjugate=True, dtype=u.dtype)[0]
        main = main.flatten(2).to(u.dtype) + self.out_proj_cam(decoded.flatten(2))
        return self.proj((main * F.silu(self.output_gate(u).float())).to(u.dtype))


class FastSoftmaxSelfAttention(_FastOutput, SoftmaxSelfAttention):
    @compiled_on_cuda
    def operands(self, u, rope, camera):
        if not use_kernels(u):
            return SoftmaxSelfAttention.operands(self, u, rope, camera)
        B, N, C = u.shape
        H, D = self.heads, self.head_dim
        q, k, v = self.qkv(u).view(B, N, 3, H, D).unbind(2)
        q, k = (head_stream(x, rope, norm=norm)[0] for x, norm in ((q, self.q_norm), (k, self.k_norm)))
        sdpa_dtype = torch.bfloat16 if u.dtype == torch.float32 else u.dtype   # as the layer's
        main = tuple(t.transpose(1, 2).to(sdpa_dtype) for t in (q, k, v))
        if camera is None:
            return main, None
        _, P_T, P_inv, rope_cam = camera
        qc, kc, vc = (proj(u).view(B, N, H, D) for proj in (self.q_proj_cam, self.k_proj_cam, self.v_proj_cam))
        rays = (head_stream(qc, rope_cam, norm=self.q_norm_cam, matrix=P_T, cap=self.rms_cap)[0],
                head_stream(kc, rope_cam, norm=self.k_norm_cam, matrix=P_inv, cap=self.rms_cap)[0],
                head_stream(vc, rope_cam, matrix=P_inv, cap=self.rms_cap)[0])
        return main, tuple(t.transpose(1, 2).to(torch.bfloat16) for t in rays)


class FastGDNSelfAttention(_FastOutput, GDNSelfAttention):
    gates = compiled_on_cuda(GDNSelfAttention.gates)

    @compiled_on_cuda
    def main_streams(self, u, num_frames, rope, chunk_size, first_frame=0):
        if not use_kernels(u) or isinstance(chunk_size, tuple):   # (the kernel takes chunks of one size)
            return GDNSelfAttention.main_streams(self, u, num_frames, rope, chunk_size, first_frame)
        B, N, C = u.shape
        q, k, v = self.qkv(u).view(B, N, 3, self.heads, self.head_dim).unbind(2)
        q_rot, q, _ = head_stream(q, rope, norm=self.q_norm, relu=True, keep_plain=True)
        k_rot, k, _ = head_stream(k, rope, norm=self.k_norm, relu=True, scale=self.key_scale(N // num_frames),
                                  conv=(self.conv_k.weight, num_frames, chunk_size, first_frame), keep_plain=True)
        return q_rot, k_rot, v, q, k

    @compiled_on_cuda
    def camera_streams(self, u, num_frames, camera, beta, chunk_size, first_frame=0):
        if not use_kernels(u) or isinstance(chunk_size, tuple):
            return GDNSelfAttention.camera_streams(self, u, num_frames, camera, beta, chunk_size, first_frame)
        B, N, C = u.shape
        T, S, H, D = num_frames, N // num_frames, self.heads, self.head_dim
        _, P_T, P_inv, rope_cam = camera
        qh = head_stream(self.q_proj_cam(u).view(B, N, H, D), rope_cam, norm=self.q_norm_cam, relu=True,
                         matrix=P_T, cap=self.rms_cap)[0]
        kh, _, inflation = head_stream(
            self.k_proj_cam(u).view(B, N, H, D), rope_cam, norm=self.k_norm_cam, relu=True, scale=self.key_scale(S),
            conv=(self.conv_k_cam.weight, T, chunk_size, first_frame), matrix=P_inv, cap=self.rms_cap, inflation=True)
        vh = head_stream(self.v_proj_cam(u).view(B, N, H, D), rope_cam, matrix=P_inv, cap=self.rms_cap)[0]
        divisor = inflation.to(kh.dtype).view(B, T, S, H).mean(2, keepdim=True).clamp_min(1.0)  # as the layer
        return qh, kh, vh, (beta.view(B, T, S, H) / divisor).view(B, N, H)


class FastGLUMBConvTemp(GLUMBConvTemp):
    def per_frame(self, images):
        if not use_kernels(images):
            return GLUMBConvTemp.per_frame(self, images)
        depth = self.depth_conv.conv
        hidden = F.silu(self.inverted_conv.conv(images))
        return self.point_conv.conv(depthwise_glu(hidden, depth.weight, depth.bias))

    def forward(self, m, thw, chunk_size=None):
        if not use_kernels(m) or type(self.t_conv) is not nn.Conv2d or isinstance(chunk_size, tuple):
            return ffn_in_parts(self, m, thw, chunk_size)
        B, N, C = m.shape
        z = ffn_middle_in_parts(self, m, thw)               # channels-last: in token order as a view
        return _temporal_residual_op(z.permute(0, 2, 3, 1).reshape(B, N, C), self.t_conv.weight, thw[0],
                                     chunk_size or thw[0])


class FastBlock(Block):
    forward = compiled_on_cuda(Block.forward)

    def plucker_map(self, w_e, b_e):
        """Both Plücker maps are linear, so for a dense plucker_proj their product is one 48 -> C map
        (W_b W_e, W_b b_e + b_b), made here in fp32: the (B, N, C) embedding never exists and each block reads 48
        channels a token instead of C (the same function; in bf16 the embedding's rounding is skipped)."""
        proj = self.plucker_proj
        if type(proj) is not nn.Linear:                     # e.g. an NVFP4 layer: embed, then project
            return Block.plucker_map(self, w_e, b_e)
        w_b = proj.weight.float()
        weight, bias = (w_b @ w_e.float()).to(w_e.dtype), (w_b @ b_e.float() + proj.bias.float()).to(w_e.dtype)
        return lambda p: F.linear(p, weight, bias)


class FastFinalLayer(FinalLayer):
    forward = compiled_on_cuda(FinalLayer.forward)


FAST = {SoftmaxSelfAttention: FastSoftmaxSelfAttention, GDNSelfAttention: FastGDNSelfAttention,
        GLUMBConvTemp: FastGLUMBConvTemp, Block: FastBlock, FinalLayer: FastFinalLayer}


def accelerate(model: nn.Module) -> nn.Module:
    """Give every layer of `model` (a dit.DiT or any part of one) its fast class, in place; returns the model.
    Parameters, buffers and state-dict keys are untouched; calling it again changes nothing."""
    for module in model.modules():
        fast = FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


# ----------------------------------------------------------------------------------------------------------------
# The refiner in the stream (refiner.RefinerStream: stage 2 of generate_stream, one block of 3 latent frames per
# stage-1 chunk, each block 3 Euler forwards + 1 history pass of the 48-layer LTX-2 transformer).
#
# As written (refiner.py §4-§7), every layer of every forward re-rotates the sink's keys and concatenates
# [sink; history; block] anew (at 704x1280 ~200 MB copied per layer), projects the constant text for the cross-
# attention again, and runs its pointwise chains (modulation, norms, gates) op by op. `accelerate_refiner(stream)`
# keeps the stream's state on the device in the form its forwards read:
#   WindowBuffers                  per layer one K and one V buffer laid out as the window, [rotated sink | history |
#                                  block], written in place: the sink rotated once per block, the block's K/V into
#                                  the slot after the history (so the history pass appends by advancing a count),
#                                  the history trimmed by moving it forward in place. Attention reads a view of the
#                                  filled prefix: the keys in the reference's concatenation order, so the same
#                                  attention bit for bit. Also the text's cross-attention K/V per layer, made once.
#   FastRefiner, FastRefinerBlock  the forward over those buffers, its pointwise chains as compiled pieces on CUDA
#                                  (between the matmuls and attention: the buffer writes stay eager).
# The model's classes are swapped as `accelerate` swaps the DiT's; under any other cache (refine(), training, the
# sink capture) they run the code as written.

# The pieces compiled on CUDA. At any size (min_elements=0): the refiner's stream is GPU-bound (each layer's matmuls
# take milliseconds at the release size), so the compiled calls' guards cost no time there.
@compiled_on_cuda(min_elements=0)
def _modulated_norm(x, table, temb, eps):
    """The block's modulation (B, 1 or N, 6, D) = table + temb, and the self-attention input
    rms_norm(x) * (1 + scale) + shift (RefinerBlock.forward)."""
    mod = table + temb.unflatten(-1, (6, -1))   # shift, scale, gate (self-attention); shift, scale, gate (FF)
    shift_msa, scale_msa = mod[:, :, 0], mod[:, :, 1]
    return rms_norm(x, eps) * (1 + scale_msa) + shift_msa, mod


@compiled_on_cuda(min_elements=0)
def _gated_residual_norm(x, attended, mod, eps):
    """x + gate * self-attention, and its rms_norm (the cross-attention's input)."""
    x = x + attended * mod[:, :, 2]
    return x, rms_norm(x, eps)


@compiled_on_cuda(min_elements=0)
def _residual_modulated_norm(x, attended, mod, eps):
    """x + cross-attention (no gate), and the FF's input rms_norm(x) * (1 + scale) + shift."""
    x = x + attended
    return x, rms_norm(x, eps) * (1 + mod[:, :, 4]) + mod[:, :, 3]


@compiled_on_cuda(min_elements=0)
def _gated_residual(x, ff, mod):
    return x + ff * mod[:, :, 5]


@compiled_on_cuda(min_elements=0)
def _normed_rotated(x, weight, eps, rope):
    """A self-attention query or key: the Attention's RMSNorm (nn.RMSNorm's own call), then RoPE."""
    return apply_rope(F.rms_norm(x, (x.shape[-1],), weight, eps), rope)


_rotated = compiled_on_cuda(apply_rope, min_elements=0)     # the sink's keys, once per block


@compiled_on_cuda(min_elements=0)
def _final_norm(x, table, e):
    """The output's layer norm and modulation (Refiner.forward)."""
    shift, scale = (table + e[:, :, None]).unbind(2)
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift


@dataclass(eq=False)
class WindowLayer(LayerKV):
    """One layer's state in WindowBuffers. LayerKV's fields keep their meaning: sink_k before RoPE (its own
    tensor), sink_v, hist_k and hist_v views of the buffers."""
    keys: Optional[torch.Tensor] = None     # (B, capacity, inner): [sink rotated | history | block | free]
    values: Optional[torch.Tensor] = None
    filled: int = 0                         # sink + history tokens
    sink_rotated: bool = False              # keys' sink slot holds the sink at the current block's offset
    text_k: Optional[torch.Tensor] = None   # (B, L, inner): the cross-attention's K/V of the stream's text
    text_v: Optional[torch.Tensor] = None

    def show(self) -> None:
        """Point LayerKV's fields at the buffers' sink and history (after each change of them)."""
        sink = self.sink_k.shape[1]
        self.sink_v = self.values[:, :sink]
        self.hist_k, self.hist_v = ((None, None) if self.filled == sink else
                                    (self.keys[:, sink:self.filled], self.values[:, sink:self.filled]))


class WindowBuffers(WindowKVCache):
    """A RefinerStream's WindowKVCache kept as per-layer window buffers (see above), with the same window, history
    and trimming; and the text's cross-attention K/V per layer, made at the first forward with the text.

    The sink is rotated at the first forward after each history pass: in a RefinerStream every forward between two
    history passes (one block's Euler steps and its history pass) has the same window, so the same sink offset."""

    def __init__(self, cache: WindowKVCache, room: int):
        """From `cache` (its sink captured, any history): buffers of sink + history + `room` tokens per layer."""
        super().__init__(len(cache.layers), cache.sink_frames)
        self.sink_rope = cache.sink_rope
        self.text_source = self.text_bias = None    # the (text, text_mask) the layers' text K/V were made from
        self.layers = [self._buffered(layer, room) for layer in cache.layers]

    @staticmethod
    def _buffered(layer: LayerKV, room: int) -> WindowLayer:
        sink = layer.sink_k.shape[1]
        hist = 0 if layer.hist_k is None else layer.hist_k.shape[1]
        B, _, inner = layer.sink_k.shape
        keys, values = (layer.sink_k.new_empty(B, sink + hist + room, inner) for _ in range(2))
        values[:, :sink] = layer.sink_v
        if hist:
            keys[:, sink:sink + hist], values[:, sink:sink + hist] = layer.hist_k, layer.hist_v
        buffered = WindowLayer(sink_k=layer.sink_k, keys=keys, values=values, filled=sink + hist)
        buffered.show()
        return buffered

    def window(self, layer: WindowLayer, k: torch.Tensor, v: torch.Tensor):
        """[sink (rotated now); history; current block] as views of the buffers, k and v written after the history."""
        end = layer.filled + k.shape[1]
        self._reserve(layer, end)
        if not layer.sink_rotated:
            layer.keys[:, :layer.sink_k.shape[1]] = _rotated(layer.sink_k.to(k.dtype), self.sink_rope)
            layer.sink_rotated = True
        layer.keys[:, layer.filled:end], layer.values[:, layer.filled:end] = k, v
        return layer.keys[:, :end], layer.values[:, :end]

    def append(self, layer: WindowLayer, tokens: int) -> None:
        """The history pass: the block's K/V, written after the history by `window`, join it; the block is done."""
        layer.filled += tokens
        layer.sink_rotated = False
        layer.show()

    def trim_history(self, keep_tokens: int):
        for layer in self.layers:
            sink = layer.sink_k.shape[1]
            drop = layer.filled - sink - keep_tokens
            if drop <= 0:
                continue
            for buffer in (layer.keys, layer.values):
                # The kept history moves `drop` tokens forward, in pieces of `drop` tokens: each piece's source lies
                # after its destination and after what the pieces before it wrote. (One copy between overlapping
                # ranges is refused by torch, or where it cannot tell, undefined: the GPU copies in parallel.)
                for i in range(sink + drop, layer.filled, drop):
                    j = min(i + drop, layer.filled)
                    buffer[:, i - drop:j - drop] = buffer[:, i:j]
            layer.filled -= drop
            layer.show()

    @staticmethod
    def _reserve(layer: WindowLayer, tokens: int) -> None:
        """Room for `tokens`: only a history that is never trimmed (kv_max_frames <= the sink's frames) outgrows
        the buffers made for it; they then double (at least)."""
        if tokens <= layer.keys.shape[1]:
            return
        for name in ("keys", "values"):
            old = getattr(layer, name)
            new = old.new_empty(old.shape[0], max(tokens, 2 * old.shape[1]), old.shape[2])
            new[:, :layer.filled] = old[:, :layer.filled]
            if old.is_cuda:     # the copy may run on another stream than old's: free old only after it
                old.record_stream(torch.cuda.current_stream(old.device))
            setattr(layer, name, new)
        layer.show()

    def text_inputs(self, model: "FastRefiner", text, text_mask, dtype):
        """The cross-attention's text bias, and per layer its K/V in `text_k`/`text_v`: made at the first forward
        with these (text, text_mask) tensors (a stream passes the same ones to every forward), as Refiner.forward
        and Attention.qkv make them."""
        if self.text_source is None or self.text_source[0] is not text or self.text_source[1] is not text_mask:
            context = model.caption_projection(text)
            for block, layer in zip(model.transformer_blocks, self.layers):
                attn2 = block.attn2
                layer.text_k, layer.text_v = attn2.norm_k(attn2.to_k(context)), attn2.to_v(context)
            self.text_bias = text_bias(text_mask, dtype)
            self.text_source = (text, text_mask)
        return self.text_bias


class FastRefinerBlock(RefinerBlock):
    def window_forward(self, x, text_bias, temb, rope, kv: WindowLayer, cache: WindowBuffers, capture):
        """RefinerBlock.forward over the window buffers: the same steps, the text's K/V from the cache, the pointwise
        chains as the compiled pieces above."""
        h, mod = _modulated_norm(x, self.scale_shift_table, temb, self.eps)
        x, h = _gated_residual_norm(x, self.window_attention(h, rope, kv, cache, capture), mod, self.eps)
        attn2 = self.attn2
        attended = attn2.attend(attn2.norm_q(attn2.to_q(h)), kv.text_k, kv.text_v, text_bias)
        x, h = _residual_modulated_norm(x, attended, mod, self.eps)
        return _gated_residual(x, self.ff(h), mod)

    def window_attention(self, h, rope, kv: WindowLayer, cache: WindowBuffers, capture):
        """RefinerBlock.self_attention with a cache: the history pass appends by advancing the window's count."""
        attn1 = self.attn1
        q = _normed_rotated(attn1.to_q(h), attn1.norm_q.weight, attn1.norm_q.eps, rope)
        k = _normed_rotated(attn1.to_k(h), attn1.norm_k.weight, attn1.norm_k.eps, rope)
        keys, values = cache.window(kv, k, attn1.to_v(h))
        if capture == "history":
            cache.append(kv, k.shape[1])
        return attn1.attend(q, keys, values)


class FastRefiner(Refiner):
    def forward(self, tokens, timestep, text, rope, text_mask=None, cache: WindowKVCache | None = None,
                capture: str | None = None) -> torch.Tensor:
        """Refiner.forward; over WindowBuffers by the blocks' window_forward, with the text's K/V made once."""
        if not isinstance(cache, WindowBuffers):
            return Refiner.forward(self, tokens, timestep, text, rope, text_mask, cache, capture)
        _check_forward(self, cache, capture)
        if capture == "sink":
            raise ValueError("capture='sink': window buffers are made from a cache whose sink is captured")
        B = tokens.shape[0]
        x = self.proj_in(tokens)
        temb, e = self.time_embed(timestep.flatten(), x.dtype)
        temb, e = temb.view(B, -1, temb.shape[-1]), e.view(B, -1, e.shape[-1])
        text_bias = cache.text_inputs(self, text, text_mask, tokens.dtype)
        for block, kv in zip(self.transformer_blocks, cache.layers):
            x = block.window_forward(x, text_bias, temb, rope, kv, cache, capture)
        return self.proj_out(_final_norm(x, self.scale_shift_table, e))


FAST_REFINER = {Refiner: FastRefiner, RefinerBlock: FastRefinerBlock}


def accelerate_refiner(stream: RefinerStream) -> RefinerStream:
    """Make `stream` (its sink captured, any number of blocks refined) run on WindowBuffers with its refiner's fast
    classes, in place; returns it. The same results: on the CPU bit for bit (tests/test_fast.py), on CUDA up to the
    compiled pieces' rounding. The refiner's classes change (as `accelerate` changes the DiT's): under any other
    cache it runs as written. Calling it again changes nothing."""
    if type(stream.refiner) not in (Refiner, FastRefiner):
        raise ValueError(f"stream: its refiner must be a refiner.Refiner, got {type(stream.refiner).__name__}")
    for module in stream.refiner.modules():
        fast = FAST_REFINER.get(type(module))
        if fast is not None:
            module.__class__ = fast
    if not isinstance(stream.cache, WindowBuffers):
        h, w = stream.sink_shape[3:]        # room for the history up to max_hist frames, then a block
        stream.cache = WindowBuffers(stream.cache, (max(stream.max_hist - stream.hist, 0) + stream.block_size) * h * w)
    return stream


# ----------------------------------------------------------------------------------------------------------------
# Kernel: a projection's per-head stream in one pass. The operands of both self-attention variants are chains of
# pointwise steps (GDN short conv, RMSNorm over C, ReLU, key scale, RoPE or UCPE, RMS cap); run op by op (or as
# Inductor fuses them) they take several passes over (B, N, C) tensors. `head_stream` reads the projection once and
# writes the operand (and the plain stream where the scan needs it): BENCHMARKS.md, the DiT step.

@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """v rounded to the stream's dtype and back to fp32: where the code as written stores an intermediate tensor."""
    return v.to(dtype).to(tl.float32)


@triton.jit
def _stream_input(xh, taps_h, rows, d, mask, t, S, T, chunk, first_frame, sxn, K: tl.constexpr):
    """One head's input at token rows and head channels d (broadcastable index tiles), fp32; with K > 0 its
    symmetric temporal short conv (gdn.short_conv): sum over |m| < K of w_{K-1-|m|} x[t+m] inside [0, T), the
    future frames only inside t's chunk (chunks counted from the video's frame 0, the tile's first frame being
    first_frame)."""
    y = tl.load(xh + rows * sxn + d, mask=mask, other=0.0).to(tl.float32)
    if K > 0:
        y *= tl.load(taps_h + d * K + (K - 1), mask=mask, other=0.0).to(tl.float32)
        for m in tl.static_range(1, K):
            w = tl.load(taps_h + d * K + (K - 1 - m), mask=mask, other=0.0).to(tl.float32)
            past = tl.load(xh + (rows - m * S) * sxn + d, mask=mask & (t >= m), other=0.0).to(tl.float32)
            same_chunk = (first_frame + t + m) // chunk == (first_frame + t) // chunk
            ahead = mask & (t + m < T) & same_chunk
            y += w * (past + tl.load(xh + (rows + m * S) * sxn + d, mask=ahead, other=0.0).to(tl.float32))
    return y


@triton.jit
def _plain_stream(xh, stash_h, norm_h, rows, d, mask, rstd, scale, C, sxn,
                  dtype: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, RELU: tl.constexpr):
    """The stream before its rotation: (short conv, read back from the stash) -> RMSNorm -> ReLU -> scale, in fp32,
    rounded where the code as written stores a tensor."""
    if K > 0:
        y = tl.load(stash_h + rows * C + d, mask=mask, other=0.0).to(tl.float32)
    else:
        y = tl.load(xh + rows * sxn + d, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        w = tl.load(norm_h + d, mask=mask, other=0.0).to(tl.float32)
        y = _rounded(_rounded(y * rstd, dtype) * w, dtype)
    if RELU:
        y = tl.maximum(y, 0.0)
    return _rounded(y * scale, dtype)


@triton.jit
def _squares(v):
    """Per token and head: the sum of squares of a (tokens, heads, a, b) tile, kept as (tokens, heads, 1, 1)."""
    return tl.sum(tl.sum(v * v, 3, keep_dims=True), 2, keep_dims=True)


@triton.jit
def _head_stream_kernel(x, taps, norm_w, table, mat, out, plain, infl,
                        S, T, chunk, first_frame, eps, scale, sxb, sxn, sxh, stn, smb, smn, smi, smj,
                        H: tl.constexpr, D: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, RELU: tl.constexpr,
                        UCPE: tl.constexpr, CONJ: tl.constexpr, CAP: tl.constexpr, PLAIN: tl.constexpr,
                        INFL: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """One program per (block of BT tokens, batch row); tiles (tokens, heads, channels, 2 or 4), BH heads at a time
    (loads of several heads in flight, not one head's round trip after another). Pass 1 (with NORM): the RMS
    statistic over all C = H*D channels, the short conv's output (K > 0) stashed in `out`. Pass 2: the plain
    stream (stored to `plain` with PLAIN), then RoPE over each head (table (n, D/2, 2)) or UCPE (a 4x4 matrix per
    token on the first half of the head, RoPE table (n, D/4, 2) on the second), optionally RMS-capped against the
    plain head; INFL stores (|capped| / |plain|)^2 per token and head."""
    b = tl.program_id(1).to(tl.int64)
    N, C = S * T, H * D
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)[:, None, None, None]  # (BT, 1, 1, 1)
    t, tok = rows // S, rows < N
    heads = tl.arange(0, BH)[None, :, None, None]
    dtype = out.dtype.element_ty                           # the stream's dtype, where the code as written rounds
    xb, ob = x + b * sxb, out + b * N * C
    two = tl.arange(0, 2)[None, None, None, :]
    p = tl.arange(0, BD // 2)[None, None, :, None]
    dp, mp = 2 * p + two, tok & (p < D // 2)               # channel pairs (2p, 2p+1) of a head
    rstd = tl.full((BT, 1, 1, 1), 1.0, tl.float32)
    if NORM:
        ss = tl.zeros((BT, 1, 1, 1), tl.float32)
        for h0 in range(0, H, BH):
            h = h0 + heads
            mask = mp & (h < H)
            y = _rounded(_stream_input(xb + h * sxh, taps + h * D * K, rows, dp, mask, t, S, T, chunk, first_frame,
                                       sxn, K), dtype)
            if K > 0:
                tl.store(ob + h * D + rows * C + dp, y.to(dtype), mask=mask)
            ss += tl.sum(_squares(y), 1, keep_dims=True)
        rstd = tl.rsqrt(ss / C + eps)
        if K > 0:
            tl.debug_barrier()                              # the stash is read back by other threads
    if UCPE:
        g, q = tl.arange(0, BD // 8)[None, None, :, None], tl.arange(0, BD // 4)[None, None, :, None]
        four = tl.arange(0, 4)[None, None, None, :]
        da, ma = 4 * g + four, tok & (g < D // 8)                                    # 4-groups of the first half
        db, mb = D // 2 + 2 * q + two, tok & (q < D // 4)                            # pairs of the second half
        cos, sin = tl.split(tl.load(table + rows * stn + 2 * q + two, mask=mb, other=0.0))
        m_row = mat + b * smb + rows * smn + four * smi                              # M[:, j] along the last dim
    else:
        cos, sin = tl.split(tl.load(table + rows * stn + dp, mask=mp, other=0.0))
    if CONJ:
        sin = -sin
    for h0 in range(0, H, BH):
        h = h0 + heads
        xh, stash_h, norm_h, oh = xb + h * sxh, ob + h * D, norm_w + h * D, ob + h * D + rows * C
        if UCPE:
            a = _plain_stream(xh, stash_h, norm_h, rows, da, ma & (h < H), rstd, scale, C, sxn, dtype, K, NORM, RELU)
            r = _plain_stream(xh, stash_h, norm_h, rows, db, mb & (h < H), rstd, scale, C, sxn, dtype, K, NORM, RELU)
            # (M a_g)_i = sum_j M_ij a_gj for each 4-group g, as in `ucpe`, accumulated in fp32 and rounded once
            ra = tl.zeros_like(a)
            for j in tl.static_range(4):
                a_j = tl.sum(tl.where(four == j, a, 0.0), 3, keep_dims=True)
                ra += a_j * tl.load(m_row + j * smj, mask=tok, other=0.0).to(tl.float32)
            ra = _rounded(ra, dtype)
            r0, r1 = tl.split(r)
            rb = _rounded(tl.join(r0 * cos - r1 * sin, r0 * sin + r1 * cos), dtype)
            ref = _squares(a) + _squares(r)
            if CAP:                                         # rms_cap(plain, rotated), eps 1e-6
                ratio = tl.sqrt(ref / D + 1e-6) / tl.maximum(tl.sqrt((_squares(ra) + _squares(rb)) / D + 1e-6), 1e-6)
                ratio = tl.minimum(ratio, 1.0)
                ra, rb = _rounded(ra * ratio, dtype), _rounded(rb * ratio, dtype)
            if INFL:
                grown = tl.maximum(tl.sqrt(_squares(ra) + _squares(rb)), 1e-6) / tl.maximum(tl.sqrt(ref), 1e-6)
                tl.store(infl + (b * N + rows) * H + h, grown * grown, mask=tok & (h < H))
            tl.store(oh + da, ra.to(dtype), mask=ma & (h < H))
            tl.store(oh + db, rb.to(dtype), mask=mb & (h < H))
        else:
            mask = mp & (h < H)
            y = _plain_stream(xh, stash_h, norm_h, rows, dp, mask, rstd, scale, C, sxn, dtype, K, NORM, RELU)
            if PLAIN:
                tl.store(plain + b * N * C + h * D + rows * C + dp, y.to(dtype), mask=mask)
            y0, y1 = tl.split(y)
            tl.store(oh + dp, tl.join(y0 * cos - y1 * sin, y0 * sin + y1 * cos).to(dtype), mask=mask)


# Tokens and heads per program, warps: measured at the release shape on an H200 (bench/head_stream.py, BENCHMARKS.md).
HEAD_STREAM_LAUNCH = dict(tokens=1, heads=4, warps=1)


def _head_stream_launch(x: torch.Tensor, taps: Optional[torch.Tensor], num_frames: int, chunk: int, first_frame: int,
                        norm_weight: Optional[torch.Tensor], eps: float, relu: bool, scale: float,
                        table: torch.Tensor, matrix: Optional[torch.Tensor], conjugate: bool, cap: bool,
                        keep_plain: bool, inflation: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    """`_head_stream_kernel` launched: [out (B, n, H, D), plain (B, n, H, D), both in dtype, inflation (B, n, H)
    fp32], the last two empty unless asked for."""
    B, N, H, D = x.shape
    out = x.new_empty(B, N, H, D, dtype=dtype)
    plain = torch.empty_like(out) if keep_plain else x.new_empty(0)
    infl = x.new_empty(B, N, H, dtype=torch.float32) if inflation else x.new_empty(0)
    table = table.contiguous()
    K = 0 if taps is None else taps.shape[-1]
    mat = table if matrix is None else matrix               # (unread without UCPE)
    BT = HEAD_STREAM_LAUNCH["tokens"]
    _head_stream_kernel[(triton.cdiv(N, BT), B)](
        x, x if taps is None else taps, x if norm_weight is None else norm_weight, table, mat, out, plain, infl,
        N // num_frames, num_frames, chunk, first_frame, eps, scale, x.stride(0), x.stride(1), x.stride(2),
        table.stride(0), *((0,) * 4 if matrix is None else matrix.stride()),
        H=H, D=D, K=K, NORM=norm_weight is not None, RELU=relu, UCPE=matrix is not None, CONJ=conjugate, CAP=cap,
        PLAIN=keep_plain, INFL=inflation, BT=BT, BH=HEAD_STREAM_LAUNCH["heads"], BD=max(16, triton.next_power_of_2(D)),
        num_warps=HEAD_STREAM_LAUNCH["warps"])
    return [out, plain, infl]


# An operator for torch.compile to call as it is; eager callers launch directly (the operator's dispatch costs
# ~0.1 ms of CPU a call, which the streaming chunks, launch-bound, would feel).
_head_stream_op = torch.library.custom_op("nano_sana_wm::head_stream", _head_stream_launch, mutates_args=())


@_head_stream_op.register_fake
def _head_stream_shapes(x, taps, num_frames, chunk, first_frame, norm_weight, eps, relu, scale, table, matrix,
                        conjugate, cap, keep_plain, inflation, dtype):
    B, N, H, D = x.shape
    out = x.new_empty(B, N, H, D, dtype=dtype)
    return [out, torch.empty_like(out) if keep_plain else x.new_empty(0),
            x.new_empty(B, N, H, dtype=torch.float32) if inflation else x.new_empty(0)]


def head_stream(x, table, *, norm=None, relu=False, scale=1.0, conv=None, matrix=None, conjugate=False, cap=False,
                keep_plain=False, inflation=False, dtype=None):
    """The fused form of a per-head stream (inference, CUDA; any float dtype in Triton's interpreter), for x
    (B, n, H, D) with channels contiguous (a view of a projection's output is fine):

        x -> [short conv over frames: conv = (weight (C, 1, K), num_frames, chunk_size, first_frame), gdn.short_conv]
          -> [norm: an RMSNorm over C] -> [ReLU] -> * scale                                    = the plain stream
          -> apply_rope(., table) (matrix None) or ucpe(., matrix, table, conjugate) -> [rms_cap(plain, .)]

    x is first converted to dtype (default: x's). Returns (out, the plain stream if keep_plain, else None, both in
    dtype; (|capped| / |plain|)^2 per token and head (fp32, UCPE only) if inflation, else None). fp32 inside, rounded
    to dtype where the readable code stores a tensor; `tests/test_attention.py` holds it equal to the readable
    composition."""
    taps, num_frames, chunk_size, first_frame = (None, 1, None, 0) if conv is None else conv
    if taps is not None:
        taps = taps.view(taps.shape[0], taps.shape[-1])
        if norm is None:
            raise ValueError("conv: the fused short conv needs a norm after it")
    if x.stride(-1) != 1:
        raise ValueError(f"x: expected contiguous channels (stride 1 in the last dim), got strides {x.stride()}")
    if matrix is None and (cap or inflation):
        raise ValueError("cap, inflation: apply to the UCPE stream only; give matrix too")
    if matrix is not None and keep_plain:
        raise ValueError("keep_plain: the plain stream is kept for RoPE streams only (matrix None)")
    launch = _head_stream_op if torch.compiler.is_compiling() else _head_stream_launch
    out, plain, infl = launch(
        x, taps, num_frames, chunk_size or first_frame + num_frames, first_frame, None if norm is None else norm.weight,
        0.0 if norm is None else norm.eps, relu, float(scale), table, matrix, conjugate, cap, keep_plain, inflation,
        dtype or x.dtype)
    return out, plain if keep_plain else None, infl if inflation else None

# ----------------------------------------------------------------------------------------------------------------
# Kernel: the FFN's depthwise conv + GLU in one pass

def depthwise_glu(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The FFN's middle (paper Fig. 2) after the SiLU: the 3x3 depthwise conv (zero padding 1, weight (2F, 1, 3, 3),
    bias (2F,)) and the GLU value * SiLU(gate) of its two channel halves, s (n, 2F, h, w) -> (n, F, h, w)
    channels-last, as one Triton kernel (`_depthwise_glu_kernel`): the FFN's widest tensor is read once and only
    the half-width result written (a depthwise conv kernel and the GLU's pointwise ops are three passes)."""
    if bias is None:
        bias = s.new_zeros(s.shape[1])
    launch = _depthwise_glu_op if torch.compiler.is_compiling() else _depthwise_glu_launch
    return launch(s, weight, bias).permute(0, 3, 1, 2)


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


def _depthwise_glu_launch(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """depthwise_glu's kernel; returns (n, h, w, F) contiguous."""
    n, c2, h, w = s.shape
    out = s.new_empty(n, h, w, c2 // 2)
    taps = weight.view(c2, 9).T.float().contiguous()        # (9, 2F): tap 3*di + dj of every channel
    BP, BC = 64, 32  # 0.79 ms at the release's 22-frame part on an H200, 0.87 with 64 x 64 (BENCHMARKS.md)
    _depthwise_glu_kernel[(triton.cdiv(c2 // 2, BC), triton.cdiv(h * w, BP), n)](
        s, taps, bias.float().contiguous(), out, h, w, c2 // 2, s.stride(0), s.stride(2), s.stride(3), s.stride(1),
        BP=BP, BC=BC, num_warps=4)
    return out


_depthwise_glu_op = torch.library.custom_op("nano_sana_wm::depthwise_glu", _depthwise_glu_launch, mutates_args=())


@_depthwise_glu_op.register_fake
def _depthwise_glu_shape(s, weight, bias):
    n, c2, h, w = s.shape
    return s.new_empty(n, h, w, c2 // 2)

# ----------------------------------------------------------------------------------------------------------------
# Operator: the FFN's temporal conv in the token layout

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
