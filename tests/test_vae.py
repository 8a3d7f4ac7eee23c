"""vae.py against diffusers 0.42.1's AutoencoderKLLTX2Video : building blocks, encode and
decode untiled and tiled at two random-weight configs, the temporal-seam choice of the tiled decode, the
streaming release's causal decoder decoded whole and piece by piece (CausalDecodeStream), config,
state dict and release-folder loading, and the release weights (marked `weights`)."""
import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderKLLTX2Video
from diffusers.models.autoencoders import autoencoder_kl_ltx2 as dl
from diffusers.pipelines.sana_wm.pipeline_sana_wm import SanaWMPipeline

import vae as V
from reference import RELEASE_VAE, TINY_VAE, build_tiny_vae, max_rel_err, randomize_, vae_from_diffusers

TOL = 1e-5  # fp32, max abs error
REFERENCE = Path(__file__).parent / "data" / "vae_state_dict_full.txt"  # the release's key list (tests/data)

# A second config: 16 latent channels, decoder *causal*, upsamplers of all three kinds (spatial / temporal only,
# channel factor 1), other down-sampling order and group sizes, uneven layer counts (so the decoder's reversed
# lists are exercised), 4 decoder stages, and a scaling_factor != 1 (normalize/denormalize against the pipeline).
ALT_VAE = dict(
    latent_channels=16, scaling_factor=0.7, block_out_channels=(16, 32, 32, 64), layers_per_block=(2, 1, 1, 1, 2),
    downsample_type=("spatiotemporal", "spatial", "temporal", "spatiotemporal"),
    decoder_block_out_channels=(16, 32, 32, 64), decoder_layers_per_block=(1, 2, 1, 1, 2),
    decoder_spatio_temporal_scaling=(True,) * 4, decoder_inject_noise=(False,) * 5,
    upsample_type=("spatiotemporal", "spatiotemporal", "spatial", "temporal"), upsample_residual=(True,) * 4,
    upsample_factor=(2, 2, 1, 2), decoder_causal=True)
CONFIGS = {"tiny": {}, "alt": ALT_VAE}

# Small tiles (tests/reference.py's) so that spatial and temporal tiling both engage on tiny inputs.
TILES = V.Tiling(size=96, stride=64, frames=16, frame_stride=8)


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours - ref).abs().max().item()
    assert err <= tol, err
    return err


def rand_video(b, t, h, w, seed):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rand_latent(b, c, t, h, w, seed):
    return torch.randn(b, c, t, h, w, generator=torch.Generator().manual_seed(seed))


def tile_reference(ref):
    """The small tiling on the diffusers model: spatial tiles + framewise encode/decode."""
    ref.enable_tiling(tile_sample_min_height=TILES.size, tile_sample_min_width=TILES.size,
                      tile_sample_min_num_frames=TILES.frames, tile_sample_stride_height=TILES.stride,
                      tile_sample_stride_width=TILES.stride, tile_sample_stride_num_frames=TILES.frame_stride)
    ref.use_framewise_encoding = ref.use_framewise_decoding = True
    return ref


def untiled(ref):
    """The diffusers model back to one-shot encode/decode (the pair fixture is shared by tiled tests)."""
    ref.use_tiling = ref.use_framewise_encoding = ref.use_framewise_decoding = False
    return ref


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    ref = build_tiny_vae(seed=3, **CONFIGS[request.param])
    return request.param, ref, vae_from_diffusers(ref)


# ------------------------------------------------------------------------------------------------------------
# building blocks (diffusers 0.42.1's, one by one)

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_causal_conv_and_resblock(causal, pad_mode):
    x = rand_latent(2, 6, 4, 5, 7, seed=1)
    ref = randomize_(dl.LTX2VideoResnetBlock3d(6, 6, spatial_padding_mode=pad_mode), seed=2)
    ours = V.ResBlock(6, causal, pad_mode)
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        close(ours.conv1(x), ref.conv1(x, causal=causal))
        close(ours(x), ref(x, causal=causal))
    close(V.pixnorm(x), dl.PerChannelRMSNorm()(x))


