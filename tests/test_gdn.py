"""gdn.py scan: the recurrence against diffusers, the torch and Triton forms against the recurrence (forward and
backward), the chunk-causal option. Triton runs in its interpreter on CPU (tiny sizes), natively on CUDA."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gdn
from reference import diffusers_gdn_bidirectional, max_rel_err

# Tiny sizes for the CPU interpreter; D=12 is not a power of two, so the kernels' masked padding is exercised.
B, T, S, H, D = 2, 5, 8, 2, 12


def make_inputs(b=B, t=T, s=S, h=H, d=D, dtype=torch.float32, device="cpu", seed=0, fused=False):
    """Random scan inputs as the layer makes them: relu'd, key-scaled q/k, rotated copies, beta in (0,1),
    decay in (0.5, 1). With fused=True, q_rot/k_rot/v are strided views of one (B, N, 3, H, D) tensor."""
    gen = torch.Generator(device).manual_seed(seed)
    n = t * s
    draw = torch.float64 if device == "cpu" else torch.float32   # release-size inputs are drawn on the GPU
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=draw, device=device)  # noqa: E731
    scale = (d * s) ** -0.5
    if fused:
        qkv = r(b, n, 3, h, d) * torch.tensor([1.0, scale, 1.0], dtype=draw, device=device)[:, None, None]
        q_rot, k_rot, v = qkv.to(dtype).unbind(2)
    else:
        q_rot, k_rot, v = r(b, n, h, d), r(b, n, h, d) * scale, r(b, n, h, d)
    q, k = r(b, n, h, d).relu(), r(b, n, h, d).relu() * scale
    beta = torch.rand(b, n, h, generator=gen, dtype=draw, device=device)
    decay = 0.5 + 0.5 * torch.rand(b, t, h, generator=gen, dtype=draw, device=device)
    return [x.to(dtype=dtype, device=device) for x in (q_rot, k_rot, v, beta, decay, q, k)]  # views stay views


@pytest.mark.parametrize("normalised", [True, False], ids=["normalised", "numerator"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_recurrent_matches_diffusers(normalised, dtype, tol):
    q_rot, k_rot, v, beta, decay, q, k = make_inputs(dtype=dtype)
    if not normalised:
        q = k = None
    ours = gdn.gdn_recurrent(q_rot, k_rot, v, beta, decay, q, k)
    ref = diffusers_gdn_bidirectional(q_rot, k_rot, v, beta, decay, q, k)
    assert ours.dtype == dtype and ours.shape == v.shape
    assert max_rel_err(ours, ref) <= tol


def test_recurrent_matches_diffusers_attention_module():
    """The whole diffusers core (key scaling, RoPE on the numerator stream, fp32 scans, division) vs ours."""
    from diffusers.models.transformers.transformer_sana_wm import SanaWMBidirectionalGDNAttention, _apply_rotary_emb

    _, _, v, beta, decay, q, k = make_inputs()
    gen = torch.Generator().manual_seed(3)
    freqs = torch.polar(torch.ones(T * S, D // 2), torch.rand(T * S, D // 2, generator=gen) * 6.3)[None, None]
    k_raw = k * (D * S) ** 0.5                                      # the module scales keys itself
    module = SanaWMBidirectionalGDNAttention(eps=1e-8)
    ref = module(q, k_raw, v, beta.permute(0, 2, 1).reshape(B, H, T, S), decay.permute(0, 2, 1),
                 torch.zeros(1), T, rotary_emb=freqs)
    rope = lambda x: _apply_rotary_emb(x.permute(0, 2, 3, 1), freqs).permute(0, 3, 1, 2)  # noqa: E731
    ours = gdn.gdn_recurrent(rope(q), rope(k), v, beta, decay, q, k)
    assert max_rel_err(ours.reshape(B, T * S, H * D), ref) <= 1e-5


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
def test_torch_form_matches_recurrent(chunk_size):
    args = make_inputs(dtype=torch.float64)
    ref = gdn.gdn_scan(*args, chunk_size=chunk_size, backend="reference")
    assert max_rel_err(gdn.gdn_scan(*args, chunk_size=chunk_size, backend="torch"), ref) <= 1e-12
    ref = gdn.gdn_scan(*args[:5], chunk_size=chunk_size, backend="reference")
    assert max_rel_err(gdn.gdn_scan(*args[:5], chunk_size=chunk_size, backend="torch"), ref) <= 1e-12


def _forward_backward(args, backend, chunk_size, weight):
    leaves = [x.detach().requires_grad_() if x is not None else None for x in args]
    out = gdn.gdn_scan(*leaves, chunk_size=chunk_size, backend=backend)
    grads = torch.autograd.grad((out.float() * weight).sum(), [x for x in leaves if x is not None])
    return out, grads


@pytest.mark.parametrize("normalised,chunk_size", [(True, None), (True, 2), (False, None), (False, 3)])
def test_triton_matches_torch_forward_backward(normalised, chunk_size):
    args = make_inputs(fused=True)                                  # q_rot/k_rot/v: strided views
    if not normalised:
        args[5:] = [None, None]
    weight = torch.randn(B, T * S, H, D, generator=torch.Generator().manual_seed(5))
    out, grads = _forward_backward(args, "triton", chunk_size, weight)
    out_ref, grads_ref = _forward_backward(args, "torch", chunk_size, weight)
    assert max_rel_err(out, out_ref) <= 1e-5
    names = ["q_rot", "k_rot", "v", "beta", "decay", "q", "k"]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert max_rel_err(g, g_ref) <= 1e-5, name


def test_triton_under_activation_checkpointing():
    """train.py recomputes each block in the backward (non-reentrant torch.utils.checkpoint), under which the
    operator's backward may unpack its saved tensors only once: same gradients as without checkpointing."""
    args = make_inputs()
    weight = torch.randn(B, T * S, H, D, generator=torch.Generator().manual_seed(5))
    _, grads = _forward_backward(args, "triton", None, weight)
    leaves = [x.detach().requires_grad_() for x in args]
    out = checkpoint(lambda *xs: gdn.gdn_scan(*xs, backend="triton"), *leaves, use_reentrant=False)
    grads_checkpointed = torch.autograd.grad((out.float() * weight).sum(), leaves)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_checkpointed))


