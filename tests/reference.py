"""Builders of tiny diffusers 0.42.1 reference models (the numerical oracle, tests only) and weight helpers.

Each section belongs to one project module; add to your section, keep the others as they are.
"""
import math

import torch


def randomize_(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Re-randomise every parameter and floating buffer (every path, random weights), so no path is silently zero.

    `A_log = log(U(0,1)*2 + 0.1)`, `dt_bias = 0.5*randn`, `*norm*.weight = 1 + 0.1*randn`, a VAE's
    `latents_std = U(0.5, 1.5)`, other tensors with dim > 1: `randn * 0.5/sqrt(fan_in)`, 1-D tensors: `0.1*randn`.
    Drawn in fp32 on each tensor's own device (the benchmarks fill full-size models on the GPU in seconds).
    """
    generators = {}
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point() or p.numel() == 0:
                continue
            g = generators.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            r = lambda: torch.randn(p.shape, generator=g, device=p.device)  # noqa: E731
            u = lambda: torch.rand(p.shape, generator=g, device=p.device)  # noqa: E731
            if name.endswith("A_log"):
                v = torch.log(u() * 2 + 0.1)
            elif name.endswith("latents_std"):
                v = 0.5 + u()
            elif name.endswith("dt_bias"):
                v = 0.5 * r()
            elif "norm" in name and name.endswith("weight"):
                v = 1 + 0.1 * r()
            elif p.dim() > 1:
                v = r() * 0.5 / math.sqrt(p[0].numel())
            else:
                v = 0.1 * r()
            p.copy_(v)
    return module


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|: the relative error the project's tolerances speak of."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# === dit.py: the tiny SanaWMTransformer3DModel (tiny config) and its inputs ===

TINY_DIT = dict(in_channels=8, num_layers=4, hidden_size=48, num_attention_heads=2, patch_size=(1, 1, 1),
                softmax_every_n=2, linear_head_dim=24, mlp_ratio=3.0, caption_channels=32,
                chunk_plucker_channels=48, chunk_plucker_post_attn_blocks=20)


def tiny_sana_wm_transformer(seed: int = 1, **overrides):
    """diffusers' SanaWMTransformer3DModel at the tiny config (keyword overrides allowed), fp32, eval,
    every parameter re-randomised with `randomize_` (the Plücker embedder is zero-initialised otherwise)."""
    from diffusers.models.transformers.transformer_sana_wm import SanaWMTransformer3DModel

    torch.manual_seed(0)
    return randomize_(SanaWMTransformer3DModel(**{**TINY_DIT, **overrides}).eval(), seed)


def tiny_camera(thw=(3, 4, 6)):
    """diffusers' prepare_camera on a yaw-left-then-pitch trajectory of 8(T-1)+1 frames at (32h, 32w) pixels:
    raymap (T, 20), chunk_plucker (48, T, h, w). For thw = (3, 4, 6) this is exactly the tiny inputs."""
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import action_string_to_c2w, prepare_camera

    T, h, w = thw
    steps = 8 * (T - 1)
    c2w = action_string_to_c2w(f"wl-{steps // 2},dk-{steps - steps // 2}")
    K = np.tile(np.array([[150.0 * w / 6, 150.0 * w / 6, 16.0 * w, 16.0 * h]], dtype=np.float32), (steps + 1, 1))
    cam = prepare_camera(c2w, K, target_size=(32 * h, 32 * w), vae_stride=(8, 32, 32))
    return cam["raymap"], cam["chunk_plucker"]


def tiny_dit_inputs(batch=2, thw=(3, 4, 6), text_len=8, in_channels=8, caption_channels=32,
                    timesteps=None, seed=100):
    """diffusers forward kwargs of the tiny inputs (B=2, T=3, h=4, w=6, L=8 by default): randn latents and text
    (generator seed 100, latents first), per-frame timesteps [0, 700, ...] (conditioning frame 0), a text mask
    with the last 3 positions of sample 0 padded, camera raymap + Plücker map repeated over the batch."""
    T, h, w = thw
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, T, h, w, generator=g)
    text = torch.randn(batch, 1, text_len, caption_channels, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    mask[0, text_len - 3:] = 0
    t = torch.tensor(timesteps if timesteps is not None else [0.0] + [700.0] * (T - 1))
    raymap, plucker = tiny_camera(thw)
    return dict(hidden_states=x, timestep=t.expand(batch, 1, T).clone(), encoder_hidden_states=text,
                encoder_attention_mask=mask, camera_conditions=raymap.expand(batch, T, 20).clone(),
                chunk_plucker=plucker.expand(batch, *plucker.shape).clone(), return_dict=False)


# ---------------------------------------------------------------------------------------------------------------
# refiner.py: tiny diffusers SANA-WM stage-2 refiner (tiny) and a second config.

TINY_REFINER = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                    attention_head_dim=8, cross_attention_dim=16, caption_channels=16, num_layers=2,
                    audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                    audio_attention_head_dim=4, audio_cross_attention_dim=8, rope_type="split",
                    rope_double_precision=True, vae_scale_factors=(8, 32, 32), pos_embed_max_pos=20,
                    base_height=2048, base_width=2048, gated_attn=False, cross_attn_mod=False,
                    timestep_scale_multiplier=1000, causal_offset=1, norm_eps=1e-6)
TINY_CONNECTORS = dict(caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                       video_connector_attention_head_dim=8, video_connector_num_layers=2,
                       video_connector_num_learnable_registers=128, audio_connector_num_attention_heads=2,
                       audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
                       audio_connector_num_learnable_registers=128, connector_rope_base_seq_len=4096,
                       rope_theta=10000.0, rope_double_precision=True, rope_type="split",
                       per_modality_projections=False, proj_bias=False)
# A second config: interleaved RoPE, 3 heads x 4 (inner 12: no identity pad), 3 blocks, 4 Gemma hidden states,
# 64 registers over 128 text tokens, single-precision RoPE frequencies.
OTHER_REFINER = dict(TINY_REFINER, in_channels=4, out_channels=4, num_attention_heads=3, attention_head_dim=4,
                     cross_attention_dim=12, caption_channels=24, num_layers=3, rope_type="interleaved",
                     rope_double_precision=False, norm_eps=1e-5, pos_embed_max_pos=16, base_height=1024)
OTHER_CONNECTORS = dict(TINY_CONNECTORS, caption_channels=24, text_proj_in_factor=4,
                        video_connector_num_attention_heads=3, video_connector_attention_head_dim=8,
                        video_connector_num_layers=1, video_connector_num_learnable_registers=64,
                        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=6,
                        audio_connector_num_learnable_registers=64, connector_rope_base_seq_len=512,
                        rope_type="interleaved")
TINY_REFINER_VARIANTS = {"spec": (TINY_REFINER, TINY_CONNECTORS, 16, 2, 1024),
                         "other": (OTHER_REFINER, OTHER_CONNECTORS, 24, 3, 128)}
TINY_VOCAB = ["<pad>", "<eos>", "<bos>", "<unk>"] + (
    "a the cat dog walks runs on along beach road at sunset dawn slowly quickly camera pans left right "
    "over sea city street red blue car").split()


def tiny_gemma3(hidden_size=16, num_layers=2, seed=0):
    """Gemma3ForConditionalGeneration at the tiny refiner size (its own random init, fp32, eval)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=64, hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8,
                         max_position_embeddings=2048,
                         layer_types=(["sliding_attention", "full_attention"] * num_layers)[:num_layers]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(cfg).eval()


def tiny_gemma_tokenizer():
    """Word-level tokenizer with Gemma's special ids (<pad>=0, <eos>=1, <bos>=2, <unk>=3) and a "<bos> $A"
    post-processor: no Gemma vocabulary needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_refiner_pipeline(variant="spec", seed=1):
    """diffusers SanaWMLTX2Refiner (no VAE) at the `variant` config, transformer and connectors re-randomised."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2RefinerTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.sana_wm.refiner import SanaWMLTX2Refiner

    dit_cfg, conn_cfg, hidden, gemma_layers, max_len = TINY_REFINER_VARIANTS[variant]
    transformer = randomize_(SanaWMLTX2RefinerTransformer3DModel(**dit_cfg), seed).eval()
    connectors = randomize_(LTX2TextConnectors(**conn_cfg), seed + 1).eval()
    return SanaWMLTX2Refiner(transformer=transformer, connectors=connectors, tokenizer=tiny_gemma_tokenizer(),
                             text_encoder=tiny_gemma3(hidden, gemma_layers),
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), text_max_sequence_length=max_len)