@pytest.mark.parametrize("kind", ["spatial", "temporal", "spatiotemporal"])
def test_downsampler(kind):
    x = rand_latent(2, 8, 5, 6, 4, seed=4)
    ref = randomize_(dl.LTX2VideoDownsampler3d(8, 16, stride=V.STRIDES[kind]), seed=5)
    ours = V.Downsampler(8, 16, V.STRIDES[kind], True, "zeros")
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        close(ours(x), ref(x, causal=True))


@pytest.mark.parametrize("kind,factor", [("spatiotemporal", 2), ("spatiotemporal", 1), ("spatial", 2),
                                         ("temporal", 2)])
def test_upsampler(kind, factor):
    x = rand_latent(2, 16, 3, 4, 5, seed=6)
    ref = randomize_(dl.LTX2VideoUpsampler3d(16, stride=V.STRIDES[kind], residual=True, upscale_factor=factor,
                                             spatial_padding_mode="reflect"), seed=7)
    ours = V.Upsampler(16, V.STRIDES[kind], factor, False, "reflect")
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        close(ours(x), ref(x, causal=False))


def test_space_to_depth_and_patchify_are_inverse_pairs():
    x = rand_latent(2, 3, 4, 8, 12, seed=8)
    assert torch.equal(V.depth_to_space(V.space_to_depth(x, (2, 2, 2)), (2, 2, 2)), x)
    assert torch.equal(V.unpatchify(V.patchify(x, 4), 4), x)
    # the width sub-index is the more significant one (as in the LTX-2 VAE): pixel (c=0, h=1, w=0) -> channel 1
    assert V.patchify(x, 4)[0, 1, 0, 0, 0] == x[0, 0, 0, 1, 0]


# ------------------------------------------------------------------------------------------------------------
# whole model, untiled

def test_encode_decode_untiled(pair):
    name, ref, ours = pair
    b, c = 2, ref.config.latent_channels
    x = rand_video(b, 17, 64, 96, seed=10)
    with torch.no_grad():
        post = untiled(ref).encode(x).latent_dist
    mean, logvar = ours.encode(x, tiling=None, return_logvar=True)
    close(mean, post.mean)
    close(logvar, post.logvar)
    z = rand_latent(b, c, 3, 2, 3, seed=11)
    with torch.no_grad():
        close(ours.decode(z, tiling=None), ref.decode(z).sample)


def test_normalize_and_pipeline_round_trip(pair):
    """normalize(encode(frame)) and decode(denormalize(z)) against the SANA-WM pipeline's own helpers."""
    name, ref, ours = pair
    pipe = SimpleNamespace(vae=untiled(ref), _execution_device=torch.device("cpu"))
    image = rand_video(1, 1, 64, 64, seed=12)
    with torch.no_grad():
        want = SanaWMPipeline._encode_first_frame(pipe, image[:, :, 0], torch.device("cpu"), torch.float32)
    close(ours.normalize(ours.encode(image, tiling=None)), want)
    z = rand_latent(1, ref.config.latent_channels, 2, 2, 2, seed=13)
    with torch.no_grad():
        close(ours.decode(ours.denormalize(z), tiling=None), SanaWMPipeline._decode_latents(pipe, z))
    close(ours.denormalize(ours.normalize(z)), z, 1e-6)


# ------------------------------------------------------------------------------------------------------------
# tiled (as SANA-WM's official loader)

def test_tiled_encode(pair):
    """25 frames at 128x128: 3 temporal windows (one more, of 1 frame, adds nothing), each 2x2 spatial tiles."""
    name, ref, ours = pair
    x = rand_video(1, 25, 128, 128, seed=14)
    with torch.no_grad():
        post = tile_reference(ref).encode(x).latent_dist
    mean, logvar = ours.encode(x, tiling=TILES, return_logvar=True)
    close(mean, post.mean)
    close(logvar, post.logvar)


