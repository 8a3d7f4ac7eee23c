"""attention.py (RMSNorm, RoPE, UCPE, softmax self-attention, cross-attention) and the GDN self-attention layer
of gdn.py against diffusers 0.42.1, module by module, at tiny re-randomised sizes: fp32, <= 1e-6."""
import pytest
import torch
import torch.nn.functional as F
from diffusers.models import normalization
from diffusers.models.transformers import transformer_sana_wm as ref

from attention import (CrossAttention, RMSNorm, SoftmaxSelfAttention, apply_rope, block_causal_sdpa, frame_spans,
                       camera_rope_table, rms_cap, rope_table, ucpe)
from gdn import GDNSelfAttention, short_conv
from reference import max_rel_err, randomize_, tiny_camera

ATOL = 1e-6
C, HEADS, D = 48, 2, 24


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def camera_transforms(thw, head_dim=D, batch=2):
    """diffusers' (P, P^T, P^-1, rope_cam) for the tiny trajectory, shared by our layers and theirs."""
    raymap, _ = tiny_camera(thw)
    rope = ref.SanaWMRotaryPosEmbed(head_dim, (1, 1, 1), 1024)(thw)
    return ref._prepare_ucpe_ray_transforms(head_dim, raymap.expand(batch, *raymap.shape), thw, (1, 1, 1), rope)


def ours_camera(transforms):
    P, P_T, P_inv, rope_cam = transforms
    return P, P_T, P_inv, torch.view_as_real(rope_cam[0, 0])


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm(eps, dtype):
    theirs = randomize_(normalization.RMSNorm(C, eps=eps)).to(dtype)
    ours = RMSNorm(C, eps).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, C, generator=gen()).to(dtype)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("head_dim,thw", [(24, (3, 4, 6)), (112, (5, 3, 7))])