# === fast.py: fast.head_stream's pipeline composed from the layers' readable pieces ===

def readable_stream(x, table, norm=None, relu=False, scale=1.0, conv=None, matrix=None, conjugate=False, cap=False):
    """What head_stream fuses, as the layers' readable code composes it, for x (B, N, H, D): (out, plain stream,
    (|out| / |plain|)^2 per token and head, or None without matrix). Arguments as head_stream's."""
    import torch.nn.functional as F

    from attention import apply_rope, rms_cap, ucpe
    from gdn import short_conv

    B, N, H, D = x.shape
    y = x.reshape(B, N, H * D)
    if conv is not None:
        taps, T, chunk_size, first_frame = conv
        y = short_conv(y, taps, T, chunk_size, first_frame)
    y = y if norm is None else norm(y)
    plain = (F.relu(y) if relu else y).view(B, N, H, D) * scale
    if matrix is None:
        return apply_rope(plain, table), plain, None
    out = ucpe(plain, matrix, table, conjugate)
    out = rms_cap(plain, out) if cap else out
    return out, plain, (out.norm(dim=-1).clamp_min(1e-6) / plain.norm(dim=-1).clamp_min(1e-6)) ** 2


# === gdn.py: diffusers' bidirectional frame-wise GDN scan (paper Eq. 3, 6) in our (B, N, H, D) layout ===

