"""Image + prompt + camera path -> video: SANA-WM (arXiv 2605.15178) end to end, stage 1 then the stage-2 refiner.

What it follows: the release's text recipe (Gemma-2 with the "chi" prompt prefix), first-frame conditioning and
flow-matching sampler as diffusers' SanaWMPipeline runs them; the camera inputs of camera.py; stage 2 as diffusers'
SanaWMLTX2Refiner runs it on the stage-1 latents, with a memory plan that keeps one large model on the GPU at a time.

    python generate.py --demo                                   # tiny random-weight models on CPU: the plumbing
    python generate.py --weights RELEASE --image in.png --prompt "a desert road" --action "w-80,dw-40,w-40"

Reading order: text encoding (Gemma-2 with the chi prefix), the sampler (`schedule` + `sample`), `generate` (the
whole pipeline as one function: stage 1, the refiner, decoding), the memory machinery (`WeightStream`: block-wise
weight streaming; `plan_memory`: what --gpu_memory picks), then model loading (the release, or tiny random models
for the demo), the output (the action overlay, the mp4 writer) and the command line (`main`).

The release folder (`--weights`) holds `dit/`, `vae/`, the stage-1 text encoder Gemma-2-2b-it as a transformers
folder `text_encoder/` (config.json + *.safetensors) with its tokenizer files either inside it or in a sibling
`tokenizer/` (the diffusers release layout), and `refiner/` (transformer/, connectors/, text_encoder/ = Gemma-3,
tokenizer/). With `refiner/` present the refiner runs unless `--no_refiner` is given.
"""
import argparse
import collections
import dataclasses
import functools
import gc
import hashlib
import io
import math
import struct
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFilter, ImageFont, UnidentifiedImageError
from tqdm import tqdm

import camera
import fast
import parallel
from attention import chunk_starts
from dit import (CHI_PROMPT, OFFICIAL_SWITCHES, RELEASE_LAYOUT, DiT, DiTConfig, StreamCache, check_model_folder,
                 crop_text, encode_negative_prompt, encode_prompt, find_checkpoint, forward_chunk, load_gemma2,
                 require_transformers, text_encoder_folder, tokenizer_folder)
from quantize import PRESETS, REFINER_EXCLUDE, REFINER_INCLUDE, check_fp8_device, checkpoint_precision, set_precision
from refiner import (ConnectorsConfig, PromptEncoder, Refiner, RefinerConfig, RefinerStream, TextConnectors,
                     refine)
from vae import VAE, CausalDecodeStream, VAEConfig, decode_pieces

HEIGHT, WIDTH = 704, 1280  # the release was trained at this one resolution
DEFAULT_FOV_DEG = 60.0  # horizontal field of view assumed when no intrinsics are given
LOW_MEMORY_PART_FRAMES = 16  # --low_memory: latent frames per part of the DiT's memory mode (BENCHMARKS.md)


# ----------------------------------------------------------------------------------------------------------------
# Sampler: flow-matching Euler with the first latent frame held clean

FLOW_SHIFT = 9.8  # the release's sampling shift (its training used 9.95, train.TRAIN_SHIFT)


def schedule(num_steps: int, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """The num_steps + 1 noise levels sigma_0 = 1 > sigma_1 > ... > sigma_n = 0 (fp32).

    Evenly spaced levels s in [1, s_min], warped towards high noise by shift(s) = shift s / (1 + (shift - 1) s).
    s_min = shift(0.001) is the smallest level of the 1000-step training grid, already shifted, so the last level
    is shifted twice: this reproduces diffusers' FlowMatchEulerDiscreteScheduler bit for bit.
    """
    def warp(s):
        return shift * s / (1 + (shift - 1) * s)
    s_min = warp(torch.tensor(1 / 1000, dtype=torch.float32)).item()  # computed in fp32 like the training grid
    levels = np.linspace(1.0, s_min, num_steps)  # float64, then warped and rounded to fp32
    return torch.cat([warp(torch.from_numpy(levels)).float(), torch.zeros(1)])


def guided_velocity(dit, x, t, text, text_mask, raymap, plucker, guidance_scale=5.0, negative_text=None,
                    negative_mask=None, part_frames=None, chunk_size=None) -> torch.Tensor:
    """The DiT's flow velocity v = noise - x0 at per-frame timesteps t (1, T). With guidance_scale > 1 the negative
    text runs in the same batch (classifier-free guidance): v = v_neg + g (v_pos - v_neg); both halves see the same
    latents and camera. part_frames: the DiT's memory mode (dit.DiT.forward); the two halves then run one after
    the other. chunk_size: the chunk-causal model's chunks."""
    if guidance_scale <= 1:
        return dit(x, t, text, text_mask, raymap=raymap, plucker=plucker, chunk_size=chunk_size,
                   part_frames=part_frames)
    texts, masks = torch.cat([negative_text, text]), torch.cat([negative_mask, text_mask])
    if part_frames is not None:
        v_neg, v_pos = (dit(x, t, texts[i:i + 1], masks[i:i + 1], raymap=raymap, plucker=plucker,
                            chunk_size=chunk_size, part_frames=part_frames) for i in range(2))
    else:
        pair = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
        v_neg, v_pos = dit(pair(x), pair(t), texts, masks, raymap=pair(raymap), plucker=pair(plucker),
                           chunk_size=chunk_size).chunk(2)
    return v_neg + guidance_scale * (v_pos - v_neg)


@torch.no_grad()
def sample(dit, x, sigmas, text, text_mask, raymap, plucker, guidance_scale=5.0, negative_text=None,
           negative_mask=None, part_frames=None) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigma = 1 to 0 with Euler steps; x (1, C, T, h, w), frame 0 = the image latent.
    Frame 0 is the conditioning image: it sees timestep 0 and is never updated (guided_velocity: CFG)."""
    timesteps = sigmas * 1000  # fp32, the DiT's 0..1000 scale
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", unit="step"):
        t = timesteps[i].expand(1, x.shape[2]).clone()
        t[:, 0] = 0  # frame 0 is clean
        v = guided_velocity(dit, x, t, text, text_mask, raymap, plucker, guidance_scale, negative_text,
                            negative_mask, part_frames)
        # The step is taken in fp32 from sigma = t / 1000 (re-derived from the timestep, as the reference does; it
        # can differ from sigmas[i] in the last bit) to the next level. The reference searches for the largest level
        # below sigma - 1e-6; with at most 1000 steps the levels are > 1e-4 apart, so that is sigmas[i + 1].
        sigma = timesteps[i] / 1000
        x_next = x.float() + (sigmas[i + 1] - sigma) * v.float()
        x_next[:, :, 0] = x[:, :, 0]  # the image frame is held
        x = x_next.to(x.dtype)
    return x


# The chunk-causal releases' samplers. Both move each chunk's frames at their own noise level (per-token Euler);
# the image frame stays at level 0.

def _euler(x, v, sigma, sigma_next):
    """One per-frame Euler step in fp32: x (B, C, T, h, w), sigma and sigma_next (T,) levels per frame."""
    step = (sigma_next - sigma).view(1, 1, -1, 1, 1)
    return (x.float() + step * v.float()).to(x.dtype)


def chunk_offsets(num_chunks: int, steps: int, interval_k: float | None = None) -> list[int]:
    """The global step at which each chunk starts denoising (chunk_flow_euler): int(i * k * steps), k = 1/num_chunks
    by default, in Python float arithmetic as the official sampler (so T = 21 gives [0, 10, 20, 30, 40, 49])."""
    k = 1 / num_chunks if interval_k is None else interval_k
    return [int(i * k * steps) for i in range(num_chunks)]


@torch.no_grad()
def chunk_flow_euler(dit, x, sigmas, text, text_mask, raymap, plucker, guidance_scale=5.0, negative_text=None,
                     negative_mask=None, chunks=(0,), interval_k=None, part_frames=None) -> torch.Tensor:
    """The chunk-causal teacher's sampler: chunk i starts denoising at global step offsets[i] (chunk_offsets) and
    then runs the len(sigmas) - 1 levels of the schedule; every global step re-runs the DiT over the prefix of
    started chunks (finished ones at level 0), chunk-causal over `chunks` (their first frames), with CFG."""
    T, S = x.shape[2], len(sigmas) - 1
    if len(chunks) <= 1:
        return sample(dit, x, sigmas, text, text_mask, raymap, plucker, guidance_scale, negative_text, negative_mask,
                      part_frames)
    offsets = chunk_offsets(len(chunks), S, interval_k)
    ends = list(chunks[1:]) + [T]
    padded = torch.cat([sigmas, sigmas.new_zeros(1)])       # a finished chunk stays at level 0
    for g in tqdm(range(offsets[-1] + S), desc="sampling", unit="step"):
        active = [i for i, o in enumerate(offsets) if g >= o]
        end = ends[active[-1]]
        level = torch.zeros(end, dtype=torch.long)
        for i in active:
            level[chunks[i]:ends[i]] = min(g - offsets[i], S)
        sigma, sigma_next = padded[level], padded[(level + 1).clamp(max=S)]
        sigma[0] = sigma_next[0] = 0                        # the image frame
        t = (sigma * 1000)[None]
        v = guided_velocity(dit, x[:, :, :end], t, text, text_mask, raymap[:, :end], plucker[:, :, :end],
                            guidance_scale, negative_text, negative_mask, part_frames, tuple(chunks[:len(active)]))
        x[:, :, :end] = _euler(x[:, :, :end], v, t[0] / 1000, sigma_next)
    return x


SAMPLERS = ("flow_euler", "chunk_flow_euler")
STREAM_SIGMAS = (1.0, 0.96, 0.889, 0.727)  # the streaming model's 4 levels (its steps 1000, 960, 889, 727), verbatim


def stream_chunks(num_frames: int, size: int = 3) -> tuple[int, ...]:
    """The streaming sampler's chunks: num_frames // size of them, the first taking the remainder (size + T % size,
    the image frame included: [0, 4), [4, 7), ... for T = 3k + 1). Their first frames."""
    if num_frames <= size:
        raise ValueError(f"num_frames: the streaming sampler needs more than {size} latent frames, got {num_frames}")
    first = size + num_frames % size
    return (0,) + tuple(range(first, num_frames, size))


@torch.no_grad()
def stream_sample(dit, x, text, text_mask, raymap, plucker, sigmas=STREAM_SIGMAS, window=2, sink=True):
    """The streaming model's sampler (few-step distilled, CFG baked in: one conditional pass), chunk by chunk: each
    chunk takes len(sigmas) Euler steps from its slice of x (the noise of the whole video, drawn once; frame 0 the
    image latent), reading the caches of the chunks before it (dit.forward_chunk), then one pass over the finished
    chunk at t = 0 writes its caches: len(sigmas) + 1 forwards per chunk. Yields (start, stop, latents) per chunk."""
    cache = StreamCache()
    text, text_mask = crop_text(text, text_mask)            # once, not in every forward (it waits for the mask)
    levels = torch.tensor(list(sigmas) + [0.0], device=x.device)
    starts = stream_chunks(x.shape[2])
    for start, stop in zip(starts, starts[1:] + (x.shape[2],)):
        z = x[:, :, start:stop]
        for sigma, sigma_next in zip(levels[:-1], levels[1:]):
            level = sigma.repeat(stop - start), sigma_next.repeat(stop - start)
            if start == 0:
                level[0][0] = level[1][0] = 0               # the image frame
            v = forward_chunk(dit, z, (level[0] * 1000)[None], text, text_mask, raymap, plucker, cache=cache,
                              window=window, sink=sink)
            z = _euler(z, v, level[0], level[1])
        forward_chunk(dit, z, levels.new_zeros(1, stop - start), text, text_mask, raymap, plucker, cache=cache,
                      save=True, window=window, sink=sink)
        yield start, stop, z


# ----------------------------------------------------------------------------------------------------------------
# The pipeline

REFINER_SEED = 42  # stage 2 draws its noise from a fixed seed on the device, as the reference does


@dataclass
class Stage2:
    """The stage-2 refiner as two loaders that generate() calls one after the other (the memory plan): the prompt
    encoder (Gemma-3 + text connectors: prompt -> (text (1, L, C), mask (1, L))) runs once and is freed before the
    refiner transformer is loaded. Each returns its model on the device it runs on."""
    load_prompt_encoder: Callable[[], Callable[[str], tuple[torch.Tensor, torch.Tensor]]]
    load_refiner: Callable[[], Refiner]


@dataclass
class Result:
    """What generate() made. With stage 2 the latents are the refined ones (frame 0 = the stage-1 sink, unchanged)
    and the output frames start at pixel frame 1; without it, stage 1's latents and all frames."""
    latents: torch.Tensor  # (1, C, T, h, w) final latents, in the VAE's normalised space
    frames: torch.Tensor | None  # (F, H, W, 3) uint8, or None when decode=False
    c2w: np.ndarray  # (F, 4, 4) the camera of each output frame (stage 1 only: the first one is the identity)
    intrinsics: np.ndarray  # (F, 4) fx, fy, cx, cy on the cropped H x W image, per output frame
    seconds_per_step: float  # stage 1's sampler
    refine_seconds: float | None = None  # stage 2's refinement loop (loading not counted); None without stage 2
    decode_seconds: float | None = None
    peak_memory_gib: dict = field(default_factory=dict)  # {"stage 1"|"refiner prompt"|"stage 2"|"decode": GiB}, CUDA
    stage1_frames: torch.Tensor | None = None  # (F, H, W, 3) uint8: stage 1 decoded, with decode_stage1=True


@contextmanager
def _on(model, device, offload: bool, streamed_blocks: int = 0):
    """Run `model` on `device`; with offload, send it back to the CPU afterwards so only one model uses the GPU.
    streamed_blocks > 0: that many of model.blocks keep their weights in host memory and stream (WeightStream)."""
    stream = WeightStream(model, model.blocks, device, streamed_blocks) if streamed_blocks else None
    if stream is None:
        model.to(device)
    try:
        yield model
    finally:
        if stream is not None:
            stream.close()
        if offload:
            model.to("cpu")
            _free_memory(device)


def _free_memory(device):
    """Hand freed blocks back to the GPU, so the next model to load finds them (nothing to do on the CPU)."""
    gc.collect()  # frees models held only by reference cycles before the cache is emptied
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class _PeakMemory:
    """Peak GPU memory allocated during each stage, in GiB; records nothing off CUDA."""

    def __init__(self, device):
        self.device, self.gib = torch.device(device), {}
        self._reset()

    def _reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self, stage: str):
        if self.device.type == "cuda":
            self.gib[stage] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self._reset()


