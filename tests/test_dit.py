"""dit.py against diffusers 0.42.1 (module by module): embedders, FFN, final layer and blocks <= 1e-6, the whole DiT
<= 1e-4 in fp32 (batch 2, padded text, camera + Plücker, two configs and latent sizes); the state-dict layout of
the release; loading both release layouts; chunk-causal properties; the real release (marked `weights`)."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models import embeddings
from diffusers.models.transformers import transformer_sana_wm as ref
from safetensors.torch import save_file

import dit
from attention import chunk_starts
from gdn import GDNSelfAttention
from dit import (CaptionEmbedder, DiT, DiTConfig, FinalLayer, GLUMBConvTemp, PatchEmbed, TimestepEmbedder,
                 timestep_sinusoid)
from reference import (TINY_DIT, load_sana_wm_native, max_rel_err, randomize_, tiny_dit_inputs,
                       tiny_sana_wm_transformer)

MODULE_ATOL, MODEL_ATOL = 1e-6, 1e-4
C = 48
STATE_DICT_LIST = Path(__file__).parent / "data" / "dit_state_dict_full.txt"  # the release's key list


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def ours_from(theirs) -> DiT:
    model = DiT(DiTConfig.from_dict(dict(theirs.config))).eval()
    model.load_state_dict(theirs.state_dict(), strict=True)
    return model


def ours_args(inputs):
    """Our forward's arguments from diffusers' kwargs: timestep (B, T), text (B, L, C)."""
    return (inputs["hidden_states"], inputs["timestep"][:, 0], inputs["encoder_hidden_states"][:, 0],
            inputs["encoder_attention_mask"], inputs["camera_conditions"], inputs["chunk_plucker"])


# ---------------------------------------------------------------------------------------------------- modules

def test_timestep_embedding():
    t = torch.tensor([0.0, 1.0, 700.0, 998.0, 1000.0])
    expected = embeddings.get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_sinusoid(t), expected)
    theirs = randomize_(embeddings.TimestepEmbedding(256, C))
    ours = TimestepEmbedder(C)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert max_abs(ours(expected), theirs(expected)) <= MODULE_ATOL


def test_embedders():
    patch = randomize_(ref.SanaWMPatchEmbed((1, 1, 1), 8, C, kernel_size=(1, 1, 1)))
    ours = PatchEmbed(8, C)
    ours.load_state_dict(patch.state_dict(), strict=True)
    x = torch.randn(2, 8, 3, 4, 5, generator=gen())
    assert max_abs(ours(x), patch(x)) <= MODULE_ATOL
    caption = randomize_(ref.SanaWMCaptionEmbedder(32, C, act_layer=lambda: torch.nn.GELU(approximate="tanh")))
    ours = CaptionEmbedder(32, C)
    ours.load_state_dict(caption.state_dict(), strict=True)
    y = torch.randn(2, 7, 32, generator=gen(1))
    assert max_abs(ours(y), caption(y)) <= MODULE_ATOL


@pytest.mark.parametrize("t_kernel,thw", [(3, (3, 4, 6)), (5, (4, 3, 2))])
def test_ffn(t_kernel, thw):
    theirs = randomize_(ref.GLUMBConvTemp(C, int(C * 2.5), use_bias=(True, True, False), t_kernel_size=t_kernel))
    ours = GLUMBConvTemp(C, int(C * 2.5), t_kernel)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    m = torch.randn(2, thw[0] * thw[1] * thw[2], C, generator=gen())
    assert max_abs(ours(m, thw), theirs(m, thw)) <= MODULE_ATOL
    # Frames split across conv calls (to bound the hidden tensors' memory) change nothing.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit, "FFN_MAX_ELEMENTS", ours.inverted_conv.conv.out_channels * thw[1] * thw[2])
        assert max_abs(dit.ffn_in_parts(ours, m, thw, None), theirs(m, thw)) <= MODULE_ATOL
    # So do parts of frames in the temporal conv too (the memory mode), with and without causal chunks. (Up to
    # rounding: on AVX-512 oneDNN sums a conv over fewer frames in another order, ~1 ulp apart.)
    for chunk_size in (None, 2):
        whole = ours(m, thw, chunk_size)
        for part_frames in (1, 2, thw[0] + 1):
            assert max_abs(dit.ffn_in_parts(ours, m, thw, chunk_size, part_frames), whole) <= MODULE_ATOL


def test_final_layer():
    theirs = randomize_(ref.T2IFinalLayer(C, (1, 1, 1), 8))
    ours = FinalLayer(C, 8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, temb = torch.randn(2, 3 * 20, C, generator=gen(0)), torch.randn(2, 1, 3, C, generator=gen(1))
    assert max_abs(ours(x, temb.transpose(1, 2)), theirs(x, temb)) <= MODULE_ATOL


@pytest.mark.parametrize("index", [0, 1])  # a GDN block and a softmax block
def test_block(index):
    model = tiny_sana_wm_transformer()
    theirs, ours = model.blocks[index], ours_from(model).blocks[index]
    thw, B, L = (3, 4, 6), 2, 8
    N = thw[0] * thw[1] * thw[2]
    x, y = torch.randn(B, N, C, generator=gen(0)), torch.randn(B, L, C, generator=gen(1))
    t6 = torch.randn(B, 1, thw[0], 6 * C, generator=gen(2)) * 0.3
    p = torch.randn(B, N, 48, generator=gen(3))               # Plücker tokens and an embedder: ours folds the two maps
    w_e, b_e = torch.randn(C, 48, generator=gen(4)) / 7, torch.randn(C, generator=gen(5))
    pl = F.linear(p, w_e, b_e)
    mask = torch.ones(B, L, dtype=torch.int16)
    mask[0, 5:] = 0
    inputs = tiny_dit_inputs(thw=thw)
    rope = ref.SanaWMRotaryPosEmbed(24, (1, 1, 1), 1024)(thw)
    transforms = ref._prepare_ucpe_ray_transforms(24, inputs["camera_conditions"], thw, (1, 1, 1), rope)
    expected = theirs(x, y[:, None], t6, mask, thw, rope, None, inputs["camera_conditions"], transforms, pl)
    P, P_T, P_inv, rope_cam = transforms
    got = ours(x, y, mask.bool(), t6.view(B, thw[0], 6, C), thw, torch.view_as_real(rope[0, 0]),
               (P, P_T, P_inv, torch.view_as_real(rope_cam[0, 0])), (p, w_e, b_e))
    assert max_abs(got, expected) <= MODULE_ATOL


# ---------------------------------------------------------------------------------------------------- whole model

CONFIGS = {
    "spec": ({}, (3, 4, 6), None),  # tests/reference.py's tiny config
    "varied": (dict(num_layers=3, hidden_size=64, num_attention_heads=4, softmax_every_n=3, linear_head_dim=16,
                    mlp_ratio=2.5, t_kernel_size=5, conv_kernel_size=3, chunk_plucker_post_attn_blocks=2,
                    caption_channels=24, in_channels=6), (5, 3, 5), [0.0, 998.26, 700.7, 435.5, 12.9]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dit_matches_diffusers(name):
    overrides, thw, timesteps = CONFIGS[name]
    theirs = tiny_sana_wm_transformer(**overrides)
    ours = ours_from(theirs)
    inputs = tiny_dit_inputs(thw=thw, in_channels=theirs.config.in_channels, timesteps=timesteps,
                             caption_channels=theirs.config.caption_channels)
    with torch.no_grad():
        expected = theirs(**inputs)[0]
        got = ours(*ours_args(inputs))
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert max_abs(got, expected) <= MODEL_ATOL
        # Each optional camera input is exercised (it changes the output) and matches without the other.
        no_cam = ours(*ours_args(inputs)[:4], None, inputs["chunk_plucker"])
        assert max_abs(no_cam, theirs(**{**inputs, "camera_conditions": None})[0]) <= MODEL_ATOL
        no_pl = ours(*ours_args(inputs)[:5], None)
        assert max_abs(no_pl, theirs(**{**inputs, "chunk_plucker": None})[0]) <= MODEL_ATOL
        assert max_abs(no_cam, got) > 1e-3 and max_abs(no_pl, got) > 1e-3


def test_padded_text_is_cropped_exactly():
    """Text tokens masked in every batch row are dropped before cross-attention (dit.crop_text, to a multiple of 64):
    a prompt padded to 100 tokens gives diffusers' output on the same padded input, and the cropped length is 64."""
    theirs = tiny_sana_wm_transformer()
    ours = ours_from(theirs)
    inputs = tiny_dit_inputs()
    B, _, L, D = inputs["encoder_hidden_states"].shape
    text = torch.cat([inputs["encoder_hidden_states"], torch.randn(B, 1, 100 - L, D, generator=gen(7))], 2)
    mask = torch.cat([inputs["encoder_attention_mask"], torch.zeros(B, 100 - L, dtype=torch.int64)], 1)
    padded = {**inputs, "encoder_hidden_states": text, "encoder_attention_mask": mask}
    with torch.no_grad():
        assert max_abs(ours(*ours_args(padded)), theirs(**padded)[0]) <= MODEL_ATOL
    cropped_text, cropped_mask = dit.crop_text(text[:, 0], mask)
    assert cropped_text.shape[1] == 64 and cropped_mask.shape == (B, 64)


