"""refiner.py against diffusers 0.42.1 (function by function): RoPE tables, one transformer forward, the text path
(connectors alone and prompt → embeddings through a tiny Gemma-3), the whole block-by-block refinement of a 15-frame
latent at the tiny config of §12 and at a second config, and that loop driven one block per call (RefinerStream);
LoRA; the release layout; full-config keys and shapes."""
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers.pipelines.sana_wm.refiner import _pack_text_embeds

import refiner as R
from reference import TINY_REFINER_VARIANTS, max_rel_err, randomize_, tiny_refiner_pipeline

TOL = 1e-5          # max abs difference in float32 (issue 7)
SPEC = Path(__file__).parent / "data"  # the release's key lists (tests/data)
PROMPT = "a red car drives along the beach at sunset slowly"   # 9 words: 10 tokens with <bos>, 1014 pad


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


@pytest.fixture(scope="module", params=["spec", "other"])
def pipe(request):
    """(variant, diffusers SanaWMLTX2Refiner, our Refiner and TextConnectors with the same weights)."""
    p = tiny_refiner_pipeline(request.param)
    ours = R.Refiner(R.RefinerConfig.from_dict(dict(p.transformer.config)), keep_audio=True)
    ours.load_state_dict(p.transformer.state_dict(), strict=True)
    conn = R.TextConnectors(R.ConnectorsConfig.from_dict(dict(p.connectors.config)), keep_audio=True)
    conn.load_state_dict(p.connectors.state_dict(), strict=True)
    return request.param, p, ours.eval(), conn.eval()


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Positions and one forward

def test_video_rope_matches_diffusers(pipe):
    _, p, ours, _ = pipe
    for frames, fps in [([0, 1, 2], 16.0), ([5, 9, 10, 30], 24.0), ([-3, -2], 16.0)]:
        cos_r, sin_r = p.transformer.build_rotary_emb_for_absolute_positions(
            batch_size=1, frame_positions=frames, height=2, width=3, device="cpu", fps=fps)
        cos, sin = ours.rope(frames, 2, 3, fps)
        if cos.dim() == 3:      # split: ours (N, H, D/2), theirs (B, H, N, D/2)
            cos_r, sin_r = cos_r[0].transpose(0, 1), sin_r[0].transpose(0, 1)
        else:                   # interleaved: theirs repeats every angle for both members of a pair
            cos_r, sin_r = cos_r[0, :, ::2], sin_r[0, :, ::2]
        assert torch.equal(cos, cos_r) and torch.equal(sin, sin_r)


def test_forward_matches_diffusers(pipe):
    variant, p, ours, _ = pipe
    cfg = ours.cfg
    g = torch.Generator().manual_seed(3)
    B, f, h, w, L = 2, 3, 2, 3, 7
    tokens = torch.randn(B, f * h * w, cfg.in_channels, generator=g)
    text = torch.randn(B, L, cfg.caption_channels, generator=g)
    mask = torch.ones(B, L)
    mask[1, :3] = 0                                    # a real −10000 bias on one sample
    sigma = torch.tensor([0.725, 0.421875])
    frames = [4, 5, 7]
    ref = p.transformer(hidden_states=tokens, encoder_hidden_states=text,
                        timestep=(sigma[:, None] * 1000).expand(B, f * h * w),
                        video_rotary_emb=p.transformer.build_rotary_emb_for_absolute_positions(
                            batch_size=B, frame_positions=frames, height=h, width=w, device="cpu", fps=16.0),
                        encoder_attention_mask=mask, return_dict=False)[0]
    with torch.no_grad():
        out = ours(tokens, sigma * 1000, text, ours.rope(frames, h, w, 16.0), mask)
        per_token = ours(tokens, (sigma[:, None] * 1000).expand(B, f * h * w), text, ours.rope(frames, h, w, 16.0),
                         mask)
    assert max_abs(out, ref) <= TOL, variant
    assert max_abs(per_token, ref) <= TOL