@contextmanager
def _counting_calls(module, desc: str, unit: str):
    """A progress bar counting the forward calls of `module` (the VAE decoder's tiles, the refiner's forwards)."""
    with tqdm(desc=desc, unit=unit) as bar:
        def count(module, inputs, output):  # returns None: the output is left as it is
            bar.update()
        hook = module.register_forward_hook(count)
        try:
            yield
        finally:
            hook.remove()


def _seconds_since(start: float, device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # the GPU runs asynchronously: wait for it before reading the clock
    return time.perf_counter() - start


def _load_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not os.path.isfile(image):
        raise FileNotFoundError(f"--image: no such file {image!r}")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image: {image!r} is not a readable image ({e})") from None


def check_inputs(prompt: str, action: str | None, c2w, translation_speed: float | None,
                 rotation_speed_deg: float | None, steps: int, num_frames: int, fps: float,
                 action_scheme: str = "v2", *, guidance_scale: float = 5.0, flow_shift: float | None = None,
                 seed: int = 0) -> np.ndarray:
    """generate()'s checks that need no model, on their own so that run() makes them before loading any; returns
    the camera trajectory (F, 4, 4), rolled out of `action` under `action_scheme` (camera.action_to_c2w; None
    speeds = the scheme's defaults) or checked from `c2w`."""
    if (action is None) == (c2w is None):
        raise ValueError("camera: give exactly one of action (--action, a WASD/IJKL string) or c2w (--camera)")
    if not prompt.strip():
        raise ValueError("--prompt is empty")
    if not 1 <= steps <= 1000:
        raise ValueError(f"--steps must be in [1, 1000], got {steps}")
    # sample() guides only above 1, so a scale below 1 would silently mean 1; NaN would fail every comparison
    # and switch guidance off without a word.
    if not (math.isfinite(guidance_scale) and guidance_scale >= 1):
        raise ValueError(f"--guidance_scale must be a finite number >= 1 (1 = no classifier-free guidance), "
                         f"got {guidance_scale}")
    if flow_shift is not None and not (math.isfinite(flow_shift) and flow_shift > 0):
        raise ValueError(f"--flow_shift must be a finite number > 0, got {flow_shift}")
    if not 0 <= seed < 2**63:  # the range torch.Generator.manual_seed takes without wrapping around
        raise ValueError(f"--seed must be in [0, 2^63), got {seed}")
    if num_frames < 9:
        raise ValueError(f"--num_frames must be >= 9 (8k+1), got {num_frames}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"--fps must be positive and finite, got {fps}")
    if action is not None:
        c2w = camera.action_to_c2w(action, translation_speed, rotation_speed_deg, action_scheme)
    c2w = camera.check_c2w(c2w)
    if len(c2w) < 9:
        raise ValueError(f"camera: the trajectory has {len(c2w)} poses; at least 9 frames are needed (8k + 1, k >= 1)")
    return c2w


def _first_frame_and_camera(pil, c2w, intrinsics, num_frames, height, width, stride, device, dtype):
    """The first frame as the VAE takes it and the DiT's camera inputs: the trajectory snapped to stride*k + 1
    frames (at most its length), intrinsics per frame (None: a 60 deg horizontal field of view), the image resized
    and centre-cropped to height x width in [-1, 1] with the intrinsics moved onto the crop (which also refuses a
    field of view outside [25, 120] deg). Returns (pixels, c2w, intrinsics, raymap, plucker)."""
    if intrinsics is None:
        fx = pil.width / (2 * math.tan(math.radians(DEFAULT_FOV_DEG) / 2))
        intrinsics = [fx, fx, pil.width / 2, pil.height / 2]
        print(f"warning: no --intrinsics given; assuming a {DEFAULT_FOV_DEG:g} deg horizontal field of view "
              f"(fx = fy = {fx:.1f}, principal point at the image centre)", file=sys.stderr)
    c2w, intrinsics = camera.prepare_trajectory(c2w, intrinsics, min(num_frames, len(c2w)), stride)
    pixels, intrinsics = camera.preprocess_image(pil, intrinsics, height=height, width=width)
    raymap, plucker = camera.prepare_camera(c2w, intrinsics, size=(height, width))
    return pixels, c2w, intrinsics, raymap[None].to(device, dtype), plucker[None].to(device, dtype)


@torch.no_grad()
def generate(dit, vae, tokenizer, text_encoder, image, prompt: str, *, refiner: Stage2 | None = None,
             action: str | None = None, c2w: np.ndarray | None = None, intrinsics=None,
             translation_speed: float | None = None, rotation_speed_deg: float | None = None,
             action_scheme: str = "v2", num_frames: int = 161, steps: int = 60, guidance_scale: float = 5.0,
             flow_shift: float | None = None, negative_prompt: str = "", seed: int = 0, fps: float = 16,
             height: int = HEIGHT, width: int = WIDTH, device="cpu", offload: bool = False,
             offload_vae: bool = False, offload_refiner: bool = False, part_frames: int | None = None,
             decode: bool = True, decode_stage1: bool = False, sampler: str = "flow_euler",
             chunk_interval_k: float | None = None, group=None, stream_dit_blocks: int = 0) -> Result:
    """First frame `image` (PIL image or path) + `prompt` + camera (`action` string or `c2w` (F, 4, 4)) -> video.
    The action string is rolled out under action_scheme ("v2" the official DSL, "legacy" diffusers 0.42.1's; see
    camera.action_to_c2w), with that scheme's speeds where translation_speed / rotation_speed_deg are None.

    dit: dit.DiT; vae: vae.VAE; tokenizer and text_encoder: Gemma-2's, the encoder being the decoder stack
    (transformers' Gemma2Model, whose last_hidden_state is read). intrinsics: [fx, fy, cx, cy], a 3x3 K, (F, 4)
    or (F, 3, 3), in pixels of the input image; None assumes a 60 deg horizontal field of view. The models run in
    their own dtype; with offload=True they live on the CPU and only the one running sits on `device`;
    offload_vae=True does that for the VAE alone (pass it on the CPU). part_frames: the DiT's memory mode
    (dit.DiT.forward; CFG halves one at a time), None = the fastest. stream_dit_blocks: that many of the DiT's blocks
    keep their weights in host memory and stream to the device as the blocks run (WeightStream; exact). flow_shift:
    the sampler's shift (schedule), None = the release's 9.8.

    refiner: stage 2, None for stage 1 only. It refines the stage-1 latents at `fps` (the
    video's frame rate: it scales the refiner's RoPE time axis); the decoded video then loses its first frame
    (num_frames - 1 frames, camera c2w[1:]). Before stage 2 the stage-1 DiT and Gemma-2 are moved to the CPU, where
    they stay, so the GPU holds only stage 2 and, without offload, the VAE; offload_refiner=True moves the VAE
    off too, so that stage 2 has the GPU to itself. decode_stage1: also decode the stage-1 latents, before the
    refiner touched them (Result.stage1_frames, all num_frames frames; needs `refiner`).

    sampler: "flow_euler" (the bidirectional release) or "chunk_flow_euler" (the chunk-causal teacher: its chunks
    attention.chunk_starts, each starting chunk_interval_k of the steps after the one before, default 1/chunks).

    group: a torch.distributed process group (e.g. dist.group.WORLD under torchrun) over which stage 1's latent
    frames are split (parallel.velocity; every rank calls generate with the same arguments and its own `device`).
    Rank 0 alone refines and decodes; the other ranks return the latents only (Result.frames None).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    _check_streamed("stream_dit_blocks", stream_dit_blocks)
    c2w = check_inputs(prompt, action, c2w, translation_speed, rotation_speed_deg, steps, num_frames, fps,
                       action_scheme, guidance_scale=guidance_scale, flow_shift=flow_shift, seed=seed)
    if decode_stage1 and (refiner is None or not decode):
        raise ValueError("decode_stage1 (--save_stage1): needs the refiner and decode=True; without the refiner the "
                         "video is stage 1's")
    model = dit if group is None else _split_frames(dit, group, part_frames)
    if group is not None and dist.get_rank(group) != 0:
        refiner, decode, decode_stage1 = None, False, False
    pil = _load_image(image)
    if torch.device(device).type == "cuda":
        fast.accelerate(dit)  # the CUDA kernels and compiled blocks (fast.py); the same model, the same weights
    memory = _PeakMemory(device)

    dtype = dit.dtype
    pixels, c2w, intrinsics, raymap, plucker = _first_frame_and_camera(pil, c2w, intrinsics, num_frames, height,
                                                                       width, 8, device, dtype)
    num_frames = len(c2w)

    with _on(text_encoder, device, offload):
        text, text_mask = encode_prompt(tokenizer, text_encoder, prompt)
        negative_text, negative_mask = encode_negative_prompt(tokenizer, text_encoder, negative_prompt)
    text, negative_text = text.to(device, dtype), negative_text.to(device, dtype)
    text_mask, negative_mask = text_mask.to(device), negative_mask.to(device)

    offload_vae = offload or offload_vae
    with _on(vae, device, offload_vae):
        vae_dtype = next(vae.parameters()).dtype
        image_latent = vae.normalize(vae.encode(pixels[:, :, None].to(device, vae_dtype))).to(dtype)

    # Initial noise, drawn on the CPU so a seed gives the same video on any device, in the model dtype.
    T, h, w = (num_frames - 1) // 8 + 1, height // 32, width // 32
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, image_latent.shape[1], T, h, w), generator=generator, dtype=dtype).to(device)
    x[:, :, :1] = image_latent

    with _on(dit, device, offload, stream_dit_blocks):
        start = time.perf_counter()
        sigmas = schedule(steps, FLOW_SHIFT if flow_shift is None else flow_shift).to(device)
        if sampler == "chunk_flow_euler":
            x = chunk_flow_euler(model, x, sigmas, text, text_mask, raymap, plucker, guidance_scale, negative_text,
                                 negative_mask, chunk_starts(T), chunk_interval_k, part_frames)
        else:
            x = sample(model, x, sigmas, text, text_mask, raymap, plucker, guidance_scale, negative_text,
                       negative_mask, part_frames)
        seconds_per_step = _seconds_since(start, device) / steps
    memory.end("stage 1")

    refine_seconds, stage1_latents = None, x
    if refiner is not None:
        # Stage 2 takes the stage-1 latents as they are (normalised VAE space, in the DiT's dtype); their frame 0,
        # the clean image latent, is the refiner's attention sink. Memory plan for one 80 GB GPU:
        # Gemma-2 and the DiT leave the GPU; Gemma-3 + connectors encode the plain prompt (no chi prefix, 1024
        # tokens) and are freed before the 13 B-parameter transformer loads; it is freed before decoding.
        text_encoder.to("cpu")
        dit.to("cpu")
        if offload_refiner:
            vae.to("cpu")  # decoding brings it back
        _free_memory(device)
        encoder = refiner.load_prompt_encoder()
        refiner_text, refiner_mask = encoder(prompt)
        del encoder
        _free_memory(device)
        memory.end("refiner prompt")
        model = refiner.load_refiner()
        start = time.perf_counter()
        with _counting_calls(model, "refining", " forward"):  # 1 + 4 per block of 3 latent frames (§7)
            x = refine(model, x, refiner_text, refiner_mask, fps=fps,
                       generator=torch.Generator(device).manual_seed(REFINER_SEED))
        refine_seconds = _seconds_since(start, device)
        del model
        _free_memory(device)
        memory.end("stage 2")
        # The sink frame was carried through unrefined: the video drops its pixel frame (one, as the causal VAE
        # decodes latent frame 0 to a single frame), and the camera path its first pose.
        c2w, intrinsics = c2w[1:], intrinsics[1:]

    frames = decode_seconds = stage1_frames = None
    if decode:
        start = time.perf_counter()
        with _on(vae, device, offload_vae), _counting_calls(vae.decoder, "decoding", " tile"):  # tiled decoding
            frames = _decode(vae, x, vae_dtype)
            if refiner is not None:
                frames = frames[1:]
            if decode_stage1:  # deterministic, and after the refiner: the main video is the same with or without
                stage1_frames = _decode(vae, stage1_latents, vae_dtype)
        decode_seconds = _seconds_since(start, device)
        memory.end("decode")
    return Result(x, frames, c2w, intrinsics, seconds_per_step, refine_seconds, decode_seconds, memory.gib,
                  stage1_frames)


def _split_frames(dit, group, part_frames):
    """The DiT as the samplers call it, its frames split over the ranks of `group` (parallel.velocity). Only stage 1
    is split (at 961 frames one GPU spends ~390 s there, ~32 s refining, ~8 s decoding: BENCHMARKS.md); the refiner
    and the VAE decode run on rank 0 as in one process (README: "Several GPUs")."""
    if part_frames is not None:
        raise ValueError("part_frames (--low_memory): the memory mode runs in one process, not with a process group")
    return functools.partial(parallel.velocity, dit, group=group)


STREAM_SEED = 42  # the streaming release's default seed


@dataclass
class StreamResult:
    """What generate_stream made: the latents, the camera of the written frames, the count, the seconds."""
    latents: torch.Tensor
    c2w: np.ndarray
    frames: int
    seconds: float
    first_frame_seconds: float


@torch.no_grad()
def generate_stream(dit, vae, tokenizer, text_encoder, image, prompt: str, write: Callable[[torch.Tensor], None], *,
                    action: str | None = None, c2w: np.ndarray | None = None, intrinsics=None,
                    translation_speed: float | None = None, rotation_speed_deg: float | None = None,
                    action_scheme: str = "v2", num_frames: int = 241, seed: int = STREAM_SEED, fps: float = 16,
                    height: int = HEIGHT, width: int = WIDTH, device="cpu", window: int = 2,
                    sink: bool = True, refiner: Stage2 | None = None, overlap: bool = True) -> StreamResult:
    """The streaming release's stage 1: the video made chunk by chunk (stream_sample: 4 distilled steps per chunk
    of 3 latent frames, caches instead of recomputation) and decoded as it comes by the causal VAE
    (vae.CausalDecodeStream, one latent frame at a time); each decoded chunk goes to write((n, H, W, 3) uint8 on
    the CPU) at once: 24 frames a chunk (the first chunk's decoded image frame is dropped), 8 (T - 1) in all.

    dit: the streaming DiT (dit.OFFICIAL_SWITCHES); vae: a causal decoder (decoder_causal=True). num_frames is
    snapped to 24k + 1 (whole chunks of 3 latent frames after the image frame). The camera of the written frames
    is c2w[1:]. A progress line per chunk says how much video is written and its real-time factor so far.
    refiner: stage 2 in the stream (refiner.RefinerStream): each stage-1 chunk's new frames are refined as one block
    of the refiner's AR loop (the image frame its sink) before they are decoded; None for stage 1 only.
    overlap: stage 1, the refiner and the decoder on CUDA streams of their own (run_stream); the same frames.
    """
    c2w = check_inputs(prompt, action, c2w, translation_speed, rotation_speed_deg, len(STREAM_SIGMAS), num_frames,
                       fps, action_scheme, guidance_scale=1.0, seed=seed)
    pil = _load_image(image)
    if torch.device(device).type == "cuda":
        fast.accelerate(dit)
    dtype, vae_dtype = dit.dtype, next(vae.parameters()).dtype
    decoder = CausalDecodeStream(vae)  # refuses a VAE without a causal decoder, before any work
    pixels, c2w, intrinsics, raymap, plucker = _first_frame_and_camera(pil, c2w, intrinsics, num_frames, height,
                                                                       width, 24, device, dtype)
    if len(c2w) < 25:
        raise ValueError(f"num_frames: streaming needs at least 25 frames (24k + 1), the camera gives {len(c2w)}")
    text, text_mask = encode_prompt(tokenizer, text_encoder, prompt)
    text, text_mask = text.to(device, dtype), text_mask.to(device)
    # The image latent: the causal encoder on the one frame, untiled (as the official streaming pipeline).
    image_latent = vae.normalize(vae.encode(pixels[:, :, None].to(device, vae_dtype), tiling=None)).to(dtype)
    T, h, w = (len(c2w) - 1) // 8 + 1, height // 32, width // 32
    x = torch.randn((1, image_latent.shape[1], T, h, w), generator=torch.Generator().manual_seed(seed),
                    dtype=dtype).to(device)  # drawn once, on the CPU: the same video on any device
    x[:, :, :1] = image_latent
    runner = None
    if refiner is not None:  # Gemma-3 + connectors encode the plain prompt, then leave; the transformer stays
        encoder = refiner.load_prompt_encoder()
        refiner_text, refiner_mask = encoder(prompt)
        del encoder
        runner = RefinerStream(refiner.load_refiner(), image_latent, refiner_text, refiner_mask, fps=fps,
                               generator=torch.Generator(device).manual_seed(REFINER_SEED))
        if torch.device(device).type == "cuda":
            fast.accelerate_refiner(runner)  # K/V windows in place, the text's K/V once, compiled pieces (fast.py)
    latents = x.new_empty(x.shape, dtype=dtype if runner is None else runner.dtype)
    chunks = stream_sample(dit, x, text, text_mask, raymap, plucker, window=window, sink=sink)
    frames, seconds, first_frame = run_stream(chunks, runner, decoder, write, latents, fps=fps, overlap=overlap)
    return StreamResult(latents, c2w[1:], frames, seconds, first_frame)


@torch.no_grad()
def run_stream(chunks, runner: RefinerStream | None, decoder: CausalDecodeStream, write, latents, *, fps: float,
               overlap: bool = True) -> tuple[int, float, float]:
    """The stream after its set-up: each stage-1 chunk (start, stop, z) of `chunks` (stream_sample) refined by
    `runner` (refine_chunk; None: as it is) into latents[:, :, start:stop], decoded by `decoder` (chunk_frames)
    and given to write((n, H, W, 3) uint8 on the CPU), with a progress line. overlap: the same steps as a
    pipeline on three CUDA streams (_overlapped_stream: stage 1 of the next chunk runs while this one is refined
    and the one before decoded; on the CPU one after the other): the same frames as this loop, which is the
    reference. Returns (frames written, seconds, seconds to the first written frame)."""
    written = _StreamProgress(write, fps)
    if overlap:
        _overlapped_stream(chunks, lambda s, z: refine_chunk(runner, s, z), lambda s, z: chunk_frames(decoder, s, z),
                           written, latents)
    else:
        for s, e, z in chunks:
            latents[:, :, s:e] = refine_chunk(runner, s, z)
            written(chunk_frames(decoder, s, latents[:, :, s:e]).cpu())
    return written.frames, _seconds_since(written.start, latents.device), written.first_frame


def refine_chunk(runner: RefinerStream | None, start: int, z: torch.Tensor) -> torch.Tensor:
    """A stage-1 chunk's latents (frames start.. of the video) refined: its new frames are the refiner's next block;
    the image frame of the first chunk is the refiner's sink, kept as it is. Without a runner, z."""
    if runner is None:
        return z
    if start == 0:
        return torch.cat([z[:, :, :1].to(runner.dtype), runner.refine(z[:, :, 1:])], 2)
    return runner.refine(z)


def chunk_frames(decoder: CausalDecodeStream, start: int, z: torch.Tensor) -> torch.Tensor:
    """A chunk's final latents (normalised) -> its video frames (n, H, W, 3) uint8 on z's device, the first chunk's
    decoded image frame dropped (the input image; with the refiner, its unrefined sink)."""
    vae = decoder.vae
    frames = _uint8_frames(decoder.decode(vae.denormalize(z.to(next(vae.parameters()).dtype))))
    return frames[1:] if start == 0 else frames


def _decode(vae, latents, vae_dtype) -> torch.Tensor:
    """Normalised latents (1, C, T, h, w) -> (F, H, W, 3) uint8 frames on the CPU, the same as
    _uint8_frames(vae.decode(...)) but streamed: each temporal window's frames go to the host as uint8 as soon as they
    are decoded (vae.decode_pieces), so the decoded video never exists whole on the device (at 961 frames it would be
    4.8 GiB in bf16, and its conversion twice that again in fp32)."""
    (T, h, w), cfg = latents.shape[2:], vae.cfg
    r = cfg.spatial_compression_ratio
    frames = torch.empty(1 + (T - 1) * cfg.temporal_compression_ratio, h * r, w * r, 3, dtype=torch.uint8)
    done = 0
    for piece in decode_pieces(vae, vae.denormalize(latents.to(vae_dtype))):
        frames[done:done + piece.shape[2]] = _uint8_frames(piece)
        done += piece.shape[2]
        del piece  # free this window on the device before the next one is decoded
    return frames


def _uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """A decoded video (1, 3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8 frames, on the video's device."""
    frames = ((video[0].float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous()


class _StreamProgress:
    """write() that counts: the frames written, the seconds to the first, and a progress line per chunk with the
    real-time factor of what has been written (seconds of video written / wall seconds since the stream started).
    It reads the host's clock only: the frames are on the CPU when they come, so nothing waits for the GPU."""

    def __init__(self, write: Callable[[torch.Tensor], None], fps: float):
        self.write, self.fps = write, fps
        self.frames, self.chunks, self.first_frame = 0, 0, None
        self.start = time.perf_counter()

    def __call__(self, frames: torch.Tensor):
        self.write(frames)
        self.frames, self.chunks = self.frames + len(frames), self.chunks + 1
        seconds = time.perf_counter() - self.start
        self.first_frame = seconds if self.first_frame is None else self.first_frame
        print(f"chunk {self.chunks}: {self.frames / self.fps:.1f} s of video in {seconds:.1f} s, "
              f"{self.frames / self.fps / seconds:.2f}x real time", file=sys.stderr)


def _overlapped_stream(chunks, refine, decode, write, latents):
    """run_stream's loop as a pipeline on three CUDA streams linked by events (streaming.md §7.1, as the official
    streaming pipeline): step t enqueues stage-1 chunk t (the next(chunks) call runs its forwards on the stage-1
    stream), refiner block t (after chunk t's event) and the decode of chunk t - 1 (after block t - 1's event) with
    a non-blocking copy of its frames into pinned host memory, then writes, in order, every decoded chunk whose copy
    has landed (event.query, no wait). So on the GPU stage 1 of chunk t + 1 runs beside the refiner on chunk t and
    the decoder on chunk t - 1. One host thread enqueues everything: it waits for the GPU only at the end, for the
    chunks still in flight (and where the steps themselves read values back: see bench/stream.py --sync_debug).
    Off CUDA there are no streams or events: the same steps run one after the other, the same results as the
    reference loop (only the order of the steps differs: chunk t is written after chunk t + 1 is made).

    Lifetimes: what one stream hands to another is a slice of two buffers made before the streams start, on the
    default stream they first wait for, and alive until they have all finished: `made` (stage 1's latents, written
    on the stage-1 stream, read by the refiner) and `latents` (the refined ones, read by the decoder), as the
    official mirror buffers. Everything else a stream makes is freed to that stream's pool and reused only by its
    later work, in order. The host frames stay referenced in `pending` until their event has completed; then
    written."""
    device = latents.device
    cuda = device.type == "cuda"
    streams = [torch.cuda.Stream(device) if cuda else None for _ in range(3)]
    stage1, refiner, decoder = streams
    made = torch.empty_like(latents)
    if cuda:  # the set-up work (noise, text, the refiner's sink, the buffers) was enqueued on the default stream
        for stream in streams:
            stream.wait_stream(torch.cuda.current_stream(device))

    def on(stream):
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def record(stream):
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def after(event, stream):  # the stream's next work waits for the event (on the GPU; the host goes on)
        if stream is not None:
            stream.wait_event(event)

    chunks = iter(chunks)
    pending = collections.deque()  # (event, frames on the host): decoded chunks in order, until written
    to_decode = None  # (start, stop, event) of the block the refiner took in the step before
    try:
        while True:
            with on(stage1):
                chunk = next(chunks, None)
                if chunk is not None:
                    s, e, z = chunk
                    made[:, :, s:e] = z
            refined = None
            if chunk is not None:
                after(record(stage1), refiner)
                with on(refiner):
                    latents[:, :, s:e] = refine(s, made[:, :, s:e])
                refined = (s, e, record(refiner))
            if to_decode is not None:
                ds, de, refined_event = to_decode
                after(refined_event, decoder)
                with on(decoder):
                    frames = decode(ds, latents[:, :, ds:de])
                    if cuda:  # the copy is the decode stream's last step; read only once its event has completed
                        frames = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True).copy_(
                            frames, non_blocking=True)
                pending.append((record(decoder), frames))
            while pending and (pending[0][0] is None or pending[0][0].query()):
                write(pending.popleft()[1])
            if chunk is None:
                break
            to_decode = refined
        while pending:
            event, frames = pending.popleft()
            if event is not None:
                event.synchronize()
            write(frames)
    finally:  # later work on the default stream (which reuses the buffers once freed) comes after the streams'
        for stream in streams if cuda else ():
            torch.cuda.current_stream(device).wait_stream(stream)


# ----------------------------------------------------------------------------------------------------------------
# Memory: block-wise weight streaming (exact bf16 under a memory cap), and the plan --gpu_memory picks

class WeightStream:
    """A model whose blocks' weights live in pinned host memory and come to the device one block ahead of use.

        stream = WeightStream(refiner, refiner.transformer_blocks, "cuda", streamed=26)
        refine(refiner, ...)                # as before: 26 of the 48 blocks are copied in as they run
        stream.close()                      # (or: with WeightStream(...): ...)

    `blocks` is the nn.ModuleList that the model's forward runs by iterating it in order (Refiner.forward,
    DiT.forward in both modes and dit.forward_chunk, Gemma-3's decoder layers): one mechanism for every model.
    `streamed` of them (all if more), spread evenly, keep their weights in pinned host memory; everything else of
    `model` moves to `device`. When the forward reaches block i its weights are there (the compute stream waits for
    their copy's event), and the copy of the next streamed block starts on a side CUDA stream, overlapping the
    compute of the blocks up to it; once block i has run, its device copy is dropped (record_stream: the memory is
    reused when the kernels queued on it are done). The last streamed block fetches the first for the next forward.
    So at most two streamed blocks are on the device (a third may wait to be reused), and the outputs are the
    resident model's bit for bit: the same weights, the same kernels. close() ends the stream; the streamed blocks'
    weights stay in host memory. On the CPU (the tests, the demo) the copies are plain copies."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, device, streamed: int):
        if type(blocks) is not nn.ModuleList or not any(m is blocks for m in model.modules()):
            raise ValueError("blocks: expected an nn.ModuleList of model (the blocks its forward iterates), not "
                             "already streamed")
        _check_streamed("streamed", streamed, least=1)
        self.device, self.blocks = torch.device(device), blocks
        n = len(blocks)
        k = min(streamed, n)
        self.streamed = [(2 * j + 1) * n // (2 * k) for j in range(k)]  # spread: resident blocks between copies
        # the block whose copy starts when block i starts: the next streamed one, cyclically
        self._next = [next((j for j in self.streamed if j > i), self.streamed[0]) for i in range(n)]
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._host, self._copies, moved = {}, {}, set()
        for i in self.streamed:
            self._host[i] = []
            for module in blocks[i].modules():
                moved.add(module)
                for slot, name, tensor in _own_tensors(module):
                    host = tensor.detach().cpu()
                    host = host.pin_memory() if self._side is not None else host  # asynchronous copies need pinning
                    _assign(module, slot, name, host)
                    self._host[i].append((module, slot, name, host))
        for module in model.modules():
            if module not in moved:
                for slot, name, tensor in _own_tensors(module):
                    _assign(module, slot, name, tensor.to(self.device))
        blocks.__class__, blocks._weight_stream = _StreamedBlocks, self

    def _fetch(self, i: int):
        """Start copying block i's weights to the device (on the side stream), unless they are there."""
        if i in self._copies:
            return
        side = torch.cuda.stream(self._side) if self._side is not None else nullcontext()
        with side:
            copies = [torch.empty_like(h, device=self.device).copy_(h, non_blocking=True) for *_, h in self._host[i]]
            self._copies[i] = (copies, self._side.record_event() if self._side is not None else None)

    def _run(self):
        """The blocks in order, each with its weights on the device while the caller runs it."""
        for i, block in enumerate(self.blocks._modules.values()):
            if i in self._host:
                self._fetch(i)
                copies, copied = self._copies[i]
                if copied is not None:
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(copied)
                    for t in copies:
                        t.record_stream(compute)
                for (module, slot, name, _), t in zip(self._host[i], copies):
                    _assign(module, slot, name, t)
            self._fetch(self._next[i])
            try:
                yield block
            finally:
                if i in self._host:
                    for module, slot, name, host in self._host[i]:
                        _assign(module, slot, name, host)
                    del self._copies[i]

    def close(self):
        """Stop streaming: the blocks are a plain nn.ModuleList again, the streamed ones' weights in host memory."""
        self._copies.clear()
        self.blocks.__class__ = nn.ModuleList
        del self.blocks._weight_stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _StreamedBlocks(nn.ModuleList):
    """The blocks of a WeightStream: iterating them (as the model's forward does) streams their weights."""

    def __iter__(self):
        return self._weight_stream._run()

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # transformers' Gemma-3 iterates layers[:num_hidden_layers], all of them
            if range(len(self))[idx] != range(len(self)):
                raise ValueError("a streamed block list (WeightStream) runs whole, not a slice of it")
            return self
        return super().__getitem__(idx)


def _own_tensors(module: nn.Module):
    """(slot, name, tensor) of the module's own parameters and buffers (not its children's)."""
    for slot in ("_parameters", "_buffers"):
        for name, tensor in getattr(module, slot).items():
            if tensor is not None:
                yield slot, name, tensor


def _assign(module: nn.Module, slot: str, name: str, tensor: torch.Tensor):
    """Point a parameter (the same Parameter object, so optimisers and hooks keep it) or a buffer at `tensor`."""
    if slot == "_parameters":
        module._parameters[name].data = tensor
    else:
        module._buffers[name] = tensor


def _check_streamed(name: str, value, least: int = 0):
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name}: expected a number of blocks >= {least} (0: none streamed), got {value!r}")


def stream_stage2(stage2: Stage2, device, gemma3_streamed: int, refiner_streamed: int) -> Stage2:
    """stage2, whose loaders give their models on the CPU, with the models put on `device` when loaded: Gemma-3's
    decoder layers (gemma3_streamed of them) and the refiner's blocks (refiner_streamed) streamed by WeightStream,
    the rest moved there (0: all of the model). Gemma-3's vision tower, never run for a prompt, stays on the CPU.
    The streams end with the models, which generate() frees after use."""
    _check_streamed("gemma3_streamed", gemma3_streamed)
    _check_streamed("refiner_streamed", refiner_streamed)

    def load_prompt_encoder():
        encoder = stage2.load_prompt_encoder()
        text = encoder.text_encoder.model.language_model  # transformers' Gemma-3: its text decoder
        if gemma3_streamed:
            WeightStream(text, text.layers, device, gemma3_streamed)  # (held by text.layers until freed)
        else:
            text.to(device)
        encoder.connectors.to(device)
        return encoder

    def load_refiner():
        model = stage2.load_refiner()
        if refiner_streamed:
            WeightStream(model, model.transformer_blocks, device, refiner_streamed)
            return model
        return model.to(device)
    return Stage2(load_prompt_encoder, load_refiner)


# What each stage needs at its peak, GiB allocated (torch.cuda.max_memory_allocated), bf16, for a minute of video
# (961 frames at 704x1280): the models' parameter counts x 2 bytes, and the working memory measured on an H200 (issue
# 22: bench/generate.py --refiner --frames 961; BENCHMARKS.md: the memory mode, the VAE decode). Precision: the sizes
# are bf16's, but for the transformers' blocks in BLOCK_GIB below; the working memory is bf16's measurement throughout.
GEMMA2_GIB = 4.87                                                           # Gemma-2-2b-it, 2.61 B parameters
VAE_GIB = 2.28                                                              # encoder + decoder, 1.22 B
DIT_BLOCKS, DIT_BLOCK_GIB, DIT_REST_GIB = 20, 0.244, 0.087                  # 2.66 B in all
REFINER_BLOCKS, REFINER_BLOCK_GIB, REFINER_REST_GIB = 48, 0.500, 0.283      # 13.04 B (video only)
GEMMA3_LAYERS, GEMMA3_LAYER_GIB = 48, 0.418  # Gemma-3-12B's text decoder, 11.4 B; its vision tower stays on the CPU
GEMMA3_REST_GIB = 1.88 + 2.01                # its embeddings, and the refiner's text connectors
WORKING_GIB = {                              # beyond the weights
    "stage 1": 11.44,             # the DiT step, CFG halves batched: 16.4 GiB with --offload (issue 22) - the DiT
    "stage 1 low_memory": 4.40,   # the memory mode: 9.36 GiB (BENCHMARKS.md, dit_step --part-frames 16) - the DiT
    "refiner prompt": 3.0,        # not measured: Gemma-3's 49 hidden states of 1024 tokens, normalised in fp32
    "refiner": 9.63,              # 36.2 GiB (issue 22, the VAE on the GPU) - refiner - VAE: the KV window is 7.1
    "decode": 3.86,               # bench/vae.py at 121 latent frames: 10.98 GiB - the whole video (4.84) - VAE
}
# A block's weights by --stage1_precision / --refiner_precision: quantize.py's formats on the blocks' linears of
# PRESETS["default"] / REFINER_INCLUDE (fp8: a byte a weight + an fp32 scale per output channel; nvfp4: half a byte +
# an E4M3 scale per 16 + an fp32 scale per layer); the rest of a block (norms, the camera path, the FFN's temporal
# and depthwise convs) stays bf16, as do the models outside their blocks. tests/test_generate.py counts the bytes of
# the quantised models built on the meta device.
BLOCK_GIB = {"DiT": {"bf16": DIT_BLOCK_GIB, "fp8": 0.160, "nvfp4": 0.123},
             "refiner": {"bf16": REFINER_BLOCK_GIB, "fp8": 0.250, "nvfp4": 0.141}}
MARGIN_GIB = 1.5  # the CUDA context and workspaces outside PyTorch's allocator (~1 GiB) and its fragmentation
IN_FLIGHT = 3     # streamed blocks on the device at once: computing, being copied, freed but not yet reusable
MINUTE = 961      # frames the table is for; longer videos scale stage 1's working memory, shorter ones need less


@dataclass
class MemoryPlan:
    """--gpu_memory's choice: generate()'s offload and memory mode, how many blocks of each model stream (0: none),
    and the peak (GiB) each stage is expected to reach, for the transformers' precisions it was planned for.
    Decoding always streams (generate._decode)."""
    gpu_memory: float
    offload: bool = False
    part_frames: int | None = None
    dit_streamed: int = 0
    gemma3_streamed: int = 0
    refiner_streamed: int = 0
    peaks: dict = field(default_factory=dict)
    stage1_precision: str = "bf16"
    refiner_precision: str = "bf16"

    def describe(self) -> str:
        """The one line generate.py prints."""
        def model(name, streamed, total, unit, precision=""):
            where = f"{streamed} of {total} {unit} streamed" if streamed else "on the GPU"
            return f"{name} {where}" + (f" ({precision})" if precision else "")
        parts = ["--offload" if self.offload else "no offload"] + ["--low_memory"] * (self.part_frames is not None)
        parts.append(model("DiT", self.dit_streamed, DIT_BLOCKS, "blocks", self.stage1_precision))
        if "refiner" in self.peaks:
            parts += [model("Gemma-3", self.gemma3_streamed, GEMMA3_LAYERS, "layers"),
                      model("refiner", self.refiner_streamed, REFINER_BLOCKS, "blocks", self.refiner_precision)]
        peaks = ", ".join(f"{stage} {gib:.1f}" for stage, gib in self.peaks.items())
        return (f"--gpu_memory {self.gpu_memory:g}: {'; '.join(parts)}; decoded frames streamed to the host; "
                f"expected peak GiB: {peaks}")


def plan_memory(gpu_memory: float, num_frames: int = MINUTE, refiner: bool = True, stage1_precision: str | None = None,
                refiner_precision: str | None = None) -> MemoryPlan:
    """The fastest settings whose expected peaks (the table above) fit a GPU of gpu_memory GiB with MARGIN_GIB to
    spare. Stage 1: everything on the GPU; else --offload (one model on the GPU at a time) with as few DiT blocks
    streamed as fit (cheap: a block's copy takes ~5 ms over PCIe, its compute ~0.3 s at 961 frames); else the memory
    mode (--low_memory, 1.14x the step) too. Gemma-3 and the refiner stream as few blocks as fit (spread evenly,
    so the copies overlap the resident blocks' compute). stage1_precision / refiner_precision: the DiT's and the
    refiner's blocks in "bf16", "fp8" or "nvfp4" (BLOCK_GIB; None: bf16). ValueError naming --gpu_memory when a
    stage cannot fit (for the refiner: at which precision it would)."""
    if not (isinstance(gpu_memory, (int, float)) and math.isfinite(gpu_memory) and gpu_memory > 0):
        raise ValueError(f"--gpu_memory: expected a positive number of GiB, got {gpu_memory!r}")
    for flag, precision in (("--stage1_precision", stage1_precision), ("--refiner_precision", refiner_precision)):
        if precision not in (None, "bf16", "fp8", "nvfp4"):
            raise ValueError(f"{flag}: expected bf16, fp8 or nvfp4, got {precision!r}")
    usable, scale = gpu_memory - MARGIN_GIB, max(1.0, num_frames / MINUTE)
    plan = MemoryPlan(gpu_memory, stage1_precision=stage1_precision or "bf16",
                      refiner_precision=refiner_precision or "bf16")
    dit_block, refiner_block = BLOCK_GIB["DiT"][plan.stage1_precision], BLOCK_GIB["refiner"][plan.refiner_precision]

    def fewest_streamed(rest: float, n: int, block: float, working: float):
        """(blocks streamed, peak): the fewest of n blocks streamed that fit, else all n (and a peak too high)."""
        for k in range(n + 1):
            peak = rest + working + (n - k + min(k, IN_FLIGHT)) * block
            if peak <= usable:
                break
        return k, peak

    stage1 = GEMMA2_GIB + VAE_GIB + DIT_REST_GIB + DIT_BLOCKS * dit_block + WORKING_GIB["stage 1"] * scale
    if stage1 > usable:
        plan.offload, plan.peaks["Gemma-2"] = True, GEMMA2_GIB
        plan.dit_streamed, stage1 = fewest_streamed(DIT_REST_GIB, DIT_BLOCKS, dit_block,
                                                    WORKING_GIB["stage 1"] * scale)
        if stage1 > usable:
            plan.part_frames = LOW_MEMORY_PART_FRAMES
            plan.dit_streamed, stage1 = fewest_streamed(DIT_REST_GIB, DIT_BLOCKS, dit_block,
                                                        WORKING_GIB["stage 1 low_memory"] * scale)
    plan.peaks["stage 1"] = stage1
    if refiner:
        vae = 0.0 if plan.offload else VAE_GIB  # without offload the VAE stays on the GPU through stage 2
        plan.gemma3_streamed, plan.peaks["refiner prompt"] = fewest_streamed(
            vae + GEMMA3_REST_GIB, GEMMA3_LAYERS, GEMMA3_LAYER_GIB, WORKING_GIB["refiner prompt"])
        plan.refiner_streamed, plan.peaks["refiner"] = fewest_streamed(
            vae + REFINER_REST_GIB, REFINER_BLOCKS, refiner_block, WORKING_GIB["refiner"])
    plan.peaks["decode"] = VAE_GIB + WORKING_GIB["decode"]
    stage, peak = max(plan.peaks.items(), key=lambda item: item[1])
    if peak > usable:
        precision = {"stage 1": plan.stage1_precision, "refiner": plan.refiner_precision}.get(stage, "bf16")
        hint = "; add --no_refiner" if stage.startswith("refiner") else ""
        if stage == "refiner":  # all its blocks streamed, IN_FLIGHT on the GPU: smaller blocks may fit
            least = {p: peak + MARGIN_GIB - IN_FLIGHT * (refiner_block - b) for p, b in BLOCK_GIB["refiner"].items()}
            fits = [f"--refiner_precision {p} ({gib:.1f} GiB)" for p, gib in least.items() if gib <= gpu_memory]
            hint = f"; add {' or '.join(fits + ['--no_refiner'])}"
        raise ValueError(f"--gpu_memory {gpu_memory:g}: {stage} needs at least {peak + MARGIN_GIB:.1f} GiB in "
                         f"{precision}" + hint)
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Models: the release folder, or tiny random ones for the demo

def _yaml_scalar(text: str):
    """A YAML scalar: null (also ~ or nothing), booleans, ints, floats (1e-4 included), quoted strings ('' is a
    quote inside '...'; no escapes in "..."), else the plain text (flow lists such as [8, 32, 32] too)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1].replace("''", "'") if text[0] == "'" else text[1:-1]
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return text.lower() == "true"
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        return float(text)
    return text


def _yaml_line(raw: str) -> str:
    """The line without its comment: a # at its start or after a space, outside quotes."""
    quote, i = None, 0
    while i < len(raw):
        c = raw[i]
        if quote == "'" and raw.startswith("''", i):
            i += 1  # a quote inside '...'
        elif quote:
            quote = None if c == quote else quote
        elif c in "'\"" and (i == 0 or raw[i - 1] in " [,-:"):
            quote = c
        elif c == "#" and (i == 0 or raw[i - 1] in " \t"):
            return raw[:i].rstrip()
        i += 1
    return raw.rstrip()


def read_release_yaml(path: str) -> dict:
    """The official config.yaml as nested dicts, read without PyYAML (not a dependency of this repository).

    The subset that the release configs use: `key: value` lines and `key:` lines opening a nested mapping, nested
    by indenting with spaces; a `key:` followed by `- item` lines (indented or not) holds a list of scalars; scalars
    as _yaml_scalar reads them; comments dropped. Flow collections ([a, b], {a: 1}) and list items that are mappings
    stay their text. Anything else (block strings |, >, anchors, several documents, tabs) is a ValueError naming
    the line, never a silently wrong value."""
    root: dict = {}
    stack: list = [(-1, root)]  # (indentation of the key owning the container, the container)
    pending = None  # (indentation, parent, key) of the last `key:` without a value: its lines say dict or list
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, raw in enumerate(lines, 1):
        line = _yaml_line(raw)
        body = line.lstrip(" ")
        if not body or body == "---":
            continue
        indent = len(line) - len(body)
        item = body == "-" or body.startswith("- ")
        if pending is not None:
            key_indent, parent, key = pending
            if indent > key_indent or (item and indent == key_indent):
                parent[key] = [] if item else {}
                stack.append((key_indent, parent[key]))
            pending = None
        while stack[-1][0] > indent or (stack[-1][0] == indent and not (item and isinstance(stack[-1][1], list))):
            stack.pop()
        container = stack[-1][1]
        match = None if item else re.fullmatch(r"([\w.-]+|'[^']*'|\"[^\"]*\")\s*:(?:\s+(.*))?", body)
        if item and isinstance(container, list):
            container.append(_yaml_scalar(body[1:].strip()))
        elif match and isinstance(container, dict):
            key, value = _yaml_scalar(match[1]), (match[2] or "").strip()
            if value in ("|", ">", "|-", ">-") or value.startswith(("&", "*")):
                raise ValueError(f"{path}:{number}: {body!r}: block strings and anchors are not read here")
            container[key] = _yaml_scalar(value)
            if not value:
                pending = (indent, container, key)
        else:
            raise ValueError(f"{path}:{number}: expected `key: value`, `key:` or `- item` indented with spaces, "
                             f"got {raw.strip()!r}")
    return root


CHUNK_CAUSAL_CHECKPOINT = "sana_wm_chunk_causal_1600m_720p.safetensors"
RELEASES = {  # release_kind's answers: what each is, and the parts that identify it (the official layouts)
    "bidirectional": ("the SANA-WM bidirectional release", RELEASE_LAYOUT),
    "streaming": ("the SANA-WM streaming release",
                  "sana_dit/model.pt, ltx2_causal_vae/, refiner_diffusers/ and gemma3_12b/"),
    "chunk_causal": ("the SANA-WM chunk-causal stage-1 teacher",
                     f"dit/{CHUNK_CAUSAL_CHECKPOINT} and config.yaml with model.chunk_size"),
}


def _release_kind(folder: str) -> str | None:
    """release_kind's answer, None for a folder that is none of the releases."""
    if os.path.isfile(os.path.join(folder, "sana_dit", "model.pt")):
        return "streaming"
    # The bidirectional release has a config.yaml beside dit/ too: the teacher's is told by its chunk size.
    config = os.path.join(folder, "config.yaml")
    if os.path.isfile(os.path.join(folder, "dit", CHUNK_CAUSAL_CHECKPOINT)) and os.path.isfile(config):
        model = read_release_yaml(config).get("model")
        if isinstance(model, dict) and model.get("chunk_size") is not None:
            return "chunk_causal"
    if os.path.isdir(os.path.join(folder, "dit")) and os.path.isdir(os.path.join(folder, "vae")):
        return "bidirectional"
    return None


def release_kind(folder: str) -> str:
    """Which official release the folder holds, from its layout: "bidirectional" (dit/, vae/, refiner/,
    text_encoder/), "streaming" (sana_dit/model.pt, ltx2_causal_vae/, refiner_diffusers/, gemma3_12b/) or
    "chunk_causal" (the stage-1 teacher: dit/sana_wm_chunk_causal_1600m_720p.safetensors + config.yaml, whose
    model.chunk_size marks it; the bidirectional release's config.yaml has none). Only the identifying parts are
    looked at: the loader of each release checks the rest and names what is missing."""
    if not os.path.isdir(folder):
        raise ValueError(f"folder: no such folder {folder!r}")
    kind = _release_kind(folder)
    if kind is None:
        raise ValueError(f"folder: {folder} holds none of the SANA-WM releases; expected "
                         + "; or ".join(f"{name} ({layout})" for name, layout in RELEASES.values()))
    return kind


def chunk_causal_settings(path: str) -> dict:
    """The chunk-causal teacher's sampling settings from its config.yaml (a file, or the release folder holding it):
    {"chunk_size": latent frames per chunk (model.chunk_size), "sampler": scheduler.vis_sampler (the release:
    chunk_flow_euler), "flow_shift": scheduler.inference_flow_shift}, each checked."""
    path = os.path.join(path, "config.yaml") if os.path.isdir(path) else path
    config = read_release_yaml(path)
    model, scheduler = config.get("model"), config.get("scheduler")
    chunk_size = model.get("chunk_size") if isinstance(model, dict) else None
    sampler, shift = (scheduler.get(k) if isinstance(scheduler, dict) else None
                      for k in ("vis_sampler", "inference_flow_shift"))
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{path}: model.chunk_size: expected a positive int, got {chunk_size!r}")
    if not isinstance(sampler, str):
        raise ValueError(f"{path}: scheduler.vis_sampler: expected a sampler name, got {sampler!r}")
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not 0 < shift < math.inf:
        raise ValueError(f"{path}: scheduler.inference_flow_shift: expected a positive number, got {shift!r}")
    return {"chunk_size": chunk_size, "sampler": sampler, "flow_shift": float(shift)}


def _check_release(weights: str, text_encoder: str | None = None, dit_path: str | None = None):
    """Fail before loading anything if --weights is another release or a part of stage 1 is missing, naming it and
    the flag that gives it (dit/ not needed with --model_path)."""
    if not os.path.isdir(weights):
        raise FileNotFoundError(f"--weights: no such folder {weights!r}")
    kind = _release_kind(weights)
    if kind not in (None, "bidirectional"):
        name, layout = RELEASES[kind]
        details = ""
        if kind == "chunk_causal":
            settings = chunk_causal_settings(weights)
            details = (f", chunk size {settings['chunk_size']}, sampler {settings['sampler']}, flow shift "
                       f"{settings['flow_shift']:g}")
        raise ValueError(f"--weights: {weights} is {name} ({layout}{details}); generate.py runs the bidirectional "
                         f"release ({RELEASE_LAYOUT})")
    for part in ("vae",) if dit_path else ("dit", "vae"):  # either may hold one native .safetensors, no config
        if not os.path.isdir(os.path.join(weights, part)):
            raise FileNotFoundError(f"--weights: {os.path.join(weights, part)}/ is missing (the release layout is "
                                    f"{RELEASE_LAYOUT})")
    text_dir, flag = text_encoder_folder(weights, text_encoder)
    check_model_folder(text_dir, "Gemma-2-2b-it", flag)
    tokenizer_folder(text_dir, flag)


def load_release(weights: str, dtype: torch.dtype, device, text_encoder: str | None = None, vae_device=None,
                 dit_path: str | None = None, official: bool = False):
    """Stage 1's (dit, vae, tokenizer, text_encoder) from the release folder, each loaded onto `device` (the VAE
    onto `vae_device` when given). text_encoder: Gemma-2-2b-it's folder (transformers layout, tokenizer files
    inside it or in a sibling tokenizer/), default <weights>/text_encoder: the release does not bundle it.
    dit_path: the DiT to load instead of <weights>/dit (the chunk-causal teacher's file), with official=True built
    with dit.OFFICIAL_SWITCHES (a file without config.json)."""
    _check_release(weights, text_encoder, dit_path)
    tokenizer, gemma = load_gemma2(weights, dtype, device, text_encoder)
    config = DiTConfig(**OFFICIAL_SWITCHES) if official else None
    dit = DiT.from_pretrained(dit_path or os.path.join(weights, "dit"), dtype=dtype, device=device,
                              config=config).eval()
    vae = VAE.from_pretrained(os.path.join(weights, "vae"), dtype=dtype,
                              device=device if vae_device is None else vae_device).eval()
    return dit, vae, tokenizer, gemma


def streaming_refiner(weights: str, dtype: torch.dtype, device, precision: str | None = None) -> Stage2:
    """The streaming release's refiner (refiner_diffusers/ transformer/ + connectors/, Gemma-3 in gemma3_12b/ with
    its tokenizer): its files checked now, the models loaded when generate_stream reaches them (the transformer's
    block linears at `precision`, refiner.Refiner.from_pretrained)."""
    folder, gemma3 = os.path.join(weights, "refiner_diffusers"), os.path.join(weights, "gemma3_12b")
    for part, what in (("transformer", "LTX-2 refiner"), ("connectors", "refiner text connectors")):
        check_model_folder(os.path.join(folder, part), what)
    check_model_folder(gemma3, "Gemma-3-12B")
    tokenizer_folder(gemma3, "--weights")
    return Stage2(lambda: PromptEncoder.from_pretrained(folder, dtype=dtype, device=device, text_encoder=gemma3),
                  lambda: Refiner.from_pretrained(folder, dtype=dtype, device=device, precision=precision))


def load_streaming_release(weights: str, dtype: torch.dtype, device, text_encoder: str | None = None):
    """The streaming release's stage 1 (dit, vae, tokenizer, text_encoder): sana_dit/model.pt built with
    dit.OFFICIAL_SWITCHES, the causal VAE ltx2_causal_vae/, and Gemma-2-2b-it (--text_encoder: the release does
    not bundle it either). Everything is checked before anything loads."""
    if _release_kind(weights) != "streaming":
        raise ValueError(f"--weights: {weights} is not the streaming release ({RELEASES['streaming'][1]})")
    check_model_folder(os.path.join(weights, "ltx2_causal_vae"), "the causal LTX-2 VAE")
    text_dir, flag = text_encoder_folder(weights, text_encoder)
    check_model_folder(text_dir, "Gemma-2-2b-it", flag)
    tokenizer_folder(text_dir, flag)
    tokenizer, gemma = load_gemma2(weights, dtype, device, text_encoder)
    dit = DiT.from_pretrained(os.path.join(weights, "sana_dit"), dtype=dtype, device=device,
                              config=DiTConfig(**OFFICIAL_SWITCHES)).eval()
    vae = VAE.from_pretrained(os.path.join(weights, "ltx2_causal_vae"), dtype=dtype, device=device).eval()
    if not vae.cfg.decoder_causal:
        raise ValueError(f"--weights: {weights}/ltx2_causal_vae/config.json has no causal decoder")
    return dit, vae, tokenizer, gemma


def release_refiner(weights: str, dtype: torch.dtype, device, refiner_root: str | None = None,
                    precision: str | None = None) -> Stage2 | None:
    """Stage 2 from refiner_root (default: the release's refiner/ folder), which holds transformer/, connectors/,
    text_encoder/ (Gemma-3) and tokenizer/: its files are checked now, the models are loaded only when
    generate() reaches stage 2, straight onto `device`, one after the other: Gemma-3 + connectors
    (PromptEncoder), then the transformer without its unused audio branch. None, with a warning, if refiner_root
    is not given and the release has no refiner/. precision: the transformer's block linears (Refiner.from_pretrained).
    """
    flag = "--weights" if refiner_root is None else "--refiner_root"
    folder = os.path.join(weights, "refiner") if refiner_root is None else refiner_root
    if not os.path.isdir(folder):
        if refiner_root is not None:
            raise FileNotFoundError(f"--refiner_root: no such folder {refiner_root!r}")
        print(f"warning: {weights} has no refiner/: stage 1 only (--no_refiner says so without this warning)",
              file=sys.stderr)
        return None
    for part, what in (("transformer", "LTX-2 refiner"), ("connectors", "refiner text connectors"),
                       ("text_encoder", "Gemma-3")):
        check_model_folder(os.path.join(folder, part), what, flag)
    tokenizer_folder(os.path.join(folder, "text_encoder"), flag)
    return Stage2(lambda: PromptEncoder.from_pretrained(folder, dtype=dtype, device=device),
                  lambda: Refiner.from_pretrained(folder, dtype=dtype, device=device, precision=precision))


DEMO_PROMPT = "a quiet desert road at dusk, the camera drives forward and turns right"


def demo_tokenizer():
    """A word-level tokenizer built in code (vocabulary: the chi prefix + the demo prompt) with Gemma's special ids
    (<pad> 0, <eos> 1, <bos> 2, <unk> 3). Unknown words map to <unk>; it adds BOS like Gemma's, so the chi-prefix
    arithmetic is exercised. Both demo text encoders (Gemma-2 and Gemma-3) read it."""
    transformers = require_transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", CHI_PROMPT + " " + DEMO_PROMPT)))
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")


def demo_text_encoder(seed: int = 0, hidden_size: int = 32):
    """The demo tokenizer and a tiny random Gemma-2 (2 layers)."""
    transformers = require_transformers()
    tokenizer = demo_tokenizer()
    config = transformers.Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    return tokenizer, transformers.Gemma2Model(config).eval()


DEMO_SIZE = (128, 192)  # 4 x 6 latent pixels

# The smallest configs that keep every code path of the release models (softmax and GDN blocks, every VAE stage).
DEMO_DIT = DiTConfig(in_channels=8, num_layers=4, hidden_size=48, num_attention_heads=2, softmax_every_n=2,
                     linear_head_dim=24, caption_channels=32)
DEMO_VAE = VAEConfig(latent_channels=8, block_out_channels=(16, 32, 64, 64), layers_per_block=(1, 1, 1, 1, 1),
                     decoder_block_out_channels=(16, 32, 64), decoder_layers_per_block=(1, 1, 1, 1))
DEMO_REFINER = RefinerConfig(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                             cross_attention_dim=16, caption_channels=16, num_layers=2)
# A 2-layer Gemma-3 gives 3 hidden states (embeddings + 2 layers), hence text_proj_in_factor 3 (49 in the release).
DEMO_CONNECTORS = ConnectorsConfig(caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                                   video_connector_attention_head_dim=8, audio_connector_num_attention_heads=2,
                                   audio_connector_attention_head_dim=8)


def demo_models(seed: int = 0, official: bool = False, causal_vae: bool = False):
    """(dit, vae, tokenizer, text_encoder): tiny models with random weights (PyTorch's default init), fp32; with
    official, the DiT has dit.OFFICIAL_SWITCHES (the chunk-causal and streaming releases'), with causal_vae the VAE
    a causal decoder (the streaming release's)."""
    torch.manual_seed(seed)
    dit_cfg = dataclasses.replace(DEMO_DIT, **OFFICIAL_SWITCHES) if official else DEMO_DIT
    dit = DiT(dit_cfg).eval()
    vae = VAE(dataclasses.replace(DEMO_VAE, decoder_causal=causal_vae)).eval()
    tokenizer, text_encoder = demo_text_encoder(seed, hidden_size=DEMO_DIT.caption_channels)
    return dit, vae, tokenizer, text_encoder


def demo_refiner(seed: int = 0, precision: str | None = None) -> Stage2:
    """A tiny random-weight stage 2, fp32 on the CPU: the refiner and connectors of DEMO_REFINER's sizes and a
    2-layer Gemma-3 (with the tiny vision tower its transformers class requires) reading the demo tokenizer; the
    refiner's block linears at `precision` (quantize.set_precision)."""
    transformers = require_transformers()
    tokenizer = demo_tokenizer()
    torch.manual_seed(seed)
    gemma3 = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=DEMO_CONNECTORS.caption_channels,
                         intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, sliding_window=8, max_position_embeddings=2048,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4)).eval()
    encoder = PromptEncoder(tokenizer, gemma3, TextConnectors(DEMO_CONNECTORS).eval())
    refiner = Refiner(DEMO_REFINER).eval()
    set_precision(refiner, precision, REFINER_INCLUDE, REFINER_EXCLUDE)
    return Stage2(lambda: encoder, lambda: refiner)