def test_dit_bf16():
    """bf16 inference runs through the same precision islands, and is as accurate as diffusers' in bf16: against
    the fp32 model, our bf16 velocity is within 1.1x diffusers' own bf16 error (the fp32 scan sums in another
    order than diffusers', and each rounding flip moves a value by 2^-8 relative; the two bf16 runs then differ by
    about as much as each differs from fp32, 2-3 ulps of the largest output here). (diffusers cannot build its ray
    matrices in bf16 on the CPU, so that comparison drops the raymap; with it, ours is compared with diffusers' fp32
    output.)"""
    theirs = tiny_sana_wm_transformer()
    ours = ours_from(theirs).to(torch.bfloat16)
    inputs = tiny_dit_inputs()
    with torch.no_grad():
        expected_fp32 = theirs(**inputs)[0]
        no_raymap = {**inputs, "camera_conditions": None}
        no_raymap_fp32 = theirs(**no_raymap)[0]
        expected = theirs.to(torch.bfloat16)(**no_raymap)[0]
        got = ours(*ours_args(no_raymap))
        assert got.dtype == torch.bfloat16
        assert max_rel_err(got, no_raymap_fp32) <= 1.1 * max_rel_err(expected, no_raymap_fp32)
        assert max_rel_err(got, expected) <= 2 ** -6
        assert max_rel_err(ours(*ours_args(inputs)), expected_fp32) <= 2 ** -6