def test_tiled_one_frame(pair):
    """The SANA-WM conditioning path: a single frame, spatially tiled, and its single-latent-frame decode."""
    name, ref, ours = pair
    x = rand_video(1, 1, 128, 192, seed=15)
    z = rand_latent(1, ref.config.latent_channels, 1, 4, 6, seed=16)  # 2x3 tiles
    with torch.no_grad():
        tile_reference(ref)
        close(ours.encode(x, tiling=TILES), ref.encode(x).latent_dist.mean)
        close(ours.decode(z, tiling=TILES), ref.decode(z).sample)


def aligned_reference_decode(ref, z):
    """diffusers' _temporal_tiled_decode with the one change vae.py makes (its _tile_time docstring): a later
    window drops its first decoded frame instead of its last. Everything else is diffusers' own code."""
    window, step = TILES.frames // 8 + 1, TILES.frame_stride // 8
    tiles = []
    for i in range(0, z.shape[2], step):
        tile = ref.tiled_decode(z[:, :, i:i + window], None).sample
        tiles.append(tile[:, :, 1:] if i > 0 else tile)
    kept = [tiles[0][:, :, :TILES.frame_stride + 1]]
    for i in range(1, len(tiles)):
        kept.append(ref.blend_t(tiles[i - 1], tiles[i], TILES.frames - TILES.frame_stride)[:, :, :TILES.frame_stride])
    return torch.cat(kept, dim=2)[:, :, :1 + 8 * (z.shape[2] - 1)]


def test_tiled_decode(pair):
    """4 latent frames at 4x4: temporal windows of 3 latent frames every 1, each 2x2 spatial tiles. Before the
    first temporal seam ours equals diffusers; all of it equals diffusers with the aligned seam."""
    name, ref, ours = pair
    z = rand_latent(1, ref.config.latent_channels, 4, 4, 4, seed=17)
    seen = []
    hook = ours.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2:]))
    out = ours.decode(z, tiling=TILES)
    hook.remove()
    with torch.no_grad():
        want = tile_reference(ref).decode(z).sample
        aligned = aligned_reference_decode(ref, z)
    assert out.shape == want.shape == (1, 3, 25, 128, 128)
    close(out[:, :, :TILES.frame_stride + 1], want[:, :, :TILES.frame_stride + 1])
    close(out, aligned)
    assert (out[:, :, TILES.frame_stride + 1:] - want[:, :, TILES.frame_stride + 1:]).abs().max() > 1e-2
    # bounded work per call: no decoder call sees more than one tile
    assert max(s[0] for s in seen) == 3 and max(max(s[1:]) for s in seen) == 3


@pytest.mark.usefixtures("one_thread")
def test_decode_pieces_are_the_decode():
    """decode_pieces yields the tiled decode's frames window by window (3 latent frames, windows of 3 every 1: 2
    pieces, each in 2x2 spatial tiles), together equal to decode() bit for bit; untiled, one piece."""
    vae = vae_from_diffusers(build_tiny_vae(seed=3))
    z = rand_latent(1, vae.cfg.latent_channels, 3, 4, 4, seed=18)
    pieces = list(V.decode_pieces(vae, z, tiling=TILES))
    assert [p.shape[2] for p in pieces] == [9, 8]
    assert torch.equal(torch.cat(pieces, dim=2), vae.decode(z, tiling=TILES))
    (whole,) = V.decode_pieces(vae, z, tiling=None)
    assert torch.equal(whole, vae.decode(z, tiling=None))


