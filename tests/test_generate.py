"""generate.py: stage 1 end to end against diffusers' SanaWMPipeline, the stage-1 -> refiner hand-off against
SanaWMPipeline + SanaWMLTX2Refiner, their parts, the memory machinery (weight streaming, --gpu_memory) and the command
line."""
import dataclasses
import os
import re
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import generate as G
import refiner as R
from dit import DiT, DiTConfig
from reference import (TINY_DIT, build_tiny_vae, load_sana_wm_native, max_rel_err, tiny_refiner_pipeline,
                       tiny_sana_wm_transformer, vae_from_diffusers)

SIZE = (128, 192)  # 4 x 6 latent pixels, the smallest the tiny VAE decodes with reflect padding


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _pipeline(tokenizer, text_encoder, transformer=None, vae=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaWMPipeline

    return SanaWMPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=9.8))


def _causal_lm(gemma):
    """The Gemma-2 weights inside a causal-LM wrapper: the pipeline reads its hidden_states[-1], we read the
    decoder's last_hidden_state; the (random) LM head is never used."""
    from transformers import Gemma2ForCausalLM

    causal = Gemma2ForCausalLM(gemma.config).eval()
    causal.model = gemma
    return causal


@pytest.fixture(scope="module")
def text_encoder():
    return G.demo_text_encoder()


@pytest.fixture(scope="module")
def models(text_encoder):
    """Tiny random-weight diffusers DiT + VAE, ours holding the same weights, and the tiny Gemma-2 for both."""
    ref_dit, ref_vae = tiny_sana_wm_transformer(), build_tiny_vae()
    dit = DiT(DiTConfig.from_dict(TINY_DIT)).eval()
    dit.load_state_dict(ref_dit.state_dict(), strict=True)
    vae = vae_from_diffusers(ref_vae)
    tokenizer, gemma = text_encoder
    return _pipeline(tokenizer, _causal_lm(gemma), ref_dit, ref_vae), (dit, vae, tokenizer, gemma)


# ----------------------------------------------------------------------------------------------------------------
# The parts

@pytest.mark.parametrize("steps", [1, 2, 7, 60, 250])
def test_schedule_matches_diffusers_scheduler(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=9.8)
    scheduler.set_timesteps(steps)
    sigmas = G.schedule(steps)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(sigmas[:-1] * 1000, scheduler.timesteps)


def test_schedule_values():
    """Shift 9.8 (official): the 60-step schedule starts 1000, 998.26, 996.47 and ends 210.58, 87.70, then 0."""
    t = G.schedule(60) * 1000
    assert len(t) == 61 and t[-1] == 0
    torch.testing.assert_close(t[[0, 1, 2, -3, -2]], torch.tensor([1000.0, 998.26, 996.47, 210.58, 87.70]),
                               atol=0.01, rtol=0)


LONG_PROMPT = " ".join(["the camera drives along a quiet desert road at dusk"] * 40)  # > 298 tokens: truncated


@pytest.mark.parametrize("prompt,negative", [(G.DEMO_PROMPT, ""), (LONG_PROMPT, "blurry, low quality frames")],
                         ids=["short", "long-truncated"])
def test_text_encoding_matches_pipeline(text_encoder, prompt, negative):
    tokenizer, gemma = text_encoder
    pipe = _pipeline(tokenizer, _causal_lm(gemma))
    with torch.no_grad():
        ref, ref_mask, ref_neg, ref_neg_mask = pipe.encode_prompt(
            prompt, negative, device=torch.device("cpu"), chi_prompt=_diffusers_chi_prompt())
    text, mask = G.encode_prompt(tokenizer, gemma, prompt)
    neg, neg_mask = G.encode_negative_prompt(tokenizer, gemma, negative)
    assert text.shape == (1, 300, 32) and neg.shape == (1, 300, 32)
    assert torch.equal(text, ref[:, 0]) and torch.equal(mask, ref_mask)
    assert torch.equal(neg, ref_neg[:, 0]) and torch.equal(neg_mask, ref_neg_mask)
    assert 1 < int(mask.sum()) <= 300 and (prompt != LONG_PROMPT or int(mask.sum()) == 300)


def _diffusers_chi_prompt():
    from diffusers.pipelines.sana_wm.pipeline_sana_wm import DEFAULT_CHI_PROMPT

    return DEFAULT_CHI_PROMPT


def test_chi_prompt_is_the_release_prefix():
    assert G.CHI_PROMPT == "\n".join(_diffusers_chi_prompt())


# ----------------------------------------------------------------------------------------------------------------
# End to end: the same final latents as SanaWMPipeline(output_type="latent")

def test_generate_matches_pipeline_without_cfg(models):
    """Action string, explicit intrinsics, guidance 1 (no CFG batch), the offload path (to and from the CPU)."""
    pipe, (dit, vae, tokenizer, gemma) = models
    image = G.demo_image(300, 350)  # another aspect ratio than 128 x 192: the crop moves the principal point
    kwargs = dict(action="w-8,l-8", intrinsics=[260.0, 250.0, 170.0, 140.0], num_frames=17)
    ref = pipe(image=image, prompt=G.DEMO_PROMPT, height=SIZE[0], width=SIZE[1], num_inference_steps=3,
               guidance_scale=1.0, generator=torch.Generator().manual_seed(7), output_type="latent", **kwargs).frames
    ours = G.generate(dit, vae, tokenizer, gemma, image, G.DEMO_PROMPT, height=SIZE[0], width=SIZE[1], steps=3,
                      guidance_scale=1.0, seed=7, decode=False, offload=True, action_scheme="legacy", **kwargs)
    assert ours.latents.shape == ref.shape == (1, 8, 3, 4, 6)
    assert (ours.latents - ref).abs().max() <= 1e-4, (ours.latents - ref).abs().max()


def test_generate_matches_pipeline_with_cfg(models, capsys):
    """c2w poses longer than the video (num_frames 20 -> 17), default intrinsics, a negative prompt, CFG 5."""
    from diffusers.pipelines.sana_wm.cam_utils import action_string_to_c2w

    pipe, (dit, vae, tokenizer, gemma) = models
    image = G.demo_image(256, 384)
    c2w = action_string_to_c2w("wi-12,dj-12")  # 25 poses
    fx = 384 / (2 * np.tan(np.radians(30)))  # the 60 degree horizontal field of view generate() assumes
    common = dict(c2w=c2w, num_frames=20, negative_prompt="blurry, low quality frames")
    ref = pipe(image=image, prompt=G.DEMO_PROMPT, intrinsics=[fx, fx, 192.0, 128.0], height=SIZE[0],
               width=SIZE[1], num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
               output_type="latent", **common).frames
    ours = G.generate(dit, vae, tokenizer, gemma, image, G.DEMO_PROMPT, height=SIZE[0], width=SIZE[1], steps=3,
                      guidance_scale=5.0, seed=3, decode=False, **common)
    assert "60 deg" in capsys.readouterr().err
    assert ours.c2w.shape == (17, 4, 4)
    assert (ours.latents - ref).abs().max() <= 1e-4, (ours.latents - ref).abs().max()
    # The memory mode (DiT in parts of frames, the CFG halves one after the other) makes the same video.
    low = G.generate(dit, vae, tokenizer, gemma, image, G.DEMO_PROMPT, height=SIZE[0], width=SIZE[1], steps=3,
                     guidance_scale=5.0, seed=3, decode=False, part_frames=1, **common)
    assert (low.latents - ref).abs().max() <= 1e-4, (low.latents - ref).abs().max()


def test_load_release_reads_the_release_layout(models, tmp_path):
    """dit/, vae/ and text_encoder/ + tokenizer/ saved the diffusers/transformers way load back unchanged."""
    pipe, (dit, vae, tokenizer, gemma) = models
    pipe.transformer.save_pretrained(tmp_path / "dit")
    pipe.vae.save_pretrained(tmp_path / "vae")
    gemma.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = G.load_release(str(tmp_path), torch.float32, "cpu")
    for ours, back in zip((dit, vae, gemma), (loaded[0], loaded[1], loaded[3])):
        a, b = ours.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text, mask = G.encode_prompt(tokenizer, gemma, G.DEMO_PROMPT)
    text_back, mask_back = G.encode_prompt(loaded[2], loaded[3], G.DEMO_PROMPT)
    assert torch.equal(text, text_back) and torch.equal(mask, mask_back)



# A chunk-causal teacher config.yaml as the release writes it (abridged): nested mappings, block lists (an empty
# item is null), a flow list, quoted strings holding quotes, colons and a #.
TEACHER_YAML = """\
model:
  model: SanaMSVideoCamCtrl_1600M_P1_D20
  image_size: 720
  fp32_attention: true
  attn_type: ChunkCausalGDNTriton  # the chunk-causal GDN
  ffn_type: ChunkGLUMBConvTemp
  mlp_acts:
    - silu
    - silu
    -
  mlp_ratio: 3
  class_dropout_prob: 0.0
  chunk_size: 3
  chunk_split_strategy: first_chunk_plus_one
vae:
  vae_pretrained: Efficient-Large-Model/SANA-WM_bidirectional
  vae_stride: [8, 32, 32]
text_encoder:
  model_max_length: 300
  chi_prompt:
    - 'Given a user prompt, generate an "Enhanced prompt": it''s # not a comment'
    - 'User Prompt: '
scheduler:
  pred_sigma: false
  flow_shift: 9.95
  inference_flow_shift: 9.8
  vis_sampler: chunk_flow_euler
  weighting_scheme:
"""


def test_read_release_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(TEACHER_YAML)
    config = G.read_release_yaml(str(path))
    assert config["model"] == {
        "model": "SanaMSVideoCamCtrl_1600M_P1_D20", "image_size": 720, "fp32_attention": True,
        "attn_type": "ChunkCausalGDNTriton", "ffn_type": "ChunkGLUMBConvTemp", "mlp_acts": ["silu", "silu", None],
        "mlp_ratio": 3, "class_dropout_prob": 0.0, "chunk_size": 3, "chunk_split_strategy": "first_chunk_plus_one"}
    assert config["vae"]["vae_stride"] == "[8, 32, 32]"  # a flow list stays its text
    assert config["text_encoder"]["chi_prompt"] == ['Given a user prompt, generate an "Enhanced prompt": it\'s # '
                                                    'not a comment', "User Prompt: "]
    assert config["scheduler"] == {"pred_sigma": False, "flow_shift": 9.95, "inference_flow_shift": 9.8,
                                   "vis_sampler": "chunk_flow_euler", "weighting_scheme": None}
    yaml = pytest.importorskip("yaml")  # the same values as PyYAML, flow lists aside
    official = yaml.safe_load(TEACHER_YAML)
    official["vae"]["vae_stride"] = "[8, 32, 32]"
    assert config == official

    for text, line in (("model:\n  a: |\n    text\n", 2), ("a: 1\n\tb: 2\n", 2), ("a:\n  - x\n  b: 1\n", 3),
                       ("just words\n", 1)):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"config.yaml:{line}: "):
            G.read_release_yaml(str(path))