def test_release_state_dict_layout():
    with torch.device("meta"):
        model = DiT()
    listed = [line.split() for line in STATE_DICT_LIST.read_text().splitlines() if line.strip()]
    ours = [[k, "x".join(map(str, v.shape)) or "1"] for k, v in model.state_dict().items()]
    assert len(listed) == 870 and ours == listed


def test_config_from_dict():
    d = dict(tiny_sana_wm_transformer().config)
    d.update(_class_name="SanaWMTransformer3DModel", _diffusers_version="0.42.1", patch_size=[1, 1, 1])
    cfg = DiTConfig.from_dict(json.loads(json.dumps(d)))
    assert cfg == DiTConfig(**{k: v for k, v in TINY_DIT.items() if k != "patch_size"})
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig.from_dict({"patch_size": [1, 2, 2]})
    with pytest.raises(ValueError, match="unknown key 'depth'"):
        DiTConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match="linear_head_dim"):
        DiTConfig(hidden_size=48, linear_head_dim=20)
    with pytest.raises(ValueError, match="t_kernel_size"):
        DiTConfig(t_kernel_size=4)
    with pytest.raises(ValueError, match="conv_kernel_size"):
        DiTConfig(conv_kernel_size=0)


def test_bad_inputs():
    theirs = tiny_sana_wm_transformer()
    ours = ours_from(theirs)
    x, t, text, mask, raymap, pl = ours_args(tiny_dit_inputs())
    for args, name in [((x[:, :4], t, text, mask), "x"), ((x, t[:, :2], text, mask), "timestep"),
                       ((x, t, text[..., :5], mask), "text"), ((x, t, text, mask[:, :3]), "text_mask"),
                       ((x, t, text, mask, raymap[:, :, :16]), "raymap"),
                       ((x, t, text, mask, None, pl[:, :6]), "plucker")]:
        with pytest.raises(ValueError, match=name):
            ours(*args)
    with pytest.raises(ValueError, match="chunk_size"):
        ours(x, t, text, mask, chunk_size=0)
    with torch.no_grad(), pytest.raises(ValueError, match="part_frames"):
        ours(x, t, text, mask, part_frames=0)
    with pytest.raises(ValueError, match="part_frames: the memory mode is for inference"):
        ours(x, t, text, mask, part_frames=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_timestep_is_refused(bad):
    """A NaN timestep would be cast to an arbitrary integer noise level: refused by name instead."""
    ours = ours_from(tiny_sana_wm_transformer())
    x, t, text, mask, raymap, pl = ours_args(tiny_dit_inputs())
    t = t.float().clone()
    t[0, -1] = bad
    with pytest.raises(ValueError, match="timestep: expected finite"):
        ours(x, t, text, mask, raymap, pl)


# ---------------------------------------------------------------------------------------------------- loading

def test_from_pretrained_both_layouts(tmp_path):
    theirs = tiny_sana_wm_transformer()
    inputs = tiny_dit_inputs()
    with torch.no_grad():
        expected = theirs(**inputs)[0]
    cfg = DiTConfig.from_dict(dict(theirs.config))

    # Native release layout: one file, the diffusers keys + an unused pos_embed.
    native = tmp_path / "sana_wm_tiny.safetensors"
    save_file({**theirs.state_dict(), "pos_embed": torch.zeros(1, 72, C)}, str(native))
    # Diffusers layout: config.json + sharded safetensors + index.
    theirs.save_pretrained(tmp_path / "transformer", max_shard_size="200KB", safe_serialization=True)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1

    for model in (DiT.from_pretrained(native, dtype=torch.float32, config=cfg),
                  DiT.from_pretrained(tmp_path / "transformer", dtype=torch.float32)):
        assert model.config == cfg and not any(p.is_meta for p in model.state_dict().values())
        with torch.no_grad():
            assert max_abs(model(*ours_args(inputs)), expected) <= MODEL_ATOL
    # The oracle loader of the release test reads the same native file into diffusers.
    twin = load_sana_wm_native(tmp_path, **{k: v for k, v in theirs.config.items() if not k.startswith("_")})
    with torch.no_grad():
        assert torch.equal(twin(**inputs)[0], expected)
    bf16 = DiT.from_pretrained(native, dtype=torch.bfloat16, config=cfg)
    assert all(p.dtype == torch.bfloat16 for p in bf16.state_dict().values())


def test_from_pretrained_errors(tmp_path):
    theirs = tiny_sana_wm_transformer()
    cfg = DiTConfig.from_dict(dict(theirs.config))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        DiT.from_pretrained(corrupt, config=cfg)

    state = dict(theirs.state_dict())
    state.pop("blocks.1.attn.qkv.weight")
    state["blocks.0.mlp.t_conv.weight"] = torch.zeros(C, C, 5, 1)
    state["blocks.0.attn.extra"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError) as err:
        DiT.from_pretrained(bad, config=cfg)
    message = str(err.value)
    assert "missing (1): blocks.1.attn.qkv.weight" in message and "unexpected (1): blocks.0.attn.extra" in message
    assert "blocks.0.mlp.t_conv.weight: checkpoint (48, 48, 5, 1) vs model (48, 48, 3, 1)" in message
    with pytest.raises(ValueError, match="does not match"):  # the release config against a tiny checkpoint
        DiT.from_pretrained(bad)
    with pytest.raises(ValueError, match="no such file"):
        DiT.from_pretrained(tmp_path / "missing")
    theirs.save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="config: .* has its own config.json"):  # never silently ignored
        DiT.from_pretrained(tmp_path / "transformer", config=cfg)