def test_rope_tables(head_dim, thw):
    theirs = ref.SanaWMRotaryPosEmbed(head_dim, (1, 1, 1), 1024)(thw)
    ours = rope_table(head_dim, thw)
    assert ours.dtype == torch.float32 and torch.equal(ours, torch.view_as_real(theirs[0, 0]))
    expected_cam = ref._slice_rope_for_cam(theirs, head_dim, head_dim // 2)[0, 0]
    assert torch.equal(camera_rope_table(ours, head_dim), torch.view_as_real(expected_cam))


@pytest.mark.parametrize("conjugate", [False, True])
def test_apply_rope(conjugate):
    thw = (3, 4, 6)
    table = rope_table(D, thw)
    x = torch.randn(2, 72, HEADS, D, generator=gen())
    freqs = torch.view_as_complex(table)
    freqs = freqs.conj() if conjugate else freqs
    theirs = ref._apply_rotary_emb(x.permute(0, 2, 3, 1), freqs).permute(0, 3, 1, 2)
    assert max_abs(apply_rope(x, table, conjugate), theirs) <= ATOL


@pytest.mark.parametrize("which,conjugate", [(0, True), (1, False), (2, False)])
def test_ucpe_and_rms_cap(which, conjugate):
    thw = (3, 4, 6)
    transforms = camera_transforms(thw)
    M, rope_cam = transforms[which], transforms[3]
    x = torch.randn(2, 72, HEADS, D, generator=gen(which))
    theirs = ref._apply_ucpe_transform(x.transpose(1, 2), M, rope_cam, inverse_rope=conjugate).transpose(1, 2)
    ours = ucpe(x, M, torch.view_as_real(rope_cam[0, 0]), conjugate)
    assert max_abs(ours, theirs) <= ATOL
    capped = ref._downscale_to_reference_rms(x.permute(0, 2, 3, 1), theirs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert max_abs(rms_cap(x, ours), capped) <= ATOL
    assert (rms_cap(x, ours).norm(dim=-1) <= x.norm(dim=-1) * (1 + 1e-6) + 1e-6).all()  # only ever scales down


def test_block_causal_sdpa():
    T, S = 5, 3
    q, k, v = (torch.randn(2, HEADS, T * S, 8, generator=gen(i)) for i in range(3))
    assert torch.equal(block_causal_sdpa(q, k, v, T, None), F.scaled_dot_product_attention(q, k, v))
    chunk_of = torch.arange(T * S) // S // 2
    dense_mask = chunk_of[:, None] >= chunk_of[None, :]  # frames of chunk c see chunks <= c
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
    assert max_abs(block_causal_sdpa(q, k, v, T, 2), expected) <= ATOL
    # Queries of some frames only (the memory mode's parts), crossing a chunk boundary or not.
    for chunk_size in (None, 2):
        whole = block_causal_sdpa(q, k, v, T, chunk_size)
        for first, stop in ((0, 1), (1, 4), (3, 5)):
            rows = slice(first * S, stop * S)
            part = block_causal_sdpa(q[:, :, rows], k, v, T, chunk_size, first_frame=first)
            assert max_abs(part, whole[:, :, rows]) <= ATOL


def test_frame_spans():
    assert frame_spans(0, 5, None) == [(0, 5)]
    assert frame_spans(0, 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert frame_spans(1, 7, 3, part_frames=2) == [(1, 3), (3, 5), (5, 6), (6, 7)]
    assert frame_spans(0, 5, None, part_frames=2) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("K,T", [(4, 5), (3, 2)])
def test_short_conv(K, T):
    theirs = randomize_(ref.SanaWMTemporalShortConvolution(C, K))
    x = torch.randn(2, T * 6, C, generator=gen())
    assert max_abs(short_conv(x, theirs.weight, T), theirs(x, T)) <= ATOL
    # It is the symmetric filter [w_0 .. w_{K-1} .. w_0] (as the official code), zero-padded in time.
    w = torch.cat([theirs.weight, theirs.weight.flip(-1)[..., 1:]], dim=-1)
    z = x.view(2, T, 6, C).permute(0, 2, 3, 1).reshape(-1, C, T)
    sym = F.conv1d(z, w, groups=C, padding=K - 1).view(2, 6, C, T).permute(0, 3, 1, 2).reshape(2, T * 6, C)
    assert max_abs(short_conv(x, theirs.weight, T), sym) <= ATOL


@pytest.mark.parametrize("K,T", [(4, 5), (3, 2), (1, 3), (7, 9)])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4, 11])
def test_short_conv_chunks_and_windows(K, T, chunk_size):
    """short_conv equals the symmetric filter written as a sum over frames, where a future frame counts only inside
    its chunk; and on frames lo.. of the video (the memory mode's windows) from frame lo + K - 1 on."""
    weight = torch.randn(C, 1, K, generator=gen(1))
    x = torch.randn(2, T * 6, C, generator=gen())
    z, w = x.view(2, T, 6, C), weight[:, 0]
    expected = torch.zeros_like(z)
    for t in range(T):
        for m in range(-(K - 1), K):
            same_chunk = chunk_size is None or (t + m) // chunk_size == t // chunk_size
            if 0 <= t + m < T and (m <= 0 or same_chunk):
                expected[:, t] += w[:, K - 1 - abs(m)] * z[:, t + m]
    expected = expected.view(2, T * 6, C)
    assert max_rel_err(short_conv(x, weight, T, chunk_size), expected) <= 1e-6
    lo = 1 if T > K else 0
    window = x.view(2, T, 6, C)[:, lo:].reshape(2, -1, C)
    exact = slice((K - 1) * 6 if lo else 0, None)
    got = short_conv(window, weight, T - lo, chunk_size, first_frame=lo)
    assert max_rel_err(got[:, exact], expected[:, lo * 6:][:, exact]) <= 1e-6


def test_cross_attention():
    theirs = randomize_(ref.MultiHeadCrossAttention(C, HEADS, qk_norm=True))
    ours = CrossAttention(C, HEADS)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, y = torch.randn(2, 30, C, generator=gen(0)), torch.randn(2, 7, C, generator=gen(1))
    mask = torch.ones(2, 7, dtype=torch.int16)
    mask[0, 4:] = 0
    expected = theirs(x, y[:, None], mask=mask)
    assert max_abs(ours(x, y, mask.bool()), expected) <= ATOL
    assert max_abs(ours(x, y, mask.bool()), ours(x, y.masked_fill(~mask.bool()[..., None], 7.0), mask.bool())) == 0


SELF_ATTENTION = {
    "softmax": (ref._SoftmaxUCPESinglePathLiteLA, lambda: SoftmaxSelfAttention(C, D)),
    "gdn": (ref.BidirectionalGDNUCPESinglePathLiteLA, lambda: GDNSelfAttention(C, D, 4)),
}


@pytest.mark.parametrize("kind", ["softmax", "gdn"])
@pytest.mark.parametrize("with_camera", [False, True])
@pytest.mark.parametrize("thw", [(3, 4, 6), (5, 2, 3)])
def test_self_attention(kind, with_camera, thw):
    """The full self-attention modules (paper §3.2-§3.3), with and without the UCPE camera branch."""
    ref_cls, make_ours = SELF_ATTENTION[kind]
    theirs = randomize_(ref_cls(C, C, cam_dim=C, cam_heads=HEADS, heads=HEADS, eps=1e-8, qk_norm=True,
                                patch_size=(1, 1, 1), conv_kernel_size=4).eval())
    ours = make_ours()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    T, h, w = thw
    u = torch.randn(2, T * h * w, C, generator=gen(3))
    rope = ref.SanaWMRotaryPosEmbed(D, (1, 1, 1), 1024)(thw)
    transforms = camera_transforms(thw) if with_camera else None
    raymap = torch.ones(1) if with_camera else None  # diffusers only checks that camera_conditions is not None
    expected = theirs(u, HW=thw, rotary_emb=rope, camera_conditions=raymap, ucpe_ray_transforms=transforms)
    got = ours(u, thw, torch.view_as_real(rope[0, 0]), ours_camera(transforms) if with_camera else None)
    assert max_abs(got, expected) <= ATOL