# ----------------------------------------------------------------------------------------------------------------
# Output

def _require_av():
    try:
        import av
    except ImportError:
        raise ImportError("writing the mp4 needs PyAV: pip install 'av>=12'") from None
    return av


def write_mp4(frames: torch.Tensor, path: str, fps: int):
    """(F, H, W, 3) uint8 frames -> H.264 mp4 (yuv420p, so H and W must be even)."""
    av = _require_av()
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "17"}
        for frame in frames.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


def _mp4_boxes(data: bytes) -> list[tuple[str, bytes]]:
    """The top-level boxes of an mp4 as (type, bytes)."""
    boxes, at = [], 0
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        if size < 8:  # 0 (to the end) and 1 (64-bit size) are not written for a chunk's few megabytes
            raise ValueError(f"mp4 box {kind!r} at byte {at}: unexpected size field {size}")
        boxes.append((kind.decode("latin-1"), data[at:at + size]))
        at += size
    return boxes


class StreamingMp4Writer:
    """An H.264 mp4 (yuv420p, crf 17 like write_mp4) written chunk by chunk, playable while it grows.

        with StreamingMp4Writer(path, fps, height, width) as writer:
            for frames in chunks:          # (n, H, W, 3) uint8, tensor or array
                writer.write(frames)       # on disk, decodable, when this returns

    A fragmented mp4: the header (ftyp + an empty moov) comes with the first chunk, then each chunk is one
    fragment (moof + mdat) that starts with a keyframe, so a player or decoder opening the file at any moment
    finds every chunk written so far, complete. The file is written under its final name (what the user watches
    while a long video is generated), opened with the first chunk (a failure before it leaves no file and an
    existing one untouched; then it is replaced). There is nothing to finish: after every write
    the file is a valid video of the frames so far, so if generation fails, or the process dies, the file left
    is a playable prefix of the video, and it stays: those frames are results, and the user may be watching them.
    A writer refusing a chunk (frames of the wrong shape) leaves the file as it was."""

    def __init__(self, path: str, fps: int, height: int, width: int):
        self.av = _require_av()
        if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
            raise ValueError(f"fps: expected a positive int (frames per second), got {fps!r}")
        if not all(isinstance(n, int) and n > 0 and n % 2 == 0 for n in (height, width)):
            raise ValueError(f"height, width: expected positive even ints (yuv420p halves the colour planes), got "
                             f"{height!r}, {width!r}")
        self.path, self.fps, self.height, self.width = path, fps, height, width
        self.frames_written, self._fragments, self._closed = 0, 0, False
        self._file = None                                  # opened by the first write

    def write(self, frames):
        """Append a chunk of (n, H, W, 3) uint8 frames (a tensor or an array) and flush it to the file."""
        if self._closed:
            raise ValueError(f"write: the writer of {self.path} is closed")
        array = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (self.height, self.width, 3) \
                or not len(array):
            raise ValueError(f"frames: expected (n >= 1, {self.height}, {self.width}, 3) uint8, got "
                             f"{tuple(array.shape)} {array.dtype}")
        # One encoder and muxer per chunk, in memory, closed at the chunk's end: PyAV cannot flush a muxer, and the
        # mp4 muxer writes a fragment only once the next one starts, so one muxer for the whole video would hold
        # back the newest chunk. Closing drains the encoder; a fresh encoder starts with a keyframe. frag_discont
        # with avoid_negative_ts disabled makes the fragment's decode time the frames' own (not 0), and
        # fragment_index numbers the fragments on, so the fragments of the separate muxers join into one track.
        # No B-frames: decode time = presentation time, never before the chunk's start.
        memory = io.BytesIO()
        options = {"movflags": "frag_keyframe+empty_moov+default_base_moof+frag_discont+skip_trailer",
                   "fragment_index": str(self._fragments + 1), "avoid_negative_ts": "disabled"}
        with self.av.open(memory, "w", format="mp4", options=options) as container:
            stream = container.add_stream("libx264", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.options = {"crf": "17", "bf": "0"}
            for i, frame in enumerate(array):
                video_frame = self.av.VideoFrame.from_ndarray(frame, format="rgb24")
                video_frame.pts = self.frames_written + i  # in 1/fps, the stream's time base
                container.mux(stream.encode(video_frame))
            container.mux(stream.encode())  # drain the encoder
        # Every chunk's muxer writes the same header (same encoder settings, so the same H.264 parameters): the
        # file takes the first one.
        keep = {"moof", "mdat"} | ({"ftyp", "moov"} if self._fragments == 0 else set())
        boxes = _mp4_boxes(memory.getvalue())
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "wb")
        self._file.write(b"".join(box for kind, box in boxes if kind in keep))
        self._file.flush()
        self._fragments += sum(kind == "moof" for kind, _ in boxes)
        self.frames_written += len(array)

    def close(self):
        """Close the file (again: nothing). The file is complete after every write; nothing is added here."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "StreamingMp4Writer":
        return self

    def __exit__(self, *exc):
        self.close()


OVERLAY_KEYS = "WASD"


def action_overlay_controls(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the action overlay shows on each of the F frames of the camera path c2w (F, 4, 4), derived from the
    poses as the official overlay does (NVlabs/Sana diffusion/utils/action_overlay.py), not from an action string:

    keys (F, 4) bool, held W A S D: from the step to the next pose in the camera's own frame, inv(c2w_t) c2w_t+1,
    W/S when it moves forward/back by more than max(0.005, 0.3 x the clip's 95th percentile of |dz|), D/A likewise
    right/left along x. So A/D light up for strafing (v2's j/l), never for turning.
    stick (F, 2) in [-1, 1], (yaw, pitch): the step's rotation as intrinsic Y-X-Z Euler angles, yaw = Y (> 0 turns
    right), pitch = X (> 0 looks up); each divided by max(0.5 deg, its 95th percentile of |angle|), clipped, then
    smoothed by e <- 0.35 x + 0.65 e from 0. The last frame repeats the one before.
    """
    poses = camera.check_c2w(c2w).astype(np.float64)
    if len(poses) < 2:
        return np.zeros((len(poses), 4), bool), np.zeros((len(poses), 2))
    rotation, position = poses[:, :3, :3], poses[:, :3, 3]
    rel_r = rotation[:-1].transpose(0, 2, 1) @ rotation[1:]  # the closed-form SE(3) inverse times the next pose
    rel_t = np.einsum("fji,fj->fi", rotation[:-1], position[1:] - position[:-1])
    dx, dz = rel_t[:, 0], rel_t[:, 2]
    thr_x, thr_z = (max(0.005, 0.3 * np.percentile(np.abs(d), 95)) for d in (dx, dz))
    keys = np.stack([dz > thr_z, dx < -thr_x, dz < -thr_z, dx > thr_x], axis=1)
    # R = Ry(yaw) Rx(pitch) Rz(roll): R[1, 2] = -sin(pitch), (R[0, 2], R[2, 2]) = cos(pitch) (sin, cos)(yaw).
    yaw = np.degrees(np.arctan2(rel_r[:, 0, 2], rel_r[:, 2, 2]))
    pitch = np.degrees(np.arcsin(np.clip(-rel_r[:, 1, 2], -1.0, 1.0)))
    angles = np.stack([yaw, pitch], axis=1)
    normalised = np.clip(angles / np.maximum(0.5, np.percentile(np.abs(angles), 95, axis=0)), -1, 1)
    stick, smoothed = np.zeros_like(normalised), np.zeros(2)
    for i, x in enumerate(normalised):
        smoothed = stick[i] = 0.35 * x + 0.65 * smoothed
    return np.concatenate([keys, keys[-1:]]), np.concatenate([stick, stick[-1:]])