class NotATensor:  # a pickled object of this class must never be rebuilt by the loader
    pass


def test_from_pretrained_streaming_model_pt(tmp_path):
    """The streaming release's sana_dit/model.pt: a torch pickle in one of the trainers' containers, names with or
    without `model.`, the official tree's unused pos_embed and null caption; every one loads strictly."""
    theirs = tiny_sana_wm_transformer()
    inputs = tiny_dit_inputs()
    with torch.no_grad():
        expected = theirs(**inputs)[0]
    cfg = DiTConfig.from_dict(dict(theirs.config))
    state = {**theirs.state_dict(), "pos_embed": torch.zeros(1, 72, C), "y_embedder.y_embedding": torch.zeros(5, 32)}
    prefixed = {"model." + k: v for k, v in state.items()}
    containers = {"generator": {"generator": prefixed, "step": 3, "denoising_step_list": [1000, 960]},
                  "model": {"model": state, "step": 3}, "state_dict": {"state_dict": prefixed},
                  "flat": state, "flat_prefixed": prefixed}
    for name, container in containers.items():
        folder = tmp_path / name / "sana_dit"
        folder.mkdir(parents=True)
        torch.save(container, folder / "model.pt")
        for path in (folder, folder / "model.pt"):  # the folder, or the file itself
            model = DiT.from_pretrained(path, dtype=torch.float32, config=cfg)
            with torch.no_grad():
                assert max_abs(model(*ours_args(inputs)), expected) <= MODEL_ATOL, (name, path)
    # bf16, as the release stores it; a legacy (not zip) pickle loads too, without the memory map.
    legacy = tmp_path / "legacy.pt"
    torch.save({"generator": {k: v.bfloat16() for k, v in prefixed.items()}}, legacy,
               _use_new_zipfile_serialization=False)
    bf16 = DiT.from_pretrained(legacy, dtype=torch.bfloat16, config=cfg)
    assert all(p.dtype == torch.bfloat16 for p in bf16.state_dict().values())
    assert torch.equal(bf16.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"].bfloat16())


def test_model_pt_errors(tmp_path):
    theirs = tiny_sana_wm_transformer()
    cfg = DiTConfig.from_dict(dict(theirs.config))
    state = dict(theirs.state_dict())

    code = tmp_path / "code.pt"  # an object weights_only must refuse, beside real tensors
    torch.save({"generator": {**state, "evil": NotATensor()}}, code)
    with pytest.raises(ValueError, match=r"code.pt holds more than tensors, so torch.load\(weights_only=True\) "
                                         r"refused it: Unsupported global: .*NotATensor"):
        DiT.from_pretrained(code, config=cfg)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="garbage.pt"):
        DiT.from_pretrained(garbage, config=cfg)

    cases = {"nested": ({"generator": {"blocks": state}}, r"not tensors: 'blocks' \(dict\)"),
             "step": ({**state, "step": 3}, r"not tensors: 'step' \(int\)"),
             "empty": ({}, "got an empty dict"), "list": ([state], "got a list"),
             "twice": ({**state, "model.final_layer.linear.bias": torch.zeros(1)},
                       "both 'final_layer.linear.bias' and 'model.final_layer.linear.bias'")}
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=f"{name}.pt: expected a dict of name -> tensor.*{message}"
                           if name != "twice" else message):
            DiT.from_pretrained(tmp_path / f"{name}.pt", config=cfg)

    state.pop("blocks.1.attn.qkv.weight")
    torch.save({"generator": {"model." + k: v for k, v in {**state, "blocks.0.attn.extra": torch.zeros(1)}.items()}},
               tmp_path / "model.pt")
    with pytest.raises(ValueError) as err:
        DiT.from_pretrained(tmp_path, config=cfg)
    message = str(err.value)
    assert "missing (1): blocks.1.attn.qkv.weight" in message and "unexpected (1): blocks.0.attn.extra" in message
    (tmp_path / "model.pt").unlink()
    with pytest.raises(ValueError, match="no .safetensors file or model.pt in"):
        DiT.from_pretrained(tmp_path, config=cfg)


