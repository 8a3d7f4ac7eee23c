"""train.py: data validation, precompute, the DiT flow-matching objective (overfit, exact resume, torchrun/FSDP2 on 2
CPU processes) and the refiner LoRA (loss falls; the saved adapter loads, merges and reproduces the model).

The data are synthetic: a box room with textured walls seen from a camera that moves along a known action-string
trajectory, rendered by ray casting, so poses and intrinsics are exact."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import camera
import train as T
from reference import TINY_DIT, TINY_REFINER, TINY_VAE

ROOT = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 17, 128, 192  # -> latents (8, 3, 4, 6) with the tiny VAE
INTRINSICS = np.array([150.0, 150.0, 96.0, 64.0], dtype=np.float32)  # fx, fy, cx, cy in pixels
ACTIONS = ["w-16", "l-16", "dw-8,jw-8"]


# ----------------------------------------------------------------------------------------------------------------
# Synthetic clips

def render(c2w: np.ndarray, k: np.ndarray, height: int, width: int, half: float = 2.0) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 of a camera inside the box [-half, half]^3 whose six walls carry a checkerboard
    tinted per wall plus a sine pattern: for each pixel, the ray R·((u−cx)/fx, (v−cy)/fy, 1) from the camera
    centre t hits the nearest wall; its colour depends on the two in-wall coordinates of the hit point."""
    fx, fy, cx, cy = k
    v, u = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    d_cam = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u, dtype=np.float64)], -1)
    tints = np.array([[1, .3, .3], [.3, 1, .3], [.3, .3, 1], [1, 1, .3], [1, .3, 1], [.3, 1, 1]])
    frames = []
    for pose in c2w.astype(np.float64):
        d = d_cam @ pose[:3, :3].T
        o = pose[:3, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = np.where(d != 0, (np.sign(d) * half - o) / d, np.inf)  # (H, W, 3): distance to each axis' wall
        axis = dist.argmin(-1)
        p = o + d * dist.min(-1, keepdims=True)
        wall = axis * 2 + (np.take_along_axis(d, axis[..., None], -1)[..., 0] > 0)
        a = np.take_along_axis(p, ((axis + 1) % 3)[..., None], -1)[..., 0]
        b = np.take_along_axis(p, ((axis + 2) % 3)[..., None], -1)[..., 0]
        checker = (np.floor(2 * a) + np.floor(2 * b)) % 2
        shade = 0.55 + 0.3 * checker + 0.15 * np.sin(5 * a + 3 * b)
        frames.append((255 * np.clip(tints[wall] * shade[..., None], 0, 1)).astype(np.uint8))
    return np.stack(frames)


def write_clip(folder: Path, action: str, caption: str, mp4: bool = False) -> np.ndarray:
    c2w = camera.action_to_c2w(action, translation_speed=0.08, rotation_speed_deg=2.5, scheme="legacy")
    frames = render(c2w, INTRINSICS, HEIGHT, WIDTH)
    folder.mkdir(parents=True)
    if mp4:
        import av
        with av.open(str(folder / "video.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=16)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv444p"
            stream.options = {"crf": "0"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    else:
        (folder / "frames").mkdir()
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(folder / "frames" / f"{i:04d}.png")
    np.save(folder / "c2w.npy", c2w)
    np.save(folder / "intrinsics.npy", INTRINSICS)
    (folder / "caption.txt").write_text(caption)
    return c2w


def tiny_vae():
    from vae import VAE, VAEConfig
    torch.manual_seed(0)
    return VAE(VAEConfig.from_dict(TINY_VAE)).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three clips (two as frame folders, one as mp4) precomputed with the tiny VAE and the tiny Gemma-2 of
    generate.py's demo; the VAE's latents_mean/std are set to the clips' statistics so latents are ~unit scale."""
    import generate
    root = tmp_path_factory.mktemp("train")
    poses = {}
    for i, action in enumerate(ACTIONS):
        poses[f"clip{i}"] = write_clip(root / "clips" / f"clip{i}", action, generate.DEMO_PROMPT, mp4=(i == 2))
    vae = tiny_vae()
    with torch.no_grad():
        z = torch.cat([vae.encode(T.read_clip(root / "clips" / n, FRAMES, HEIGHT, WIDTH).video[None] / 127.5 - 1)
                       for n in poses])
        vae.latents_mean.copy_(z.mean((0, 2, 3, 4)))
        vae.latents_std.copy_(z.std((0, 2, 3, 4)))
    tokenizer, text_encoder = generate.demo_text_encoder()
    encode = lambda caption: generate.encode_prompt(tokenizer, text_encoder, caption)  # noqa: E731
    null = generate.encode_negative_prompt(tokenizer, text_encoder, "")
    T.precompute(root / "clips", root / "data", vae, encode, FRAMES, HEIGHT, WIDTH, null_text=null, shard_size=2)
    (root / "dit.json").write_text(json.dumps(TINY_DIT))
    # the same models as a release folder, for the command line
    (root / "release" / "vae").mkdir(parents=True)
    (root / "release" / "vae" / "config.json").write_text(json.dumps(TINY_VAE))
    save_file(vae.state_dict(), str(root / "release" / "vae" / "diffusion_pytorch_model.safetensors"))
    text_encoder.save_pretrained(root / "release" / "text_encoder")
    tokenizer.save_pretrained(root / "release" / "tokenizer")
    return dict(root=root, clips=root / "clips", data=root / "data", config=root / "dit.json", poses=poses)


def dit_argv(data, out, *extra):
    return ["train", "--data", str(data["data"]), "--out", str(out), "--config", str(data["config"]),
            "--num_frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--precision", "fp32",
            "--camera", "--warmup", "2", "--global_batch", "2", *extra]


# ----------------------------------------------------------------------------------------------------------------
# Data

def test_read_clip_validates_and_names_clip_and_file(data, tmp_path):
    clip = T.read_clip(data["clips"] / "clip0", FRAMES, HEIGHT, WIDTH)
    assert clip.video.shape == (3, FRAMES, HEIGHT, WIDTH) and clip.video.dtype == torch.uint8
    assert torch.equal(clip.video.permute(1, 2, 3, 0), torch.from_numpy(render(clip.c2w, INTRINSICS, HEIGHT, WIDTH)))
    np.testing.assert_array_equal(clip.intrinsics, np.tile(INTRINSICS, (FRAMES, 1)))  # same size: crop = identity

    def broken(name, edit):
        folder = tmp_path / name
        write_clip(folder, "w-16", "a room")
        edit(folder)
        with pytest.raises(ValueError) as e:
            T.read_clip(folder, FRAMES, HEIGHT, WIDTH)
        return str(e.value)

    msg = broken("nocap", lambda f: (f / "caption.txt").unlink())
    assert "nocap" in msg and "caption.txt" in msg and "missing" in msg
    msg = broken("skew", lambda f: np.save(f / "c2w.npy", np.load(f / "c2w.npy") * 2))
    assert "skew" in msg and "c2w.npy" in msg and "rigid" in msg
    msg = broken("short", lambda f: np.save(f / "c2w.npy", np.load(f / "c2w.npy")[:9]))
    assert "short" in msg and "c2w.npy" in msg and "9 poses for 17 frames" in msg
    msg = broken("badk", lambda f: np.save(f / "intrinsics.npy", np.ones(5)))
    assert "badk" in msg and "intrinsics.npy" in msg
    msg = broken("novideo", lambda f: [p.unlink() for p in (f / "frames").iterdir()] and (f / "frames").rmdir())
    assert "novideo" in msg and "video.mp4" in msg
    with pytest.raises(ValueError, match="fewer than num_frames=25"):
        T.read_clip(data["clips"] / "clip0", 25, HEIGHT, WIDTH)
    # refiner clips carry the stage-1 latents of the clip
    msg = broken("stage1", lambda f: save_file({"latents": torch.zeros(8, 3, 4, 5)}, str(f / "stage1.safetensors")))
    assert "stage1" in msg and "stage1.safetensors" in msg and "(C, 3, 4, 6)" in msg
    save_file({"latents": torch.ones(8, 3, 4, 6)}, str(tmp_path / "stage1" / "stage1.safetensors"))
    assert torch.equal(T.read_clip(tmp_path / "stage1", FRAMES, HEIGHT, WIDTH).stage1, torch.ones(8, 3, 4, 6))


def test_precompute_writes_latents_text_and_exact_camera(data):
    ds = T.LatentDataset(data["data"])
    assert len(ds) == 3 and ds.meta["shards"] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    for i, name in enumerate(["clip0", "clip1", "clip2"]):
        item = ds[i]
        assert item["name"] == name
        assert item["latents"].shape == (8, 3, 4, 6) and item["text"].shape == (300, 32)
        raymap, plucker = camera.prepare_camera(data["poses"][name], INTRINSICS, size=(HEIGHT, WIDTH))
        assert torch.equal(item["raymap"], raymap) and torch.equal(item["plucker"], plucker)
    assert ds.null_text["text"].shape == (300, 32) and ds.null_text["text_mask"].sum() == 1  # "": only its BOS
    # the mp4 clip (H.264 at crf 0, 4:4:4) decodes to the rendered frames up to the RGB <-> YUV rounding
    rendered = torch.from_numpy(render(data["poses"]["clip2"], INTRINSICS, HEIGHT, WIDTH)).permute(3, 0, 1, 2)
    decoded = T.read_clip(data["clips"] / "clip2", FRAMES, HEIGHT, WIDTH).video
    assert (decoded.int() - rendered.int()).abs().max() <= 2  # measured 2 levels of 255


def test_precompute_command_line_reads_a_release_folder(data, tmp_path):
    argv = ["precompute", "--clips", str(data["clips"]), "--out", str(tmp_path), "--weights",
            str(data["root"] / "release"), "--num_frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH),
            "--dtype", "fp32", "--shard_size", "2"]
    assert T.main(argv) == 0
    ours, ref = T.LatentDataset(tmp_path), T.LatentDataset(data["data"])
    assert len(ours) == len(ref) == 3
    for i in range(3):
        for key, value in ref[i].items():
            assert value == ours[i][key] if key == "name" else torch.equal(value, ours[i][key]), key
    argv[argv.index("--num_frames") + 1] = "18"
    with pytest.raises(SystemExit, match="2"):  # not 8k+1: refused by the argument parser
        T.main(argv)


def test_sigma_sampling_uses_the_training_shift():
    u = torch.tensor([0.0, 0.1, 0.5, 1.0])
    torch.testing.assert_close(T.shift_sigma(u, 9.95), 9.95 * u / (1 + 8.95 * u))
    sigma = T.sample_sigma(torch.Generator().manual_seed(0), 20000, T.TRAIN_SHIFT, "uniform")
    # P(σ < shift(0.5)) = 0.5 for the shifted uniform; shift(0.5) = 0.9087
    assert abs((sigma < 9.95 * 0.5 / (1 + 8.95 * 0.5)).float().mean() - 0.5) < 0.02
    assert 0 < sigma.min() and sigma.max() < 1
    # per-frame σ: frame 0 clean; one σ for all noisy frames, or one per chunk with --chunk_size
    item = dict(latents=torch.zeros(8, 5, 2, 2))
    for chunk, groups in ((None, [[1, 2, 3, 4]]), (2, [[1], [2, 3], [4]])):
        args = T.parse_args(["train", "--data", "x", "--out", "y"] + (["--chunk_size", str(chunk)] if chunk else []))
        s = T.dit_sample_noise(item, torch.Generator().manual_seed(1), args)["sigma"]
        assert s[0] == 0 and len({tuple(s[g].unique().tolist()) for g in groups}) == len(groups)
        assert all(len(s[g].unique()) == 1 for g in groups)


# ----------------------------------------------------------------------------------------------------------------
# DiT

def _eval_loss(model, data, device="cpu"):
    """DiT loss on every clip at fixed σ in {0.2, 0.5, 0.8, 0.95} with fixed noise, camera and caption on."""
    ds = T.LatentDataset(data["data"])
    items = [ds[i] for i in range(len(ds)) for _ in range(4)]
    g = torch.Generator().manual_seed(123)
    batch = T.collate(items)
    sig = torch.tensor([0.2, 0.5, 0.8, 0.95] * len(ds))[:, None].repeat(1, 3)
    sig[:, 0] = 0
    batch.update(noise=torch.randn(batch["latents"].shape, generator=g), sigma=sig)
    with torch.no_grad():
        return T.dit_loss(model, batch, use_camera=True, chunk_size=None).item()


def test_tiny_dit_overfits_synthetic_clips(data, tmp_path):
    args = T.parse_args(dit_argv(data, tmp_path, "--steps", "150", "--lr", "3e-3", "--global_batch", "3",
                                 "--text_dropout", "0", "--ema_decay", "0.9", "--save_every", "1000"))
    initial, _ = T.build_model(args, "cpu")
    before = _eval_loss(initial, data)
    losses, model = T.train(args)
    after = _eval_loss(model, data)
    assert before / after >= 5, (before, after, losses[:3], losses[-3:])  # measured 2.276 -> 0.300 (7.6x)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 151)) and log[-1]["loss"] == losses[-1]
    # the exported EMA weights load with DiT.from_pretrained
    from dit import DiT
    ema = DiT.from_pretrained(tmp_path / "ema", dtype=torch.float32)
    assert _eval_loss(ema, data) < before / 5  # measured 0.273


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_is_bit_identical(data, tmp_path):
    extra = ("--grad_accum", "2", "--chunk_size", "2", "--text_dropout", "0.5", "--lr", "1e-3", "--save_every", "2")
    T.train(T.parse_args(dit_argv(data, tmp_path / "a", "--steps", "4", *extra)))
    T.train(T.parse_args(dit_argv(data, tmp_path / "b", "--steps", "2", *extra)))
    T.train(T.parse_args(dit_argv(data, tmp_path / "b", "--steps", "4", "--resume", *extra)))
    a, b = _checkpoint(tmp_path / "a" / "checkpoint.pt"), _checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4 and a["position"] == b["position"] == 8
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][k][name]), (k, name)
    log_a = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in log_a] == [json.loads(x)["loss"] for x in log_b]
    # and the run really moved: parameters differ from the initial ones
    initial, _ = T.build_model(T.parse_args(dit_argv(data, tmp_path / "c")), "cpu")
    assert not torch.equal(initial.final_layer.linear.weight, a["model"]["final_layer.linear.weight"])
    # the exported weights are where a next stage starts from (--weights; their config.json replaces --config)
    argv = dit_argv(data, tmp_path / "c", "--weights", str(tmp_path / "a" / "model"))
    del argv[argv.index("--config"):argv.index("--config") + 2]
    exported, _ = T.build_model(T.parse_args(argv), "cpu")
    assert all(torch.equal(p, a["model"][k]) for k, p in exported.named_parameters())


TORCHRUN_STEPS = ("--steps", "3", "--lr", "1e-3", "--global_batch", "4", "--text_dropout", "0.5")


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The run that the torchrun tests repeat on two processes, in this one."""
    out = tmp_path_factory.mktemp("one")
    T.train(T.parse_args(dit_argv(data, out, *TORCHRUN_STEPS)))
    return out


def _torchrun_matches(data, one, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *dit_argv(data, out, *TORCHRUN_STEPS, *extra)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [[json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()] for run in (one, out)]
    assert len(logs[0]) == len(logs[1]) == 3
    for key in ("loss", "grad_norm"):
        assert max(abs(x[key] - y[key]) for x, y in zip(*logs)) <= 1e-5 * logs[0][0][key], (key, logs)
    # rank 0 gathered the full (unsharded) tensors into the checkpoint
    a, b = _checkpoint(one / "checkpoint.pt"), _checkpoint(out / "checkpoint.pt")
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    assert {k: v.shape for k, v in a["ema"].items()} == {k: v.shape for k, v in b["ema"].items()}


def test_torchrun_two_processes_match_one(data, one_process, tmp_path):
    """FSDP2 over 2 gloo processes with global batch 4 (2 per process) = one process with batch 4."""
    _torchrun_matches(data, one_process, tmp_path / "two")


def test_torchrun_sequence_parallel_matches_one(data, one_process, tmp_path):
    """FSDP2 over 2 gloo processes that split each clip's 3 latent frames (2 + 1; parallel.py), global batch 4 as 4
    micro-steps of one clip (which both read: without the split, 2 processes could not share 4 micro-steps of 1)
    = one process with batch 4: the loss and the gradient norm of each step."""
    _torchrun_matches(data, one_process, tmp_path / "two", "--sequence_parallel", "2", "--grad_accum", "4")


def test_cli_errors_exit_2(data, tmp_path, capsys):
    assert T.main(dit_argv(data, tmp_path, "--global_batch", "3", "--grad_accum", "2")) == 2
    assert "global_batch" in capsys.readouterr().err
    assert T.main(dit_argv(data, tmp_path, "--resume")) == 2
    assert "checkpoint.pt does not exist" in capsys.readouterr().err
    assert T.main(dit_argv(data, tmp_path, "--sequence_parallel", "2")) == 2     # one process
    assert "sequence_parallel: expected a divisor of the 1 processes" in capsys.readouterr().err
    wrong = dit_argv(data, tmp_path)
    wrong[wrong.index("--height") + 1] = "96"
    assert T.main(wrong) == 2
    assert "precompute with the same stage" in capsys.readouterr().err
    for config, words in ((tmp_path, ["Is a directory"]),  # an OSError other than FileNotFoundError
                          (tmp_path / "bad.json", ["--config", "bad.json", "not a JSON config"])):
        (tmp_path / "bad.json").write_text("{'hidden_size': 32}")
        argv = dit_argv(data, tmp_path / "out")
        argv[argv.index("--config") + 1] = str(config)
        assert T.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err
    refiner = ["train", "--model", "refiner", "--data", str(data["data"]), "--out", str(tmp_path / "out"),
               "--weights", str(tmp_path), "--config", str(tmp_path / "bad.json")]
    with pytest.raises(SystemExit, match="2"):  # --config would be silently ignored: refused by the parser
        T.main(refiner)
    assert "--config" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        T.main(refiner[:-2] + ["--sequence_parallel", "2"])
    assert "--sequence_parallel must be >= 1, and 1 for the refiner" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Refiner LoRA

@pytest.fixture(scope="module")
def refiner_data(data):
    """The DiT clips' latents as targets, a degraded copy (smoothed over time, offset) as the stage-1 latents, and
    a random 16-channel caption embedding (the tiny refiner's caption width)."""
    ds = T.LatentDataset(data["data"])
    out = data["root"] / "refiner_data"
    out.mkdir()
    g = torch.Generator().manual_seed(7)
    records = []
    for i in range(len(ds)):
        z = ds[i]["latents"]
        blurred = (z + z.roll(1, dims=1) + z.roll(-1, dims=1)) / 3
        records.append(dict(name=ds[i]["name"], latents=z, stage1=0.7 * blurred + 0.1,
                            text=torch.randn(12, 16, generator=g), text_mask=torch.ones(12),
                            raymap=ds[i]["raymap"], plucker=ds[i]["plucker"]))
    T.write_shard(out / "shard_00000.safetensors", records, ds.meta)
    (out / "dataset.json").write_text(json.dumps(dict(ds.meta, clips=len(records),
                                                      shards=["shard_00000.safetensors"])))
    (data["root"] / "refiner.json").write_text(json.dumps(TINY_REFINER))
    return dict(data=out, config=data["root"] / "refiner.json")


def _refiner_eval_loss(model, refiner_data):
    ds = T.LatentDataset(refiner_data["data"])
    items = []
    for i in range(len(ds)):
        for sigma, start in ((0.2, 1), (0.5, 2), (0.9, 1)):
            item = ds[i]
            g = torch.Generator().manual_seed(10 * i + start)
            item.update(noise=torch.randn((8, 1, 4, 6), generator=g), sigma=torch.tensor(sigma),
                        start=torch.tensor(start))
            items.append(item)
    with torch.no_grad():
        return T.refiner_loss(model, T.collate(items), sink_size=1, fps=16.0).item()


def test_refiner_lora_trains_saves_loads_and_merges(refiner_data, tmp_path):
    from refiner import LoRALinear, Refiner, RefinerConfig, load_lora, pack
    argv = ["train", "--model", "refiner", "--data", str(refiner_data["data"]), "--out", str(tmp_path),
            "--config", str(refiner_data["config"]), "--num_frames", str(FRAMES), "--height", str(HEIGHT),
            "--width", str(WIDTH), "--precision", "fp32", "--global_batch", "3", "--steps", "30", "--lr", "5e-2",
            "--warmup", "1", "--lora_rank", "8", "--refiner_block_size", "1", "--seed", "3"]
    args = T.parse_args(argv)
    initial, trained_names = T.build_model(args, "cpu")
    assert trained_names and all(".lora_" in n for n in trained_names)
    before = _refiner_eval_loss(initial, refiner_data)
    losses, model = T.train(args)
    after = _refiner_eval_loss(model, refiner_data)
    assert after < 0.85 * before, (before, after, losses)  # measured 1.090 -> 0.826

    # A fresh base (same seed as the run's) + the saved adapter, merged, reproduces the trained model.
    torch.manual_seed(args.seed)
    fresh = Refiner(RefinerConfig.from_dict(TINY_REFINER))
    names = load_lora(fresh, tmp_path / "lora.safetensors")
    assert len(names) == 10 * TINY_REFINER["num_layers"]
    for m in fresh.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    g = torch.Generator().manual_seed(0)
    x = pack(torch.randn(1, 8, 2, 4, 6, generator=g))
    text = torch.randn(1, 12, 16, generator=g)
    t = torch.full((1,), 600.0)
    rope = model.rope(range(1, 3), 4, 6, 16.0)
    with torch.no_grad():
        want, got = model(x, t, text, rope), fresh(x, t, text, rope)
    assert (want - got).abs().max().item() <= 1e-6
    # the base weights were not trained
    assert torch.equal(fresh.proj_in.weight, model.proj_in.weight)


# ----------------------------------------------------------------------------------------------------------------
# Command-line checks that need no data

@pytest.mark.parametrize("content,words", [
    ("{}", ["dataset.json", "lacks the key 'num_frames'"]),
    (json.dumps(dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH)), ["dataset.json", "lacks the key 'shards'"]),
    ("[]", ["dataset.json", "JSON object"]),
    ("{'num_frames': 17", ["dataset.json", "not JSON"]),
], ids=["empty-object", "no-shards", "list", "not-json"])
def test_bad_dataset_json_is_one_line_and_leaves_no_run_folder(tmp_path, capsys, content, words):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(content)
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "data"), "--out", str(out), "--num_frames", str(FRAMES),
            "--height", str(HEIGHT), "--width", str(WIDTH), "--precision", "fp32"]
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err
    assert not out.exists()  # the run folder this call made is removed again
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert T.main(argv) == 2 and sorted(os.listdir(out)) == ["notes.txt"]  # a folder that existed is left alone


