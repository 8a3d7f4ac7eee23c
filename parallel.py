"""Sequence parallelism: the latent frames of one video split over the ranks of a torch.distributed process group
(NCCL on GPUs, gloo on CPUs), for sampling (`torchrun --nproc_per_node N generate.py ...`, `generate(group=)`) and
training (`torchrun ... train.py train --sequence_parallel N`).

Not a paper component: a driver of the pieces every mode runs over a span of frames with state in and out (README,
"Running blocks over spans of frames"). Rank r holds frames [t0, t1) (`frame_split`: contiguous, as even as the
count allows, 11 frames on 3 ranks as 4 + 4 + 3) and runs every frame-local part of the DiT on them alone. The three
temporal operators read the other ranks, each through one all-gather:

- GDN blocks: per frame the state is affine in the state before, S_t = S_{t-1} A_t + U_t (gdn.py's DxD form), so the
  frames of rank q compose into one map  S_{b-1} = S_{a-1} A_q + U_q  of its span [a, b):
      A_q = A_a ... A_{b-1},    U_q = sum_t U_t A_{t+1} ... A_{b-1}    (U_q: the span scanned from zero).
  The backward scan composes the same way in reversed time, S^b_{a-1} = S^b_{b-1} A_q^T + V_q (A_t is symmetric, so
  A_{b-1} ... A_a = A_q^T), with V_q its span scanned from zero, and A_q^T replaced by 0 when a chunk starts in
  [a, b) (chunk-causal: the backward scan restarts there). Every rank all-gathers the maps (A_q, U_q, V_q), fp32
  (per rank and head (4D + 2) x D numbers with the normaliser, 3D x D for the camera branch), and folds its exact
  incoming states:
      S_in(r)   = (...((0 A_0 + U_0) A_1 + U_1) ...) A_{r-1} + U_{r-1}
      S^b_in(r) = (...((0 A_{N-1}^T + V_{N-1}) A_{N-2}^T + V_{N-2}) ...) A_{r+1}^T + V_{r+1}
  then scans its own frames from them (`scan_parallel`): the numerator, the normaliser (state row D, with its own
  transitions from the plain keys) and the camera branch alike.
- softmax blocks: the keys and values of every rank are all-gathered (both branches) and the rank's queries attend
  to them (attention.SoftmaxSelfAttention.attend, chunk-causal masks included): any number of ranks and heads.
- temporal convolutions (the GDN short convs on K, the FFN's temporal conv): each rank publishes its first and last
  few frames (the convolutions' reach) and reads its neighbours' (`halo`; past a chunk's end the convolution reads
  nothing, as in the whole video).

Each collective is an all-gather whose backward is an all-to-all of the gradients, so training differentiates
through them. Equal to the DiT on the whole video in one process up to rounding (tests/test_parallel.py: <= 1e-5 on 2
to 4 processes, uneven splits, camera, chunk-causal); the communication per step: bench/parallel.py.
"""
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attention import camera_rows, frame_spans, rope_table
from dit import (_check_inputs, crop_text, ffn_middle_in_parts, gated, modulate, span_camera, temporal_residual,
                 timestep_sinusoid)
from gdn import GDNSelfAttention, frame_terms, read_out, scan_states