def test_forward_rejects_bad_cache_use(pipe):
    _, _, ours, _ = pipe
    tokens, text = torch.zeros(1, 6, ours.cfg.in_channels), torch.zeros(1, 4, ours.cfg.caption_channels)
    rope = ours.rope([1], 2, 3, 16.0)
    with pytest.raises(ValueError, match="capture"):
        ours(tokens, torch.zeros(1), text, rope, capture="sink")
    with pytest.raises(ValueError, match="capture must be"):
        ours(tokens, torch.zeros(1), text, rope, cache=R.WindowKVCache(ours.cfg.num_layers), capture="pre")
    with pytest.raises(ValueError, match="no sink"):
        ours(tokens, torch.zeros(1), text, rope, cache=R.WindowKVCache(ours.cfg.num_layers))


# ---------------------------------------------------------------------------------------------------------------
# Text path

def test_text_connectors_match_diffusers(pipe):
    variant, p, _, conn = pipe
    cfg = conn.cfg
    L = 2 * cfg.video_connector_num_learnable_registers      # registers repeat twice
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, L, cfg.caption_channels, cfg.text_proj_in_factor, generator=g) * 3 + 1
    lengths = torch.tensor([10, L - 7])
    mask = (torch.arange(L)[None] >= L - lengths[:, None]).long()
    packed = _pack_text_embeds(hidden, lengths, device="cpu", padding_side="left")
    ref, _, ref_mask = p.connectors(packed, mask)
    with torch.no_grad():
        out, out_mask = conn(hidden, mask)
    assert max_abs(out, ref) <= TOL, variant
    assert torch.equal(out_mask, ref_mask) and bool((out_mask == 1).all())


def test_prompt_encoder_matches_diffusers(pipe):
    variant, p, _, conn = pipe
    ref, ref_mask = p._encode_prompt(PROMPT, device=torch.device("cpu"), dtype=torch.float32)
    encoder = R.PromptEncoder(p.tokenizer, p.text_encoder, conn, max_length=p.text_max_sequence_length)
    text, mask = encoder(PROMPT)
    assert text.shape == (1, p.text_max_sequence_length, conn.cfg.caption_channels)
    assert max_abs(text, ref) <= TOL, variant
    assert torch.equal(mask, ref_mask)


def test_text_connectors_reject_bad_input(pipe):
    _, _, _, conn = pipe
    c, n, R_ = conn.cfg.caption_channels, conn.cfg.text_proj_in_factor, conn.cfg.video_connector_num_learnable_registers
    right_padded = torch.zeros(1, R_, dtype=torch.long)
    right_padded[0, :5] = 1
    with pytest.raises(ValueError, match="left-padded"):
        conn(torch.randn(1, R_, c, n), right_padded)
    with pytest.raises(ValueError, match="hidden_states must be"):
        conn(torch.randn(1, R_, c, n + 1), torch.ones(1, R_))
    with pytest.raises(ValueError, match="multiple"):
        conn(torch.randn(1, R_ + 1, c, n), torch.ones(1, R_ + 1))


# ---------------------------------------------------------------------------------------------------------------
# The refinement loop