def draw_action_overlay(frames: torch.Tensor, c2w: np.ndarray) -> torch.Tensor:
    """The official action overlay drawn over the video's bottom-left corner: the W A S D key tiles (held ones
    white, the others dark) and, beside them, a joystick whose knob shows the turn (x: yaw right, y: pitch, a look
    up moving it down as in the official overlay), as action_overlay_controls derives them from c2w.

    frames (F, H, W, 3) uint8; c2w (F', 4, 4) the camera of each frame (frame t shows entry min(t, F' - 1)).
    Returns new frames. Sizes follow the official ones (56 px keys on 704 x 1280); their pixel minimums assume a
    frame of ~400 px or more, so a smaller one shrinks the keys until the panel fits (at most H/6, (W - 2 margin)/7).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.dtype} {tuple(frames.shape)}")
    keys, stick = action_overlay_controls(c2w)
    video = frames.numpy().copy()
    height, width = video.shape[1:3]
    margin = height // 20
    key = max(1, min(max(32, height * 8 // 100), height // 6, (width - 2 * margin) // 7))
    gap, corner = max(4, key * 15 // 100), max(4, key // 5)
    cluster_w, cluster_h = 3 * key + 2 * gap, 2 * key + gap
    x0, y0 = margin, height - margin - cluster_h
    small = min(key, 32) / 32  # scales the official pixel minimums on frames too small for them
    r = max(round(30 * small), int(0.47 * cluster_h))  # the joystick plate's radius
    ring, halo = round(7 * small), round(14 * small)  # the outer ring's and the plate shadow's distance to the plate
    cx, cy = x0 + cluster_w + key + r, y0 + cluster_h // 2
    tiles = [(x0 + key + gap, y0), (x0, y0 + key + gap), (x0 + key + gap, y0 + key + gap),
             (x0 + 2 * (key + gap), y0 + key + gap)]  # W A S D
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", max(1, key // 2))
    except OSError:
        font = ImageFont.load_default(max(1, key // 2))
    white = lambda alpha: (255, 255, 255, alpha)  # noqa: E731

    # What every frame shares: the soft shadows, the plate, its ring and cross-hair.
    static = Image.new("RGBA", (width, height))
    draw = ImageDraw.Draw(static)
    draw.rounded_rectangle((x0 - 4, y0 - 4, x0 + cluster_w + 4, y0 + cluster_h + 4), corner + 4, fill=(0, 0, 0, 74))
    draw.ellipse((cx - r - halo, cy - r - halo, cx + r + halo, cy + r + halo), fill=(0, 0, 0, 88))
    static = static.filter(ImageFilter.GaussianBlur(max(2, key // 8)))
    draw = ImageDraw.Draw(static)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(7, 9, 13, 104), outline=white(95), width=max(1, r // 28))
    draw.ellipse((cx - r - ring, cy - r - ring, cx + r + ring, cy + r + ring), outline=white(42), width=1)
    arm = round(0.63 * r)
    draw.line((cx - arm, cy, cx + arm, cy), fill=white(56))
    draw.line((cx, cy - arm, cx, cy + arm), fill=white(56))
    box = static.getbbox()
    arrow, knob, line = max(round(7 * small), int(0.16 * r)), max(round(7 * small), int(0.13 * r)), max(2, r // 10)

    for t in range(len(video)):
        held, (yaw, pitch) = keys[min(t, len(keys) - 1)], stick[min(t, len(stick) - 1)]
        layer = static.copy()
        draw = ImageDraw.Draw(layer)
        for letter, (x, y), pressed in zip(OVERLAY_KEYS, tiles, held):
            fill, outline, ink = ((white(200), white(255), (0, 0, 0, 220)) if pressed else
                                  ((0, 0, 0, 100), white(60), white(180)))
            draw.rounded_rectangle((x, y, x + key - 1, y + key - 1), corner, fill=fill, outline=outline,
                                   width=max(1, key // 28))
            draw.text((x + key / 2, y + key / 2), letter, fill=ink, font=font, anchor="mm")
        for dx, dy, value in ((0, -1, -pitch), (0, 1, pitch), (-1, 0, -yaw), (1, 0, yaw)):  # up down left right
            tip_x, tip_y = cx + dx * (0.78 * r + arrow / 2), cy + dy * (0.78 * r + arrow / 2)
            base_x, base_y = tip_x - dx * arrow, tip_y - dy * arrow
            draw.polygon([(tip_x, tip_y), (base_x - dy * arrow / 2, base_y - dx * arrow / 2),
                          (base_x + dy * arrow / 2, base_y + dx * arrow / 2)], fill=white(210 if value > 0.08 else 72))
        kx, ky = cx + yaw * 0.48 * r, cy + pitch * 0.48 * r
        glow = Image.new("RGBA", (width, height))
        glow_draw = ImageDraw.Draw(glow)
        glow_draw.line((cx, cy, kx, ky), fill=white(110), width=line)
        glow_draw.ellipse((kx - 1.8 * knob, ky - 1.8 * knob, kx + 1.8 * knob, ky + 1.8 * knob), fill=white(60))
        layer.alpha_composite(glow.crop(box).filter(ImageFilter.GaussianBlur(max(1, r // 14))), dest=box[:2])
        draw.ellipse((kx - knob, ky - knob, kx + knob, ky + knob), fill=white(230))
        dot = max(2, knob // 3)
        draw.ellipse((kx - dot, ky - dot, kx + dot, ky + dot), fill=(20, 22, 28, 230))
        region = Image.fromarray(video[t, box[1]:box[3], box[0]:box[2]]).convert("RGBA")
        video[t, box[1]:box[3], box[0]:box[2]] = np.asarray(
            Image.alpha_composite(region, layer.crop(box)).convert("RGB"))
    return torch.from_numpy(video)


def output_stem(image_stem: str, seed: int, key: dict) -> str:
    """`<image stem>_<hash>_seed<seed>`: the hash (8 hex digits of a SHA-256) covers everything else that makes the
    video (`key`: prompt, camera trajectory, image pixels, steps, guidance, ...), so runs that differ in any of them
    never share a name, and a rerun of the same inputs finds its earlier result."""
    digest = hashlib.sha256()
    for name in sorted(key):
        value = key[name]
        digest.update(name.encode() + b"=" + (value if isinstance(value, bytes) else repr(value).encode()) + b";")
    return f"{image_stem}_{digest.hexdigest()[:8]}_seed{seed}"


def _check_output_dir(folder: str):
    """--output_dir can be made and written: the nearest part of it that exists is a writable folder. Nothing is
    created here, so a run refused later leaves nothing behind."""
    if not folder:
        raise ValueError("--output_dir: empty; give a folder ('.' for this one)")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output_dir {folder!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {folder!r}: no permission to write in {existing}")


def _write_outputs(writers: dict[str, Callable[[str], None]]):
    """Write each output path through writers[path](temporary path) in the same folder, then rename them all: an
    error on the way leaves none of them (and none of the folders this call made), never a half-written file."""
    folder = os.path.dirname(next(iter(writers)))
    made, parent = [], os.path.abspath(folder)
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    temporary, renamed = {}, []
    try:
        for path, write in writers.items():
            # Hidden, and ending in the real suffix (PyAV picks the container by it); made by the writer, so it
            # gets the usual permissions (tempfile.mkstemp's would be owner-only).
            stem, suffix = os.path.splitext(os.path.basename(path))
            temporary[path] = os.path.join(folder, f".{stem}.partial{os.getpid()}{suffix}")
            write(temporary[path])
        for path, tmp in temporary.items():
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException:
        for path in list(temporary.values()) + renamed:
            if os.path.exists(path):
                os.remove(path)
        for made_folder in made:  # the deepest first
            if os.path.isdir(made_folder) and not os.listdir(made_folder):
                os.rmdir(made_folder)
        raise


def _save_npy(array: np.ndarray) -> Callable[[str], None]:
    def write(path: str):
        with open(path, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, array)
    return write


# ----------------------------------------------------------------------------------------------------------------
# Command line

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISIONS = {"bf16": "bf16", "fp8": "fp8", "nvfp4": "nvfp4", "fp4": "nvfp4"}  # fp4: the official script's name


def _looks_like_path(value: str) -> bool:
    """A --prompt value meant as a file: it ends with .txt, or it holds a path separator and no whitespace (a
    prompt is words). Such a value that names no file is refused rather than generated from as prompt text."""
    separators = {os.sep, os.altsep} - {None}
    return value.lower().endswith(".txt") or (any(s in value for s in separators) and not any(
        c.isspace() for c in value))


def _read_prompt(prompt: str) -> str:
    """--prompt is a text file (UTF-8) when such a file exists or the value looks like a path, else the prompt."""
    if not os.path.isfile(prompt):
        if os.path.exists(prompt) or _looks_like_path(prompt):
            raise FileNotFoundError(f"--prompt: no such file {prompt!r} (a value ending in .txt, or with a / and no "
                                    f"spaces, is read as a prompt file)")
        return prompt
    try:
        with open(prompt, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt: the file {prompt!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise ValueError(f"--prompt: the file {prompt!r} is empty")
    return text


def _read_npy(path: str, flag: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: no such file {path!r}")
    try:
        return np.load(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{flag}: {path!r} is not a readable .npy file ({e})") from None


def _read_camera(path: str) -> np.ndarray:
    poses = _read_npy(path, "--camera")
    try:
        return camera.check_c2w(poses)
    except ValueError as e:
        raise ValueError(f"--camera {path}: {e}") from None


def _read_intrinsics(values: list[str] | None):
    """--intrinsics: one .npy file ((3, 3), (F, 3, 3), (4,) or (F, 4)) or the four numbers fx fy cx cy."""
    if values is None:
        return None
    if len(values) == 1 and values[0].endswith(".npy"):
        return _read_npy(values[0], "--intrinsics")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if len(numbers) != 4:
        raise ValueError(f"--intrinsics: expected a .npy file or four numbers fx fy cx cy, got {' '.join(values)!r}")
    return numbers


def demo_image(height: int = 256, width: int = 384) -> Image.Image:
    """A synthetic first frame for the demo: a horizon with a sky and ground gradient."""
    v = np.linspace(0, 1, height)[:, None, None]
    u = np.linspace(0, 1, width)[None, :, None]
    sky = np.array([90, 140, 220]) * (1 - 0.5 * v) + 40 * u
    ground = np.array([200, 160, 100]) * (0.6 + 0.4 * v) - 30 * u
    pixels = np.where(v < 0.45, sky, ground)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _finite_float(value: str) -> float:
    """argparse type of every float flag: NaN and infinities are refused with the flag's name."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default except None: the help of those flags says what leaving them out does."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as the CLI's other refusals: one line on stderr, exit code 2 (main catches it)."""

    def error(self, message):
        raise ValueError(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="SANA-WM: image + prompt + camera path -> video (stage 1 + refiner). The official "
                            "script's flag names (--step, --cfg_scale, --flow_shift, --refiner_root, --offload_vae, "
                            "--offload_refiner, --save_stage1) are accepted.",
                formatter_class=_HelpFormatter)
    p.add_argument("--image",
                   help="first frame (any size; resized and centre-cropped to 704x1280); required but with --demo")
    p.add_argument("--prompt", help="the text prompt, or a UTF-8 text file holding it; a value ending in .txt or "
                                    "with a / and no spaces is a file and must exist; required but with --demo")
    p.add_argument("--action", help="camera as WASD/IJKL actions, e.g. 'w-80,dw-40,w-40' (frames per key set; "
                                    "w/s forward/back, i/k look up/down, v2's a/d turn and j/l strafe); this or "
                                    "--camera (--demo: 'w-8,d-8')")
    p.add_argument("--camera",
                   help="camera as a .npy of (F, 4, 4) camera-to-world poses (OpenCV axes); this or --action")
    p.add_argument("--intrinsics", nargs="+", metavar="K",
                   help="fx fy cx cy in input-image pixels, or a .npy (3,3)/(F,3,3)/(4,)/(F,4); default: 60 deg FOV")
    p.add_argument("--action_scheme", choices=sorted(camera.ACTION_SCHEMES), default="v2",
                   help="v2: the official action DSL (a/d turn, j/l strafe, eased motion); legacy: diffusers "
                        "0.42.1's (a/d strafe, j/l turn, constant steps)")
    p.add_argument("--translation_speed", type=_finite_float, default=None,
                   help="world units per frame for w/s and the strafe keys (default: v2 0.025, legacy 0.05)")
    p.add_argument("--rotation_speed_deg", type=_finite_float, default=None,
                   help="degrees per frame for i/k and the turn keys (default: v2 0.6, legacy 1.2)")
    p.add_argument("--no_action_overlay", action="store_true",
                   help="with --action, leave out the W/A/S/D keys and joystick drawn over the video")
    p.add_argument("--num_frames", type=int, default=None,
                   help="snapped to 8k+1 (24k+1 with --stream), at most the trajectory's length; the refiner drops "
                        "the first frame; when not given, 161 (241 with --stream)")
    p.add_argument("--steps", "--step", type=int, default=60, help="denoising steps of stage 1, in [1, 1000]")
    p.add_argument("--guidance_scale", "--cfg_scale", type=_finite_float, default=5.0,
                   help="classifier-free guidance scale, >= 1 (1 = no guidance)")
    p.add_argument("--flow_shift", type=_finite_float, default=None,
                   help=f"the sampler's noise-level shift, > 0; when not given, the release's {FLOW_SHIFT}")
    p.add_argument("--negative_prompt", default="",
                   help="text for the unconditional half of guidance (default: %(default)r)")
    p.add_argument("--seed", type=int, default=None,
                   help="stage 1's noise, in [0, 2^63) (the refiner draws from its own fixed seed 42, as the "
                        "reference does); when not given, 0 (42 with --stream, as the streaming release)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the mp4 and of the refiner's time axis")
    p.add_argument("--output_dir", default="outputs",
                   help="where <image stem>_<hash>_seed<seed>.mp4 and its camera path <...>_c2w.npy are written "
                        "(stem 'demo' for --demo; the hash covers the prompts, image, camera, intrinsics, steps, "
                        "guidance, shift, frames, fps, weights and dtype, so different runs never share a name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs of the same name; without it such a run is refused before it starts")
    p.add_argument("--weights", help="the release folder: dit/, vae/, refiner/ (and text_encoder/ if you put "
                                     "Gemma-2 there); required but with --demo")
    p.add_argument("--text_encoder",
                   help="Gemma-2-2b-it's folder (config.json + *.safetensors, tokenizer files inside or in a "
                        "sibling tokenizer/); the release does not include it: download "
                        "Efficient-Large-Model/gemma-2-2b-it from the Hugging Face hub; when not given, "
                        "<weights>/text_encoder")
    p.add_argument("--refiner_root",
                   help="the refiner folder: transformer/, connectors/, text_encoder/ (Gemma-3), tokenizer/; "
                        "when not given, <weights>/refiner, and stage 1 only (with a warning) if that is absent")
    p.add_argument("--no_refiner", action="store_true",
                   help="stage 1 only: skip the LTX-2 refiner (which runs by default when there is a refiner folder)")
    p.add_argument("--save_stage1", action="store_true",
                   help="also write stage 1's video, decoded before the refiner, as <name>_stage1.mp4 (needs the "
                        "refiner; the main video is unchanged)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="the models' dtype")
    for flag, layers in (("--stage1_precision", "the stage-1 DiT's block linears (attention, cross-attention, "
                                                "FFN 1x1 convs; the camera path, embedders, final layer stay in "
                                                "--dtype)"),
                         ("--refiner_precision", "the refiner's block linears (attention, cross-attention, "
                                                 "feed-forward; its embedders and projections stay in --dtype)")):
        p.add_argument(flag, choices=PRECISIONS, default=None,
                       help=f"{layers}: bf16 = unquantised (in --dtype); fp8 = E4M3 weights and activations, a "
                            f"scale per channel and per token (W8A8, torch._scaled_mm: needs an sm_89+ GPU, Ada or "
                            f"Hopper, and bf16); nvfp4 (fp4, the official script's name) = quantize.py's 4-bit "
                            f"weights. A bf16 checkpoint is quantised as it loads; default: the checkpoint's own "
                            f"(the release's bf16, a quantize.py file's format)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the models run")
    p.add_argument("--offload", action="store_true",
                   help="keep only the running model on the GPU (implies --offload_vae and --offload_refiner)")
    p.add_argument("--offload_vae", action="store_true",
                   help="keep the VAE on the CPU except while it encodes the first frame and decodes the video")
    p.add_argument("--offload_refiner", action="store_true",
                   help="stage 2 alone on the GPU: the VAE leaves it before the refiner loads (Gemma-2 and the DiT "
                        "always leave it, and the refiner's models are always freed before decoding)")
    p.add_argument("--gpu_memory", type=_finite_float, default=None, metavar="GiB",
                   help="the GPU's memory: picks --offload, --low_memory and the block-wise weight streaming of the "
                        "DiT, Gemma-3 and the refiner (exact, slower) to fit it, their blocks counted at "
                        "--stage1_precision / --refiner_precision (bf16 without them), and prints what it chose "
                        "(README: a table by GPU size); the decoded frames always stream to the host")
    p.add_argument("--low_memory", action="store_true",
                   help=f"the DiT's memory mode: {LOW_MEMORY_PART_FRAMES} latent frames at a time, CFG halves one "
                        f"after the other (slower; a 961-frame step fits a 12 GiB GPU, BENCHMARKS.md)")
    p.add_argument("--demo", action="store_true",
                   help="tiny RANDOM-weight models on the CPU: checks the plumbing, the video is noise")
    p.add_argument("--stream", action="store_true",
                   help="the streaming release: chunks of 3 latent frames, 4 distilled steps each, each refined "
                        "(unless --no_refiner) and decoded by the causal VAE into an mp4 (<name>_streaming.mp4) "
                        "that plays while it grows; automatic when --weights is the streaming release (sana_dit/, "
                        "ltx2_causal_vae/, refiner_diffusers/, gemma3_12b/)")
    p.add_argument("--model_path", help="the stage-1 DiT file or folder to use instead of <weights>/dit, e.g. the "
                                        "chunk-causal teacher's dit/sana_wm_chunk_causal_1600m_720p.safetensors")
    p.add_argument("--config", help="the release's config.yaml beside --model_path (the chunk-causal teacher's "
                                    "selects chunk_flow_euler, its chunk size and flow shift)")
    p.add_argument("--sampling_algo", choices=("auto",) + SAMPLERS, default="auto",
                   help="stage 1's sampler; auto: chunk_flow_euler for a chunk-causal --config, else flow_euler")
    p.add_argument("--chunk_interval_k", type=_finite_float, default=None,
                   help="chunk_flow_euler: each chunk starts this fraction of the steps after the one before; when "
                        "not given, 1 / the number of chunks")
    args = p.parse_args(argv)
    args.stage1_precision, args.refiner_precision = map(PRECISIONS.get, (args.stage1_precision, args.refiner_precision))
    streaming = args.stream or (args.weights is not None and _release_kind(args.weights) == "streaming")
    args.stream = streaming
    args.num_frames = args.num_frames if args.num_frames is not None else (241 if streaming else 161)
    args.seed = args.seed if args.seed is not None else (STREAM_SEED if streaming else 0)
    return args


@contextmanager
def _threads(n: int):
    """CPU threads for PyTorch's operators. The demo's models are so small that more than one thread only adds
    synchronisation (about 30x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: argparse.Namespace) -> str:
    """The CLI's work; returns the path of the mp4. Every input is read and checked, and the output names are
    known to be free, before any model loads; the outputs appear only once complete."""
    _check_output_dir(args.output_dir)
    if args.action is not None and args.camera is not None:
        raise ValueError("give exactly one of --action or --camera, not both")
    if args.save_stage1 and args.no_refiner:
        raise ValueError("--save_stage1: the stage-1 video is the main one with --no_refiner; drop one of them")
    if args.demo:
        for flag in ("weights", "text_encoder", "refiner_root"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--demo builds its own random models: drop --{flag}")
        stages = ("streaming " if args.stream else "") + "stage 1" + ("" if args.no_refiner else " + refiner")
        print(f"DEMO: tiny models with RANDOM weights on the CPU ({stages}). The video is noise; this only proves "
              f"the plumbing.")
        if args.action is None and args.camera is None:
            args.action = "w-48,d-48" if args.stream else "w-8,d-8"  # streaming: 4 chunks of 24 frames
    else:
        for flag in ("weights", "image", "prompt"):
            if getattr(args, flag) is None:
                raise ValueError(f"--{flag} is required (or run --demo)")
        if args.action is None and args.camera is None:
            raise ValueError("give exactly one of --action (e.g. 'w-80,dw-40,w-40') or --camera (a c2w .npy)")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.stream:
        for flag in ("save_stage1", "low_memory", "model_path", "config", "refiner_root", "chunk_interval_k",
                     "flow_shift", "offload", "offload_vae", "offload_refiner", "gpu_memory"):
            if getattr(args, flag) not in (None, False):
                raise ValueError(f"--{flag}: not with --stream (the streaming release's own models and sampler)")
        if args.sampling_algo != "auto":
            raise ValueError("--sampling_algo: not with --stream (its sampler is the distilled model's own)")
        if args.num_frames < 25:
            raise ValueError(f"--num_frames: streaming makes 24k + 1 frames, at least 25; got {args.num_frames}")
    sampler, flow_shift = args.sampling_algo, args.flow_shift
    if args.config is not None:
        settings = chunk_causal_settings(args.config)
        if settings["chunk_size"] != 3:
            raise ValueError(f"--config: chunk size {settings['chunk_size']}; the releases use 3")
        sampler = settings["sampler"] if sampler == "auto" else sampler
        flow_shift = settings["flow_shift"] if flow_shift is None else flow_shift
    sampler = "flow_euler" if sampler == "auto" else sampler
    # The chunk-causal teacher (its --config, or its sampler) is built with the official code's switches.
    teacher = args.config is not None or sampler == "chunk_flow_euler"
    if sampler not in SAMPLERS:
        raise ValueError(f"--config: scheduler.vis_sampler {sampler!r}; expected one of {SAMPLERS}")
    if args.model_path is not None and not os.path.exists(args.model_path):
        raise ValueError(f"--model_path: no such file or folder {args.model_path!r}")
    image = _load_image(args.image) if args.image is not None else demo_image()
    prompt = _read_prompt(args.prompt) if args.prompt is not None else DEMO_PROMPT
    c2w = check_inputs(prompt, args.action, _read_camera(args.camera) if args.camera is not None else None,
                       args.translation_speed, args.rotation_speed_deg, args.steps, args.num_frames, args.fps,
                       args.action_scheme, guidance_scale=args.guidance_scale, flow_shift=args.flow_shift,
                       seed=args.seed)
    intrinsics = _read_intrinsics(args.intrinsics)
    plan = _memory_plan(args)
    if intrinsics is not None:
        camera.check_field_of_view(intrinsics, *image.size)
        # (refuses per-frame intrinsics fewer than the frames made, before any model loads)
        camera.prepare_trajectory(c2w, intrinsics, min(args.num_frames, len(c2w)), 24 if args.stream else 8)

    key = dict(prompt=prompt, negative_prompt=args.negative_prompt, image=np.asarray(image).tobytes(),
               image_size=image.size, c2w=np.ascontiguousarray(c2w, np.float64).tobytes(),
               intrinsics=np.asarray(intrinsics if intrinsics is not None else [], np.float64).tobytes(),
               num_frames=args.num_frames, steps=args.steps, guidance_scale=args.guidance_scale,
               flow_shift=flow_shift, config=args.config and os.path.realpath(args.config), fps=args.fps,
               refiner=not args.no_refiner and (args.refiner_root or "default"),
               weights=None if args.demo else os.path.realpath(args.weights),
               text_encoder=args.text_encoder and os.path.realpath(args.text_encoder),
               dtype=None if args.demo else args.dtype,
               overlay=args.action is not None and not args.no_action_overlay, stream=args.stream,
               model_path=args.model_path and os.path.realpath(args.model_path), sampler=sampler,
               chunk_interval_k=args.chunk_interval_k)
    key.update({flag: getattr(args, flag) for flag in ("stage1_precision", "refiner_precision") if getattr(args, flag)})
    stem = "demo" if args.image is None else os.path.splitext(os.path.basename(args.image))[0]
    path = os.path.join(args.output_dir, output_stem(stem, args.seed, key) + ("_streaming" * args.stream) + ".mp4")
    paths = [path, path[:-4] + "_c2w.npy"] + [path[:-4] + "_stage1.mp4"] * args.save_stage1
    taken = [p for p in paths if os.path.exists(p)]
    if taken and not args.overwrite:
        raise ValueError(f"--output_dir: {taken[0]} exists (the same inputs were run before); give --overwrite to "
                         f"replace it")

    group = _torchrun_group(args)
    if plan is not None:
        print(plan.describe() + (" [DEMO: applied to the tiny models on the CPU]" if args.demo else ""))
    if args.stream:
        return _run_stream(args, image, prompt, c2w, intrinsics, path, paths[1])
    if args.demo:
        dit, vae, tokenizer, text_encoder = demo_models(official=teacher)
        stage2 = None if args.no_refiner else demo_refiner(precision=args.refiner_precision)
        device, size = "cpu", {"height": DEMO_SIZE[0], "width": DEMO_SIZE[1]}
    else:
        device, size = args.device, {}
        dtype = DTYPES[args.dtype]
        _check_release(args.weights, args.text_encoder, args.model_path)
        _check_precisions(args, args.model_path or os.path.join(args.weights, "dit"))
        if args.save_stage1 and args.refiner_root is None and not os.path.isdir(os.path.join(args.weights,
                                                                                              "refiner")):
            raise ValueError(f"--save_stage1: {args.weights} has no refiner/ (and no --refiner_root is given), so "
                             f"the video is stage 1's")
        stage2 = None if args.no_refiner else release_refiner(args.weights, dtype, "cpu" if plan else device,
                                                              args.refiner_root, args.refiner_precision)
        models_device = "cpu" if args.offload else device  # generate() moves each onto the device when it runs
        dit, vae, tokenizer, text_encoder = load_release(
            args.weights, dtype, models_device, args.text_encoder,
            vae_device="cpu" if args.offload_vae else models_device, dit_path=args.model_path,
            official=teacher)
    set_precision(dit, args.stage1_precision, *PRESETS["default"])

    if plan is not None and stage2 is not None:
        stage2 = stream_stage2(stage2, device, plan.gemma3_streamed, plan.refiner_streamed)
    with _threads(1 if args.demo else torch.get_num_threads()):
        result = generate(dit, vae, tokenizer, text_encoder, image, prompt, refiner=stage2, c2w=c2w,
                          intrinsics=intrinsics, num_frames=args.num_frames, steps=args.steps,
                          guidance_scale=args.guidance_scale, flow_shift=flow_shift,
                          negative_prompt=args.negative_prompt, seed=args.seed, fps=args.fps, device=device,
                          offload=args.offload and not args.demo, offload_vae=args.offload_vae and not args.demo,
                          offload_refiner=args.offload_refiner and not args.demo,
                          part_frames=LOW_MEMORY_PART_FRAMES if args.low_memory else None,
                          decode_stage1=args.save_stage1, sampler=sampler, chunk_interval_k=args.chunk_interval_k,
                          stream_dit_blocks=plan.dit_streamed if plan else 0, group=group, **size)
    if group is not None and dist.get_rank(group) != 0:
        return path                                         # rank 0 writes the outputs

    overlay = args.action is not None and not args.no_action_overlay
    video = draw_action_overlay(result.frames, result.c2w) if overlay else result.frames
    writers = {path: lambda tmp: write_mp4(video, tmp, args.fps), paths[1]: _save_npy(result.c2w)}
    if args.save_stage1:
        # Stage 1's video keeps the first frame that the refined one drops: its camera is the whole trajectory.
        stage1 = draw_action_overlay(result.stage1_frames, c2w) if overlay else result.stage1_frames
        writers[paths[2]] = lambda tmp: write_mp4(stage1, tmp, args.fps)
    _write_outputs(writers)
    # Said once the video exists (an error stays the only line on stderr).
    if args.action is not None and camera.action_scheme_matters(args.action):
        turn, strafe = ("a/d", "j/l") if args.action_scheme == "v2" else ("j/l", "a/d")
        print(f"note: --action ran under the {args.action_scheme} action scheme ({turn} turn, {strafe} strafe); "
              f"strings of the other scheme convert by swapping a<->j and d<->l, or pass --action_scheme "
              f"{'legacy' if args.action_scheme == 'v2' else 'v2'}", file=sys.stderr)
    F, H, W, _ = result.frames.shape
    peaks = result.peak_memory_gib
    memory = (f"{max(peaks.values()):.1f} GiB (" + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + ")"
              if peaks else "n/a (CPU)")
    refined = f"refiner {result.refine_seconds:.1f} s, " if result.refine_seconds is not None else "no refiner, "
    print(f"{path}: {F} frames, {W}x{H} at {args.fps} fps, {result.seconds_per_step:.2f} s/step, {refined}"
          f"decode {result.decode_seconds:.1f} s, peak GPU memory {memory}"
          + (" [DEMO: random weights]" if args.demo else "")
          + (f"; stage 1: {paths[2]}" if args.save_stage1 else ""))
    return path


def _memory_plan(args) -> MemoryPlan | None:
    """--gpu_memory's plan (None without it), the flags it sets (--offload, --low_memory) set in args."""
    if args.gpu_memory is None:
        return None
    for flag in ("offload", "offload_vae", "offload_refiner", "low_memory"):
        if getattr(args, flag):
            raise ValueError(f"--{flag}: --gpu_memory chooses the memory flags itself; drop one of them")
    if not args.demo and not args.device.startswith("cuda"):
        raise ValueError(f"--gpu_memory: plans the memory of a GPU, but --device is {args.device}")
    # The precision flags as given: without one, the plan counts bf16 blocks (a quantize.py checkpoint's are smaller)
    plan = plan_memory(args.gpu_memory, args.num_frames, refiner=not args.no_refiner,
                       stage1_precision=args.stage1_precision, refiner_precision=args.refiner_precision)
    args.offload, args.low_memory = plan.offload, plan.part_frames is not None
    return plan


def _torchrun_group(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL for CUDA, gloo on the CPU), take the GPU
    LOCAL_RANK, and return the group over which stage 1's frames are split (parallel.py); None in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    for flag in ("stream", "gpu_memory", "low_memory"):
        if getattr(args, flag):
            raise ValueError(f"--{flag}: runs in one process; under torchrun stage 1's frames are split instead")
    cuda = not args.demo and args.device.startswith("cuda")
    if args.device == "cuda" and cuda:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.group.WORLD


def _check_precisions(args, dit_path: str) -> None:
    """--stage1_precision / --refiner_precision against the GPU and the stage-1 checkpoint, before any model loads:
    fp8 needs an sm_89+ GPU and bf16; a quantize.py file holds its own format (quantising again only loses more)."""
    for flag in ("--stage1_precision", "--refiner_precision"):
        if getattr(args, flag[2:]) == "fp8" and torch.device(args.device).type == "cuda":
            try:
                check_fp8_device(args.device)
            except ValueError as e:
                raise ValueError(f"{flag} {e}") from None
            if args.dtype != "bf16":
                raise ValueError(f"{flag} fp8: the FP8 matmul takes bf16 activations on CUDA; drop --dtype "
                                 f"{args.dtype}")
    if args.stage1_precision is not None and os.path.exists(dit_path):  # (a missing one: the loader says so)
        held = checkpoint_precision(find_checkpoint(dit_path)[1])
        if held not in ("bf16", args.stage1_precision):
            raise ValueError(f"--stage1_precision {args.stage1_precision}: {dit_path} holds {held} layers (a "
                             f"quantize.py file); pass --stage1_precision {held}, or a bf16 checkpoint")


def _run_stream(args, image, prompt, c2w, intrinsics, path, camera_path) -> str:
    """run() for --stream: the streaming release written into the mp4 as it is made (stage 1, the refiner unless
    --no_refiner, the causal decoder)."""
    if args.demo:
        dit, vae, tokenizer, text_encoder = demo_models(official=True, causal_vae=True)
        stage2 = None if args.no_refiner else demo_refiner(precision=args.refiner_precision)
        device, size = "cpu", {"height": DEMO_SIZE[0], "width": DEMO_SIZE[1]}
    else:
        device, size, dtype = args.device, {}, DTYPES[args.dtype]
        _check_precisions(args, os.path.join(args.weights, "sana_dit"))
        stage2 = None if args.no_refiner else streaming_refiner(args.weights, dtype, device,
                                                                args.refiner_precision)  # checked, not loaded
        dit, vae, tokenizer, text_encoder = load_streaming_release(args.weights, dtype, device, args.text_encoder)
    set_precision(dit, args.stage1_precision, *PRESETS["default"])
    height, width = size.get("height", HEIGHT), size.get("width", WIDTH)
    with _threads(1 if args.demo else torch.get_num_threads()), StreamingMp4Writer(path, args.fps, height,
                                                                                    width) as writer:
        result = generate_stream(dit, vae, tokenizer, text_encoder, image, prompt, writer.write, c2w=c2w,
                                 intrinsics=intrinsics, num_frames=args.num_frames, seed=args.seed, fps=args.fps,
                                 device=device, refiner=stage2, **size)
    _write_outputs({camera_path: _save_npy(result.c2w)})
    print(f"{path}: {result.frames} frames, {width}x{height} at {args.fps} fps, "
          f"{result.frames / args.fps / result.seconds:.2f}x real time, first frames after "
          f"{result.first_frame_seconds:.1f} s" + (" [DEMO: random weights]" if args.demo else ""))
    return path


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        run(args)
    except torch.OutOfMemoryError:
        print(f"error: out of GPU memory at --num_frames {args.num_frames}: try --gpu_memory with your GPU's GiB "
              f"(or --offload: only the running model on the GPU; --low_memory), fewer --num_frames"
              + ("" if args.no_refiner else ", or --no_refiner (stage 1 only)"), file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, even for a key list
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