def _release_layouts(root, teacher_yaml=TEACHER_YAML):
    """Empty stand-ins of the three official release layouts under root (release_kind reads only the layout and
    the teacher's config.yaml)."""
    layouts = {"bidirectional": ["dit/diffusion_pytorch_model.safetensors", "vae/config.json", "refiner/",
                                 "text_encoder/", "config.yaml"],
               "streaming": ["sana_dit/model.pt", "ltx2_causal_vae/", "refiner_diffusers/transformer/",
                             "gemma3_12b/"],
               "chunk_causal": ["dit/sana_wm_chunk_causal_1600m_720p.safetensors", "config.yaml"]}
    for kind, parts in layouts.items():
        for part in parts:
            path = root / kind / part
            path.parent.mkdir(parents=True, exist_ok=True)
            if not part.endswith("/"):
                path.write_text(teacher_yaml if kind == "chunk_causal" and part == "config.yaml" else "")
            else:
                path.mkdir(exist_ok=True)
    return {kind: str(root / kind) for kind in layouts}


def test_release_kind(tmp_path):
    folders = _release_layouts(tmp_path)
    assert {kind: G.release_kind(folder) for kind, folder in folders.items()} == {k: k for k in folders}
    assert G.chunk_causal_settings(folders["chunk_causal"]) == {"chunk_size": 3, "sampler": "chunk_flow_euler",
                                                                "flow_shift": 9.8}
    # The bidirectional release's config.yaml (no chunk size) does not make it the teacher.
    (tmp_path / "bidirectional" / "config.yaml").write_text("model:\n  model: SanaMSVideoCamCtrl_1600M_P1_D20\n")
    assert G.release_kind(folders["bidirectional"]) == "bidirectional"
    with pytest.raises(ValueError, match="folder: .* holds none of the SANA-WM releases; expected .*sana_dit/model.pt"):
        G.release_kind(str(tmp_path))
    with pytest.raises(ValueError, match="folder: no such folder"):
        G.release_kind(str(tmp_path / "nowhere"))
    bad = _release_layouts(tmp_path / "bad", TEACHER_YAML.replace("chunk_size: 3", "chunk_size: three"))
    with pytest.raises(ValueError, match="model.chunk_size: expected a positive int, got 'three'"):
        G.chunk_causal_settings(bad["chunk_causal"])
    # generate.py runs the bidirectional release; the others are named, before any part is looked for.
    with pytest.raises(ValueError, match="is the SANA-WM streaming release .*generate.py runs the bidirectional"):
        G._check_release(folders["streaming"])
    with pytest.raises(ValueError, match="chunk-causal stage-1 teacher .*chunk size 3, sampler chunk_flow_euler, "
                                         "flow shift 9.8"):
        G._check_release(folders["chunk_causal"])


