"""Training: flow matching for the SANA-WM DiT (stage 1) and a LoRA on the LTX-2 refiner (stage 2).

    python train.py precompute --clips CLIPS --out DATA --weights RELEASE --stage 2     # once: VAE + text encoder
    python train.py train --data DATA --out RUN --weights RELEASE/dit --stage 2        # one GPU
    torchrun --nproc_per_node 8 train.py train --data DATA --out RUN --weights RELEASE/dit --stage 3  # FSDP2
    torchrun --nproc_per_node 8 train.py train ... --stage 3 --sequence_parallel 4  # and each clip's frames on 4 GPUs
    python train.py train --model refiner --data DATA --out RUN --weights RELEASE/refiner --lora_rank 384

Paper: arXiv 2605.15178 (four progressive stages; refiner fine-tuned with a LoRA). The flow convention, shift and
first-frame conditioning are those of generate.py's sampler; the refiner trains from a truncated σ (section 4).

Reading order:
  1. stage presets                       STAGES
  2. data: clip folders                  read_clip (validation), precompute -> safetensors shards
  3. data: shards                        LatentDataset, the global sample order, per-sample randomness
  4. objectives                          sample_sigma, dit_loss, refiner_loss   (equations in comments)
  5. the training loop                   build_model, train (AdamW, warm-up, clipping, bf16, activation
                                         checkpointing, accumulation, EMA, FSDP2, checkpoints, logs)
  6. command line                        main

Determinism. Everything random about a sample (noise ε, σ, text dropout, the refiner's block) is drawn from a
generator seeded by (seed, the sample's position in the global sample order), so a run gives the same batches
on 1 or N processes and after a resume, and a checkpoint only needs the position to continue exactly.
"""
import argparse
import functools
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import camera

TRAIN_SHIFT = 9.95          # the release's training flow shift (native Sana config `flow_shift`)
REFINER_SIGMA_MAX = 0.909375  # the refiner starts here, not at 1, so the stage-1 content survives


# ----------------------------------------------------------------------------------------------------------------
# 1. Stage presets. The paper trains in four progressive stages: short low-resolution clips, then 720p clips with
#    camera control up to one minute, then a high-quality SFT; the learning rate falls from 5e-5 to 1e-5 and the
#    global batch from 64 to 32 (as issue 9 quotes the paper). The split into four presets, their clip lengths and
#    resolutions are our reading of that progression, not checked against the paper's own table. Every field can be
#    overridden by the flag of the same name.
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    num_frames: int     # raw frames per clip, 8k+1 (T = k+1 latent frames)
    height: int         # pixels, multiple of 32
    width: int
    lr: float
    global_batch: int   # clips per optimizer step over all processes and accumulation steps
    camera: bool        # feed the camera (raymap + Plücker) to the DiT


STAGES = {
    1: Stage(num_frames=81, height=352, width=640, lr=5e-5, global_batch=64, camera=False),   # 5 s, low res
    2: Stage(num_frames=161, height=704, width=1280, lr=5e-5, global_batch=64, camera=True),  # 10 s, 720p, camera
    3: Stage(num_frames=961, height=704, width=1280, lr=2e-5, global_batch=32, camera=True),  # 60 s, 720p, camera
    4: Stage(num_frames=961, height=704, width=1280, lr=1e-5, global_batch=32, camera=True),  # SFT, curated clips
}


# ----------------------------------------------------------------------------------------------------------------
# 2. Clip folders and precompute.
#    CLIPS/<name>/ video.mp4 (or frames/ with one image per frame, sorted by name), c2w.npy (F, 4, 4) camera-to-world
#    in OpenCV axes, intrinsics.npy ((4,), (F, 4), (3, 3) or (F, 3, 3), pixels of the video), caption.txt, and for
#    refiner training stage1.safetensors {"latents": (128, T, h, w)}: the stage-1 DiT's output for this clip (its
#    first frame, caption and camera), in the normalised VAE space.
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Clip:
    name: str
    video: torch.Tensor         # (3, F, H, W) uint8, resized and centre-cropped (a minute at 720p: 2.6 GB)
    c2w: np.ndarray             # (F, 4, 4)
    intrinsics: np.ndarray      # (F, 4), pixels of the cropped video
    caption: str
    stage1: torch.Tensor | None  # (C, T, h, w) or None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _clip_error(clip: Path, file: str, what: str) -> ValueError:
    return ValueError(f"clip {clip.name}: {file}: {what}")