class FrameIndexDecoder(nn.Module):
    """A stand-in decoder that writes the true global pixel-frame index into every output frame: a window whose
    first latent frame is s (the latents carry their index) starts at pixel frame 8s (paper §3.3)."""

    def forward(self, z, *unused, **unused_kw):
        B, _, T, h, w = z.shape
        start = 8 * z[:, :1, :1, :1, :1]
        frames = start + torch.arange(1 + 8 * (T - 1), dtype=z.dtype).view(1, 1, -1, 1, 1)
        return frames.expand(B, 3, -1, 32 * h, 32 * w).contiguous()


def test_temporal_seams_keep_frames_in_place():
    """Decoded frame t must show pixel frame t. With the release tiles (96/64 frames) and 21 latent frames
    (161 pixel frames, windows at latent 0, 8, 16) ours does; diffusers runs one frame late after its first
    seam (a 32-frame ramp, then exactly one frame) and loses the last frame (diffusers' framewise decode)."""
    z = torch.arange(21.0).view(1, 1, 21, 1, 1).expand(1, 8, 21, 2, 2).contiguous()
    ours = V.VAE(V.VAEConfig.from_dict(TINY_VAE))
    ours.decoder = FrameIndexDecoder()
    truth = torch.arange(161.0)
    close(ours.decode(z)[0, 0, :, 0, 0], truth, 1e-4)

    ref = AutoencoderKLLTX2Video(**TINY_VAE)
    ref.decoder = FrameIndexDecoder()
    ref.enable_tiling(tile_sample_min_num_frames=96, tile_sample_stride_num_frames=64)
    ref.use_framewise_decoding = True
    with torch.no_grad():
        theirs = ref.decode(z).sample[0, 0, :, 0, 0]
    close(theirs[:66], truth[:66], 1e-4)
    x = torch.arange(32.0)
    close(theirs[65:97], 65 + x - x / 32, 1e-4)  # blend of frame 65 + x (previous window) and 64 + x
    close(theirs[97:], truth[97:] - 1, 1e-4)


# ------------------------------------------------------------------------------------------------------------
# the streaming release's causal decoder, decoded whole and piece by piece (CausalDecodeStream)

# The tiny config with the streaming release's causal decoder (weights re-randomised), and the alt config
# (causal already), whose spatial-only and temporal-only upsamplers drop no frames / do alone.
CAUSAL_CONFIGS = {"tiny-causal": dict(decoder_causal=True), "alt": ALT_VAE}
CHUNKS = (4, 3, 3)  # the streaming release's decode pieces: latent frames [0, 4), [4, 7), [7, 10)


@pytest.fixture(scope="module", params=list(CAUSAL_CONFIGS))
def causal_pair(request):
    ref = build_tiny_vae(seed=41, **CAUSAL_CONFIGS[request.param])
    return request.param, ref, vae_from_diffusers(ref)


def stream_decode(vae, z, pieces):
    """z decoded piece by piece (pieces of `pieces` latent frames) by one fresh stream: (video, frames per piece)."""
    stream, out = V.CausalDecodeStream(vae), []
    for start, n in zip(torch.tensor((0,) + pieces).cumsum(0).tolist(), pieces):
        out.append(stream.decode(z[:, :, start:start + n]))
    return torch.cat(out, dim=2), [o.shape[2] for o in out]


def test_causal_decode_matches_diffusers(causal_pair):
    """The whole-video causal decode equals diffusers' AutoencoderKLLTX2Video(decoder_causal=True)."""
    name, ref, ours = causal_pair
    assert ours.cfg.decoder_causal
    z = rand_latent(2, ref.config.latent_channels, 10, 2, 3, seed=42)
    with torch.no_grad():
        close(ours.decode(z, tiling=None), untiled(ref).decode(z).sample)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_stream_equals_whole_causal_decode(causal_pair, dtype, tol):
    """Frame by frame and in the release's pieces (4, 3, 3 latent frames -> 25, 24, 24 pixel frames) the stream
    decodes exactly what one causal decode of the whole latent gives. Exact up to rounding: float64 shows the
    cache logic is exact; in float32 the convs round differently on 1-frame inputs (about 1e-6 of the output's
    largest value, compared as max |diff| / max |x|)."""
    name, ref, ours = causal_pair
    ours = copy.deepcopy(ours).to(dtype)
    z = rand_latent(2, ref.config.latent_channels, 10, 2, 3, seed=43).to(dtype)
    whole = ours.decode(z, tiling=None)
    assert whole.shape == (2, 3, 73, 64, 96)
    by_frame, sizes = stream_decode(ours, z, (1,) * 10)
    assert sizes == [1] + [8] * 9
    assert max_rel_err(by_frame, whole) <= tol
    by_piece, sizes = stream_decode(ours, z, CHUNKS)
    assert sizes == [25, 24, 24]
    assert max_rel_err(by_piece, whole) <= tol