def _count_attention(monkeypatch):
    """Record the key length of every SDPA call of refiner.py (the window the queries see)."""
    seen = []
    sdpa = R.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, attn_mask=attn_mask)
    monkeypatch.setattr(R.F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("loop", [dict(), dict(sink_size=2, block_size=2, kv_max_frames=5, fps=24.0)],
                         ids=["defaults", "sink2-block2-window5"])
def test_refine_matches_diffusers(pipe, loop, monkeypatch):
    """15 frames, defaults: blocks at 1,4,7,10,13 (last has 2 frames), history trimmed after block 4, sink offset
    0,0,0,0,2. The second loop: sink 2, blocks of 2, window 5 at 24 fps."""
    variant, p, ours, conn = pipe
    loop = dict(dict(sink_size=1, block_size=3, kv_max_frames=11, fps=16.0), **loop)
    z = torch.randn(1, ours.cfg.in_channels, 15, 2, 3, generator=torch.Generator().manual_seed(7))
    ref = p(z, PROMPT, output_type="latent", **loop)                    # default generator: seed 42 on CPU

    text, mask = R.PromptEncoder(p.tokenizer, p.text_encoder, conn, p.text_max_sequence_length)(PROMPT)
    seen = _count_attention(monkeypatch)
    out = R.refine(ours, z, text, mask, **loop)
    assert max_abs(out, ref) <= TOL, variant
    sink = loop["sink_size"]
    assert torch.equal(out[:, :, :sink], z[:, :, :sink])

    # Forward count (1 sink capture + 4 per block; each layer calls SDPA for attn1 then attn2) and the bounded
    # window: a block's queries see at most kv_max_frames cached frames plus the block itself (without the
    # trimming, the last block of the default loop would see 1 + 12 + 2 = 15 > 14 frames).
    tpf, layers = 6, ours.cfg.num_layers
    n_blocks = -(-(15 - sink) // loop["block_size"])
    assert len(seen) == 2 * layers * (1 + 4 * n_blocks)
    self_attn_keys = [k for i, (_, k) in enumerate(seen) if i % 2 == 0]
    assert max(self_attn_keys) <= (loop["kv_max_frames"] + loop["block_size"]) * tpf


def test_refine_explicit_generator_and_bad_input(pipe):
    _, _, ours, _ = pipe
    c, L = ours.cfg.in_channels, ours.cfg.caption_channels
    z, text = torch.randn(1, c, 5, 2, 3), torch.randn(1, 4, L)
    a = R.refine(ours, z, text, fps=16, generator=torch.Generator().manual_seed(42))
    b = R.refine(ours, z, text, fps=16)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="latents"):
        R.refine(ours, z[0], text, fps=16)
    with pytest.raises(ValueError, match="text"):
        R.refine(ours, z, text[:, :, :-1], fps=16)
    with pytest.raises(ValueError, match="text_mask"):           # (B, 1) would broadcast over the text keys
        R.refine(ours, z, text, torch.ones(1, 1), fps=16)
    with pytest.raises(ValueError, match="sink_size"):
        R.refine(ours, z, text, fps=16, sink_size=5)
    with pytest.raises(ValueError, match="sigmas"):
        R.refine(ours, z, text, fps=16, sigmas=(0.9, 0.95, 0.0))
    with pytest.raises(ValueError, match="fps"):
        R.refine(ours, z, text, fps=0)


@pytest.mark.parametrize("kv_max_frames", [11, 3], ids=["window11", "window3-trimmed"])
def test_stream_block_by_block_equals_refine(pipe, kv_max_frames):
    """Stage-1 chunks fed one by one as they would arrive (T = 1 + 3 + 3 + 2: the last block partial) give refine()'s
    whole-video result and diffusers'; with kv_max_frames = 3 the history is trimmed to 2 frames after every block."""
    variant, p, ours, conn = pipe
    z = torch.randn(1, ours.cfg.in_channels, 9, 2, 3, generator=torch.Generator().manual_seed(8))
    loop = dict(fps=16.0, block_size=3, kv_max_frames=kv_max_frames)
    ref = p(z, PROMPT, output_type="latent", sink_size=1, **loop)             # default generator: seed 42 on CPU
    text, mask = R.PromptEncoder(p.tokenizer, p.text_encoder, conn, p.text_max_sequence_length)(PROMPT)
    whole = R.refine(ours, z, text, mask, **loop, generator=torch.Generator().manual_seed(42))
    stream = R.RefinerStream(ours, z[:, :, :1].clone(), text, mask, **loop, generator=torch.Generator().manual_seed(42))
    blocks, hist = [z[:, :, :1]], []
    for s, e in [(1, 4), (4, 7), (7, 9)]:
        assert stream.next_frame == s
        blocks.append(stream.refine(z[:, :, s:e].clone()))
        assert max_abs(blocks[-1], whole[:, :, s:e]) <= TOL
        hist.append(stream.cache.layers[0].hist_k.shape[1] // (2 * 3))     # h·w = 6 tokens per frame
    assert hist == ([3, 6, 8] if kv_max_frames == 11 else [2, 2, 2])
    assert max_abs(torch.cat(blocks, dim=2), ref) <= TOL, variant
    assert max_abs(whole, ref) <= TOL, variant


def test_stream_refuses_out_of_order_and_bad_input(pipe):
    """Refused blocks change nothing (no ε drawn, no K/V kept): the valid blocks after them still equal refine()."""
    _, _, ours, _ = pipe
    c, L = ours.cfg.in_channels, ours.cfg.caption_channels
    g = torch.Generator().manual_seed(9)
    z, text = torch.randn(1, c, 6, 2, 3, generator=g), torch.randn(1, 4, L, generator=g)
    whole = R.refine(ours, z, text, fps=16)
    stream = R.RefinerStream(ours, z[:, :, :1], text, fps=16)
    with pytest.raises(ValueError, match="block has 4 frames, more than block_size=3"):
        stream.refine(z[:, :, 1:5])
    with pytest.raises(ValueError, match="block must be"):
        stream.refine(z[:, :, 1:4, :1])                                      # another height than the sink's
    with pytest.raises(ValueError, match="block must be"):
        stream.refine(z[0, :, 1:4])
    with pytest.raises(ValueError, match="block must be"):
        stream.refine(z[:, :, 1:1])
    assert max_abs(stream.refine(z[:, :, 1:4]), whole[:, :, 1:4]) <= TOL
    assert max_abs(stream.refine(z[:, :, 4:6]), whole[:, :, 4:6]) <= TOL    # partial: the video's last block
    with pytest.raises(ValueError, match="block: the previous block had fewer"):
        stream.refine(z[:, :, 4:6])
    assert stream.next_frame == 6
    with pytest.raises(ValueError, match="sink"):
        R.RefinerStream(ours, z[0, :, :1], text, fps=16)
    with pytest.raises(ValueError, match="text"):
        R.RefinerStream(ours, z[:, :, :1], text[:, :, :-1], fps=16)
    with pytest.raises(ValueError, match="block_size"):
        R.RefinerStream(ours, z[:, :, :1], text, fps=16, block_size=0)
    with pytest.raises(ValueError, match="fps"):
        R.RefinerStream(ours, z[:, :, :1], text, fps=-1)


# ---------------------------------------------------------------------------------------------------------------
# LoRA

def _lora_model(seed=11):
    cfg = R.RefinerConfig.from_dict(TINY_REFINER_VARIANTS["spec"][0])
    return randomize_(R.Refiner(cfg), seed).eval()


def _lora_inputs(model):
    g = torch.Generator().manual_seed(12)
    cfg = model.cfg
    return (torch.randn(2, 12, cfg.in_channels, generator=g), torch.tensor([400.0, 900.0]),
            torch.randn(2, 5, cfg.caption_channels, generator=g), model.rope([3, 4], 2, 3, 16.0))


def test_lora_zero_init_is_identity_and_wraps_the_ten_linears():
    model = _lora_model()
    x = _lora_inputs(model)
    with torch.no_grad():
        before = model(*x)
        names = R.add_lora(model, rank=4, alpha=8)
        after = model(*x)
    assert len(names) == 10 * model.cfg.num_layers
    assert torch.equal(before, after)
    keys = set(model.state_dict())
    assert "transformer_blocks.0.attn1.to_out.0.weight" in keys          # the base keys are unchanged
    assert "transformer_blocks.1.ff.net.2.lora_B.weight" in keys


def test_lora_merge_equals_adapter_forward_and_unmerge_restores():
    model = _lora_model()
    x = _lora_inputs(model)
    R.add_lora(model, rank=4, alpha=8)
    randomize_(model, seed=13)           # every adapter's B non-zero
    adapters = [m for m in model.modules() if isinstance(m, R.LoRALinear)]
    weights = [m.weight.clone() for m in adapters]
    with torch.no_grad():
        adapted = model(*x)
        for m in adapters:
            m.merge()
        merged = model(*x)
        with pytest.raises(ValueError, match="already merged"):
            adapters[0].merge()
        for m in adapters:
            m.unmerge()
        unmerged = model(*x)
        for m in adapters:
            m.lora_B.weight.zero_()
        plain = model(*x)
    assert max_abs(merged, adapted) <= 1e-6
    assert max_abs(unmerged, adapted) <= 1e-6
    assert all(max_abs(m.weight, w) <= 1e-6 for m, w in zip(adapters, weights))
    assert max_abs(plain, adapted) > 1e-3        # the adapters did change the output


def test_lora_rank_384_adapter_size_at_full_config():
    """The paper's rank-384 adapter on the 10 linears of the 48 blocks: 1.964 B parameters (≈ 3.9 GB in bf16, the
    size of paper App. A, showing that the release ships it merged)."""
    with torch.device("meta"):
        model = R.Refiner()
    R.add_lora(model)
    n = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    assert n == 48 * 384 * (8 * (4096 + 4096) + 2 * (4096 + 16384))


def test_lora_save_load_round_trip(tmp_path):
    model = _lora_model()
    R.add_lora(model, rank=3, alpha=6)
    randomize_(model, seed=14)
    R.save_lora(model, tmp_path / "adapter.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert all(".lora_" in k for k in f.keys()) and len(list(f.keys())) == 2 * 10 * model.cfg.num_layers

    fresh = _lora_model()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    names = R.load_lora(fresh, tmp_path / "adapter.safetensors")
    assert len(names) == 10 * model.cfg.num_layers
    assert model.state_dict().keys() == fresh.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    m = fresh.get_submodule(names[0])
    assert (m.rank, m.alpha) == (3, 6.0)
    x = _lora_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(*x), fresh(*x))
    with pytest.raises(ValueError, match="no LoRALinear"):
        R.save_lora(_lora_model(), tmp_path / "none.safetensors")


def test_lora_load_into_existing_adapters_and_bad_files(tmp_path):
    from safetensors.torch import save_file
    model = _lora_model()
    R.add_lora(model, rank=3, alpha=6)
    randomize_(model, seed=15)
    file = tmp_path / "adapter.safetensors"
    R.save_lora(model, file)
    x = _lora_inputs(model)

    same = _lora_model()                      # unmerged adapters of the file's rank/alpha: loaded in place
    same.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    R.add_lora(same, rank=3, alpha=6)
    R.load_lora(same, file)
    with torch.no_grad():
        assert torch.equal(model(*x), same(*x))
    other_alpha = _lora_model()               # the file's alpha=6 would be silently replaced by 3
    R.add_lora(other_alpha, rank=3, alpha=3)
    with pytest.raises(ValueError, match="adapter.safetensors.*alpha"):
        R.load_lora(other_alpha, file)
    merged = _lora_model()                    # forward never reads a merged adapter's A/B
    R.add_lora(merged, rank=3, alpha=6)
    for m in merged.modules():
        if isinstance(m, R.LoRALinear):
            m.merge()
    with pytest.raises(ValueError, match="adapter.safetensors.*merged"):
        R.load_lora(merged, file)

    meta = {"rank": "3", "alpha": "6.0"}
    for key in ("single_transformer_blocks.0.attn.to_q.lora_A.weight",   # another model's layer
                "transformer_blocks.0.attn1.to_q.weight"):               # not an adapter tensor
        save_file({key: torch.zeros(3, 16)}, tmp_path / "foreign.safetensors", metadata=meta)
        with pytest.raises(ValueError) as err:
            R.load_lora(_lora_model(), tmp_path / "foreign.safetensors")
        assert "foreign.safetensors" in str(err.value) and key in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# State dicts and loading

def _spec_list(name):
    rows = [line.split() for line in (SPEC / name).read_text().splitlines() if line.strip()]
    return {k: tuple(int(s) for s in shape.split("x")) for k, shape in rows}


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_config_keys_and_shapes():
    full = _spec_list("refiner_state_dict_full.txt")
    with torch.device("meta"):
        everything, video = R.Refiner(keep_audio=True), R.Refiner()
        conn_all, conn_video = R.TextConnectors(keep_audio=True), R.TextConnectors()
    assert _shapes(everything) == full
    video_keys = {k: s for k, s in full.items()
                  if not any(a in k for a in ("audio", "av_cross", "video_to_audio", "video_a2v"))}
    assert _shapes(video) == video_keys and len(video_keys) == 1215
    n_all = sum(p.numel() for p in everything.parameters())
    n_video = sum(p.numel() for p in video.parameters())
    assert round(n_all / 1e9, 3) == 18.876 and round(n_video / 1e9, 3) == 13.042     # audio: 5.835 B skipped

    conn = _spec_list("refiner_connectors_state_dict_full.txt")
    assert _shapes(conn_all) == conn
    assert _shapes(conn_video) == {k: s for k, s in conn.items() if not k.startswith("audio_connector")}


def _save_release(p, root: Path):
    """The release refiner/ layout, written by diffusers itself."""
    p.transformer.save_pretrained(root / "transformer")
    p.connectors.save_pretrained(root / "connectors")
    p.text_encoder.save_pretrained(root / "text_encoder")
    p.tokenizer.save_pretrained(root / "tokenizer")


def test_release_layout_loads(tmp_path):
    p = tiny_refiner_pipeline("spec")
    _save_release(p, tmp_path / "refiner")
    video = R.Refiner.from_pretrained(tmp_path / "refiner", dtype=torch.float32)
    full = R.Refiner.from_pretrained(tmp_path / "refiner" / "transformer", dtype=torch.float32, keep_audio=True)
    assert not any("audio" in k for k in video.state_dict())
    for k, v in p.transformer.state_dict().items():
        assert torch.equal(full.state_dict()[k], v), k
    encoder = R.PromptEncoder.from_pretrained(tmp_path / "refiner", dtype=torch.float32)
    text, mask = encoder(PROMPT)
    ref_text, _ = p._encode_prompt(PROMPT, device=torch.device("cpu"), dtype=torch.float32)
    assert max_abs(text, ref_text) <= TOL

    z = torch.randn(1, 8, 6, 2, 3, generator=torch.Generator().manual_seed(9))
    ref = p(z, PROMPT, fps=16, output_type="latent")
    assert max_abs(R.refine(video, z, text, mask, fps=16), ref) <= TOL
    assert max_abs(R.refine(full, z, text, mask, fps=16), ref) <= TOL

    half = R.Refiner.from_pretrained(tmp_path / "refiner", dtype=torch.bfloat16)
    assert half.proj_in.weight.dtype == torch.bfloat16


def test_release_layout_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    p = tiny_refiner_pipeline("spec")
    _save_release(p, tmp_path)
    file = next((tmp_path / "transformer").glob("*.safetensors"))
    state = load_file(file)
    state["proj_in.bias"] = state["proj_in.bias"][:-1]
    del state["audio_proj_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, file)
    with pytest.raises(ValueError) as err:
        R.Refiner.from_pretrained(tmp_path, dtype=torch.float32)
    msg = str(err.value)
    assert "audio_proj_out.bias" in msg and "extra.weight" in msg and "proj_in.bias" in msg

    cfg_file = tmp_path / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(cfg, gated_attn=True)))
    with pytest.raises(ValueError, match="gated_attn"):
        R.Refiner.from_pretrained(tmp_path)
    cfg_file.write_text(json.dumps(dict(cfg, brand_new_key=1)))
    with pytest.raises(ValueError, match="brand_new_key"):
        R.Refiner.from_pretrained(tmp_path)
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != "rope_type"}))
    with pytest.raises(ValueError, match="rope_type"):
        R.Refiner.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "connectors" / "config.json").read_text())
    with pytest.raises(ValueError, match="no .safetensors"):
        R.TextConnectors.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="missing config"):
        R.TextConnectors.from_pretrained(tmp_path / "tokenizer")