# ---------------------------------------------------------------------------------------------------- memory mode

@pytest.mark.parametrize("name,frames", [("spec", None), ("varied", None), ("varied", 9)])
def test_memory_mode(name, frames):
    """DiT(..., part_frames=P) (token-wise work in parts of P frames, GDN scans in stages, softmax queries against
    all keys) matches diffusers like the whole-video path, and the whole-video path itself, with and without the
    camera, bidirectional and chunk-causal (chunks that parts cross and parts that chunks cross). At 9 frames the
    GDN parts' windows (the short conv's reach on either side) start and end inside the video."""
    overrides, thw, timesteps = CONFIGS[name]
    if frames is not None:
        thw, timesteps = (frames, *thw[1:]), None
    theirs = tiny_sana_wm_transformer(**overrides)
    ours = ours_from(theirs)
    inputs = tiny_dit_inputs(thw=thw, in_channels=theirs.config.in_channels, timesteps=timesteps,
                             caption_channels=theirs.config.caption_channels)
    args = ours_args(inputs)
    with torch.no_grad():
        expected = theirs(**inputs)[0]
        no_cam = theirs(**{**inputs, "camera_conditions": None})[0]
        for part_frames in (1, 2):
            assert max_abs(ours(*args, part_frames=part_frames), expected) <= MODEL_ATOL
            assert max_abs(ours(*args[:4], None, args[5], part_frames=part_frames), no_cam) <= MODEL_ATOL
            for chunk_size in (1, 2, 3):
                whole = ours(*args, chunk_size=chunk_size)
                assert max_abs(ours(*args, chunk_size=chunk_size, part_frames=part_frames), whole) <= MODEL_ATOL