def _read_frames(clip: Path, num_frames: int) -> tuple[str, list]:
    """(source file name, one entry per frame of the clip: a PIL image for the first num_frames, None after);
    the length is the clip's frame count, checked against the poses."""
    from PIL import Image
    if (clip / "video.mp4").is_file():
        try:
            import av
        except ImportError:
            raise ImportError("reading video.mp4 needs PyAV: pip install 'av>=12'") from None
        frames = []
        try:
            with av.open(str(clip / "video.mp4")) as container:
                for frame in container.decode(video=0):
                    frames.append(frame.to_image() if len(frames) < num_frames else None)
        except av.error.FFmpegError as e:
            raise _clip_error(clip, "video.mp4", f"cannot be decoded ({e})") from None
        return "video.mp4", frames
    if (clip / "frames").is_dir():
        files = sorted(f for f in (clip / "frames").iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        frames = []
        for i, f in enumerate(files):
            try:
                frames.append(Image.open(f).convert("RGB") if i < num_frames else None)
            except OSError as e:
                raise _clip_error(clip, f"frames/{f.name}", f"is not a readable image ({e})") from None
        return "frames/", frames
    raise _clip_error(clip, "video.mp4", "missing (give video.mp4 or a frames/ folder of images)")


def _read_npy(clip: Path, file: str) -> np.ndarray:
    if not (clip / file).is_file():
        raise _clip_error(clip, file, "missing")
    try:
        return np.load(clip / file, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise _clip_error(clip, file, f"is not a readable .npy array ({e})") from None


def read_clip(clip, num_frames: int, height: int, width: int) -> Clip:
    """Read and validate one clip folder; the first num_frames frames, resized and centre-cropped to height x width
    (the intrinsics follow the crop). Every error names the clip and the file."""
    clip = Path(clip)
    if (num_frames - 1) % 8 or num_frames < 1:
        raise ValueError(f"num_frames: expected 8k+1 (the VAE's frame rule), got {num_frames}")
    source, frames = _read_frames(clip, num_frames)
    poses = _read_npy(clip, "c2w.npy")
    try:
        poses = camera.check_c2w(poses)
    except ValueError as e:
        raise _clip_error(clip, "c2w.npy", str(e)) from None
    if len(poses) != len(frames):
        raise _clip_error(clip, "c2w.npy", f"{len(poses)} poses for {len(frames)} frames in {source}; expected one "
                                          f"pose per frame")
    if len(frames) < num_frames:
        raise _clip_error(clip, source, f"{len(frames)} frames, fewer than num_frames={num_frames}")
    try:
        k = camera.normalize_intrinsics(_read_npy(clip, "intrinsics.npy"), len(poses))[:num_frames]
    except ValueError as e:
        raise _clip_error(clip, "intrinsics.npy", str(e)) from None
    if not (clip / "caption.txt").is_file():
        raise _clip_error(clip, "caption.txt", "missing")
    caption = (clip / "caption.txt").read_text(encoding="utf-8").strip()
    if not caption:
        raise _clip_error(clip, "caption.txt", "is empty")

    sizes = {f.size for f in frames[:num_frames]}
    if len(sizes) != 1:
        raise _clip_error(clip, source, f"frames differ in size: {sorted(sizes)}")
    pixels = []
    for frame in frames[:num_frames]:
        cropped, src_size, resized_size, offset = camera.resize_and_center_crop(frame, height, width)
        pixels.append(torch.from_numpy(np.array(cropped.convert("RGB"), dtype=np.uint8)))
    k = camera.crop_intrinsics(k, src_size, resized_size, offset)
    video = torch.stack(pixels).permute(3, 0, 1, 2)  # (3, F, H, W)

    stage1 = None
    if (clip / "stage1.safetensors").is_file():
        try:
            with safe_open(str(clip / "stage1.safetensors"), framework="pt") as f:
                stage1 = f.get_tensor("latents").float()
        except (SafetensorError, OSError) as e:
            raise _clip_error(clip, "stage1.safetensors", f"is not readable ({e})") from None
        expected = ((num_frames - 1) // 8 + 1, height // 32, width // 32)
        if stage1.dim() != 4 or tuple(stage1.shape[1:]) != expected:
            raise _clip_error(clip, "stage1.safetensors", f"latents must be (C, {expected[0]}, {expected[1]}, "
                                                         f"{expected[2]}), got {tuple(stage1.shape)}")
    return Clip(clip.name, video, poses[:num_frames], k, caption, stage1)


def write_shard(path, records: list[dict], meta: dict) -> None:
    """One safetensors shard: tensors '<i>.<field>' of the records, `meta` + the clip names as metadata."""
    tensors = {f"{i}.{key}": value.contiguous() for i, r in enumerate(records) for key, value in r.items()
               if key != "name"}
    metadata = {"meta": json.dumps(meta), "names": json.dumps([r["name"] for r in records])}
    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


@torch.no_grad()
def precompute(clips_dir, out_dir, vae, encode_text, num_frames: int, height: int, width: int,
               null_text=None, fps: float = 16.0, shard_size: int = 32) -> int:
    """Encode every clip folder under clips_dir once: latents (vae.encode -> vae.normalize), text embeddings
    (encode_text(caption) -> ((1, L, D), (1, L))), camera inputs (camera.prepare_camera), optional stage-1 latents.
    Writes out_dir/shard_*.safetensors and out_dir/dataset.json; null_text = encode_text of the empty prompt for
    text dropout (DiT), stored as out_dir/null_text.safetensors. Returns the number of clips."""
    clips = sorted(p for p in Path(clips_dir).iterdir() if p.is_dir())
    if not clips:
        raise ValueError(f"clips: no clip folders in {clips_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(num_frames=num_frames, height=height, width=width, fps=fps)
    shards, records = [], []
    device = vae.latents_mean.device
    for n, folder in enumerate(tqdm(clips, desc="precompute", unit="clip")):
        clip = read_clip(folder, num_frames, height, width)
        # pixels -> [-1, 1] in the VAE's dtype on its device (the VAE encodes tile by tile)
        video = clip.video[None].to(device).to(vae.latents_mean.dtype) / 127.5 - 1
        latents = vae.normalize(vae.encode(video))[0].float().cpu()
        text, mask = encode_text(clip.caption)
        raymap, plucker = camera.prepare_camera(clip.c2w, clip.intrinsics, size=(height, width))
        record = dict(name=clip.name, latents=latents, text=text[0].float().cpu(), text_mask=mask[0].float().cpu(),
                      raymap=raymap, plucker=plucker)
        if clip.stage1 is not None:
            if clip.stage1.shape != latents.shape:
                raise _clip_error(folder, "stage1.safetensors", f"latents {tuple(clip.stage1.shape)} do not match "
                                                                f"the VAE latents {tuple(latents.shape)}")
            record["stage1"] = clip.stage1
        records.append(record)
        if len(records) == shard_size or n == len(clips) - 1:
            shards.append(f"shard_{len(shards):05d}.safetensors")
            write_shard(out / shards[-1], records, meta)
            records = []
    if null_text is not None:
        save_file({"text": null_text[0][0].float().cpu().contiguous(),
                   "text_mask": null_text[1][0].float().cpu().contiguous()}, str(out / "null_text.safetensors"))
    (out / "dataset.json").write_text(json.dumps(dict(meta, clips=len(clips), shards=shards), indent=1))
    return len(clips)


# ----------------------------------------------------------------------------------------------------------------
# 3. Shards, the global sample order and per-sample randomness.
# ----------------------------------------------------------------------------------------------------------------

DATASET_KEYS = ("num_frames", "height", "width", "shards")  # what precompute writes and training reads


def _read_dataset_json(path: Path) -> dict:
    """A data folder's dataset.json, with the keys training reads; every error names the file (and the key)."""
    if not path.is_file():
        raise ValueError(f"data: {path} is missing (run `train.py precompute` first)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError (and UnicodeDecodeError) are ValueErrors
        raise ValueError(f"data: {path} is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"data: {path} must hold a JSON object, got {type(meta).__name__}")
    missing = [key for key in DATASET_KEYS if key not in meta]
    if missing:
        raise ValueError(f"data: {path} lacks the key {missing[0]!r} (expected {', '.join(DATASET_KEYS)}; "
                         f"`train.py precompute` writes them)")
    if not isinstance(meta["shards"], list):
        raise ValueError(f"data: {path}: 'shards' must be a list of shard file names, got {meta['shards']!r}")
    return meta


class LatentDataset:
    """The precomputed clips of a data folder; item i = dict of tensors (latents, text, text_mask, raymap, plucker,
    optionally stage1). Reads lazily, one clip at a time."""

    def __init__(self, root):
        self.root = Path(root)
        self.meta = _read_dataset_json(self.root / "dataset.json")
        self.items = []
        for shard in self.meta["shards"]:
            try:
                with safe_open(str(self.root / shard), framework="pt") as f:
                    names = json.loads(f.metadata()["names"])
            except (SafetensorError, OSError, KeyError) as e:
                raise ValueError(f"data: {self.root / shard} is not a shard written by precompute ({e})") from None
            self.items += [(shard, i, name) for i, name in enumerate(names)]
        self.null_text = None
        if (self.root / "null_text.safetensors").is_file():
            with safe_open(str(self.root / "null_text.safetensors"), framework="pt") as f:
                self.null_text = {k: f.get_tensor(k) for k in f.keys()}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        shard, i, name = self.items[index]
        with safe_open(str(self.root / shard), framework="pt") as f:
            prefix = f"{i}."
            item = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        item["name"] = name
        return item


def sample_index(position: int, num_items: int, seed: int) -> int:
    """The dataset item at `position` of the global sample order: epoch e = position // N visits a permutation
    seeded by (seed, e), so the order depends on nothing but the seed (not on world size or restarts)."""
    epoch, offset = divmod(position, num_items)
    return int(_epoch_order(num_items, seed, epoch)[offset])


@functools.lru_cache(maxsize=2)  # a batch smaller than the dataset spans <= 2 epochs; 20 ms per call at 1M items
def _epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the dataset that epoch `epoch` visits (read only: it is shared between calls)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=g)


def sample_generator(position: int, seed: int) -> torch.Generator:
    """The generator of everything random about the sample at `position` (noise, σ, dropout, refiner block)."""
    return torch.Generator().manual_seed((seed << 40) + position)


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "name"}


# ----------------------------------------------------------------------------------------------------------------
# 4. Objectives.
#    Flow matching: x_σ = (1 − σ)·x0 + σ·ε, ε ~ N(0, I), and the model predicts the velocity
#    v = dx_σ/dσ = ε − x0; the sampler integrates it from σ = 1 to 0. Loss = ‖v_θ(x_σ, 1000σ) − (ε − x0)‖².
# ----------------------------------------------------------------------------------------------------------------

def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = shift·u / (1 + (shift − 1)·u): u is pushed towards high noise, the same warp as the sampler's schedule
    (generate.schedule, there with 9.8): u = 0.5 gives σ = 0.909 with the training shift 9.95."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigma(generator: torch.Generator, n: int, shift: float, scheme: str) -> torch.Tensor:
    """n noise levels in [0, 1): u ~ U[0, 1) ("uniform") or u = sigmoid(N(0, 1)) ("logit_normal"), then shifted."""
    if scheme == "uniform":
        u = torch.rand(n, generator=generator)
    elif scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        raise ValueError(f"sigma_sampling: expected 'uniform' or 'logit_normal', got {scheme!r}")
    return shift_sigma(u, shift)


def dit_sample_noise(item: dict, generator: torch.Generator, args) -> dict:
    """Per sample: ε, the per-frame σ (T,) with frame 0 at 0, and whether the caption is dropped."""
    T = item["latents"].shape[1]
    eps = torch.randn(item["latents"].shape, generator=generator)
    chunk = args.chunk_size or T
    n_chunks = math.ceil(T / chunk)
    # Bidirectional: one σ for all noisy frames, as at inference. Chunk-causal: one σ per chunk (our choice, in the
    # manner of diffusion forcing), so each chunk learns to denoise next to earlier chunks at other noise levels.
    sigma = sample_sigma(generator, n_chunks, args.shift, args.sigma_sampling).repeat_interleave(chunk)[:T].clone()
    sigma[0] = 0.0  # frame 0 is the image condition: kept clean, timestep 0, as at inference
    drop = bool(torch.rand((), generator=generator) < args.text_dropout)
    return dict(noise=eps, sigma=sigma, drop_text=torch.tensor(drop))


def dit_loss(model, batch: dict, use_camera: bool, chunk_size: int | None, group=None) -> torch.Tensor:
    """Flow-matching loss of the DiT on one micro-batch (dict of stacked tensors, see dit_sample_noise).

    x_σ[:, :, t] = (1 − σ_t)·x0[:, :, t] + σ_t·ε[:, :, t]   per latent frame t, σ_0 = 0 (the clean image frame)
    target        = ε − x0
    loss          = mean over the noisy frames t ≥ 1 of (v_θ − target)²  (frame 0 is given, not predicted)
    Text dropout swaps the caption for the empty prompt's embedding (the CFG negative).
    group: sequence parallelism (parallel.py; the model `parallel.attach`ed): this rank's frames' share of the loss
    (the shares of the group's ranks sum to it) times the group's size, so that FSDP's mean over all processes of the
    gradients is the mean over the clips.
    """
    x0, eps = batch["latents"], batch["noise"]
    sigma = batch["sigma"][:, None, :, None, None]                       # (B, 1, T, 1, 1)
    x_sigma = (1 - sigma) * x0 + sigma * eps
    text, mask = batch["text"], batch["text_mask"]
    if "null_text" in batch:
        drop = batch["drop_text"][:, None, None]
        text = torch.where(drop, batch["null_text"], text)
        mask = torch.where(drop[..., 0], batch["null_text_mask"], mask)
    raymap, plucker = (batch["raymap"], batch["plucker"]) if use_camera else (None, None)
    # The model reads timesteps on its 0..1000 scale (and truncates them to integers, as at inference).
    if group is None:
        v = model(x_sigma, batch["sigma"] * 1000, text, mask, raymap=raymap, plucker=plucker, chunk_size=chunk_size)
        return (v.float() - (eps - x0))[:, :, 1:].pow(2).mean()
    from parallel import Split
    split = Split.of(group, x0.shape[2])
    v = model.parallel_forward(x_sigma, batch["sigma"] * 1000, text, mask, raymap, plucker, chunk_size)
    error = (v.float() - (eps - x0)[:, :, split.start:split.stop])[:, :, max(0, 1 - split.start):]
    return error.pow(2).sum() * (len(split.spans) / eps[:, :, 1:].numel())


def refiner_sample_noise(item: dict, generator: torch.Generator, args) -> dict:
    """Per sample: ε for the current block, σ in (0, σ_max] and the block start s (frames s .. s+b−1)."""
    T = item["latents"].shape[1]
    sink, block = args.sink_size, min(args.refiner_block_size, T - args.sink_size)
    if block < 1:
        raise ValueError(f"refiner: clips need more than sink_size={sink} latent frames, got T={T}")
    start = sink + int(torch.randint(0, T - sink - block + 1, (), generator=generator))
    shape = (item["latents"].shape[0], block) + tuple(item["latents"].shape[2:])
    eps = torch.randn(shape, generator=generator)
    sigma = REFINER_SIGMA_MAX * (1 - torch.rand((), generator=generator))  # (0, σ_max]: 1 − U[0, 1) is in (0, 1]
    return dict(noise=eps, sigma=sigma, start=torch.tensor(start))


def refiner_loss(model, batch: dict, sink_size: int, fps: float, weighting: str = "x0",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Truncated-σ flow matching of the refiner on one micro-batch, one sample at a time.

    The refiner starts from the stage-1 latent, not from pure noise:
        x_σ      = (1 − σ)·z_stage1 + σ·ε,   σ ∈ (0, 0.909375]
        target v = (x_σ − z_target)/σ        so that x_σ − σ·v = z_target: one Euler step to σ = 0 lands on the
                                             real video's latent (z_target = the VAE latent of the clip).
        loss     = w(σ)·(v_θ − v)²,  w = σ² ("x0": = (x̂0 − z_target)² with x̂0 = x_σ − σ·v_θ) or 1 ("none").
    The target grows like 1/σ as σ → 0, so unweighted the rare small σ dominate every batch (the tiny test model
    saw single-batch losses of 3e3 next to typical ones of 3); σ² puts every noise level on the latent's scale.
    The window is one AR step of refiner.refine, made by the same two calls (capture_sink, block_velocity): the clean
    stage-1 sink frame(s) at σ = 0, captured pre-RoPE and placed just before the block (no history), then the noisy
    block at its absolute frame positions.
    Tokens and text enter the model in `dtype` (its compute dtype); timesteps stay fp32.
    """
    if weighting not in ("x0", "none"):
        raise ValueError(f"refiner_weighting: expected 'x0' or 'none', got {weighting!r}")
    from refiner import block_velocity, capture_sink
    losses = []
    for b in range(batch["latents"].shape[0]):
        z1, zt = batch["stage1"][b:b + 1], batch["latents"][b:b + 1]
        eps, sigma, s = batch["noise"][b:b + 1], batch["sigma"][b], int(batch["start"][b])
        text, mask = batch["text"][b:b + 1].to(dtype), batch["text_mask"][b:b + 1]
        e = s + eps.shape[2]
        cache, sink_out = capture_sink(model, z1[:, :, :sink_size].to(dtype), text, mask, fps)
        x_sigma = (1 - sigma) * z1[:, :, s:e] + sigma * eps
        v = block_velocity(model, cache, x_sigma.to(dtype), sigma, s, text, mask, fps)
        target = (x_sigma - zt[:, :, s:e]) / sigma
        weight = sigma ** 2 if weighting == "x0" else 1.0
        # Only the sink's K/V feed the loss, not its output; the zero-weighted term keeps the output in the graph so
        # that FSDP's pre-backward hooks (registered on module outputs) gather the weights for its backward too.
        losses.append(weight * (v.float() - target).pow(2).mean() + 0.0 * sink_out.float().sum())
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------------------
# 5. The training loop.
# ----------------------------------------------------------------------------------------------------------------

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _read_config(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:  # JSONDecodeError (and UnicodeDecodeError) are ValueErrors
        raise ValueError(f"--config {path}: not a JSON config ({e})") from None


def build_model(args, device) -> tuple[nn.Module, list[str]]:
    """The model in fp32 master weights (bf16 runs through autocast / FSDP's mixed precision), and the names of
    its trained parameters: all of the DiT; only the LoRA adapters of the refiner (its base is frozen)."""
    torch.manual_seed(args.seed)  # the initialisation of a from-scratch model or of the LoRA A matrices
    config = _read_config(args.config) if args.config else None
    if args.model == "dit":
        from dit import DiT, DiTConfig
        if args.weights:
            model = DiT.from_pretrained(args.weights, dtype=torch.float32, device=device,
                                        config=DiTConfig.from_dict(config) if config else None)
        else:
            model = DiT(DiTConfig.from_dict(config) if config else DiTConfig()).to(device)
        return model.train(), [n for n, _ in model.named_parameters()]
    from refiner import Refiner, RefinerConfig, add_lora
    base_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32  # frozen: no fp32 master needed
    if args.weights:
        model = Refiner.from_pretrained(args.weights, dtype=base_dtype, device=device)
    else:
        model = Refiner(RefinerConfig.from_dict(config) if config else RefinerConfig()).to(device, base_dtype)
    model.requires_grad_(False)
    add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
    names = []
    for n, p in model.named_parameters():
        if ".lora_" in n:
            p.data = p.data.float()  # the adapters are trained: fp32 master weights
            p.requires_grad_(True)
            names.append(n)
    return model.train(), names


def checkpoint_blocks(blocks: nn.ModuleList, method: str = "forward") -> None:
    """Activation checkpointing: each block keeps only its input and recomputes its activations in the backward.
    The instance's forward (or `method`) is wrapped (not the module), so parameter names and the state dict stay
    unchanged."""
    for block in blocks:
        setattr(block, method, functools.partial(checkpoint, getattr(block, method), use_reentrant=False))


def shard_model(model: nn.Module, blocks: nn.ModuleList, precision: str, method: str | None = None) -> None:
    """FSDP2: each block, then the rest, becomes one all-gathered unit; parameters, gradients and optimizer state are
    sharded over the processes. bf16: parameters are gathered and computed in bf16, gradients reduced in fp32.
    method: a forward other than `forward` that the model and the blocks run (parallel.attach's
    `parallel_forward`), given FSDP's hooks too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # No casting of forward inputs: the timesteps must stay fp32 (bf16 would round 909.375 to 908, and everything
    # in [512, 1024) to a multiple of 4), and casting rebuilds dataclass arguments, while the refiner's blocks must
    # write into the very LayerKV objects of its KV cache. The DiT casts its inputs itself; refiner_loss does it.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if method is not None:
        from torch.distributed.fsdp import register_fsdp_forward_method
        for module in (*blocks, model):
            register_fsdp_forward_method(module, method)
    # The models return a permuted view; the losses read it out of place, which is what this warning asks for.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a (possibly FSDP-sharded DTensor) tensor."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def _like(full: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like t (sharded the same way when t is a DTensor)."""
    full = full.to(t.device, t.dtype)
    if hasattr(t, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full, t.device_mesh, t.placements)
    return full


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash leaves the previous checkpoint intact, never a half-written one


def save_checkpoint(path: Path, model, optimizer, ema: dict, trained: list[str], step: int, position: int,
                    args) -> None:
    """Collective under FSDP (every rank calls); rank 0 writes. Model: the trained parameters (the whole DiT, only
    the adapters of the refiner), full fp32 tensors."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)  # with cpu_offload, empty on ranks > 0
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    ema_state = {k: _full(v) for k, v in ema.items()}
    if _rank() != 0:
        return
    model_state = {k: model_state[k] for k in trained}
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    _atomic_save(dict(model=model_state, optimizer=optim_state, ema=ema_state, step=step, position=position,
                      rng=rng, args=vars(args)), path)


def load_checkpoint(path: Path, model, optimizer, ema: dict) -> tuple[int, int]:
    """Restore model, optimizer, EMA and RNG states; returns (step, data position)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"resume: {path} is not a readable checkpoint ({e})") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
    # strict=False: parameters that never received a gradient (the dead raymap_embedder, the Plücker path with the
    # camera off) have no optimizer state, in the saved run as in this one.
    set_optimizer_state_dict(model, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    with torch.no_grad():
        for k, v in ema.items():
            v.copy_(_like(state["ema"][k], v))
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["position"]


def export_weights(out: Path, model, ema: dict, trained: list[str], args) -> None:
    """Loadable results next to the checkpoint (collective under FSDP; rank 0 writes):
    DiT: model/ and ema/, each config.json + diffusion_pytorch_model.safetensors (DiT.from_pretrained);
    refiner: lora.safetensors and lora_ema.safetensors, adapter only (refiner.load_lora)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_state = {k: _full(v) for k, v in ema.items()}
    if _rank() != 0:
        return
    if args.model == "dit":
        config = json.dumps(asdict(model.config), indent=1)
        for folder, weights in (("model", state), ("ema", {**state, **ema_state})):
            (out / folder).mkdir(exist_ok=True)
            (out / folder / "config.json").write_text(config)
            tmp = out / folder / "weights.tmp"
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
            os.replace(tmp, out / folder / "diffusion_pytorch_model.safetensors")
        return
    rank_alpha = {"rank": str(args.lora_rank), "alpha": str(float(args.lora_alpha or args.lora_rank))}
    for name, weights in (("lora", {k: state[k] for k in trained}), ("lora_ema", ema_state)):
        # the format of refiner.save_lora: adapter tensors + rank/alpha metadata
        tmp = out / f"{name}.tmp"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=rank_alpha)
        os.replace(tmp, out / f"{name}.safetensors")


def _lr(step: int, args) -> float:
    """Linear warm-up over `warmup` steps, then constant (each stage runs at its own constant rate)."""
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else args.lr


def _setup_distributed() -> torch.device:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Without torchrun: one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _sequence_parallel(args, world: int):
    """(the process group of this rank's clips, the blocks' forward method, the number of such groups): with
    --sequence_parallel N, consecutive groups of N processes share clips and split their latent frames
    (parallel.py); otherwise every process reads its own clips."""
    n = args.sequence_parallel
    if n == 1:
        return None, "forward", world
    if world % n:
        raise ValueError(f"sequence_parallel: expected a divisor of the {world} processes, got {n}")
    if (args.num_frames - 1) // 8 + 1 < n:
        raise ValueError(f"sequence_parallel: {args.num_frames} frames are {(args.num_frames - 1) // 8 + 1} latent "
                         f"frames, fewer than the {n} processes that would split them")
    group, _ = dist.new_subgroups(n)
    return group, "parallel_forward", world // n


def _make_batch(dataset, positions: list[int], args, device) -> dict:
    items = []
    for p in positions:
        item = dataset[sample_index(p, len(dataset), args.seed)]
        g = sample_generator(p, args.seed)
        if args.model == "dit":
            item.update(dit_sample_noise(item, g, args))
        else:
            if "stage1" not in item:
                raise ValueError(f"data: clip {item['name']} has no stage-1 latents (stage1.safetensors), which "
                                 f"refiner training needs")
            item.update(refiner_sample_noise(item, g, args))
        items.append(item)
    batch = {k: v.to(device) for k, v in collate(items).items()}
    if args.model == "dit" and args.text_dropout > 0:
        if dataset.null_text is None:
            raise ValueError("data: text_dropout > 0 needs null_text.safetensors (the empty prompt's embedding)")
        B = len(positions)
        batch["null_text"] = dataset.null_text["text"].to(device).expand(B, -1, -1)
        batch["null_text_mask"] = dataset.null_text["text_mask"].to(device).expand(B, -1)
    return batch


def train(args) -> tuple[list[float], nn.Module]:
    """Run the training described by args (see parse_args); returns the per-step losses of this run (means over
    the global batch) and the trained model (FSDP-sharded under torchrun). Writes out/checkpoint.pt every
    save_every steps and at the end, out/log.jsonl (one line per step), and the exports of export_weights."""
    device = _setup_distributed()
    rank, world = _rank(), _world()
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dataset = LatentDataset(args.data)
    meta = dataset.meta
    if (meta["num_frames"], meta["height"], meta["width"]) != (args.num_frames, args.height, args.width):
        raise ValueError(f"data: {args.data} holds {meta['num_frames']} frames at {meta['height']}x{meta['width']}, "
                         f"the run asks for {args.num_frames} at {args.height}x{args.width}; precompute with the "
                         f"same stage / flags")
    frames_group, method, clips = _sequence_parallel(args, world)     # `clips` processes read different clips
    if args.global_batch % (args.grad_accum * clips):
        readers = "processes" if clips == world else "process groups (processes / sequence_parallel)"
        raise ValueError(f"global_batch: expected a multiple of grad_accum x {readers} = {args.grad_accum} x {clips}, "
                         f"got {args.global_batch}")
    micro = args.global_batch // (args.grad_accum * clips)  # clips per process (per group) per micro-step

    model, trained = build_model(args, device)
    blocks = model.blocks if args.model == "dit" else model.transformer_blocks
    if frames_group is not None:
        from parallel import attach
        attach(model, frames_group)
    if args.activation_checkpointing:
        checkpoint_blocks(blocks, method)
    if world > 1:
        shard_model(model, blocks, args.precision, None if frames_group is None else method)
    named = dict(model.named_parameters())
    params = [named[n] for n in trained]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8,
                                  weight_decay=args.weight_decay)
    ema = {n: named[n].detach().clone().float() for n in trained}  # fp32, sharded like the parameters

    step, position = 0, 0
    ckpt = out / "checkpoint.pt"
    if args.resume:
        if not ckpt.is_file():
            raise ValueError(f"resume: {ckpt} does not exist")
        step, position = load_checkpoint(ckpt, model, optimizer, ema)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" and world == 1
                else torch.autocast(device.type, enabled=False))  # FSDP: the policy gathers bf16 parameters
    fps = float(meta.get("fps", 16.0))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32  # compute dtype of the model's inputs

    losses = []
    bar = tqdm(total=args.steps, initial=step, desc=f"train {args.model}", unit="step", disable=rank != 0)
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    while step < args.steps:
        t0 = time.perf_counter()
        lr = _lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        for m in range(args.grad_accum):
            # this rank's (group's) slice of the micro-step's global positions [position, position + micro * clips)
            start = position + m * micro * clips + rank // (world // clips) * micro
            batch = _make_batch(dataset, list(range(start, start + micro)), args, device)
            if world > 1:  # reduce-scatter the gradients only after the last micro-step
                model.set_requires_gradient_sync(m == args.grad_accum - 1)
            with autocast:
                if args.model == "dit":
                    loss = dit_loss(model, batch, args.camera, args.chunk_size, frames_group)
                else:
                    loss = refiner_loss(model, batch, args.sink_size, fps, args.refiner_weighting, dtype)
            (loss / args.grad_accum).backward()
            total += loss.detach() / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # EMA of the weights: ema ← ema + (1 − decay)·(θ − ema)
            torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params], 1 - args.ema_decay)
        if world > 1:
            dist.all_reduce(total)
            total /= world
        step += 1
        position += args.global_batch
        losses.append(total.item())
        speed = args.global_batch / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.2f}")
        if log:
            log.write(json.dumps(dict(step=step, loss=losses[-1], lr=lr, grad_norm=grad_norm,
                                      samples_per_s=speed)) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(ckpt, model, optimizer, ema, trained, step, position, args)
    bar.close()
    if log:
        log.close()
    export_weights(out, model, ema, trained, args)
    return losses, model


# ----------------------------------------------------------------------------------------------------------------
# 6. Command line.
# ----------------------------------------------------------------------------------------------------------------

def _finite_float(value: str) -> float:
    """argparse type of every float flag: NaN and infinities are refused with the flag's name (a NaN learning rate
    or clip norm would otherwise train to NaN weights without an error)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def _positive(v):
    return v > 0


# The float flags' ranges, checked after parsing (AdamW itself refuses betas outside [0, 1)).
FLOAT_RANGES = {"fps": ("> 0", _positive), "lr": ("> 0", _positive), "grad_clip": ("> 0", _positive),
                "shift": ("> 0", _positive), "lora_alpha": ("> 0", _positive),
                "weight_decay": (">= 0", lambda v: v >= 0), "beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
                "beta2": ("in [0, 1)", lambda v: 0 <= v < 1), "ema_decay": ("in [0, 1]", lambda v: 0 <= v <= 1),
                "text_dropout": ("in [0, 1]", lambda v: 0 <= v <= 1)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def clip_flags(p):
        p.add_argument("--stage", type=int, choices=sorted(STAGES), default=2,
                       help="preset of clip length, resolution, lr, batch, camera (section 1)")
        p.add_argument("--num_frames", type=int, help="raw frames per clip, 8k+1 (default: the stage's)")
        p.add_argument("--height", type=int, help="pixels, multiple of 32 (default: the stage's)")
        p.add_argument("--width", type=int, help="pixels, multiple of 32 (default: the stage's)")
        p.add_argument("--model", choices=("dit", "refiner"), default="dit")

    pre = sub.add_parser("precompute", help="encode clip folders into latent shards (VAE + text encoder, once)")
    clip_flags(pre)
    pre.add_argument("--clips", required=True, help="folder of clip folders (section 2)")
    pre.add_argument("--out", required=True, help="output data folder")
    pre.add_argument("--weights", required=True, help="the release folder (vae/, refiner/)")
    pre.add_argument("--text_encoder", help="the DiT's text encoder Gemma-2-2b-it, which the release does not "
                                            "include (default: <weights>/text_encoder), as generate.py's flag")
    pre.add_argument("--fps", type=_finite_float, default=16.0, help="frame rate of the clips (refiner RoPE)")
    pre.add_argument("--shard_size", type=int, default=32)
    pre.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="VAE / text encoder dtype")

    tr = sub.add_parser("train", help="train the DiT (flow matching) or the refiner LoRA")
    clip_flags(tr)
    tr.add_argument("--data", required=True, help="data folder written by precompute")
    tr.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, exported weights")
    tr.add_argument("--weights", help="initial weights: the release dit/ or refiner/ folder (default: from scratch)")
    tr.add_argument("--config", help="a model config.json (DiTConfig / RefinerConfig fields); default: the release")
    tr.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (a resumed run included)")
    tr.add_argument("--lr", type=_finite_float, help="peak learning rate (default: the stage's)")
    tr.add_argument("--global_batch", type=int, help="clips per optimizer step over all processes (default: stage)")
    tr.add_argument("--camera", action=argparse.BooleanOptionalAction, default=None,
                    help="feed raymap + Plücker to the DiT (default: the stage's)")
    tr.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    tr.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    tr.add_argument("--grad_clip", type=_finite_float, default=1.0)
    tr.add_argument("--weight_decay", type=_finite_float, default=0.0)
    tr.add_argument("--beta1", type=_finite_float, default=0.9)
    tr.add_argument("--beta2", type=_finite_float, default=0.999)
    tr.add_argument("--ema_decay", type=_finite_float, default=0.9999)
    tr.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="bf16: autocast (one process) or FSDP mixed precision; master weights stay fp32")
    tr.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    tr.add_argument("--chunk_size", type=int, help="latent frames per causal chunk: trains the chunk-causal DiT")
    tr.add_argument("--sequence_parallel", type=int, default=1,
                    help="processes (under torchrun) that split each clip's latent frames (parallel.py), the DiT only")
    tr.add_argument("--shift", type=_finite_float, default=TRAIN_SHIFT, help="flow shift of the σ sampling")
    tr.add_argument("--sigma_sampling", choices=("uniform", "logit_normal"), default="uniform")
    tr.add_argument("--text_dropout", type=_finite_float, default=0.1,
                    help="caption -> empty prompt probability (CFG)")
    tr.add_argument("--lora_rank", type=int, default=384)
    tr.add_argument("--lora_alpha", type=_finite_float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    tr.add_argument("--sink_size", type=int, default=1, help="refiner: clean stage-1 sink frames")
    tr.add_argument("--refiner_block_size", type=int, default=3, help="refiner: noisy frames per window")
    tr.add_argument("--refiner_weighting", choices=("x0", "none"), default="x0",
                    help="refiner: loss weight σ² (x0) or 1 (none) on the velocity error, see refiner_loss")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save_every", type=int, default=500)
    tr.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")
    args = parser.parse_args(argv)

    stage = STAGES[args.stage]
    for name in ("num_frames", "height", "width") + (("lr", "global_batch", "camera") if args.command == "train"
                                                     else ()):
        if getattr(args, name) is None:
            setattr(args, name, getattr(stage, name))
    for name, (expected, ok) in FLOAT_RANGES.items():
        value = getattr(args, name, None)  # None: not a flag of this command, or left to the stage preset
        if value is not None and not ok(value):
            parser.error(f"--{name} must be {expected}, got {value}")
    if (args.num_frames - 1) % 8 or args.height % 32 or args.width % 32 or min(args.height, args.width) < 32:
        parser.error(f"--num_frames must be 8k+1 and --height/--width positive multiples of 32, got "
                     f"{args.num_frames}, {args.height}x{args.width}")
    if args.command == "train":
        if args.chunk_size is not None and args.chunk_size < 1:
            parser.error("--chunk_size must be >= 1")
        if args.chunk_size is not None and args.model == "refiner":
            parser.error("--chunk_size is a DiT option (the refiner always runs block by block)")
        if args.sequence_parallel < 1 or (args.sequence_parallel > 1 and args.model == "refiner"):
            parser.error("--sequence_parallel must be >= 1, and 1 for the refiner (it trains on windows of 3 frames)")
        if args.config is not None and args.model == "refiner" and args.weights is not None:
            parser.error("--config: the refiner loaded from --weights uses the release's config.json; give --config "
                         "only for a refiner built from scratch")
        if args.steps < 1 or args.grad_accum < 1 or args.save_every < 1 or args.global_batch < 1:
            parser.error("--steps, --grad_accum, --save_every and --global_batch must be >= 1")
    return args


def run_precompute(args) -> int:
    """precompute with the release's VAE and text encoder (Gemma-2 + chi prefix for the DiT, Gemma-3 + connectors
    for the refiner). The text encoder loads first: for the DiT it is a separate download, the likelier to be
    missing, and its error should not wait for the VAE."""
    from vae import VAE
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = Path(args.weights)
    if args.model == "refiner":
        from refiner import PromptEncoder
        encoder = PromptEncoder.from_pretrained(weights / "refiner", dtype=dtype, device=device)
        encode_text, null_text = encoder, None
    else:
        from dit import encode_negative_prompt, encode_prompt, load_gemma2
        tokenizer, text_encoder = load_gemma2(str(weights), dtype, device, args.text_encoder)
        encode_text = functools.partial(encode_prompt, tokenizer, text_encoder)
        null_text = encode_negative_prompt(tokenizer, text_encoder, "")
    vae = VAE.from_pretrained(weights / "vae", dtype=dtype, device=device).eval()
    return precompute(args.clips, args.out, vae, encode_text, args.num_frames, args.height, args.width,
                      null_text=null_text, fps=args.fps, shard_size=args.shard_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    made_out, done = not out.exists(), False
    try:
        if args.command == "precompute":
            print(f"{run_precompute(args)} clips -> {args.out}")
        else:
            losses, _ = train(args)
            if _rank() == 0 and losses:
                print(f"step {args.steps}: loss {losses[-1]:.5f}")
        done = True
    except (ValueError, OSError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, even for a key list
        return 2
    finally:
        # A run that failed before writing anything leaves no empty --out folder behind (rank 0 made it).
        if not done and made_out and _rank() == 0 and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