def test_stream_reset_starts_a_new_video(causal_pair):
    name, ref, ours = causal_pair
    c = ref.config.latent_channels
    first, second = rand_latent(1, c, 7, 2, 2, seed=44), rand_latent(1, c, 7, 2, 2, seed=45)
    stream = V.CausalDecodeStream(ours)
    stream.decode(first[:, :, :4])
    stream.decode(first[:, :, 4:])
    stream.reset()
    again = torch.cat([stream.decode(second[:, :, :4]), stream.decode(second[:, :, 4:])], dim=2)
    assert torch.equal(again, stream_decode(ours, second, (4, 3))[0])
    assert again.shape[2] == 1 + 8 * 6


def test_causal_vae_folder_streaming_path(tmp_path):
    """The streaming release's ltx2_causal_vae/ layout (config.json with decoder_causal true + safetensors, no
    vae/ subfolder), loaded strictly, run as the streaming pipeline does: the first frame encoded untiled and
    normalised, the DiT's latents de-normalised and decoded piece by piece."""
    from safetensors.torch import save_file

    ref = build_tiny_vae(seed=46, decoder_causal=True)
    folder = tmp_path / "ltx2_causal_vae"
    ref.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["decoder_causal"] is True
    ours = V.VAE.from_pretrained(folder)
    assert ours.cfg == V.VAEConfig.from_dict(dict(TINY_VAE, decoder_causal=True))
    image = rand_video(1, 1, 64, 96, seed=47)
    with torch.no_grad():
        want = (untiled(ref).encode(image).latent_dist.mode() - ref.latents_mean.view(1, -1, 1, 1, 1)) \
            / ref.latents_std.view(1, -1, 1, 1, 1) * ref.config.scaling_factor
    close(ours.normalize(ours.encode(image, tiling=None)), want)
    z = rand_latent(1, 8, 10, 2, 3, seed=48)  # normalised, as the DiT makes them
    with torch.no_grad():
        want = ref.decode(z * ref.latents_std.view(1, -1, 1, 1, 1) / ref.config.scaling_factor
                          + ref.latents_mean.view(1, -1, 1, 1, 1)).sample
    close(stream_decode(ours, ours.denormalize(z), CHUNKS)[0], want)

    state = dict(ref.state_dict())  # strict keys: a missing decoder weight is reported
    del state["decoder.up_blocks.0.upsamplers.0.conv.conv.weight"]
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="decoder.up_blocks.0.upsamplers.0.conv.conv.weight"):
        V.VAE.from_pretrained(folder)


def test_stream_bad_inputs():
    with pytest.raises(ValueError, match="vae: .*causal decoder"):
        V.CausalDecodeStream(V.VAE(V.VAEConfig.from_dict(TINY_VAE)))
    stream = V.CausalDecodeStream(V.VAE(V.VAEConfig.from_dict(dict(TINY_VAE, decoder_causal=True))))
    for shape in [(1, 7, 1, 2, 2), (1, 8, 0, 2, 2), (8, 1, 2, 2)]:
        with pytest.raises(ValueError, match="z: expected"):
            stream.decode(torch.zeros(shape))
    stream.decode(torch.zeros(1, 8, 1, 2, 2))
    for shape in [(2, 8, 1, 2, 2), (1, 8, 1, 2, 3)]:
        with pytest.raises(ValueError, match="call reset"):
            stream.decode(torch.zeros(shape))
    stream.reset()
    assert stream.decode(torch.zeros(2, 8, 1, 2, 3)).shape == (2, 3, 1, 64, 96)