# ---------------------------------------------------------------------------------------------------- chunk-causal

def test_chunk_causal():
    overrides, thw, _ = CONFIGS["varied"]
    ours = ours_from(tiny_sana_wm_transformer(**overrides))
    x, t, text, mask, raymap, pl = ours_args(tiny_dit_inputs(thw=thw, in_channels=6, caption_channels=24))
    T = thw[0]
    with torch.no_grad():
        full = ours(x, t, text, mask, raymap, pl)
        assert max_abs(ours(x, t, text, mask, raymap, pl, chunk_size=T), full) <= MODULE_ATOL
        assert max_abs(ours(x, t, text, mask, raymap, pl, chunk_size=T + 3), full) <= MODULE_ATOL
        for chunk in (1, 2, 3):
            causal = ours(x, t, text, mask, raymap, pl, chunk_size=chunk)
            assert max_abs(causal, full) > 1e-3  # later frames are really cut off
            # Change everything about the frames after the first chunk: earlier outputs must not move.
            later = slice(chunk, None)
            x2, t2, raymap2, pl2 = x.clone(), t.clone(), raymap.clone(), pl.clone()
            x2[:, :, later] += torch.randn_like(x2[:, :, later])
            t2[:, later] = 500.0
            raymap2[:, later, 3] += 0.5
            pl2[:, :, later] *= -1
            moved = ours(x2, t2, text, mask, raymap2, pl2, chunk_size=chunk)
            assert max_abs(moved[:, :, :chunk], causal[:, :, :chunk]) == 0
            assert max_abs(moved[:, :, chunk:], causal[:, :, chunk:]) > 1e-3