def frame_split(num_frames: int, ranks: int) -> tuple[tuple[int, int], ...]:
    """(start, stop) of each rank's frames: contiguous, in rank order, the first num_frames % ranks one longer."""
    if ranks < 1 or num_frames < ranks:
        raise ValueError(f"num_frames: splitting over {ranks} ranks needs at least {ranks} latent frames, "
                         f"got {num_frames}")
    size, longer = divmod(num_frames, ranks)
    bounds = [r * size + min(r, longer) for r in range(ranks + 1)]
    return tuple(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class Split:
    """How one video's latent frames lie over a process group: rank q holds frames spans[q] = [a, b)."""
    group: object   # the process group (None: the default one)
    spans: tuple
    rank: int       # this process's rank in the group

    @classmethod
    def of(cls, group, num_frames: int, spans=None) -> "Split":
        ranks = dist.get_world_size(group)
        spans = frame_split(num_frames, ranks) if spans is None else tuple(tuple(s) for s in spans)
        bounds = [0] + [b for _, b in spans]
        if len(spans) != ranks or any(a != bounds[i] or b <= a for i, (a, b) in enumerate(spans)) \
                or bounds[-1] != num_frames:
            raise ValueError(f"spans: expected {ranks} non-empty (start, stop) spans covering frames 0..{num_frames} "
                             f"in order, got {spans}")
        return cls(group, spans, dist.get_rank(group))

    @property
    def start(self) -> int:
        return self.spans[self.rank][0]

    @property
    def stop(self) -> int:
        return self.spans[self.rank][1]

    @property
    def num_frames(self) -> int:
        return self.spans[-1][1]


# --------------------------------------------------------------------------------------------------------------
# The collectives: one differentiable all-gather, used for the frames of all ranks and for the halos.

class _AllGather(torch.autograd.Function):
    """(ranks, *x.shape): every rank's x in rank order. Backward: each rank's own x gets the gradients that every rank
    computed for it (an all-to-all), summed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty(dist.get_world_size(group), *x.shape)
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        mine = torch.empty_like(grad)
        dist.all_to_all(list(mine.unbind(0)), list(grad.contiguous().unbind(0)), group=ctx.group)
        return mine.sum(0), None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGather.apply(x, group)


def _padded(x, dim: int, length: int):
    """x with zeros appended along dim up to length (the collectives take tensors of one size on all ranks)."""
    if x.shape[dim] == length:
        return x
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim)


def gather_frames(x: torch.Tensor, split: Split, dim: int, size: int) -> torch.Tensor:
    """The whole video's tensor from each rank's x, whose frames lie along dim, `size` entries per frame."""
    longest = max(b - a for a, b in split.spans)
    pieces = all_gather(_padded(x, dim, longest * size), split.group)
    return torch.cat([pieces[q].narrow(dim, 0, (b - a) * size) for q, (a, b) in enumerate(split.spans)], dim)


def halo(x: torch.Tensor, split: Split, frames: int, dim: int, size: int):
    """(x with up to `frames` frames of the other ranks on either side, as far as the video reaches; lo, hi: the
    frames [lo, hi) it then holds). Each rank publishes its first and last `frames` frames (all, if it has fewer):
    whatever any rank reads of it, even of a neighbour shorter than the halo."""
    t0, t1 = split.start, split.stop
    lo, hi = max(0, t0 - frames), min(split.num_frames, t1 + frames)
    if frames == 0:
        return x, t0, t1
    k = min(frames, t1 - t0)
    edges = [_padded(x.narrow(dim, at * size, k * size), dim, frames * size) for at in (0, t1 - t0 - k)]
    pieces = all_gather(torch.cat(edges, dim), split.group)
    before, after = [], []
    for q, (a, b) in enumerate(split.spans):
        if a < t0 and b > lo:     # an earlier rank: frames [max(a, lo), b) of its last ones, [max(a, b - frames), b)
            since = max(a, lo)
            before.append(pieces[q].narrow(dim, (frames + since - max(a, b - frames)) * size, (b - since) * size))
        if a >= t1 and a < hi:    # a later rank: frames [a, min(b, hi)) of its first ones
            after.append(pieces[q].narrow(dim, 0, (min(b, hi) - a) * size))
    return torch.cat(before + [x] + after, dim), lo, hi


def _chunks_from(chunk_size, lo: int, hi: int):
    """The causal chunks of the whole video as frames [lo, hi) see them, counted from lo (chunk starts from 0)."""
    return None if chunk_size is None else tuple(start - lo for start, _ in frame_spans(lo, hi, chunk_size))


# --------------------------------------------------------------------------------------------------------------
# The GDN scan across ranks (the module docstring's composition)

def _span_transition(M, decay):
    """A_a ... A_{b-1} (B, H, NA, D, D) of a span's per-frame terms M (B, H, T, NA, D, D) and decay (B, T, H),
    A_t = g_t (I - M_t) per row group (numerator, normaliser): a tree of products, the order kept."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    A = decay.transpose(1, 2)[..., None, None, None] * (eye - M)
    while A.shape[2] > 1:
        even = A.shape[2] // 2 * 2
        A = torch.cat([A[:, :, 0:even:2] @ A[:, :, 1:even:2], A[:, :, even:]], 2)
    return A[:, :, 0]


def _times(X, A):
    """X A for states X (B, H, R, D) and maps A (B, H, NA, D, D): rows < D through A[:, :, 0], row D through the
    normaliser's A[:, :, 1]."""
    D = X.shape[-1]
    XA = X[..., :D, :] @ A[:, :, 0]
    return XA if X.shape[-2] == D else torch.cat([XA, X[..., D:, :] @ A[:, :, 1]], -2)


def scan_parallel(branches, decay, chunk_size, split: Split):
    """The states X (2, B, H, T, R, D) that gdn.scan_states gives on the whole video, at this rank's frames: one per
    branch, from its per-frame terms (M, U) of these frames (gdn.frame_terms); decay (B, T, H) of these frames.

    Each span is scanned with one stand-in frame on either side (no transition: A = I; U: the state it brings in,
    zero at first), whose states are the span's maps: the forward state after its last frame is U_q, the backward
    state before its first frame V_q. Then the maps are exchanged, composed into this rank's incoming states and
    the span scanned again from them."""
    B, T, H = decay.shape
    chunks = _chunks_from(chunk_size, split.start - 1, split.stop + 1)
    ones = decay.new_ones(B, 1, H)
    decay_padded = torch.cat([ones, decay, ones], 1)
    padded, maps = [], []
    for M, U in branches:
        none, zero = torch.zeros_like(M[:, :, :1]), torch.zeros_like(U[:, :, :1])
        padded.append(torch.cat([none, M, none], 2))
        X = scan_states(padded[-1], torch.cat([zero, U, zero], 2), decay_padded, chunks)
        maps += [_span_transition(M, decay), X[0, :, :, -2], X[1, :, :, 0]]
    shapes = [m.shape for m in maps]
    gathered = all_gather(torch.cat([m.reshape(-1) for m in maps]), split.group)
    per_rank = [[piece.view(shape) for piece, shape in zip(row.split([s.numel() for s in shapes]), shapes)]
                for row in gathered]
    restarts = [chunk_size is not None and len(frame_spans(a - 1, b, chunk_size)) > 1 for a, b in split.spans]
    states = []
    for i, ((M, U), M_padded) in enumerate(zip(branches, padded)):
        forward = backward = torch.zeros_like(U[:, :, 0])
        for q in range(split.rank):
            A, U_q, _ = per_rank[q][3 * i:3 * i + 3]
            forward = _times(forward, A) + U_q
        for q in reversed(range(split.rank + 1, len(split.spans))):
            A, _, V_q = per_rank[q][3 * i:3 * i + 3]
            backward = V_q if restarts[q] else _times(backward, A.transpose(-1, -2)) + V_q
        U = torch.cat([forward[:, :, None], U, backward[:, :, None]], 2)
        states.append(scan_states(M_padded, U, decay_padded, chunks)[:, :, :, 1:-1])
    return states


# --------------------------------------------------------------------------------------------------------------
# The layers over this rank's frames. rope and camera hold the rows of frames [first, ...) (the driver's window).

def gdn_layer(layer: GDNSelfAttention, u, thw, rope, camera, chunk_size, split: Split, first: int):
    """layer(u, ...) at this rank's frames u (B, n, C): the streams of its frames with the short conv's halo
    (gdn_in_parts' windows), their per-frame terms, the scan across ranks, the read-out."""
    T, S = thw[0], thw[1] * thw[2]
    wide, lo, hi = halo(u, split, layer.conv_k.weight.shape[-1] - 1, 1, S)
    rows = slice((lo - first) * S, (hi - first) * S)
    own, frames = slice((split.start - lo) * S, (split.stop - lo) * S), slice(split.start - lo, split.stop - lo)
    start = lo % chunk_size if isinstance(chunk_size, int) else (lo if chunk_size else 0)  # as gdn_in_parts
    beta, decay = layer.gates(wide, hi - lo)
    q_rot, k_rot, v, q, k = (x[:, own] for x in layer.main_streams(wide, hi - lo, rope[rows], chunk_size, start))
    branches = [frame_terms(k_rot, v, beta[:, own], k, num_frames=T)]
    if camera is not None:
        qh, kh, vh, beta_cam = (x[:, own] for x in layer.camera_streams(wide, hi - lo, camera_rows(camera, rows),
                                                                        beta, chunk_size, start))
        branches.append(frame_terms(kh, vh, beta_cam, num_frames=T))
    states = scan_parallel(branches, decay[:, frames], chunk_size, split)
    main = read_out(states[0], q_rot, q)
    cam = read_out(states[1], qh) if camera is not None else None
    return layer.output(u, main, cam, camera_rows(camera, slice((split.start - first) * S, (split.stop - first) * S)))


def softmax_layer(layer, u, rope, camera, chunk_size, split: Split):
    """layer(u, ...) at this rank's frames u (B, n, C) (rope, camera: their rows): its queries against the keys and
    values of all ranks."""
    S = u.shape[1] // (split.stop - split.start)
    main, cam = layer.operands(u, rope, camera)
    keys = gather_frames(torch.stack(main[1:]), split, 3, S).unbind(0)
    if cam is not None:
        cam = (cam[0], *gather_frames(torch.stack(cam[1:]), split, 3, S).unbind(0))
    return layer.attend(u, (main[0], *keys), cam, split.num_frames, chunk_size, camera, split.start)


def ffn_layer(mlp, m, thw, chunk_size, split: Split):
    """mlp(m, ...) at this rank's frames m (B, n, C): the per-frame middle, then the temporal conv with the halo."""
    B, N, C = m.shape
    T, h, w = thw
    z = ffn_middle_in_parts(mlp, m, thw).view(B, T, C, h * w).permute(0, 2, 1, 3)
    wide, lo, hi = halo(z, split, mlp.t_conv.padding[0], 2, 1)
    z = temporal_residual(wide, mlp.t_conv, _chunks_from(chunk_size, lo, hi))[:, :, split.start - lo:split.stop - lo]
    return z.permute(0, 2, 3, 1).reshape(B, N, C).contiguous()  # (the frames' view has gaps between batch rows)


def block_forward(block, x, y, text_mask, t6, thw, rope, camera, plucker, chunk_size, split: Split, first: int):
    """block(x, ...) at this rank's frames x (B, n, C) (dit.Block.forward, its temporal operators across ranks)."""
    T, S = thw[0], thw[1] * thw[2]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (block.scale_shift_table + t6).chunk(6, 2)
    u = modulate(x, shift_msa, scale_msa, T)
    if isinstance(block.attn, GDNSelfAttention):
        a = gdn_layer(block.attn, u, thw, rope, camera, chunk_size, split, first)
    else:
        own = slice((split.start - first) * S, (split.stop - first) * S)
        a = softmax_layer(block.attn, u, rope[own], camera_rows(camera, own), chunk_size, split)
    x = block.after_attention(x, gated(gate_msa, a), y, text_mask, plucker)
    return x + gated(gate_mlp, ffn_layer(block.mlp, modulate(x, shift_mlp, scale_mlp, T), thw, chunk_size, split))


# --------------------------------------------------------------------------------------------------------------
# The DiT across ranks

def forward(dit, x, timestep, text, text_mask, raymap=None, plucker=None, chunk_size=None, *, group=None,
            spans=None):
    """This rank's frames of dit(x, timestep, text, text_mask, raymap, plucker, chunk_size): the velocity
    (B, 128, t1 - t0, h, w) of frames [t0, t1) = spans[rank] (default frame_split) of the video x (B, 128, T, h, w).
    Every rank passes the whole video's inputs (small: the latents, not the activations) and the same spans; group:
    the process group (None: the default one). Differentiable (training: train.py). A block's `parallel_forward`
    attribute, when it has one (`attach`), runs it instead of block_forward."""
    cfg, dtype = dit.config, dit.dtype
    B, T, h, w = _check_inputs(cfg, x, timestep, text, text_mask, raymap, plucker, chunk_size)
    split = Split.of(group, T, spans)
    t0, t1, S, C = split.start, split.stop, h * w, cfg.hidden_size
    reach = cfg.conv_kernel_size - 1                        # the GDN short convs' halo: the frames [lo, hi) read
    lo, hi = max(0, t0 - reach), min(T, t1 + reach)
    text, text_mask = crop_text(text, text_mask)
    tokens = dit.x_embedder(x[:, :, t0:t1].to(dtype))
    temb = dit.t_embedder(timestep_sinusoid(timestep[:, t0:t1].long().float().flatten()).to(dtype))
    t6 = dit.t_block(temb).view(B, t1 - t0, 6, C)
    y = dit.attention_y_norm(dit.y_embedder(text.to(dtype)))
    rope = rope_table(cfg.linear_head_dim, (hi, h, w), x.device)[lo * S:]
    camera, pl = span_camera(dit, raymap, plucker, rope, (h, w), (lo, hi), (t0, t1))
    mask = text_mask != 0
    for block in dit.blocks:
        run = getattr(block, "parallel_forward", None) or functools.partial(block_forward, block)
        tokens = run(tokens, y, mask, t6, (t1 - t0, h, w), rope, camera, pl, chunk_size, split, lo)
    out = dit.final_layer(tokens, temb.view(B, t1 - t0, 1, C))
    return out.view(B, t1 - t0, h, w, -1).permute(0, 4, 1, 2, 3)


def velocity(dit, x, timestep, text, text_mask, raymap=None, plucker=None, chunk_size=None, part_frames=None, *,
             group=None):
    """dit(x, ...)'s whole velocity (B, 128, T, h, w) on every rank, each rank computing its frames (`forward`): the
    DiT as generate.generate(group=)'s samplers call it. The inputs are group rank 0's (broadcast first), so every
    rank samples the same video. A video shorter than the group (the chunk-causal sampler's first chunks) runs
    whole on every rank, rank 0's result kept."""
    if part_frames is not None:
        raise ValueError("part_frames: the memory mode runs in one process, not across ranks")
    source = 0 if group is None else dist.get_global_rank(group, 0)
    inputs = []
    for t in (x, timestep, text, text_mask, raymap, plucker):
        if t is not None:
            t = t.clone(memory_format=torch.contiguous_format)
            dist.broadcast(t, source, group=group)
        inputs.append(t)
    if x.shape[2] < dist.get_world_size(group):
        v = dit(*inputs, chunk_size=chunk_size).contiguous()
        dist.broadcast(v, source, group=group)
        return v
    split = Split.of(group, x.shape[2])
    return gather_frames(forward(dit, *inputs, chunk_size, group=group), split, 2, 1)


def attach(dit, group) -> None:
    """Give dit and each of its blocks a `parallel_forward` attribute: `forward` over `group`, and block_forward.
    train.py wraps them like `forward` methods: in activation checkpointing, and in FSDP2's hooks
    (torch.distributed.fsdp.register_fsdp_forward_method), which gather a sharded module's parameters around its
    forward; `forward` runs the attributes."""
    dit.parallel_forward = functools.partial(forward, dit, group=group)
    for block in dit.blocks:
        block.parallel_forward = functools.partial(block_forward, block)