def diffusers_gdn_bidirectional(q_rot, k_rot, v, beta, decay, q=None, k=None, eps=1e-8):
    """What SanaWMBidirectionalGDNAttention (with q, k) / SanaWMBidirectionalGDNCamAttention (numerator only) do
    after RoPE/UCPE: two `torch_chunk_sana_gdn` (or `torch_chunk_cam_single_path_delta_rule`) scans, the second on
    the `flip_and_shift`-ed sequence, combined. Inputs as `gdn.gdn_scan`; runs in the inputs' float dtype
    (upcast bf16 to float32 as diffusers does); returns (B, N, H, D) in v.dtype."""
    from diffusers.models.transformers.transformer_sana_wm import (
        flip_and_shift, torch_chunk_cam_single_path_delta_rule, torch_chunk_sana_gdn)

    B, N, H, D = v.shape
    T = decay.shape[1]
    S = N // T
    up = lambda x: x if x.dtype == torch.float64 else x.float()  # noqa: E731
    hdn = lambda x: up(x).permute(0, 2, 3, 1)                       # (B, H, D, N)  # noqa: E731
    frames = lambda x: x.reshape(B, H, x.shape[2], T, S).permute(0, 1, 3, 2, 4)  # (B, H, T, D, S)  # noqa: E731
    tokens = lambda x: x.permute(0, 1, 3, 2, 4).reshape(B, H, x.shape[3], N)    # noqa: E731
    flip_back = lambda x: torch.flip(x.reshape(B, H, x.shape[2], T, S), [3]).reshape(B, H, x.shape[2], N)  # noqa: E731
    rev = lambda x: tokens(torch.flip(frames(x), [2]))             # queries: time-reversed  # noqa: E731
    shift = lambda x: tokens(flip_and_shift(frames(x), 2, 0.0))     # keys/values: reversed, shifted  # noqa: E731
    be = up(beta).permute(0, 2, 1).reshape(B, H, T, S)
    de = up(decay).permute(0, 2, 1)
    be_b, de_b = flip_and_shift(be, 2, 0.0), flip_and_shift(de, 2, 1.0)
    qr, kr, vv = hdn(q_rot), hdn(k_rot), hdn(v)
    if q is None:
        fwd = torch_chunk_cam_single_path_delta_rule(qr, kr, vv, be, de)
        bwd = torch_chunk_cam_single_path_delta_rule(rev(qr), shift(kr), shift(vv), be_b, de_b)
        out = fwd + flip_back(bwd)
    else:
        qq, kk = hdn(q), hdn(k)
        num_f, den_f = torch_chunk_sana_gdn(qq, kk, vv, qr, kr, be, de, return_components=True)
        num_b, den_b = torch_chunk_sana_gdn(rev(qq), shift(kk), shift(vv), rev(qr), shift(kr), be_b, de_b,
                                            return_components=True)
        out = (num_f + flip_back(num_b)) / (den_f + flip_back(den_b) + eps)
    return out.permute(0, 3, 1, 2).to(v.dtype)