# ---------------------------------------------------------------------------------------------------- release

@pytest.mark.weights
def test_release_weights_one_step():
    """Ours and diffusers load the released dit/ and agree on one denoising step (bf16 on GPU, fp32 on CPU)."""
    folder = Path(os.environ["SANA_WM_WEIGHTS"]) / "dit"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ours = DiT.from_pretrained(folder, dtype=dtype, device=device)
    theirs = load_sana_wm_native(folder, dtype, device)
    inputs = tiny_dit_inputs(batch=2, thw=(3, 22, 40), text_len=300, in_channels=128, caption_channels=2304)
    inputs = {k: v.to(device=device, dtype=dtype) if torch.is_tensor(v) and k != "encoder_attention_mask"
              else (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    with torch.no_grad():
        expected = theirs(**inputs)[0]
        got = ours(*ours_args(inputs))
    assert max_rel_err(got, expected) <= (2e-2 if dtype == torch.bfloat16 else 1e-4)


# ---------------------------------------------------------------------------------------------------- streaming

def test_chunk_starts_and_windows():
    """SANA-WM's chunks (the image frame joins the first) and the softmax window of the streaming sampler."""
    assert chunk_starts(4) == (0,) and chunk_starts(7) == (0, 4)
    assert chunk_starts(31) == tuple([0] + list(range(4, 31, 3)))
    assert chunk_starts(21) == (0, 4, 7, 10, 13, 16) and chunk_starts(5) == (0,) and chunk_starts(22)[-1] == 19
    assert chunk_starts(21, merge_short_last=False)[-1] == 19
    cache = dit.StreamCache()
    seen = []
    for c in range(6):
        seen.append((cache.window(2, True), cache.window(2, False), cache.window(-1, True)))
        cache.chunks.append((c, c + 1))
    assert [s[0] for s in seen] == [[], [0], [0, 1], [0, 2], [0, 3], [0, 4]]
    assert [s[1] for s in seen] == [[], [0], [0, 1], [1, 2], [2, 3], [3, 4]]
    assert seen[5][2] == [0, 1, 2, 3, 4]


def test_short_conv_halo():
    """The GDN short conv of one chunk over [the previous frames ; the chunk] (gdn_chunk's form) equals the
    chunk-causal short conv on the whole sequence at the chunk's frames: the past read, nothing after the chunk."""
    from gdn import short_conv
    weight = torch.randn(C, 1, 4, generator=gen(1))
    x = torch.randn(2, 10 * 6, C, generator=gen(2))                 # 10 frames of 6 tokens, chunks (0, 4, 7)
    whole = short_conv(x, weight, 10, (0, 4, 7))
    for s, e in ((4, 7), (7, 10)):
        h = 3                                                       # the halo: K - 1 frames before the chunk
        part = short_conv(x[:, (s - h) * 6:e * 6], weight, h + e - s, h)
        assert max_abs(part[:, h * 6:], whole[:, s * 6:e * 6]) <= MODULE_ATOL


def test_ffn_chunk_halo():
    """The FFN of one chunk reading the previous frames' z equals the chunk-causal FFN on the whole sequence."""
    ffn = randomize_(GLUMBConvTemp(C, 2 * C, 3))
    thw, starts = (7, 2, 3), (0, 4)
    m = torch.randn(2, 7 * 6, C, generator=gen(3))
    with torch.no_grad():
        whole = ffn(m, thw, starts)
        first, z = dit.ffn_chunk(ffn, m[:, :24], (4, 2, 3))
        second, _ = dit.ffn_chunk(ffn, m[:, 24:], (3, 2, 3), halo=z[:, :, -1:])
    assert max_abs(torch.cat([first, second], 1), whole) <= MODULE_ATOL


@pytest.mark.parametrize("frames,camera,kernel", [(10, True, 3), (12, True, 3), (10, False, 3), (10, True, 4)])
def test_cached_chunks_equal_the_chunk_causal_forward(frames, camera, kernel):
    """Chunk by chunk with caches (the streaming model's forward) == the chunk-causal DiT over the whole video so
    far (finished chunks at t = 0, the new one at its own timesteps), for every chunk: 4+3+3 frames, and 4+3+5 (a
    short last chunk merged); batch 2, with and without the camera; all history in the softmax window; the GDN
    short conv of 3 taps and the release's 4 (a halo as long as the chunk: gdn_chunk's uniform-chunk form)."""
    overrides, (_, h, w), _ = CONFIGS["varied"]
    ours = ours_from(tiny_sana_wm_transformer(**dict(overrides, conv_kernel_size=kernel)))
    x, _, text, mask, raymap, plucker = ours_args(tiny_dit_inputs(thw=(frames, h, w), in_channels=6,
                                                                 caption_channels=24))
    if not camera:
        raymap = plucker = None
    starts = chunk_starts(frames)
    cache = dit.StreamCache()
    with torch.no_grad():
        for s, e in zip(starts, starts[1:] + (frames,)):
            t = torch.rand(2, e - s, generator=gen(s)) * 1000
            got = dit.forward_chunk(ours, x[:, :, s:e], t, text, mask, raymap, plucker, cache=cache)
            full_t = torch.cat([torch.zeros(2, s), t], 1)
            cut = lambda a, dim: None if a is None else a.narrow(dim, 0, e)  # noqa: E731
            expected = ours(x[:, :, :e], full_t, text, mask, cut(raymap, 1), cut(plucker, 2),
                            chunk_size=tuple(c for c in starts if c < e))[:, :, s:]
            assert max_abs(got, expected) <= 1e-5, (s, e)
            dit.forward_chunk(ours, x[:, :, s:e], torch.zeros(2, e - s), text, mask, raymap, plucker, cache=cache,
                              save=True)
    assert cache.frames == frames and len(cache.chunks) == len(starts)


def test_streaming_window_sees_the_sink_and_the_last_chunk(monkeypatch):
    """With the official window (2, sink on) each chunk's softmax blocks read chunk 0 and the chunk before only, and
    the cache keeps no other chunk's keys and values (they are dropped as they leave every later window)."""
    overrides, (_, h, w), _ = CONFIGS["varied"]
    ours = ours_from(tiny_sana_wm_transformer(**overrides))
    x, _, text, mask, raymap, plucker = ours_args(tiny_dit_inputs(thw=(16, h, w), in_channels=6,
                                                                 caption_channels=24))
    seen, softmax_chunk = [], dit.softmax_chunk
    monkeypatch.setattr(dit, "softmax_chunk", lambda layer, u, rope, camera, past: seen.append(
        [p[0].shape[2] // (h * w) for p in past]) or softmax_chunk(layer, u, rope, camera, past))
    starts, cache = chunk_starts(16), dit.StreamCache()
    with torch.no_grad():
        for s, e in zip(starts, starts[1:] + (16,)):
            seen.clear()
            dit.forward_chunk(ours, x[:, :, s:e], torch.zeros(2, e - s), text, mask, raymap, plucker, cache=cache,
                              save=True, window=2)
            assert seen[0] == {0: [], 4: [4], 7: [4, 3]}.get(s, [4, 3]), (s, seen[0])
            softmax = next(e for b, e in zip(ours.blocks, cache.blocks) if not isinstance(b.attn, GDNSelfAttention))
            kept = [i for i, kv in enumerate(softmax["kv"]) if kv is not None]
            assert kept == ([0, len(cache.chunks) - 1] if len(cache.chunks) > 1 else [0])