@pytest.mark.parametrize("command,flag,value", [
    ("train", "--lr", "nan"), ("train", "--grad_clip", "inf"), ("train", "--shift", "nan"),
    ("train", "--ema_decay", "-inf"), ("train", "--lora_alpha", "nan"), ("train", "--weight_decay", "nan"),
    ("train", "--beta1", "1"), ("train", "--text_dropout", "1.5"), ("train", "--lr", "0"),
    ("precompute", "--fps", "nan"),
])
def test_non_finite_or_out_of_range_float_flags_are_refused_by_name(tmp_path, capsys, command, flag, value):
    required = ["--clips", "c", "--weights", "w"] if command == "precompute" else ["--data", "d"]
    with pytest.raises(SystemExit) as e:  # argparse's refusal
        T.main([command, *required, "--out", str(tmp_path / "run"), f"{flag}={value}"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in last and value in last, last
    assert not (tmp_path / "run").exists()


def test_precompute_without_gemma2_names_text_encoder(tmp_path, capsys):
    """The release does not include the DiT's text encoder: the error says where to get it and which flag takes
    it, before any model loads, and leaves no --out folder."""
    (tmp_path / "release" / "vae").mkdir(parents=True)
    argv = ["precompute", "--clips", str(tmp_path), "--out", str(tmp_path / "data"), "--weights",
            str(tmp_path / "release")]
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--text_encoder" in err[0] and "Efficient-Large-Model/gemma-2-2b-it" in err[0], err
    assert T.main(argv + ["--text_encoder", str(tmp_path / "gemma")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--text_encoder: no such folder" in err[0], err
    assert not (tmp_path / "data").exists()