# ---- vae.py (issue 5): the LTX-2 video VAE, diffusers AutoencoderKLLTX2Video (tiny) ---------------------------

# The smallest config with every structural feature of the release VAE; 1,469,157 parameters.
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=8,
    block_out_channels=(16, 32, 64, 64), down_block_types=("LTX2VideoDownBlock3D",) * 4,
    decoder_block_out_channels=(16, 32, 64),
    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
    spatio_temporal_scaling=(True,) * 4, decoder_spatio_temporal_scaling=(True,) * 3,
    decoder_inject_noise=(False,) * 4,
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_type=("spatiotemporal",) * 3, upsample_residual=(True,) * 3, upsample_factor=(2, 2, 2),
    timestep_conditioning=False, patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, scaling_factor=1.0,
    encoder_causal=True, decoder_causal=False,
    encoder_spatial_padding_mode="zeros", decoder_spatial_padding_mode="reflect",
    spatial_compression_ratio=32, temporal_compression_ratio=8)

# The release VAE is the class defaults plus these (its vae/config.json).
RELEASE_VAE = dict(decoder_causal=False, spatial_compression_ratio=32, temporal_compression_ratio=8)


def build_tiny_vae(seed: int = 0, **overrides):
    """diffusers' AutoencoderKLLTX2Video at TINY_VAE updated by `overrides`, fp32, eval mode, every weight
    re-randomised (randomize_) and non-trivial latents_mean (N(0, 0.5^2)) / latents_std (U(0.5, 1.5))."""
    from diffusers import AutoencoderKLLTX2Video

    vae = randomize_(AutoencoderKLLTX2Video(**{**TINY_VAE, **overrides}), seed).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        vae.latents_mean.copy_(0.5 * torch.randn(vae.latents_mean.shape, generator=g))
        vae.latents_std.copy_(0.5 + torch.rand(vae.latents_std.shape, generator=g))
    return vae


def vae_from_diffusers(ref):
    """Our vae.VAE with the config and (copied) weights of a diffusers AutoencoderKLLTX2Video."""
    from vae import VAE, VAEConfig

    ours = VAE(VAEConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(next(ref.parameters()).dtype).eval()


def load_sana_wm_native(folder, dtype=torch.float32, device="cpu", **config):
    """diffusers' SanaWMTransformer3DModel (release config unless overridden) loaded from the native release
    layout: the *.safetensors in `folder` with the diffusers keys + an unused `pos_embed`. Built on the meta
    device; the RoPE table, a plain attribute there, is rebuilt on the CPU afterwards."""
    from pathlib import Path

    from diffusers.models.transformers.transformer_sana_wm import SanaWMRotaryPosEmbed, SanaWMTransformer3DModel
    from safetensors import safe_open

    with torch.device("meta"):
        model = SanaWMTransformer3DModel(**config)
    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            state.update({k: f.get_tensor(k).to(dtype) for k in f.keys() if k != "pos_embed"})
    model.load_state_dict(state, strict=True, assign=True)
    model.rope = SanaWMRotaryPosEmbed(model.config.linear_head_dim, tuple(model.config.patch_size), 1024)
    return model.eval()