# ------------------------------------------------------------------------------------------------------------
# config, state dict, loading, bad input

def release_config_json() -> dict:
    with torch.device("meta"):
        cfg = dict(AutoencoderKLLTX2Video(**RELEASE_VAE).config)
    return json.loads(json.dumps({"_class_name": "AutoencoderKLLTX2Video", "_diffusers_version": "0.42.1", **cfg}))


def test_config_release_defaults_and_from_dict():
    cfg = V.VAEConfig()
    assert (cfg.spatial_compression_ratio, cfg.temporal_compression_ratio) == (32, 8)
    assert cfg.decoder_causal is False
    assert V.VAEConfig.from_dict(release_config_json()) == cfg
    for bad in ({"timestep_conditioning": True}, {"decoder_inject_noise": [False, True, False, False]},
                {"spatial_compression_ratio": 64}, {"temporal_compression_ratio": 16}, {"not_a_key": 1},
                {"decoder_block_out_channels": [256, 256, 1024]}, {"upsample_type": ["spatial"] * 3}):
        with pytest.raises(ValueError, match="config|VAEConfig"):
            V.VAEConfig.from_dict({**release_config_json(), **bad})


def test_full_state_dict_matches_release_list():
    want = [line.split() for line in REFERENCE.read_text().splitlines() if line.strip()]
    with torch.device("meta"):
        model = V.VAE()
    got = [(k, "x".join(map(str, v.shape))) for k, v in model.state_dict().items()]
    assert sorted(got) == sorted((k, s) for k, s in want)
    assert len(got) == 184
    assert sum(p.numel() for p in model.parameters()) == 1_222_479_857 - 2 * 128


@pytest.mark.parametrize("shard", [None, "300KB"])
def test_from_pretrained_release_layout(tmp_path, shard):
    ref = build_tiny_vae(seed=21)
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert bool(list(tmp_path.glob("*.index.json"))) == bool(shard)
    ours = V.VAE.from_pretrained(tmp_path)
    x, z = rand_video(1, 9, 64, 64, seed=22), rand_latent(1, 8, 2, 2, 2, seed=23)
    with torch.no_grad():
        close(ours.encode(x, tiling=None), ref.encode(x).latent_dist.mean)
        close(ours.decode(z, tiling=None), ref.decode(z).sample)
    assert torch.equal(ours.latents_std, ref.latents_std)
    half = V.VAE.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in half.state_dict().values()} == {torch.bfloat16}
    if not shard:  # a single file (no config.json beside it is read) takes its config from the caller
        file = V.VAE.from_pretrained(tmp_path / "diffusion_pytorch_model.safetensors",
                                     config=V.VAEConfig.from_dict(TINY_VAE))
        close(file.decode(z, tiling=None), ours.decode(z, tiling=None), 0.0)
        (tmp_path / "config.json").unlink()  # a folder without config.json: the release config, which does not fit
        with pytest.raises(ValueError, match="wrong shapes"):
            V.VAE.from_pretrained(tmp_path)


def test_from_pretrained_reports_mismatches(tmp_path):
    from safetensors.torch import save_file

    ref = build_tiny_vae(seed=24)
    ref.save_pretrained(tmp_path)
    state = dict(ref.state_dict())
    del state["decoder.conv_out.conv.bias"]
    state["encoder.conv_in.conv.bias"] = torch.zeros(3)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError) as err:
        V.VAE.from_pretrained(tmp_path)
    for key in ("decoder.conv_out.conv.bias", "encoder.conv_in.conv.bias", "extra.weight"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="path"):
        V.VAE.from_pretrained(tmp_path / "missing")