def test_release_layout_unreadable_file(tmp_path):
    """A corrupt .safetensors file is a ValueError naming it (the CLI reports ValueErrors), not SafetensorError."""
    refiner_cfg, connectors_cfg = TINY_REFINER_VARIANTS["spec"][:2]
    for name, cfg, cls in (("transformer", refiner_cfg, R.Refiner), ("connectors", connectors_cfg, R.TextConnectors)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        (tmp_path / name / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
        with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
            cls.from_pretrained(tmp_path, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The release (skipped without SANA_WM_WEIGHTS)

def _diffusers_video_rope(ref, cfg: R.RefinerConfig, frames, h, w, fps):
    """diffusers' absolute-position RoPE without building its 19 B-parameter model: the method only reads .rope."""
    import types
    rope = ref.SanaWMLTX2AudioVideoRotaryPosEmbed(
        dim=cfg.inner_dim, base_num_frames=cfg.pos_embed_max_pos, base_height=cfg.base_height,
        base_width=cfg.base_width, scale_factors=cfg.vae_scale_factors, theta=cfg.rope_theta,
        causal_offset=cfg.causal_offset, double_precision=cfg.rope_double_precision, rope_type=cfg.rope_type,
        num_attention_heads=cfg.num_attention_heads)
    return ref.SanaWMLTX2RefinerTransformer3DModel.build_rotary_emb_for_absolute_positions(
        types.SimpleNamespace(rope=rope), batch_size=1, frame_positions=frames, height=h, width=w, device="cpu",
        fps=fps)


@pytest.mark.weights
def test_release_block_matches_diffusers():
    """Block 0 of the release refiner/transformer in fp32, ours vs diffusers' block, on random inputs attending to
    a filled sink + history cache (only that block's tensors are read from the release)."""
    from diffusers.models.transformers import transformer_sana_wm_refiner as ref
    from safetensors import safe_open

    folder = Path(os.environ["SANA_WM_WEIGHTS"]) / "refiner" / "transformer"
    cfg = R.RefinerConfig.from_dict(json.loads((folder / "config.json").read_text()))
    prefix = "transformer_blocks.0."
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            state.update({k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)})
    theirs = ref.SanaWMLTX2RefinerTransformerBlock(
        dim=cfg.inner_dim, num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim,
        audio_dim=cfg.audio_num_attention_heads * cfg.audio_attention_head_dim,
        audio_num_attention_heads=cfg.audio_num_attention_heads, audio_attention_head_dim=cfg.audio_attention_head_dim,
        audio_cross_attention_dim=cfg.audio_cross_attention_dim, rope_type=cfg.rope_type, eps=cfg.norm_eps)
    theirs.attn1.set_processor(ref.SanaWMLTX2RefinerAttnProcessor())
    theirs.load_state_dict(state, strict=True)
    ours = R.RefinerBlock(cfg)
    ours.load_state_dict({k: v for k, v in state.items() if k in ours.state_dict()}, strict=True)

    g = torch.Generator().manual_seed(0)
    d, h, w, frames = cfg.inner_dim, 4, 5, [7, 8]
    x = torch.randn(1, len(frames) * h * w, d, generator=g)
    text = torch.randn(1, 16, d, generator=g)
    temb = torch.randn(1, 1, 6 * d, generator=g) * 0.1
    sink_k, sink_v, hist_k, hist_v = (torch.randn(1, h * w * n, d, generator=g) for n in (1, 1, 3, 3))
    layer = ref.SanaWMRefinerKVLayerCache()
    layer.store_sink(sink_k, sink_v)
    layer.store_history(hist_k, hist_v)
    cache = R.WindowKVCache(1)
    cache.layers[0] = R.LayerKV(sink_k, sink_v, hist_k, hist_v)
    cache.sink_rope = R.video_rope([3], h, w, 16.0, cfg)
    with torch.no_grad():
        expected = theirs(x, text, temb, _diffusers_video_rope(ref, cfg, frames, h, w, 16.0),
                          sink_rotary_emb=_diffusers_video_rope(ref, cfg, [3], h, w, 16.0), kv_cache=layer,
                          kv_cache_mode="inject")
        got = ours(x, text, None, temb, R.video_rope(frames, h, w, 16.0, cfg), cache.layers[0], cache)
    assert max_rel_err(got, expected) <= TOL


def test_refine_bf16_matches_diffusers_bit_for_bit():
    """In bf16 both sides run the same operations in the same order and precision (the float32 islands of
    official details: RoPE, RMSNorm statistics, the range-norm mean, the Euler update), so the results are equal."""
    p = tiny_refiner_pipeline("spec")
    ours = R.Refiner(R.RefinerConfig.from_dict(dict(p.transformer.config)))
    ours.load_state_dict({k: v for k, v in p.transformer.state_dict().items() if k in ours.state_dict()})
    conn = R.TextConnectors(R.ConnectorsConfig.from_dict(dict(p.connectors.config)))
    conn.load_state_dict({k: v for k, v in p.connectors.state_dict().items() if k in conn.state_dict()})
    for m in (p.transformer, p.connectors, p.text_encoder, ours, conn):
        m.to(torch.bfloat16)
    ref_text, _ = p._encode_prompt(PROMPT, device=torch.device("cpu"), dtype=torch.bfloat16)
    text, mask = R.PromptEncoder(p.tokenizer, p.text_encoder, conn, p.text_max_sequence_length)(PROMPT)
    assert text.dtype == torch.bfloat16 and torch.equal(text, ref_text)
    z = torch.randn(1, 8, 8, 2, 3, generator=torch.Generator().manual_seed(7))
    out = R.refine(ours, z, text, mask, fps=16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, p(z, PROMPT, fps=16, output_type="latent"))