def test_triton_bf16_pieces_are_float32_accurate():
    """bf16 inputs take the bf16-pieces products (`_dot_split`): the per-frame terms and the read-out still match
    float32 math on the same bf16 values to float32 accuracy."""
    q_rot, k_rot, v, beta, decay, q, k = make_inputs(dtype=torch.bfloat16)
    M, U = gdn._frame_terms_triton(k_rot, v, beta, k, T)
    M_ref, U_ref = gdn._frame_terms(k_rot, v, beta, k, T)
    assert max_rel_err(M, M_ref) <= 1e-6 and max_rel_err(U, U_ref) <= 1e-6
    X = gdn._scan_torch(M_ref, U_ref, decay.float().transpose(1, 2), None)
    out = gdn._read_out_triton(X, q_rot, q, 1e-8, torch.float32)
    assert max_rel_err(out, gdn._read_out(X, q_rot, q, T, 1e-8)) <= 1e-6


def test_triton_bf16_forward_backward():
    """bf16 inputs through the whole Triton path (bf16-pieces products forward and backward) against float32
    torch math on the same values: what remains is the bf16 rounding of outputs and gradients."""
    args = make_inputs(dtype=torch.bfloat16)
    args[4] = args[4].float()                                       # decay is float32 (as the official code)
    weight = torch.randn(B, T * S, H, D, generator=torch.Generator().manual_seed(5))
    out, grads = _forward_backward(args, "triton", 2, weight)
    out_ref, grads_ref = _forward_backward([x.float() for x in args], "torch", 2, weight)
    assert out.dtype == torch.bfloat16 and max_rel_err(out, out_ref) <= 1e-2
    for name, g, g_ref in zip(["q_rot", "k_rot", "v", "beta", "decay", "q", "k"], grads, grads_ref):
        assert g.dtype == (torch.float32 if name == "decay" else torch.bfloat16)
        assert max_rel_err(g, g_ref) <= 1e-2, name


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_chunk_causal(backend):
    """Frames of chunk k ignore every later frame; chunk_size >= T is the bidirectional scan."""
    chunk = 2                                                       # chunks [0,2) [2,4) [4,5)
    args, other = make_inputs(), make_inputs(seed=1)
    out = gdn.gdn_scan(*args, chunk_size=chunk, backend=backend)
    bidirectional = gdn.gdn_scan(*args, backend=backend)
    assert max_rel_err(gdn.gdn_scan(*args, chunk_size=T, backend=backend), bidirectional) <= 1e-6
    for changed_from in (2, 4):                                     # new inputs from this frame on
        mixed = [torch.cat([a[:, :changed_from * a.shape[1] // T], o[:, changed_from * a.shape[1] // T:]], 1)
                 for a, o in zip(args, other)]
        out_mixed = gdn.gdn_scan(*mixed, chunk_size=chunk, backend=backend)
        assert torch.equal(out[:, :changed_from * S], out_mixed[:, :changed_from * S])
        assert not torch.allclose(out[:, changed_from * S:], out_mixed[:, changed_from * S:])
    # whereas the bidirectional scan does see the future: frame 0 changes
    assert not torch.allclose(gdn.gdn_scan(*mixed, backend=backend)[:, :S], bidirectional[:, :S])


def test_auto_backend_on_cpu_is_torch():
    args = make_inputs()
    assert torch.equal(gdn.gdn_scan(*args), gdn.gdn_scan(*args, backend="torch"))


def test_bad_arguments():
    q_rot, k_rot, v, beta, decay, q, k = make_inputs()
    with pytest.raises(ValueError, match="k_rot"):
        gdn.gdn_scan(q_rot, k_rot[:, :-1], v, beta, decay)
    with pytest.raises(ValueError, match="q, k"):
        gdn.gdn_scan(q_rot, k_rot, v, beta, decay, q)
    with pytest.raises(ValueError, match="beta"):
        gdn.gdn_scan(q_rot, k_rot, v, beta[..., None], decay)
    with pytest.raises(ValueError, match="decay"):
        gdn.gdn_scan(q_rot, k_rot, v, beta, decay[:, :3])           # 3 frames do not divide 40 tokens
    with pytest.raises(ValueError, match="chunk_size"):
        gdn.gdn_scan(q_rot, k_rot, v, beta, decay, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        gdn.gdn_scan(q_rot, k_rot, v, beta, decay, backend="cuda")


# --- GPU (run on a CUDA machine): the release shape ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [None, 21])
def test_triton_release_shape_bf16(chunk_size):
    """B=1, H=20, D=112, T=121, S=880 in bf16: Triton forward and gradients vs float32 torch math on the same
    bf16 values, relative error <= 1e-2 (the bf16 rounding of outputs and gradients)."""
    args = make_inputs(1, 121, 880, 20, 112, dtype=torch.bfloat16, device="cuda", fused=True)
    args[4] = args[4].float()                                       # decay is float32 (as the official code)
    weight = torch.randn(1, 121 * 880, 20, 112, device="cuda")
    out, grads = _forward_backward(args, "triton", chunk_size, weight)
    ref_args = [x.float() for x in args]
    out_ref, grads_ref = _forward_backward(ref_args, "torch", chunk_size, weight)
    assert out.dtype == torch.bfloat16 and max_rel_err(out, out_ref) <= 1e-2
    for name, g, g_ref in zip(["q_rot", "k_rot", "v", "beta", "decay", "q", "k"], grads, grads_ref):
        assert max_rel_err(g, g_ref) <= 1e-2, name


@pytest.mark.gpu
def test_triton_float32_on_gpu():
    """float32 inputs take the tf32x3 products: float32 accuracy against the torch form on the GPU."""
    args = make_inputs(2, 11, 880, 4, 112, device="cuda")
    for a in (args, args[:5]):
        out = gdn.gdn_scan(*a, chunk_size=4, backend="triton")
        assert max_rel_err(out, gdn.gdn_scan(*a, chunk_size=4, backend="torch")) <= 1e-5