def test_mismatched_checkpoint_is_one_error_line(models, tmp_path, capsys):
    """A dit/ whose keys do not match the model: the CLI's error names the key problems on one line."""
    from safetensors.torch import load_file, save_file

    pipe, (dit, vae, tokenizer, gemma) = models
    pipe.transformer.save_pretrained(tmp_path / "dit")
    pipe.vae.save_pretrained(tmp_path / "vae")
    gemma.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    weights = next((tmp_path / "dit").glob("*.safetensors"))
    state = load_file(str(weights))
    state["bogus.weight"] = state.pop("final_layer.linear.bias")
    save_file(state, str(weights))
    image = str(tmp_path / "image.png")
    G.demo_image().save(image)
    argv = ["--weights", str(tmp_path), "--image", image, "--prompt", "p", "--action", "w-8", "--no_refiner",
            "--dtype", "fp32", "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()  # the savers' progress bars
    assert G.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # transformers' loading bars may come first
    assert [line for line in err if line.startswith("error: ")] == err[-1:], err
    assert "final_layer.linear.bias" in err[-1] and "bogus.weight" in err[-1], err

# ----------------------------------------------------------------------------------------------------------------
# Stage 2: the hand-off to the refiner, as diffusers' two-stage use does it (official two-stage pipeline)

def _tiny_refiner(p):
    """Our Stage2 with the weights, tokenizer and Gemma-3 of the diffusers SanaWMLTX2Refiner `p`."""
    refiner = R.Refiner(R.RefinerConfig.from_dict(dict(p.transformer.config)), keep_audio=True)
    refiner.load_state_dict(p.transformer.state_dict(), strict=True)
    connectors = R.TextConnectors(R.ConnectorsConfig.from_dict(dict(p.connectors.config)), keep_audio=True)
    connectors.load_state_dict(p.connectors.state_dict(), strict=True)
    encoder = R.PromptEncoder(p.tokenizer, p.text_encoder, connectors.eval(), p.text_max_sequence_length)
    return G.Stage2(lambda: encoder, lambda: refiner.eval())


def test_two_stage_matches_pipeline_then_refiner(models):
    """diffusers' two-stage use: SanaWMPipeline(output_type="latent") -> SanaWMLTX2Refiner(vae=pipe.vae) on those
    latents with the same prompt and fps (its default generator: seed 42) -> decode, first frame dropped. 33 frames
    (T = 5): the sink, a block of 3 and a shorter last block; fps 12, so a wrong frame rate would show in RoPE."""
    from diffusers.pipelines.sana_wm.refiner import SanaWMLTX2Refiner

    pipe, (dit, vae, tokenizer, gemma) = models
    p = tiny_refiner_pipeline("spec")
    image = G.demo_image(256, 384)
    kwargs = dict(action="w-16,l-16", intrinsics=[330.0, 330.0, 192.0, 128.0], num_frames=33)
    stage1 = pipe(image=image, prompt=G.DEMO_PROMPT, height=SIZE[0], width=SIZE[1], num_inference_steps=2,
                  guidance_scale=1.0, generator=torch.Generator().manual_seed(5), output_type="latent",
                  **kwargs).frames
    ref_refiner = SanaWMLTX2Refiner(transformer=p.transformer, connectors=p.connectors, tokenizer=p.tokenizer,
                                    text_encoder=p.text_encoder, scheduler=p.scheduler, vae=pipe.vae,
                                    text_max_sequence_length=p.text_max_sequence_length)
    ref_latents = ref_refiner(stage1, G.DEMO_PROMPT, fps=12, output_type="latent")
    ref_video = ref_refiner(stage1, G.DEMO_PROMPT, fps=12, output_type="np")  # (F, H, W, 3) in [0, 1]

    ours = G.generate(dit, vae, tokenizer, gemma, image, G.DEMO_PROMPT, refiner=_tiny_refiner(p), height=SIZE[0],
                      width=SIZE[1], steps=2, guidance_scale=1.0, seed=5, fps=12, action_scheme="legacy", **kwargs)
    assert ours.latents.shape == ref_latents.shape == (1, 8, 5, 4, 6)
    assert (ours.latents - ref_latents).abs().max() <= 1e-4, (ours.latents - ref_latents).abs().max()
    assert (ours.latents[:, :, 0] - stage1[:, :, 0]).abs().max() <= 1e-5  # the sink frame is carried through
    # 8 (T - 1) + 1 decoded frames minus the first; ours are rounded to uint8, so they may differ from 255 x the
    # reference by half a level plus what 1e-4 in [-1, 1] is worth.
    assert ref_video.shape == (32, *SIZE, 3) and ours.frames.shape == (32, *SIZE, 3)
    error = np.abs(ours.frames.numpy().astype(np.float64) - 255 * ref_video.astype(np.float64)).max()
    assert error <= 0.5 + 127.5 * 1e-4, error
    trajectory = G.camera.action_to_c2w("w-16,l-16", scheme="legacy")
    assert ours.c2w.shape == (32, 4, 4) and np.array_equal(ours.c2w, trajectory[1:33])
    assert ours.intrinsics.shape == (32, 4) and ours.refine_seconds is not None


def _save_refiner_release(p, root):
    p.transformer.save_pretrained(root / "refiner" / "transformer")
    p.connectors.save_pretrained(root / "refiner" / "connectors")
    p.text_encoder.save_pretrained(root / "refiner" / "text_encoder")
    p.tokenizer.save_pretrained(root / "refiner" / "tokenizer")


def test_release_refiner_reads_refiner_folder(tmp_path, capsys):
    """refiner/ as diffusers writes it: checked at once, loaded only when called (video-only transformer)."""
    p = tiny_refiner_pipeline("spec")
    _save_refiner_release(p, tmp_path)
    stage2 = G.release_refiner(str(tmp_path), torch.float32, "cpu")
    refiner = stage2.load_refiner()
    ours, theirs = refiner.state_dict(), p.transformer.state_dict()
    assert set(ours) < set(theirs) and not any("audio" in k or k.startswith("av_") for k in ours)
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    prompt = "a red car drives along the beach at sunset slowly"
    text, mask = stage2.load_prompt_encoder()(prompt)
    ref_text, ref_mask = p._encode_prompt(prompt, device=torch.device("cpu"), dtype=torch.float32)
    assert (text - ref_text).abs().max() <= 1e-5 and torch.equal(mask, ref_mask)

    shutil.rmtree(tmp_path / "refiner" / "connectors")
    with pytest.raises(FileNotFoundError, match="refiner/connectors/ is missing"):
        G.release_refiner(str(tmp_path), torch.float32, "cpu")
    shutil.rmtree(tmp_path / "refiner")
    assert G.release_refiner(str(tmp_path), torch.float32, "cpu") is None
    assert "no refiner/" in capsys.readouterr().err


@pytest.mark.weights
def test_generate_matches_pipeline_on_release():
    """The release, fp32, 2 steps at 17 frames, 704 x 1280: ours vs SanaWMPipeline, sharing the text encoder."""
    from diffusers import AutoencoderKLLTX2Video

    weights = os.environ["SANA_WM_WEIGHTS"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Gemma-2-2b-it is a separate download: SANA_WM_TEXT_ENCODER, else <release>/text_encoder.
    dit, vae, tokenizer, gemma = G.load_release(weights, torch.float32, device,
                                                text_encoder=os.environ.get("SANA_WM_TEXT_ENCODER"))
    ref_dit = load_sana_wm_native(os.path.join(weights, "dit"), torch.float32, device).to(device)
    ref_vae = AutoencoderKLLTX2Video.from_pretrained(os.path.join(weights, "vae"), torch_dtype=torch.float32)
    # Our VAE encodes with SANA-WM's tiles (official loader); diffusers' pipeline leaves that to the caller.
    ref_vae.enable_tiling(tile_sample_min_num_frames=96, tile_sample_stride_num_frames=64)
    ref_vae.use_framewise_encoding = ref_vae.use_framewise_decoding = True
    pipe = _pipeline(tokenizer, gemma, ref_dit, ref_vae.to(device).eval())
    image = G.demo_image(720, 1280)
    kwargs = dict(action="w-8,jw-8", intrinsics=[800.0, 800.0, 640.0, 360.0], num_frames=17)
    ref = pipe(image=image, prompt=G.DEMO_PROMPT, num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).frames
    ours = G.generate(dit, vae, tokenizer, gemma, image, G.DEMO_PROMPT, steps=2, guidance_scale=5.0, seed=0,
                      device=device, decode=False, action_scheme="legacy", **kwargs)
    assert max_rel_err(ours.latents, ref) <= 1e-3, max_rel_err(ours.latents, ref)


# ----------------------------------------------------------------------------------------------------------------
# The command line

def _read_mp4(path):
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return frames, container.streams.video[0].average_rate


def _smooth_frames(n, start, size=(128, 192)):
    """n smooth moving gradients (H.264 at crf 17 keeps them within a few levels), frame indices from start."""
    y, x = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    return np.stack([np.stack([127 + 100 * np.sin(x / 30 + 0.2 * i), 127 + 100 * np.cos(y / 25 - 0.1 * i),
                               np.full_like(x, 4 * i % 256)], -1) for i in range(start, start + n)]).astype(np.uint8)


def test_streaming_mp4_is_playable_while_it_grows(tmp_path):
    """Each chunk is on disk and decodable once write returns: after 2 of 4 chunks the growing file decodes to
    those 16 frames; a refused chunk leaves the file as it was; after close all 32 frames decode."""
    path, chunk = tmp_path / "stream.mp4", 8
    written = [_smooth_frames(chunk, c * chunk) for c in range(4)]
    with G.StreamingMp4Writer(str(path), 16, 128, 192) as writer:
        writer.write(torch.from_numpy(written[0]))  # a tensor, as generate() gives
        writer.write(written[1])
        frames, fps = _read_mp4(path)
        assert len(frames) == 2 * chunk and fps == 16
        assert np.abs(np.stack(frames).astype(float) - np.concatenate(written[:2])).mean() < 3
        with pytest.raises(ValueError, match=r"frames: expected \(n >= 1, 128, 192, 3\) uint8, got \(8, 128, 190, 3\)"):
            writer.write(written[2][:, :, :190])
        assert len(_read_mp4(path)[0]) == 2 * chunk
        writer.write(written[2])
        writer.write(written[3])
    with pytest.raises(ValueError, match="write: the writer of .* is closed"):
        writer.write(written[0])
    frames, _ = _read_mp4(path)
    assert len(frames) == 4 * chunk
    difference = np.abs(np.stack(frames).astype(float) - np.concatenate(written)).mean(axis=(1, 2, 3))
    assert difference.max() < 3, difference
    import av
    with av.open(str(path)) as container:  # the fragments of the chunks' muxers join into one timeline
        assert [frame.time for frame in container.decode(video=0)] == [i / 16 for i in range(4 * chunk)]
    with pytest.raises(ValueError, match="height, width: expected positive even ints"):
        G.StreamingMp4Writer(str(tmp_path / "odd.mp4"), 16, 127, 192)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The two demo runs (into one folder): with the refiner (and --save_stage1), and stage 1 only; for each, the
    mp4's path and what the CLI printed."""
    folder = tmp_path_factory.mktemp("demo")
    runs = {}
    for no_refiner in (False, True):
        # No overlay: x264 encodes the overlay's sharp edges differently from run to run (the frames handed to
        # it are equal), and --save_stage1's test compares two encodes bit for bit.
        argv = ["--demo", "--steps", "2", "--fps", "12", "--no_action_overlay", "--output_dir", str(folder)]
        argv += ["--no_refiner"] if no_refiner else ["--save_stage1"]
        before = set(os.listdir(folder))
        with _captured() as out:
            assert G.main(argv) == 0
        written = sorted(set(os.listdir(folder)) - before)
        mp4 = [f for f in written if f.endswith("0.mp4")]
        assert len(mp4) == 1, written
        runs[no_refiner] = (folder / mp4[0], out.getvalue(), written)
    return runs


@contextmanager
def _captured():
    """stdout and stderr of a call, together, in a module-scoped fixture (capsys is per test)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        yield out


@pytest.mark.parametrize("no_refiner", [False, True], ids=["refiner", "no-refiner"])
def test_demo_writes_a_playable_mp4(demo_runs, no_refiner):
    """17 frames are generated; the refiner's video drops the first one, and the camera path its first pose.
    Named <stem>_<8 hex digits>_seed<seed>."""
    path, out, written = demo_runs[no_refiner]
    frames_expected = 17 if no_refiner else 16
    assert "RANDOM weights" in out and f"{frames_expected} frames, 192x128" in out
    assert "under the v2 action scheme" in out and "a<->j and d<->l" in out  # the default camera turns with d
    assert ("no refiner" in out) == no_refiner and ("refiner " in out) != no_refiner
    assert re.fullmatch(r"demo_[0-9a-f]{8}_seed0\.mp4", path.name), path.name
    assert written == sorted([path.name, path.name[:-4] + "_c2w.npy"] + [path.name[:-4] + "_stage1.mp4"] * (
        not no_refiner)), written  # and no temporary file left over
    frames, rate = _read_mp4(path)
    assert rate == 12
    assert len(frames) == frames_expected and frames[0].shape == (128, 192, 3)
    c2w = np.load(path.with_name(path.name[:-4] + "_c2w.npy"))
    trajectory = G.camera.action_to_c2w("w-8,d-8")  # the demo's default camera: forward, then turn right
    assert np.array_equal(c2w, trajectory[17 - frames_expected:17])


def test_action_overlay_controls():
    """Keys and joystick from the poses: walking lights W, strafing (v2 j/l) A/D, turning (v2 a/d) no key but the
    joystick; the official overlay's values on the official demo_0 trajectory."""
    keys, stick = G.action_overlay_controls(G.camera.action_to_c2w("w-12,l-12,d-12,s-12,j-12,i-12"))
    held = ["".join(k for k, on in zip(G.OVERLAY_KEYS, row) if on) for row in keys]
    assert keys.shape == (73, 4) and stick.shape == (73, 2)
    assert held[:12] == ["W"] * 12 and held[13:24] == ["D"] * 11 and held[25:36] == [""] * 11
    assert held[37:48] == ["S"] * 11 and held[49:60] == ["A"] * 11 and held[61:] == [""] * 12
    assert (stick[26:36, 0] > 0.5).all() and np.abs(stick[:24]).max() == 0 and np.abs(stick[26:36, 1]).max() < 1e-3
    assert (stick[64:, 1] > 0.5).all() and np.abs(stick[64:, 0]).max() < 1e-3  # look up: +pitch, the knob goes down
    demo = np.load(os.path.join(os.path.dirname(__file__), "data", "demo_0_pose.npy"))[1:321]  # "w-100,dw-60,..."
    keys, stick = G.action_overlay_controls(demo)
    assert keys.all(axis=0).tolist() == [True, False, False, False] and not keys[:, 1:].any()
    assert np.allclose(stick[[98, 99, 100, 160, 200, 260], 0], [0, 0.35, 0.5775, 0.9451, 0.0823, -0.5766], atol=1e-4)
    assert (stick[115:159, 0] > 0.999).all() and (stick[275:320, 0] < -0.999).all() and not stick[:, 1].any()


def test_demo_draws_the_action_overlay(tmp_path, monkeypatch, capsys):
    """--action draws the keys over the video (W white while walking, D while strafing with v2's l), only inside its
    corner; --no_action_overlay writes the generated frames as they are; the saved camera is the same."""
    import av

    made, written = [], []
    generate, write_mp4 = G.generate, G.write_mp4
    monkeypatch.setattr(G, "generate", lambda *a, **k: made.append(generate(*a, **k)) or made[-1])
    monkeypatch.setattr(G, "write_mp4", lambda frames, *a: written.append(frames) or write_mp4(frames, *a))
    argv = ["--demo", "--no_refiner", "--steps", "1", "--action", "w-8,l-8"]
    assert G.main(argv + ["--output_dir", str(tmp_path / "overlay")]) == 0
    assert "under the v2 action scheme" in capsys.readouterr().err
    assert G.main(argv + ["--no_action_overlay", "--output_dir", str(tmp_path / "plain")]) == 0
    assert torch.equal(made[0].frames, made[1].frames) and torch.equal(written[1], made[1].frames)
    (overlay_npy,), (plain_npy,) = ((tmp_path / d).glob("*_c2w.npy") for d in ("overlay", "plain"))
    assert overlay_npy.name != plain_npy.name  # the overlay is part of the name's hash
    assert np.array_equal(np.load(overlay_npy), np.load(plain_npy))
    overlaid, plain = written[0].numpy(), written[1].numpy()
    touched = (overlaid != plain).any(axis=(0, 3))
    rows, cols = np.nonzero(touched)
    assert rows.min() > 128 // 3 and cols.max() < 170  # the bottom-left corner only, clear of the right edge
    # At 128 x 192 the keys are 21 px (margin 6, gap 4): W at (31, 76), S at (31, 101), D at (56, 101); the
    # 15 x 15 inside of a tile: a white pressed tile is >= 200 but for its dark letter.
    inside = lambda frame, x, y: frame[y + 3:y + 18, x + 3:x + 18].min(axis=-1)  # noqa: E731
    with av.open(str(overlay_npy).replace("_c2w.npy", ".mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for frame in (decoded[3], overlaid[3]):
        w_tile, s_tile = inside(frame, 31, 76), inside(frame, 31, 101)
        assert (w_tile > 185).mean() > 0.5 and w_tile.min() < 80  # white, with the black W drawn on it
        assert (s_tile > 185).mean() < 0.35
    assert (inside(overlaid[12], 56, 101) > 185).mean() > 0.5 and (inside(overlaid[12], 31, 76) > 185).mean() < 0.35


def test_draw_action_overlay_fits_small_and_large_frames():
    """The official layout on 704 x 1280 (keys of 56 px at (99, 549) for W); on 128 x 192 the panel shrinks into
    the frame. A frame with no pressed key and a still stick differs from a pressed one only on the tiles."""
    c2w = G.camera.action_to_c2w("w-4")
    for height, width in ((704, 1280), (128, 192), (64, 64)):
        frames = torch.full((5, height, width, 3), 90, dtype=torch.uint8)
        out = G.draw_action_overlay(frames, c2w).numpy()
        assert out.shape == frames.shape and out.dtype == np.uint8 and not np.array_equal(out, frames.numpy())
    big = G.draw_action_overlay(torch.full((5, 704, 1280, 3), 90, dtype=torch.uint8), c2w).numpy()
    assert (big[0, 549 + 8:549 + 48, 99 + 8:99 + 48].min(-1) > 185).mean() > 0.5  # W pressed: white
    assert (big[0, 613 + 8:613 + 48, 163 + 8:163 + 48].max(-1) < 90).mean() > 0.5  # D idle: darkened
    with pytest.raises(ValueError, match="frames"):
        G.draw_action_overlay(torch.zeros(5, 64, 64, 3), c2w)
    with pytest.raises(ValueError, match="c2w"):
        G.draw_action_overlay(torch.zeros(5, 64, 64, 3, dtype=torch.uint8), np.zeros((5, 3, 4)))


def test_save_stage1_writes_the_stage1_video(demo_runs):
    """--save_stage1 beside the refiner: <name>_stage1.mp4 holds stage 1 decoded before the refiner, all 17 frames,
    the same video as the stage-1-only run (same seed and inputs)."""
    refined, _, _ = demo_runs[False]
    stage1_only, _, _ = demo_runs[True]
    stage1, _ = _read_mp4(refined.with_name(refined.name[:-4] + "_stage1.mp4"))
    expected, _ = _read_mp4(stage1_only)
    assert len(stage1) == 17 and all(np.array_equal(a, b) for a, b in zip(stage1, expected))
    assert refined.name != stage1_only.name  # the refiner is part of the name's hash


def test_decode_stage1_leaves_the_result_unchanged():
    """generate(decode_stage1=True): the refined result is bit for bit the same, and stage1_frames are stage 1's
    video (generate without the refiner)."""
    dit, vae, tokenizer, gemma = G.demo_models()
    common = dict(action="w-8", num_frames=9, steps=1, height=G.DEMO_SIZE[0], width=G.DEMO_SIZE[1])
    plain = G.generate(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, refiner=G.demo_refiner(),
                       **common)
    both = G.generate(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, refiner=G.demo_refiner(),
                      decode_stage1=True, **common)
    stage1 = G.generate(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, **common)
    assert plain.stage1_frames is None and torch.equal(plain.frames, both.frames)
    assert torch.equal(plain.latents, both.latents)
    assert torch.equal(both.stage1_frames, stage1.frames) and len(stage1.frames) == 9
    with pytest.raises(ValueError, match="decode_stage1"):
        G.generate(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, decode_stage1=True, **common)


def _bad_inputs(tmp):
    """(argv, words the one-line error must contain) for every bad input the issue lists."""
    text = tmp / "not_an_image.png"
    text.write_text("hello")
    empty = tmp / "empty.txt"
    empty.write_text("  \n")
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("une route déserte".encode("latin-1"))
    in_the_way = tmp / "a_file"
    in_the_way.write_text("")
    np.save(tmp / "bad_c2w.npy", np.zeros((9, 3, 4), np.float32))
    np.save(tmp / "bad_k.npy", np.zeros((2, 2), np.float32))
    image = str(tmp / "image.png")
    G.demo_image().save(image)
    partial = tmp / "release"
    for part in ("dit", "vae"):
        (partial / part).mkdir(parents=True)
    no_gemma = tmp / "release_without_gemma_weights"
    for part in ("dit", "vae", "text_encoder"):
        (no_gemma / part).mkdir(parents=True)
    (no_gemma / "text_encoder" / "config.json").write_text("{}")
    # Stage 1 complete as far as the checks look (file names only), refiner/ without connectors/ or Gemma-3 weights.
    no_connectors = tmp / "release_without_connectors"
    for part in ("text_encoder", "refiner/transformer", "refiner/text_encoder"):
        (no_connectors / part).mkdir(parents=True)
        (no_connectors / part / "config.json").write_text("{}")
        (no_connectors / part / "model.safetensors").write_bytes(b"")
    for part in ("dit", "vae", "tokenizer", "refiner/tokenizer"):
        (no_connectors / part).mkdir(parents=True)
    (no_connectors / "tokenizer" / "tokenizer.json").write_text("{}")
    (no_connectors / "refiner" / "tokenizer" / "tokenizer.json").write_text("{}")
    no_gemma3 = tmp / "release_without_gemma3_weights"
    shutil.copytree(no_connectors, no_gemma3)
    (no_gemma3 / "refiner" / "text_encoder" / "model.safetensors").unlink()
    (no_gemma3 / "refiner" / "connectors").mkdir()
    (no_gemma3 / "refiner" / "connectors" / "config.json").write_text("{}")
    (no_gemma3 / "refiner" / "connectors" / "model.safetensors").write_bytes(b"")
    # Stage 1 passes the file checks but cannot load (empty weights, tokenizer.json "{}"): an error reported with
    # it comes from a check made before loading. (argparse: a repeated flag's last value wins.)
    unloadable = ["--weights", str(no_connectors), "--image", image, "--prompt", "p", "--action", "w-8",
                  "--no_refiner"]
    stage1_only = tmp / "release_without_refiner"
    shutil.copytree(no_connectors, stage1_only, ignore=lambda folder, names: ["refiner"])
    # quantize.py files (only their keys are read before loading): an NVFP4 DiT and an FP8 one
    from safetensors.torch import save_file
    layer = "blocks.0.attn.qkv"
    save_file({f"{layer}.weight": torch.zeros(48, 8, dtype=torch.uint8), f"{layer}.weight_scale_2": torch.ones(()),
               f"{layer}.weight_scale": torch.ones(48, 1).to(torch.float8_e4m3fn)}, str(tmp / "dit_nvfp4.safetensors"))
    save_file({f"{layer}.weight": torch.zeros(48, 16).to(torch.float8_e4m3fn), f"{layer}.weight_scale": torch.ones(48)},
              str(tmp / "dit_fp8.safetensors"))
    return [
        (["--demo", "--stage1_precision", "fp16"], ["--stage1_precision", "invalid choice", "'fp16'"]),
        (["--demo", "--refiner_precision", "int8"], ["--refiner_precision", "invalid choice", "'int8'"]),
        (unloadable + ["--model_path", str(tmp / "dit_nvfp4.safetensors"), "--stage1_precision", "fp8"],
         ["--stage1_precision fp8", "dit_nvfp4.safetensors holds nvfp4 layers", "--stage1_precision nvfp4"]),
        (unloadable + ["--model_path", str(tmp / "dit_fp8.safetensors"), "--stage1_precision", "bf16"],
         ["--stage1_precision bf16", "holds fp8 layers"]),
        (unloadable + ["--steps", "0"], ["--steps", "[1, 1000]", "got 0"]),
        (unloadable + ["--prompt", "  "], ["--prompt", "empty"]),
        (unloadable + ["--num_frames", "3"], ["--num_frames must be >= 9 (8k+1), got 3"]),
        (["--demo", "--num_frames", "3"], ["--num_frames must be >= 9 (8k+1), got 3"]),
        (unloadable + ["--fps", "0"], ["--fps", "positive"]),
        (unloadable + ["--action", "w-3"], ["4 poses", "at least 9 frames"]),
        (["--demo", "--image", str(tmp / "missing.png")], ["--image", "no such file"]),
        (["--demo", "--image", str(text)], ["--image", "not a readable image"]),
        (["--demo", "--prompt", str(empty)], ["--prompt", "empty"]),
        (["--demo", "--action", "w-8", "--camera", str(tmp / "bad_c2w.npy")], ["--action", "--camera", "both"]),
        (["--weights", str(partial), "--image", image, "--prompt", "p", "--no_refiner"], ["--action", "--camera"]),
        (["--demo", "--action", "w-8,x-8"], ["action", "'x-8'", "unknown keys"]),
        (["--demo", "--action", "w8"], ["action", "'w8'"]),
        (["--demo", "--action", "w-3"], ["4 poses", "at least 9 frames"]),
        (["--demo", "--camera", str(tmp / "bad_c2w.npy")], ["--camera", "(F, 4, 4)", "(9, 3, 4)"]),
        (["--demo", "--camera", str(tmp / "missing.npy")], ["--camera", "no such file"]),
        (["--demo", "--intrinsics", str(tmp / "bad_k.npy")], ["intrinsics", "(2, 2)"]),
        (["--demo", "--intrinsics", "100", "100", "50"], ["--intrinsics", "four numbers"]),
        (["--demo", "--intrinsics", "20", "20", "192", "128"], ["field of view", "[25, 120]"]),
        (["--weights", str(partial), "--image", image, "--prompt", "p", "--action", "w-8", "--no_refiner"],
         [os.path.join(str(partial), "text_encoder"), "missing"]),
        (["--weights", str(no_gemma), "--image", image, "--prompt", "p", "--action", "w-8", "--no_refiner"],
         ["*.safetensors", os.path.join(str(no_gemma), "text_encoder")]),
        (["--weights", str(partial), "--image", image, "--prompt", "p", "--action", "w-8"],
         [os.path.join(str(partial), "text_encoder"), "missing"]),  # no refiner/: the warning waits for stage 1
        (["--weights", str(no_connectors), "--image", image, "--prompt", "p", "--action", "w-8"],
         [os.path.join(str(no_connectors), "refiner", "connectors"), "missing"]),
        (["--weights", str(no_gemma3), "--image", image, "--prompt", "p", "--action", "w-8"],
         ["*.safetensors", os.path.join(str(no_gemma3), "refiner", "text_encoder"), "Gemma-3"]),
        (["--weights", str(tmp / "nowhere"), "--image", image, "--prompt", "p", "--action", "w-8",
          "--no_refiner"], ["--weights", "no such folder"]),
        # A mistyped prompt file is not generated from as prompt text; a file must be UTF-8.
        (["--demo", "--prompt", "prompts/demo_0.txt"], ["--prompt", "no such file", "prompts/demo_0.txt"]),
        (["--demo", "--prompt", "notes.TXT"], ["--prompt", "no such file"]),
        (["--demo", "--prompt", str(tmp / "prompts" / "demo")], ["--prompt", "no such file"]),
        (["--demo", "--prompt", str(tmp)], ["--prompt", "no such file"]),  # a folder
        (["--demo", "--prompt", str(latin1)], ["--prompt", "not UTF-8"]),
        # Numbers: non-finite floats by argparse's type, ranges by check_inputs (both before any model).
        (["--demo", "--guidance_scale", "nan"], ["--guidance_scale", "finite", "'nan'"]),
        (["--demo", "--cfg_scale", "inf"], ["--cfg_scale", "finite", "'inf'"]),
        (["--demo", "--flow_shift=-inf"], ["--flow_shift", "finite"]),
        (["--demo", "--flow_shift", "nan"], ["--flow_shift", "finite"]),
        (["--demo", "--guidance_scale", "abc"], ["--guidance_scale", "expected a number"]),
        (["--demo", "--guidance_scale", "0.5"], ["--guidance_scale", ">= 1", "0.5"]),
        (["--demo", "--flow_shift", "0"], ["--flow_shift", "> 0"]),
        (["--demo", "--seed", "-1"], ["--seed", "[0, 2^63)"]),
        (["--demo", "--seed", str(2**63)], ["--seed", "[0, 2^63)"]),
        (["--demo", "--fps", "-3"], ["--fps", "positive", "-3"]),
        (["--demo", "--step", "0"], ["--steps", "[1, 1000]"]),
        (["--demo", "--steps", "2.5"], ["--steps", "invalid int"]),
        (["--demo", "--bogus"], ["unrecognized arguments", "--bogus"]),
        # The output folder: checked first, naming --output_dir.
        (["--demo", "--output_dir", str(in_the_way)], ["--output_dir", "is a file, not a folder"]),
        (["--demo", "--output_dir", str(in_the_way / "sub")], ["--output_dir", str(in_the_way), "is a file"]),
        # Gemma-2 is a separate download; the refiner folder can be elsewhere.
        (unloadable + ["--text_encoder", str(tmp / "gemma-2-2b-it")],
         ["--text_encoder", "no such folder", "Efficient-Large-Model/gemma-2-2b-it"]),
        (["--weights", str(partial), "--image", image, "--prompt", "p", "--action", "w-8", "--no_refiner"],
         ["--text_encoder", "does not include Gemma-2-2b-it", "Efficient-Large-Model/gemma-2-2b-it"]),
        (unloadable[:-1] + ["--refiner_root", str(tmp / "nowhere")], ["--refiner_root", "no such folder"]),
        (unloadable[:-1] + ["--refiner_root", str(no_gemma3 / "refiner")],
         ["--refiner_root", "*.safetensors", "Gemma-3"]),
        (["--demo", "--no_refiner", "--save_stage1"], ["--save_stage1", "--no_refiner"]),
        (["--weights", str(stage1_only)] + unloadable[2:-1] + ["--save_stage1"], ["--save_stage1", "no refiner/"]),
        (["--demo", "--text_encoder", str(tmp)], ["--demo", "drop --text_encoder"]),
        (["--demo", "--gpu_memory", "0"], ["--gpu_memory", "positive"]),
        (["--demo", "--gpu_memory", "nan"], ["--gpu_memory", "finite"]),
        (["--demo", "--gpu_memory", "24", "--offload"], ["--offload", "--gpu_memory chooses"]),
        (["--demo", "--gpu_memory", "24", "--low_memory"], ["--low_memory", "--gpu_memory chooses"]),
        (["--demo", "--gpu_memory", "8"], ["--gpu_memory 8", "refiner needs", "--no_refiner"]),
        (unloadable + ["--gpu_memory", "24", "--device", "cpu"], ["--gpu_memory", "--device is cpu"]),
    ]


def _no_models(monkeypatch):
    """Make loading (or running) any model fail the test: a refused input must be refused before."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded for an input that should have been refused first")
    for loader in ("demo_models", "demo_refiner", "load_release", "generate"):
        monkeypatch.setattr(G, loader, loaded)


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    _no_models(monkeypatch)
    for argv, words in _bad_inputs(tmp_path):
        listing = sorted(os.listdir(tmp_path))
        output_dir = [] if "--output_dir" in argv else ["--output_dir", str(tmp_path / "out")]
        assert G.main(argv + output_dir) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
        assert all(word in err[0] for word in words), (argv, err[0], words)
        assert sorted(os.listdir(tmp_path)) == listing, argv  # nothing made, nothing left behind
    assert not (tmp_path / "out").exists()


def test_output_dir_without_permission_is_refused(tmp_path, capsys, monkeypatch):
    """A folder this user cannot write in (simulated through os.access: the tests may run as root)."""
    _no_models(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and access(path, mode))
    assert G.main(["--demo", "--output_dir", str(locked / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output_dir" in err[0] and "no permission" in err[0], err
    assert os.listdir(locked) == []


def _fake_generate(calls):
    """generate() replaced by a quick fake result (9 black 16 x 16 frames), counting its calls."""
    def fake(*args, **kwargs):
        calls.append(kwargs)
        c2w = np.repeat(np.eye(4)[None], 9, 0)
        return G.Result(None, torch.zeros(9, 16, 16, 3, dtype=torch.uint8), c2w, np.zeros((9, 4)), 0.0,
                        decode_seconds=0.0)
    return fake


def _outputs(folder):
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_output_names_and_overwrite(tmp_path, capsys, monkeypatch):
    """Different prompts, cameras, seeds, steps, guidance or shift get different names; the same inputs again are
    refused before any compute unless --overwrite, which replaces the files."""
    calls = []
    monkeypatch.setattr(G, "generate", _fake_generate(calls))
    out = tmp_path / "out"
    base = ["--demo", "--no_refiner", "--output_dir", str(out)]
    names = []
    for extra in ([], ["--prompt", "a snowy forest"], ["--action", "w-16"], ["--seed", "1"], ["--steps", "3"],
                  ["--guidance_scale", "2"], ["--flow_shift", "3"]):
        assert G.main(base + extra) == 0, extra
        names += re.findall(r"^(\S+\.mp4): ", capsys.readouterr().out, re.M)
    assert len(set(names)) == len(names) == 7 and len(_outputs(out)) == 14 and len(calls) == 7
    first = names[0]
    os.utime(first, (1000, 1000))
    calls.clear()
    assert G.main(base) == 2 and not calls  # refused before generate()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and first in err[0] and "--overwrite" in err[0], err
    assert os.path.getmtime(first) == 1000 and len(_outputs(out)) == 14
    assert G.main(base + ["--overwrite"]) == 0 and len(calls) == 1
    assert os.path.getmtime(first) > 1000 and len(_outputs(out)) == 14


@pytest.mark.parametrize("existed", [False, True], ids=["new-folder", "existing-folder"])
def test_failed_save_leaves_nothing(tmp_path, capsys, monkeypatch, existed):
    """The mp4 is written, then saving the camera .npy fails: neither output remains, nor a temporary file, nor
    the output folder the run made; the error is one line."""
    monkeypatch.setattr(G, "generate", _fake_generate([]))
    out = tmp_path / "new" / "out"
    if existed:
        out.mkdir(parents=True)
        (out / "other.mp4").write_bytes(b"earlier run")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", full_disk)
    assert G.main(["--demo", "--no_refiner", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    if existed:
        assert _outputs(out) == ["other.mp4"]
    else:
        assert not (tmp_path / "new").exists()


def test_official_flag_names_are_aliases():
    official = G.parse_args(["--step", "7", "--cfg_scale", "3.5", "--flow_shift", "5", "--refiner_root", "r",
                             "--offload_vae", "--offload_refiner", "--save_stage1"])
    ours = G.parse_args(["--steps", "7", "--guidance_scale", "3.5", "--flow_shift", "5", "--refiner_root", "r",
                         "--offload_vae", "--offload_refiner", "--save_stage1"])
    assert vars(official) == vars(ours)
    assert (ours.steps, ours.guidance_scale, ours.flow_shift, ours.refiner_root) == (7, 3.5, 5.0, "r")
    assert G.parse_args([]).flow_shift is None


def test_help_shows_every_flag_with_help(capsys):
    with pytest.raises(SystemExit) as e:
        G.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser_flags = re.findall(r"^  (--\w+)", text, re.M)
    assert {"--text_encoder", "--refiner_root", "--flow_shift", "--save_stage1", "--overwrite"} <= set(parser_flags)
    assert "--step STEPS" in text and "--cfg_scale" in text and "(default: 60)" in text and "(default: 5.0)" in text
    blocks = re.split(r"\n  (?=-)", text.split("options:")[1])[1:]
    assert all(len(block.split()) > 3 for block in blocks), [b for b in blocks if len(b.split()) <= 3]


@pytest.mark.parametrize("kwargs,name", [(dict(guidance_scale=float("nan")), "guidance_scale"),
                                         (dict(guidance_scale=0.0), "guidance_scale"),
                                         (dict(flow_shift=float("inf")), "flow_shift"),
                                         (dict(flow_shift=-1.0), "flow_shift"), (dict(seed=-1), "seed"),
                                         (dict(fps=float("nan")), "fps")])
def test_generate_refuses_bad_numbers_before_any_model(kwargs, name):
    """The Python API: checked before the models are touched (None here)."""
    with pytest.raises(ValueError, match=name):
        G.generate(None, None, None, None, G.demo_image(), G.DEMO_PROMPT, action="w-8", **kwargs)


def test_text_encoder_outside_the_release(models, tmp_path):
    """Gemma-2-2b-it downloaded on its own (tokenizer files inside its folder), given with --text_encoder; the
    release folder without text_encoder/ names --text_encoder and where to get it."""
    pipe, (dit, vae, tokenizer, gemma) = models
    release, download = tmp_path / "release", tmp_path / "gemma-2-2b-it"
    pipe.transformer.save_pretrained(release / "dit")
    pipe.vae.save_pretrained(release / "vae")
    gemma.save_pretrained(download)
    tokenizer.save_pretrained(download)
    with pytest.raises(FileNotFoundError, match="--text_encoder.*Efficient-Large-Model/gemma-2-2b-it"):
        G.load_release(str(release), torch.float32, "cpu")
    loaded = G.load_release(str(release), torch.float32, "cpu", text_encoder=str(download))
    assert all(torch.equal(v, loaded[3].state_dict()[k]) for k, v in gemma.state_dict().items())
    text, mask = G.encode_prompt(tokenizer, gemma, G.DEMO_PROMPT)
    text_back, mask_back = G.encode_prompt(loaded[2], loaded[3], G.DEMO_PROMPT)
    assert torch.equal(text, text_back) and torch.equal(mask, mask_back)


def test_out_of_memory_suggests_offload(monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(G, "generate", out_of_memory)
    assert G.main(["--demo", "--num_frames", "33"]) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "--offload" in err and "--low_memory" in err and "--num_frames" in err


# ---------------------------------------------------------------------------------------------------------------
# The chunk-causal releases' samplers

def _tiny_stage1(frames, seed=0):
    """The demo DiT (random weights), latents of `frames` latent frames with frame 0 an "image", text, camera."""
    dit = G.demo_models(seed)[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 8, frames, 4, 6, generator=g)
    text, mask = torch.randn(1, 5, 32, generator=g), torch.ones(1, 5, dtype=torch.long)
    c2w = G.camera.action_to_c2w(f"w-{8 * (frames - 1)}")
    raymap, plucker = G.camera.prepare_camera(c2w, [200.0, 200.0, 96.0, 64.0], size=G.DEMO_SIZE)
    return dit, x, text, mask, raymap[None], plucker[None]


def test_chunk_offsets_match_the_official_tables():
    assert G.chunk_offsets(6, 60) == [0, 10, 20, 30, 40, 49]                  # T = 21: 5 * (1/6) * 60 = 49.99...
    assert G.chunk_offsets(13, 60) == [0, 4, 9, 13, 18, 23, 27, 32, 36, 41, 46, 50, 55]
    offsets = G.chunk_offsets(40, 60)
    assert offsets == [int(1.5 * i) for i in range(40)] and offsets[-1] + 60 == 118
    assert G.chunk_offsets(3, 10, interval_k=1.0) == [0, 10, 20]
    assert G.stream_chunks(31) == (0,) + tuple(range(4, 31, 3)) and G.stream_chunks(8) == (0, 5)


def test_stream_sample_equals_the_uncached_loop(monkeypatch):
    """The streaming sampler (caches, all history visible) gives the latents of the same per-token Euler loop run
    with the chunk-causal DiT over the whole video so far; 5 forwards per chunk; the image frame bit for bit."""
    dit, x, text, mask, raymap, plucker = _tiny_stage1(10)
    calls = []
    forward_chunk = G.forward_chunk
    monkeypatch.setattr(G, "forward_chunk", lambda *a, **k: calls.append(k["save"] if "save" in k else False)
                        or forward_chunk(*a, **k))
    chunks = list(G.stream_sample(dit, x.clone(), text, mask, raymap, plucker, window=-1))
    assert [(s, e) for s, e, _ in chunks] == [(0, 4), (4, 7), (7, 10)]
    assert calls == [False] * 4 + [True] + [False] * 4 + [True] + [False] * 4 + [True]
    got = torch.cat([z for _, _, z in chunks], 2)
    assert torch.equal(got[:, :, 0], x[:, :, 0])
    levels = torch.tensor(list(G.STREAM_SIGMAS) + [0.0])
    done, starts = x[:, :, :0], (0, 4, 7)
    with torch.no_grad():
        for s, e in zip(starts, (4, 7, 10)):
            z = x[:, :, s:e]
            for sigma, sigma_next in zip(levels[:-1], levels[1:]):
                level, after = sigma.repeat(e - s), sigma_next.repeat(e - s)
                if s == 0:
                    level[0] = after[0] = 0
                t = torch.cat([torch.zeros(s), level * 1000])[None]
                v = dit(torch.cat([done, z], 2), t, text, mask, raymap[:, :e], plucker[:, :, :e],
                        chunk_size=tuple(c for c in starts if c < e))[:, :, s:]
                z = (z.float() + (after - level).view(1, 1, -1, 1, 1) * v.float()).to(z.dtype)
            done = torch.cat([done, z], 2)
    assert (got - done).abs().max() <= 1e-5


def test_chunk_flow_euler(monkeypatch):
    """The teacher's sampler: with interval_k = 1 the chunks run one after the other, so the first chunk's latents
    are those of the plain sampler on that chunk alone (it sees no later frame); the image frame is held; one DiT
    forward per global step; one chunk is the plain sampler."""
    dit, x, text, mask, raymap, plucker = _tiny_stage1(7)
    sigmas = G.schedule(3)
    calls, forward = [], dit.forward
    monkeypatch.setattr(dit, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    out = G.chunk_flow_euler(dit, x.clone(), sigmas, text, mask, raymap, plucker, guidance_scale=1.0,
                             chunks=(0, 4), interval_k=1.0)
    assert len(calls) == 6 and torch.equal(out[:, :, 0], x[:, :, 0])
    first = G.sample(dit, x[:, :, :4].clone(), sigmas, text, mask, raymap[:, :4], plucker[:, :, :4],
                     guidance_scale=1.0)
    assert torch.allclose(out[:, :, :4], first, atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, :, 4:], x[:, :, 4:])
    whole = G.chunk_flow_euler(dit, x.clone(), sigmas, text, mask, raymap, plucker, guidance_scale=1.0, chunks=(0,))
    assert torch.equal(whole, G.sample(dit, x.clone(), sigmas, text, mask, raymap, plucker, guidance_scale=1.0))


def test_demo_stream_mp4_plays_while_it_grows(tmp_path, monkeypatch, capsys):
    """--demo --stream (stage 1 and the refiner): 4 chunks of 24 frames; after the second chunk the mp4 on disk
    already decodes to its 48 frames while the stream goes on; at the end 96 frames and the camera of the written
    frames."""
    import av

    seen = []
    write = G.StreamingMp4Writer.write

    def watching(self, frames):
        write(self, frames)
        if self.frames_written == 48:  # after chunk 2 of 4: read back what is on disk now
            with av.open(self.path) as container:
                seen.append(sum(1 for _ in container.decode(video=0)))
    monkeypatch.setattr(G.StreamingMp4Writer, "write", watching)
    assert G.main(["--demo", "--stream", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert seen == [48] and "chunk 4: 6.0 s of video" in out.err
    (mp4,) = tmp_path.glob("*_streaming.mp4")
    with av.open(str(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 96
    assert np.load(str(mp4)[:-4] + "_c2w.npy").shape == (96, 4, 4)


@pytest.mark.parametrize("argv,flag", [(["--save_stage1"], "--save_stage1"), (["--low_memory"], "--low_memory"),
                                       (["--num_frames", "17"], "--num_frames"), (["--gpu_memory", "24"],
                                                                                  "--gpu_memory")])
def test_stream_refuses_flags(tmp_path, capsys, argv, flag):
    assert G.main(["--demo", "--stream", "--output_dir", str(tmp_path / "out")] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and not (tmp_path / "out").exists()


def test_demo_chunk_causal_teacher(tmp_path):
    """--sampling_algo chunk_flow_euler (the chunk-causal teacher's sampler) runs end to end on the demo."""
    assert G.main(["--demo", "--no_refiner", "--steps", "2", "--sampling_algo", "chunk_flow_euler", "--action",
                   "w-24", "--output_dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.mp4"))) == 1


def test_streaming_release_is_checked_before_loading(tmp_path, capsys):
    """--weights at a streaming release without its causal VAE or its refiner: one line naming what is missing."""
    (tmp_path / "sana_dit").mkdir()
    torch.save({}, tmp_path / "sana_dit" / "model.pt")
    argv = ["--weights", str(tmp_path), "--image", str(tmp_path / "x.png"), "--prompt", "a road", "--action",
            "w-48", "--output_dir", str(tmp_path / "out")]
    G.demo_image().save(tmp_path / "x.png")
    for extra, missing in ((["--no_refiner"], "ltx2_causal_vae"), ([], "refiner_diffusers")):
        assert G.main(argv + ["--device", "cpu"] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and missing in err[0], err


def test_stream_with_the_refiner_equals_refine_on_the_whole_video():
    """generate_stream with the refiner: each stage-1 chunk's new frames refined as one block as they come equal
    refine() over the whole stage-1 video (same seeds); 4 chunks, 96 frames written."""
    dit, vae, tokenizer, gemma = G.demo_models(official=True, causal_vae=True)
    kwargs = dict(action="w-48,d-48", num_frames=97, height=G.DEMO_SIZE[0], width=G.DEMO_SIZE[1])
    written = []
    stage1 = G.generate_stream(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, lambda f: None, **kwargs)
    stage2 = G.demo_refiner()
    refined = G.generate_stream(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, written.append,
                                refiner=stage2, **kwargs)
    assert [len(f) for f in written] == [24] * 4 and refined.frames == 96
    text, mask = stage2.load_prompt_encoder()(G.DEMO_PROMPT)
    expected = G.refine(stage2.load_refiner(), stage1.latents, text, mask, fps=16,
                        generator=torch.Generator().manual_seed(G.REFINER_SEED))
    assert (refined.latents - expected).abs().max() <= 1e-5
    assert not torch.allclose(refined.latents[:, :, 1:], stage1.latents[:, :, 1:])


@pytest.mark.parametrize("refined", [False, True], ids=["stage1", "refiner"])
def test_overlapped_stream_writes_the_sequential_mp4(tmp_path, refined):
    """The stream as a pipeline (overlap=True; on the CPU its steps one after the other, in the pipeline's order)
    writes an mp4 whose frames equal the sequential reference loop's bit for bit (overlap must not change
    results), with and without the refiner: the chunks given to write and the latents as well."""
    dit, vae, tokenizer, gemma = G.demo_models(official=True, causal_vae=True)
    kwargs = dict(action="w-48,d-24", num_frames=73, height=G.DEMO_SIZE[0], width=G.DEMO_SIZE[1],
                  refiner=G.demo_refiner() if refined else None)
    runs = []
    for overlap in (False, True):
        chunks, path = [], tmp_path / f"overlap_{overlap}.mp4"
        with G.StreamingMp4Writer(str(path), 16, *G.DEMO_SIZE) as writer:
            result = G.generate_stream(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT,
                                       lambda f: chunks.append(f.clone()) or writer.write(f), overlap=overlap,
                                       **kwargs)
        runs.append((torch.cat(chunks), result.latents, np.stack(_read_mp4(path)[0])))
    (frames, latents, mp4), (o_frames, o_latents, o_mp4) = runs
    assert len(chunks) == 3 and frames.shape[0] == mp4.shape[0] == 72
    assert torch.equal(o_frames, frames) and torch.equal(o_latents, latents) and np.array_equal(o_mp4, mp4)


def test_overlapped_stream_order():
    """The pipeline's order of work, what lets the GPU overlap the parts: step t makes chunk t, refines it and
    decodes chunk t - 1; a decoded chunk is written once ready (at once off CUDA), in order; the last step decodes
    and writes the last chunk. Stage 1 hands its latents to the refiner, the refiner its own to the decoder."""
    log = []

    def chunks():
        for t in range(3):
            log.append(f"make {t}")
            yield 3 * t, 3 * t + 3, torch.full((1, 1, 3, 1, 1), 10.0 * t)

    latents = torch.zeros(1, 1, 9, 1, 1)
    G._overlapped_stream(chunks(), lambda s, z: log.append(f"refine {s // 3}") or z + 1,
                         lambda s, z: log.append(f"decode {s // 3}") or z.flatten(),
                         lambda f: log.append(f"write {f.tolist()}"), latents)
    assert log == ["make 0", "refine 0",
                   "make 1", "refine 1", "decode 0", "write [1.0, 1.0, 1.0]",
                   "make 2", "refine 2", "decode 1", "write [11.0, 11.0, 11.0]",
                   "decode 2", "write [21.0, 21.0, 21.0]"]
    assert torch.equal(latents.flatten(), torch.tensor([1.0, 11.0, 21.0]).repeat_interleave(3))


@pytest.mark.gpu
def test_overlapped_stream_equals_sequential_on_cuda():
    """On CUDA (three streams, events, pinned host copies) the overlapped stream writes the sequential run's frames
    bit for bit, with and without the refiner; the sequential run first repeats itself (else the comparison would
    say nothing)."""
    dit, vae, tokenizer, gemma = G.demo_models(official=True, causal_vae=True)
    dit, vae = dit.cuda(), vae.cuda()
    stage2 = G.demo_refiner()
    encoder, refiner = stage2.load_prompt_encoder(), stage2.load_refiner().cuda()
    on_cuda = G.Stage2(lambda: lambda prompt: tuple(t.cuda() for t in encoder(prompt)), lambda: refiner)
    for refined in (None, on_cuda):
        runs = []
        for overlap in (False, False, True):
            chunks = []
            G.generate_stream(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, chunks.append,
                              action="w-72,d-48", num_frames=121, height=G.DEMO_SIZE[0], width=G.DEMO_SIZE[1],
                              device="cuda", refiner=refined, overlap=overlap)
            runs.append(torch.cat(chunks))
        assert runs[0].shape[0] == 120 and torch.equal(runs[1], runs[0])
        assert torch.equal(runs[2], runs[0])


def test_stream_failure_before_the_first_chunk_leaves_no_file(tmp_path, monkeypatch, capsys):
    """The growing mp4 is opened with the first chunk: a failure before it leaves no file (and an existing one as
    it was); per-frame intrinsics too few for the video are refused before any model loads; an empty --output_dir
    is refused."""
    np.save(tmp_path / "k.npy", np.tile(np.array([[200.0, 0, 96], [0, 200.0, 64], [0, 0, 1]]), (5, 1, 1)))
    assert G.main(["--demo", "--stream", "--no_refiner", "--intrinsics", str(tmp_path / "k.npy"),
                   "--output_dir", str(tmp_path / "out")]) == 2
    assert "intrinsics" in capsys.readouterr().err and not (tmp_path / "out").exists()
    monkeypatch.setattr(G, "stream_sample", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop")))
    assert G.main(["--demo", "--stream", "--no_refiner", "--output_dir", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mp4"))
    assert G.main(["--demo", "--output_dir", ""]) == 2
    assert "--output_dir" in capsys.readouterr().err


def test_model_path_replaces_the_release_dit(tmp_path, capsys):
    """With --model_path the release folder needs no dit/: the next missing part (Gemma-2) is what is named."""
    (tmp_path / "w" / "vae").mkdir(parents=True)
    (tmp_path / "m.safetensors").write_bytes(b"")
    G.demo_image().save(tmp_path / "x.png")
    assert G.main(["--weights", str(tmp_path / "w"), "--model_path", str(tmp_path / "m.safetensors"), "--image",
                   str(tmp_path / "x.png"), "--prompt", "a road", "--action", "w-16", "--device", "cpu",
                   "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dit/" not in err[0] and "--text_encoder" in err[0], err


def test_fp8_flags_refused_without_fp8_tensor_cores(tmp_path, capsys, monkeypatch):
    """fp8 on a CUDA GPU below sm_89 (an A100), or with fp16 activations, is refused before any model loads (the
    GPU simulated: torch.cuda's answers patched)."""
    from types import SimpleNamespace

    _no_models(monkeypatch)
    gpu = SimpleNamespace(name="NVIDIA A100", major=8, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    argv = next(a for a, words in _bad_inputs(tmp_path) if "--no_refiner" in a and "--steps" in a)[:-2]
    argv += ["--device", "cuda", "--output_dir", str(tmp_path / "out")]
    for extra, words in ((["--refiner_precision", "fp8"], ["--refiner_precision fp8", "sm_89+", "A100 is sm_80"]),
                         (["--stage1_precision", "fp8", "--dtype", "fp16"], ["--stage1_precision fp8", "bf16",
                                                                             "--dtype fp16"])):
        assert G.main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err
        gpu.major = 9  # the second case: a Hopper GPU


def test_precision_flags_quantise_the_models(tmp_path, monkeypatch):
    """--stage1_precision fp8 --refiner_precision fp4 (the official name of nvfp4): the demo's DiT runs with FP8
    block linears, its refiner with NVFP4 ones, end to end to the mp4."""
    from quantize import model_precision

    seen, real = {}, G.generate

    def spy(dit, vae, tokenizer, text_encoder, image, prompt, refiner=None, **kwargs):
        seen.update(dit=model_precision(dit), refiner=model_precision(refiner.load_refiner()))
        return real(dit, vae, tokenizer, text_encoder, image, prompt, refiner=refiner, **kwargs)
    monkeypatch.setattr(G, "generate", spy)
    assert G.main(["--demo", "--stage1_precision", "fp8", "--refiner_precision", "fp4", "--num_frames", "9",
                   "--steps", "1", "--no_action_overlay", "--output_dir", str(tmp_path)]) == 0
    assert seen == {"dit": "fp8", "refiner": "nvfp4"}
    assert len(list(tmp_path.glob("*.mp4"))) == 1


# ---------------------------------------------------------------------------------------------------------------
# Memory: block-wise weight streaming, the streamed decode, --gpu_memory

def _watch_stream(blocks):
    """Record, as each block of a WeightStream starts, whether its weights are device copies (not the host tensors)
    and which streamed blocks have copies then. Returns (log, remove)."""
    log, hooks = [], []
    for i, block in enumerate(blocks):  # (iterating a plain list: no stream yet)
        def seen(module, args, kwargs, i=i):
            stream = blocks._weight_stream
            host = [h for *_, h in stream._host.get(i, [])]
            copied = [p.data_ptr() != h.data_ptr() for p, h in zip(module.parameters(), host)]
            log.append((i, all(copied) and bool(copied), sorted(stream._copies)))
        hooks.append(block.register_forward_pre_hook(seen, with_kwargs=True))
    return log, lambda: [h.remove() for h in hooks]


@pytest.mark.parametrize("streamed", [1, 3, 5, 9])
def test_weight_stream_refiner_is_exact(streamed):
    """refine() with k of the refiner's 5 blocks streamed (9: more than it has, so all) is the resident refine() bit
    for bit; while a streamed block runs its weights are copies, at most two streamed blocks have copies, and
    afterwards the streamed blocks hold their host tensors; close() leaves a plain model that gives the same."""
    from reference import randomize_

    torch.manual_seed(0)
    model = randomize_(R.Refiner(dataclasses.replace(G.DEMO_REFINER, num_layers=5)).eval(), seed=3)
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 8, 7, 4, 6, generator=g), torch.randn(1, 6, 16, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    run = lambda: R.refine(model, latents, text, mask, fps=16, generator=torch.Generator().manual_seed(5))  # noqa
    resident = run()
    blocks = model.transformer_blocks
    hosts = [p for p in blocks.parameters()]
    stream = G.WeightStream(model, blocks, "cpu", streamed)
    log, unwatch = _watch_stream(blocks)
    assert torch.equal(run(), resident)
    unwatch()
    k = min(streamed, 5)
    assert len(stream.streamed) == k and len(log) == 9 * 5  # 9 forwards (sink, 2 blocks x 4) of 5 blocks
    assert all(copied == (i in stream.streamed) for i, copied, _ in log)
    assert all(len(copies) <= 2 for *_, copies in log)
    assert all(p.data_ptr() == h.data_ptr() for i in stream.streamed for (*_, h), p in
               zip(stream._host[i], blocks[i].parameters()))
    with pytest.raises(ValueError, match="runs whole"):
        blocks[1:]
    assert blocks[:5] is blocks
    stream.close()
    assert type(blocks) is torch.nn.ModuleList and [p for p in blocks.parameters()] == hosts
    assert torch.equal(run(), resident)
    with pytest.raises(ValueError, match="streamed"):
        G.WeightStream(model, blocks, "cpu", 0)
    with pytest.raises(ValueError, match="blocks"):
        G.WeightStream(model, torch.nn.ModuleList(), "cpu", 1)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_weight_stream_quantised_refiner_is_exact(precision):
    """A refiner whose blocks' linears are FP8 / NVFP4 layers (their weights and scales are buffers) streams as a
    bf16 one does: the streamed blocks' quantised buffers live in host memory, copies of them run, and refine() is
    the resident quantised refine() bit for bit."""
    from quantize import REFINER_EXCLUDE, REFINER_INCLUDE, set_precision
    from reference import randomize_

    cfg = dataclasses.replace(G.DEMO_REFINER, num_layers=4)
    model = randomize_(R.Refiner(cfg).eval(), seed=4)
    quantised = set_precision(model, precision, REFINER_INCLUDE, REFINER_EXCLUDE)
    g = torch.Generator().manual_seed(2)
    latents, text = torch.randn(1, 8, 4, 4, 6, generator=g), torch.randn(1, 6, 16, generator=g)
    run = lambda: R.refine(model, latents, text, fps=16, generator=torch.Generator().manual_seed(6))  # noqa: E731
    resident = run()
    blocks = model.transformer_blocks
    stream = G.WeightStream(model, blocks, "cpu", 2)
    seen = []
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: seen.append((name, m.weight.data_ptr()))) for name in quantised]
    assert torch.equal(run(), resident)
    for h in hooks:
        h.remove()
    names = {m: name for name, m in model.named_modules()}
    host = {names[m]: t.data_ptr() for i in stream.streamed for m, _, key, t in stream._host[i]
            if names[m] in quantised and key == "weight"}
    assert len(host) == len(quantised) // 2  # the quantised layers of the 2 streamed blocks (of 4), in host memory
    assert all(ptr != host[name] for name, ptr in seen if name in host) and set(host) <= {n for n, _ in seen}
    stream.close()
    assert torch.equal(run(), resident)


def test_generate_with_weight_streaming_is_exact():
    """generate() with the DiT streaming, and stage 2 with Gemma-3's layers and the refiner's blocks streaming
    (stream_stage2), makes the same latents and frames as with every model resident; so does the DiT's memory mode
    and a streaming chunk (dit.forward_chunk) with the blocks streamed."""
    dit, vae, tokenizer, gemma = G.demo_models()
    common = dict(action="w-8", num_frames=9, steps=2, height=G.DEMO_SIZE[0], width=G.DEMO_SIZE[1])
    plain = G.generate(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, refiner=G.demo_refiner(),
                       **common)
    stage2 = G.stream_stage2(G.demo_refiner(), "cpu", 1, 2)
    streamed = G.generate(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, refiner=stage2,
                          stream_dit_blocks=3, **common)
    assert torch.equal(streamed.latents, plain.latents) and torch.equal(streamed.frames, plain.frames)
    assert type(dit.blocks) is torch.nn.ModuleList  # the stream ended with stage 1
    with pytest.raises(ValueError, match="stream_dit_blocks"):
        G.generate(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, stream_dit_blocks=-1, **common)

    dit, x, text, mask, raymap, plucker = _tiny_stage1(4)
    t = torch.tensor([[0.0, 500.0, 500.0, 500.0]])
    with torch.no_grad():
        parts = dit(x, t, text, mask, raymap, plucker, part_frames=1)
        chunk = G.forward_chunk(dit, x[:, :, :2], t[:, :2], text, mask, raymap, plucker, cache=G.StreamCache())
        with G.WeightStream(dit, dit.blocks, "cpu", 2):
            assert torch.equal(dit(x, t, text, mask, raymap, plucker, part_frames=1), parts)
            assert torch.equal(G.forward_chunk(dit, x[:, :, :2], t[:, :2], text, mask, raymap, plucker,
                                               cache=G.StreamCache()), chunk)


def test_streamed_decode_equals_decode():
    """generate's decode hands the video to the host window by window (vae.decode_pieces): the same uint8 frames
    as converting the whole decoded video (two temporal windows here: 14 latent frames, windows of 13)."""
    _, vae, _, _ = G.demo_models()
    latents = torch.randn(1, 8, 14, 4, 6, generator=torch.Generator().manual_seed(2))
    pieces = []
    hook = vae.decoder.register_forward_hook(lambda m, i, out: pieces.append(out.shape[2]))
    frames = G._decode(vae, latents, torch.float32)
    hook.remove()
    whole = G._uint8_frames(vae.decode(vae.denormalize(latents)))
    assert len(pieces) == 2 and frames.shape == (105, 128, 192, 3) and torch.equal(frames, whole)


def test_gpu_memory_plans():
    """--gpu_memory's choices at the README's GPU sizes: everything resident on 48 GB and up; --offload and the
    refiner partly streamed on 24 GB (every expected peak under 24 - MARGIN); the DiT streamed on 16 GB; the memory
    mode on 12 GB; the memory mode and the DiT streamed on 8 GB, where the refiner does not fit in bf16."""
    for gib in (48, 80):
        plan = G.plan_memory(gib)
        assert not plan.offload and plan.part_frames is None
        assert (plan.dit_streamed, plan.gemma3_streamed, plan.refiner_streamed) == (0, 0, 0)
    plan = G.plan_memory(24)
    assert plan.offload and plan.part_frames is None and plan.dit_streamed == 0
    assert 0 < plan.refiner_streamed < G.REFINER_BLOCKS and 0 < plan.gemma3_streamed < G.GEMMA3_LAYERS
    assert max(plan.peaks.values()) <= 24 - G.MARGIN_GIB
    assert set(plan.peaks) == {"Gemma-2", "stage 1", "refiner prompt", "refiner", "decode"}
    assert "--offload" in plan.describe() and f"refiner {plan.refiner_streamed} of 48 blocks" in plan.describe()
    plan16 = G.plan_memory(16)
    assert plan16.part_frames is None and 0 < plan16.dit_streamed < G.DIT_BLOCKS
    assert plan16.refiner_streamed > plan.refiner_streamed
    plan = G.plan_memory(12, refiner=False)
    assert plan.offload and plan.part_frames == G.LOW_MEMORY_PART_FRAMES and plan.dit_streamed == 0
    plan = G.plan_memory(8, refiner=False)
    assert plan.part_frames == G.LOW_MEMORY_PART_FRAMES and plan.dit_streamed > 0 and "refiner" not in plan.peaks
    assert G.plan_memory(16, num_frames=1921).part_frames is not None  # two minutes: more working memory
    for gib in (8, 12):
        with pytest.raises(ValueError, match=rf"--gpu_memory {gib}: refiner needs .*--no_refiner"):
            G.plan_memory(gib)
    with pytest.raises(ValueError, match="--gpu_memory 4: decode needs at least 7.6 GiB"):
        G.plan_memory(4, refiner=False)


def test_gpu_memory_plans_by_precision():
    """--stage1_precision / --refiner_precision into the plan: at 16 GB fp8 blocks stream fewer than bf16's (both
    under 16 - MARGIN), nvfp4 fewer still; at 12 GB the refiner fits in nvfp4 alone, and bf16's and fp8's refusals say
    so; describe() names each transformer's precision; the CLI passes its flags (fp4: nvfp4) to the plan."""
    bf16, fp8, nvfp4 = (G.plan_memory(16, stage1_precision=p, refiner_precision=p) for p in ("bf16", "fp8", "nvfp4"))
    assert G.plan_memory(16) == bf16  # None: bf16
    assert bf16.dit_streamed > fp8.dit_streamed > nvfp4.dit_streamed == 0
    assert bf16.refiner_streamed > fp8.refiner_streamed > nvfp4.refiner_streamed > 0
    assert max(fp8.peaks.values()) <= 16 - G.MARGIN_GIB and fp8.offload and fp8.part_frames is None
    assert "DiT 5 of 20 blocks streamed (fp8)" in fp8.describe() and "refiner 33 of 48 blocks streamed (fp8)" in \
        fp8.describe() and "DiT on the GPU (nvfp4)" in nvfp4.describe()
    plan = G.plan_memory(12, refiner_precision="nvfp4")
    assert plan.refiner_streamed == G.REFINER_BLOCKS - 1 and plan.peaks["refiner"] <= 12 - G.MARGIN_GIB
    for precision, least in (("bf16", 12.9), ("fp8", 12.2)):
        with pytest.raises(ValueError, match=rf"--gpu_memory 12: refiner needs at least {least} GiB in {precision}; "
                                             rf"add --refiner_precision nvfp4 \(11.8 GiB\) or --no_refiner"):
            G.plan_memory(12, refiner_precision=precision)
    with pytest.raises(ValueError, match=r"--gpu_memory 11: refiner needs at least 11.8 GiB in nvfp4; add --no_ref"):
        G.plan_memory(11, refiner_precision="nvfp4")
    with pytest.raises(ValueError, match="--stage1_precision: expected bf16, fp8 or nvfp4, got 'fp4'"):
        G.plan_memory(16, stage1_precision="fp4")
    args = G.parse_args(["--demo", "--gpu_memory", "12", "--refiner_precision", "fp4", "--stage1_precision", "fp8"])
    assert G._memory_plan(args) == G.plan_memory(12, args.num_frames, stage1_precision="fp8", refiner_precision="nvfp4")


@pytest.mark.parametrize("model", ["DiT", "refiner"])
def test_block_gib_counts_the_quantised_blocks(model):
    """BLOCK_GIB (the plan's block sizes by precision) is what one block of the release-sized model weighs with its
    layer set quantised by quantize.py (built on the meta device: shapes, dtypes, no data), to 0.5 MiB."""
    from quantize import PRESETS, REFINER_EXCLUDE, REFINER_INCLUDE, set_precision

    cls, cfg, layers = ((DiT, DiTConfig(), PRESETS["default"]) if model == "DiT" else
                        (R.Refiner, R.RefinerConfig(), (REFINER_INCLUDE, REFINER_EXCLUDE)))
    for precision, gib in G.BLOCK_GIB[model].items():
        with torch.device("meta"):
            built = cls(cfg).to(torch.bfloat16)
        set_precision(built, precision, *layers)
        block = (built.blocks if model == "DiT" else built.transformer_blocks)[0]
        weighed = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()]) / 2**30
        assert abs(weighed - gib) <= 0.0005, (precision, weighed)


def test_demo_gpu_memory_prints_its_plan(tmp_path, capsys):
    assert G.main(["--demo", "--no_refiner", "--steps", "1", "--gpu_memory", "8", "--output_dir",
                   str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "--gpu_memory 8: --offload; --low_memory; DiT" in out and "applied to the tiny models" in out


@pytest.mark.gpu
def test_weight_stream_on_cuda(monkeypatch):
    """On CUDA (side-stream copies, events, record_stream; the DiT's kernels and compiled blocks, also in the memory
    mode): generate() with the DiT, Gemma-3 and the refiner streaming is bit for bit the resident run, and a streamed
    refiner's forwards hold at most IN_FLIGHT blocks beyond its resident weights."""
    import fast
    from reference import randomize_

    monkeypatch.setattr(fast, "COMPILE_MIN_ELEMENTS", 0)  # compile the tiny blocks, as the release's are
    common = dict(action="w-8", num_frames=9, steps=2, height=G.DEMO_SIZE[0], width=G.DEMO_SIZE[1], device="cuda",
                  offload=True)
    for part_frames in (None, 1):
        runs = []
        for dit_blocks, gemma3_layers, refiner_blocks in ((0, 0, 0), (3, 1, 2)):
            dit, vae, tokenizer, gemma = G.demo_models()
            stage2 = G.stream_stage2(G.demo_refiner(), "cuda", gemma3_layers, refiner_blocks)
            runs.append(G.generate(dit, vae, tokenizer, gemma, G.demo_image(), G.DEMO_PROMPT, refiner=stage2,
                                   stream_dit_blocks=dit_blocks, part_frames=part_frames, **common))
        assert torch.equal(runs[0].latents, runs[1].latents) and torch.equal(runs[0].frames, runs[1].frames)

    cfg = dataclasses.replace(G.DEMO_REFINER, num_attention_heads=4, attention_head_dim=64, cross_attention_dim=256,
                              caption_channels=64, num_layers=8)
    model = randomize_(R.Refiner(cfg).eval(), seed=3).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 8, 7, 8, 8, generator=g), torch.randn(1, 16, 64, generator=g)
    block_bytes = sum(p.numel() * p.element_size() for p in model.transformer_blocks[0].parameters())
    peaks, outputs = [], []
    for streamed in (0, 8):
        copy = R.Refiner(cfg).eval().to(torch.bfloat16)
        copy.load_state_dict(model.state_dict())
        if streamed:
            G.WeightStream(copy, copy.transformer_blocks, "cuda", streamed)  # held by copy.transformer_blocks
        else:
            copy.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        outputs.append(R.refine(copy, latents.cuda(), text.cuda(), fps=16,
                                generator=torch.Generator("cuda").manual_seed(5)))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        del copy
        G._free_memory("cuda")
    assert torch.equal(outputs[0], outputs[1])
    assert peaks[1] <= peaks[0] - (8 - G.IN_FLIGHT) * block_bytes, (peaks, block_bytes)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_weight_stream_quantised_on_cuda(monkeypatch, precision):
    """On CUDA in bf16 (pinned float8 / uint8 host tensors, side-stream copies; the DiT's compiled blocks, also in
    the memory mode; the FP8 and NVFP4 kernels): a DiT and a refiner with quantised block linears, most blocks
    streamed, give the resident models' outputs bit for bit."""
    import fast
    from quantize import PRESETS, REFINER_EXCLUDE, REFINER_INCLUDE, set_precision
    from reference import randomize_

    monkeypatch.setattr(fast, "COMPILE_MIN_ELEMENTS", 0)  # compile the tiny blocks, as the release's are
    dit, x, text, mask, raymap, plucker = _tiny_stage1(4)
    dit = dit.to(torch.bfloat16)
    set_precision(dit, precision, *PRESETS["default"])
    inputs = [t.cuda() for t in (x.bfloat16(), torch.tensor([[0.0, 500.0, 500.0, 500.0]]), text.bfloat16(), mask,
                                 raymap, plucker)]
    cfg = dataclasses.replace(G.DEMO_REFINER, num_attention_heads=4, attention_head_dim=64, cross_attention_dim=256,
                              caption_channels=64, num_layers=6)
    refiner = randomize_(R.Refiner(cfg).eval(), seed=3).to(torch.bfloat16)
    set_precision(refiner, precision, REFINER_INCLUDE, REFINER_EXCLUDE)
    g = torch.Generator().manual_seed(1)
    latents, caption = torch.randn(1, 8, 7, 8, 8, generator=g).cuda(), torch.randn(1, 16, 64, generator=g).cuda()
    outputs = []
    for streamed in (0, 4):
        if streamed:
            streams = [G.WeightStream(dit, dit.blocks, "cuda", streamed),
                       G.WeightStream(refiner, refiner.transformer_blocks, "cuda", streamed)]
        else:
            dit.cuda(), refiner.cuda()
        with torch.no_grad():
            outputs.append([dit(*inputs, part_frames=p) for p in (None, 1)] + [R.refine(
                refiner, latents, caption, fps=16, generator=torch.Generator("cuda").manual_seed(5))])
        for stream in streams if streamed else ():
            stream.close()
        dit.cpu(), refiner.cpu()
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
