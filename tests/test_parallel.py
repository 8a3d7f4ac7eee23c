"""parallel.py: the DiT with its latent frames split over 2, 3 and 4 gloo processes (CPU) against the DiT in one
process: the velocity (<= 1e-5; with and without the camera, bidirectional and chunk-causal, even, uneven and
one-frame spans, halos longer than a neighbour's span), a training step's loss and gradients (train.dit_loss), the
sampler's view (`velocity`, also for fewer frames than ranks) and the tiny generate()'s latents.

Each world size is one spawn of processes that runs every check (the processes' start-up is most of the time).
Precision: the softmax blocks' attention runs in bf16 (as the official code). Where a GDN block comes before it,
its fp32 output differs from one process's by rounding (~1e-7), and the bf16 casts of the attention's operands now
and then round the other way (up to ~1e-5 at the output, measured): models of one kind of block are compared in
fp32, models mixing the two in float64 (where the camera branch's bf16 attention remains, but its inputs differ by
~1e-16). Gradients likewise: each rank's share of the keys' gradients is rounded to bf16 before the shares are
summed, so the softmax blocks' gradients are compared in float64 without the camera (whose attention is always
bf16), the camera branch's in a model of GDN blocks only."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import camera
import parallel
from attention import chunk_starts
from dit import DiT, DiTConfig
from reference import TINY_DIT, max_rel_err, randomize_

# conv_kernel_size 3 and t_kernel_size 5: the GDN short conv and the FFN's temporal conv both reach 2 frames
VARIED = dict(in_channels=6, num_layers=3, hidden_size=64, num_attention_heads=4, softmax_every_n=3,
              linear_head_dim=16, mlp_ratio=2.5, t_kernel_size=5, conv_kernel_size=3,
              chunk_plucker_post_attn_blocks=2, caption_channels=24)
HW = (2, 3)


def tiny_dit(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return randomize_(DiT(DiTConfig.from_dict({**TINY_DIT, **overrides}))).to(dtype)


def inputs(cfg, frames, seed, dtype=torch.float32, batch=2):
    """DiT.forward's arguments for a random video of `frames` latent frames at 2x3 latents: latents, per-frame
    timesteps, text with a padded tail, and the camera of an action string (raymap, Plücker)."""
    g = torch.Generator().manual_seed(seed)
    h, w = HW
    x = torch.randn(batch, cfg.in_channels, frames, h, w, generator=g, dtype=dtype)
    t = torch.rand(batch, frames, generator=g) * 1000
    text = torch.randn(batch, 8, cfg.caption_channels, generator=g, dtype=dtype)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[0, 5:] = 0
    c2w = camera.action_to_c2w("wl-40,dk-40", scheme="legacy")[:8 * (frames - 1) + 1]
    raymap, plucker = camera.prepare_camera(c2w, np.array([150.0, 150.0, 48.0, 32.0]), size=(32 * h, 32 * w))
    return [x, t, text, mask, raymap[None].repeat(batch, 1, 1).to(dtype),
            plucker[None].repeat(batch, 1, 1, 1, 1).to(dtype)]


def check_velocity(dit, args, chunk_size, group, spans=None):
    with torch.no_grad():
        whole = dit(*args, chunk_size=chunk_size)
        mine = parallel.forward(dit, *args, chunk_size, group=group, spans=spans)
    split = parallel.Split.of(group, args[0].shape[2], spans)
    assert max_rel_err(mine, whole[:, :, split.start:split.stop]) <= 1e-5, (split, chunk_size, args[4] is None)


def check_training_step(dit, args, chunk_size, group):
    """train.dit_loss over the split (parallel.attach) against one process: the loss (the ranks' shares summed)
    and every parameter's gradient (averaged over the ranks, as FSDP reduces them)."""
    import train
    x, t, text, mask, raymap, plucker = args
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    batch = dict(latents=x, noise=noise, sigma=t / 1000, text=text, text_mask=mask, raymap=raymap, plucker=plucker)
    use_camera, ranks = raymap is not None, dist.get_world_size(group)
    dit.zero_grad()
    loss = train.dit_loss(dit, batch, use_camera, chunk_size)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    dit.zero_grad()
    parallel.attach(dit, group)
    share = train.dit_loss(dit, batch, use_camera, chunk_size, group=group)
    share.backward()
    total = share.detach() / ranks                       # dit_loss scales each share by the group's size
    dist.all_reduce(total, group=group)
    assert abs(total.item() - loss.item()) <= 1e-5 * loss.item()
    for name, p in dit.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad / ranks
        dist.all_reduce(grad, group=group)
        if name in expected:
            assert max_rel_err(grad, expected[name]) <= 1e-5, name
        else:
            assert grad.abs().max() == 0, name            # unused (the raymap embedder)
    for module in (dit, *dit.blocks):
        del module.parallel_forward


def check_generate(group):
    """generate() with its frames split over the group (every rank's latents) = generate() in one process: the
    bidirectional sampler and the chunk-causal teacher's (the DiT over a growing prefix of chunks)."""
    import generate as G
    dit, vae, tokenizer, text_encoder = G.demo_models()
    dit.double()                                            # (a hybrid model: the module docstring)
    for sampler, frames in (("flow_euler", 33), ("chunk_flow_euler", 57)):
        run = dict(action=f"w-{frames - 1}", num_frames=frames, steps=2, decode=False, height=G.DEMO_SIZE[0],
                   width=G.DEMO_SIZE[1], sampler=sampler)
        one = G.generate(dit, vae, tokenizer, text_encoder, G.demo_image(), G.DEMO_PROMPT, **run)
        split = G.generate(dit, vae, tokenizer, text_encoder, G.demo_image(), G.DEMO_PROMPT, group=group, **run)
        assert max_rel_err(split.latents, one.latents) <= 1e-5, sampler
    with pytest.raises(ValueError, match="part_frames"):
        G.generate(dit, vae, tokenizer, text_encoder, G.demo_image(), G.DEMO_PROMPT, group=group, part_frames=2,
                   **run)


def check_bytes(group):
    """bench/parallel.py's count of what a rank receives per step = the collectives' pieces (bf16, the release's
    kinds of block, the camera on, an uneven split)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_parallel", Path(__file__).parents[1] / "bench" / "parallel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    release = tiny_dit(torch.bfloat16)
    args = inputs(release.config, 11, seed=6, dtype=torch.bfloat16)
    counted, all_gather = [], parallel.all_gather
    parallel.all_gather = lambda x, g: counted.append(x.numel() * x.element_size()) or all_gather(x, g)
    try:
        with torch.no_grad():
            parallel.forward(release, *args, group=group)
    finally:
        parallel.all_gather = all_gather
    expected = bench.received_bytes(release.config, bench.Video(11, 6, 2, 2), dist.get_world_size(group))
    del expected["inputs + velocity"]
    assert (dist.get_world_size(group) - 1) * sum(counted) == sum(expected.values())


def checks(group):
    """Every check, on the ranks of `group`."""
    ranks = dist.get_world_size(group)
    uneven = [(0, 1), (1, 2), (2, 9), (9, 11)][-ranks:]     # one-frame spans, shorter than the halos
    uneven[0] = (0, uneven[0][1])
    for kind, dtype in (("gdn", torch.float32), ("softmax", torch.float32), ("hybrid", torch.float64)):
        dit = tiny_dit(dtype, **dict(VARIED, softmax_every_n={"gdn": 0, "softmax": 1, "hybrid": 3}[kind]))
        args = inputs(dit.config, 11, seed=1, dtype=dtype)
        check_velocity(dit, args, None, group)
        check_velocity(dit, args[:4] + [None, args[5]], 3, group)
        check_velocity(dit, args, 3, group, uneven)
        check_velocity(dit, args, chunk_starts(11), group, uneven)
    # the release's 4-tap short conv: a halo of 3 frames, from two ranks when spans are shorter
    release = tiny_dit(torch.float64)
    check_velocity(release, inputs(release.config, 7, seed=2, dtype=torch.float64), (0, 4), group)
    # the sampler's view: the whole velocity on every rank, also for a video of fewer frames than ranks
    for frames in (ranks - 1, ranks + 2):
        few = inputs(release.config, frames, seed=3, dtype=torch.float64)
        with torch.no_grad():
            assert max_rel_err(parallel.velocity(release, *few, group=group), release(*few)) <= 1e-5
    # training: GDN blocks with the camera (fp32), the softmax blocks in float64 without it
    gdn_only = tiny_dit(softmax_every_n=0)
    check_training_step(gdn_only, inputs(gdn_only.config, 7, seed=4), 2, group)
    check_training_step(release, inputs(release.config, 7, seed=5, dtype=torch.float64)[:4] + [None, None], None,
                        group)
    with pytest.raises(ValueError, match="spans"):
        parallel.Split.of(group, 11, [(0, 5), (6, 11)] + [(11, 11)] * (ranks - 2))


def _processes(rank, init):
    """The checks on 4 processes, then on groups of the first 3 and 2 (one start-up for the three sizes)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=4)
    try:
        groups = {4: dist.group.WORLD, 3: dist.new_group([0, 1, 2]), 2: dist.new_group([0, 1])}
        for ranks, group in groups.items():
            if rank < ranks:
                checks(group)
                if ranks == 3:
                    check_generate(group)
                    check_bytes(group)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_split_over_2_3_and_4_processes_equals_one(tmp_path):
    mp.spawn(_processes, args=(str(tmp_path / "init"),), nprocs=4)


def test_frame_split():
    assert parallel.frame_split(11, 3) == ((0, 4), (4, 8), (8, 11))
    assert parallel.frame_split(8, 4) == ((0, 2), (2, 4), (4, 6), (6, 8))
    assert parallel.frame_split(3, 3) == ((0, 1), (1, 2), (2, 3))
    with pytest.raises(ValueError, match="num_frames"):
        parallel.frame_split(2, 3)