def test_from_pretrained_unreadable_file(tmp_path):
    """A corrupt .safetensors file is a ValueError naming it (the CLI reports ValueErrors), not SafetensorError."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_VAE))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is not a readable safetensors file"):
        V.VAE.from_pretrained(tmp_path)


def test_bad_inputs():
    model = V.VAE(V.VAEConfig.from_dict(TINY_VAE))
    for shape in [(1, 3, 10, 64, 64), (1, 3, 9, 48, 64), (1, 4, 9, 64, 64), (3, 9, 64, 64)]:
        with pytest.raises(ValueError, match="video"):
            model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="z"):
        model.decode(torch.zeros(1, 7, 2, 2, 2))
    with pytest.raises(ValueError, match="reflect"):
        model.decode(torch.zeros(1, 8, 1, 1, 4), tiling=None)
    with pytest.raises(ValueError, match="1-pixel edge tile"):  # width 29: tiles at 0, 14 and a 1-wide one at 28
        model.decode(torch.zeros(1, 8, 1, 2, 29))
    for tiling in (V.Tiling(size=100), V.Tiling(stride=600), V.Tiling(frames=90), V.Tiling(frame_stride=0)):
        with pytest.raises(ValueError, match="tiling"):
            model.decode(torch.zeros(1, 8, 1, 2, 2), tiling=tiling)


# ------------------------------------------------------------------------------------------------------------
# the release

@pytest.mark.weights
def test_release_weights_match_diffusers():
    folder = Path(os.environ["SANA_WM_WEIGHTS"]) / "vae"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = AutoencoderKLLTX2Video.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval()
    ours = V.VAE.from_pretrained(folder, dtype=torch.float32, device=device)
    assert ours.cfg == V.VAEConfig()
    assert torch.equal(ours.latents_mean, ref.latents_mean) and torch.equal(ours.latents_std, ref.latents_std)
    x = rand_video(1, 9, 96, 160, seed=30).to(device)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want = ref.encode(x).latent_dist.mean
        mean = ours.encode(x, tiling=None)
        assert max_rel_err(mean, want) <= TOL
        assert max_rel_err(ours.decode(mean, tiling=None), ref.decode(want).sample) <= TOL


@pytest.mark.gpu
@pytest.mark.weights
def test_release_weights_sana_wm_tiled_path():
    """The calls SANA-WM makes, with its tiles, on the GPU in fp32 (TF32 off): a 704x1280 first frame encoded
    and normalised, and 13 latent frames decoded (two temporal windows of 2x3 spatial tiles; frames 0..64 are
    where both tile the same way)."""
    folder = Path(os.environ["SANA_WM_WEIGHTS"]) / "vae"
    ref = AutoencoderKLLTX2Video.from_pretrained(folder, torch_dtype=torch.float32).to("cuda").eval()
    ours = V.VAE.from_pretrained(folder, dtype=torch.float32, device="cuda")
    ref.enable_tiling(tile_sample_min_num_frames=96, tile_sample_stride_num_frames=64)
    ref.use_framewise_encoding = ref.use_framewise_decoding = True
    pipe = SimpleNamespace(vae=ref, _execution_device=torch.device("cuda"))
    image = rand_video(1, 1, 704, 1280, seed=31).cuda()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want = SanaWMPipeline._encode_first_frame(pipe, image[:, :, 0], torch.device("cuda"), torch.float32)
        assert max_rel_err(ours.normalize(ours.encode(image)), want) <= TOL
        z = rand_latent(1, 128, 13, 22, 40, seed=32).cuda()
        out, ref_out = ours.decode(ours.denormalize(z)), SanaWMPipeline._decode_latents(pipe, z)
        assert out.shape == ref_out.shape == (1, 3, 97, 704, 1280)
        assert max_rel_err(out[:, :, :65], ref_out[:, :, :65]) <= TOL
