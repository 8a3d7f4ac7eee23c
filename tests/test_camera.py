"""camera.py against diffusers 0.42.1 (its camera utilities): action roll-outs, frame snapping, intrinsics handling, the
first-frame preprocessing, raymap / Plücker packing and the UCPE ray matrices; the official action DSL v2 against
the official demo trajectories (tests/data) and its worked values; then every bad input."""
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.transformers import transformer_sana_wm as ref_dit
from diffusers.pipelines.sana_wm import cam_utils as ref
from diffusers.pipelines.sana_wm.image_processor import SanaWMImageProcessor
from diffusers.pipelines.sana_wm.pipeline_sana_wm import SanaWMPipeline
from PIL import Image

import camera

TOL = 1e-6  # max abs difference allowed in float32 (issue 2); everything below is in fact bit-exact
SEEDS = range(10)


def random_action(rng: np.random.Generator, segments: int = 25) -> str:
    """A long action string using every key, idle frames, upper case, blanks and the full-width comma."""
    parts = []
    for _ in range(segments):
        keys = "".join(rng.choice(list("wasdijkl"), size=rng.integers(1, 5)))
        keys = rng.choice([keys, keys.upper(), "none", "NONE", ""], p=[0.7, 0.1, 0.1, 0.05, 0.05])
        parts.append(f"{keys}-{rng.integers(1, 40)}" + rng.choice(["", " ", "\t"]))
    return "".join(p + rng.choice([",", "，", " , "]) for p in parts[:-1]) + parts[-1]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def random_c2w(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    c2w = np.tile(np.eye(4), (num_frames, 1, 1))
    for pose in c2w:
        pose[:3, :3], pose[:3, 3] = random_rotation(rng), rng.normal(scale=2.0, size=3)
    return c2w.astype(np.float32)


def random_intrinsics(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """Per-frame [fx, fy, cx, cy] with fields of view between 40 and 100 degrees and off-centre principal points."""
    fov = np.radians(rng.uniform(40, 100, size=(num_frames, 2)))
    fx, fy = width / (2 * np.tan(fov[:, 0] / 2)), height / (2 * np.tan(fov[:, 1] / 2))
    cx, cy = width * rng.uniform(0.4, 0.6, num_frames), height * rng.uniform(0.4, 0.6, num_frames)
    return np.stack([fx, fy, cx, cy], axis=1).astype(np.float32)


def as_form(rng: np.random.Generator, k: np.ndarray, form: str):
    """k (F, 4) in one of the four accepted forms: (4,), (F, 4), (3, 3) or (F, 3, 3)."""
    mats = np.tile(np.eye(3, dtype=np.float32), (len(k), 1, 1))
    mats[:, 0, 0], mats[:, 1, 1], mats[:, 0, 2], mats[:, 1, 2] = k.T
    return {"vec": k[0], "per_frame_vec": k, "K": mats[0], "per_frame_K": mats}[form]


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---------------------------------------------------------------------------------------------- §1 actions

@pytest.mark.parametrize("seed", SEEDS)
def test_parse_action_matches_reference(seed):
    action = random_action(np.random.default_rng(seed))
    assert [sorted(keys) for keys in camera.parse_action(action)] == ref._parse_action_string(action)


@pytest.mark.parametrize("seed", SEEDS)
def test_action_to_c2w_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    # Long pitch holds against small limits make the pitch limit reject steps in every seed.
    action = random_action(rng) + ",i-60,kw-5,k-90,il-30"
    speeds = dict(translation_speed=float(rng.uniform(0.01, 0.2)), rotation_speed_deg=float(rng.uniform(0.5, 5)),
                  pitch_limit_deg=float(rng.choice([5.0, 30.0, 85.0])))
    ours = camera.action_to_c2w(action, scheme="legacy", **speeds)
    theirs = ref.action_string_to_c2w(action, **speeds)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (len(camera.parse_action(action)) + 1, 4, 4)
    assert max_diff(ours, theirs) <= TOL


def test_legacy_action_semantics():
    forward = lambda c2w: c2w[-1, :3, 2]  # noqa: E731
    walk = camera.action_to_c2w("w-5", translation_speed=0.1, scheme="legacy")
    assert walk.shape == (6, 4, 4) and np.allclose(walk[:, :3, :3], np.eye(3)) and np.isclose(walk[-1, 2, 3], 0.5)
    assert np.array_equal(camera.action_to_c2w("none-3", scheme="legacy"),
                          np.tile(np.eye(4, dtype=np.float32), (4, 1, 1)))
    assert forward(camera.action_to_c2w("i-1", scheme="legacy"))[1] < 0  # look up = towards -y (y points down)
    assert forward(camera.action_to_c2w("l-1", scheme="legacy"))[0] > 0  # turn right = towards +x
    assert camera.action_to_c2w("d-1", scheme="legacy")[-1, 0, 3] > 0  # strafe right
    # Pitch stops at the last whole 1.2-degree step inside 85 degrees (70 steps = 84), and moving stays level.
    looked_up = camera.action_to_c2w("i-100,w-10", scheme="legacy")
    assert np.isclose(np.degrees(np.arcsin(-forward(looked_up)[1])), 84.0, atol=1e-3)
    assert np.allclose(looked_up[:, 1, 3], 0) and looked_up[-1, 2, 3] > 0.49


# ---------------------------------------------------------------------------------------------- §1 the action DSL v2

DATA = Path(__file__).parent / "data"
OFFICIAL_DEMOS = [  # the official gallery's action strings and speeds (NVlabs/Sana docs/sana_wm.md)
    ("w-100,dw-60,w-100,aw-60", {}, 321),
    ("w-35,aw-60,dw-100,aw-55,w-25,none-50", {}, 326),
    ("w-25,aw-60,dw-100,aw-55,none-85", {"translation_speed": 0.015}, 326),
]


def yaw_deg(c2w: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(c2w[:, 0, 2].astype(np.float64), c2w[:, 2, 2]))


@pytest.mark.parametrize("demo", range(len(OFFICIAL_DEMOS)))
def test_v2_reproduces_the_official_demo_trajectories(demo):
    action, speeds, num_poses = OFFICIAL_DEMOS[demo]
    official = np.load(DATA / f"demo_{demo}_pose.npy")
    ours = camera.action_to_c2w(action, **speeds)
    assert official.shape == ours.shape == (num_poses, 4, 4) and ours.dtype == np.float32
    assert max_diff(ours, official) <= TOL
    assert max_diff(camera.action_to_c2w(action, scheme="legacy", **speeds), official) > 0.1


def test_v2_worked_values():
    """Values of the official roll-out: snapping on a press, coasting after a release or while both of two opposite
    keys were held, the saturating pitch limit, and the pressed key's snap cutting a coast short."""
    coast = camera.action_to_c2w("w-3,none-3")
    assert np.allclose(coast[:, 2, 3], [0, 0.025, 0.0499999, 0.0749999, 0.0984852, 0.1205476, 0.1412733], atol=1e-6)
    assert np.array_equal(coast[:, :3, :3], np.tile(np.eye(3, dtype=np.float32), (7, 1, 1)))
    assert np.allclose(yaw_deg(camera.action_to_c2w("d-2,none-2")), [0, 0.6, 1.2, 1.7636479, 2.2931457], atol=1e-5)
    assert np.allclose(yaw_deg(camera.action_to_c2w("ad-5,a-5")), [0] * 6 + [-0.0778052, -0.2233261, -0.4277817,
                                                                             -0.6835297, -0.9839185], atol=1e-5)
    strafe = camera.action_to_c2w("wl-4")[:, :3, 3]  # j/l strafe in v2
    assert np.allclose(strafe, np.arange(5)[:, None] * [0.025, 0, 0.025], atol=1e-6)
    assert np.isclose(yaw_deg(camera.action_to_c2w("d-16"))[-1], 9.6, atol=1e-5)
    assert np.isclose(yaw_deg(camera.action_to_c2w("d-16,none-64"))[-1], 18.732733, atol=1e-5)
    assert np.allclose(yaw_deg(camera.action_to_c2w("d-16,w-5"))[16:], 9.6, atol=1e-5)  # w's press zeroes the yaw
    looked_up = camera.action_to_c2w("i-200")[-1]
    assert np.isclose(np.degrees(np.arcsin(-looked_up[1, 2])), 60.0, atol=1e-4)  # saturated, not dropped at 59.4
    stream = camera.action_to_c2w("w-80,dw-40,w-80,aw-40")
    assert np.allclose(yaw_deg(stream)[[80, 120, 160, 200, 240]], [0, 24, 32.53948, 33.24044, 9.24044], atol=1e-4)
    assert np.allclose(stream[-1, :3, 3], [1.61087, 0, 5.600827], atol=1e-5)
    assert np.isclose(camera.action_to_c2w("w-10", translation_speed=0.1)[-1, 2, 3], 0.999999, atol=1e-7)
    # a/d turn and j/l strafe in v2; the legacy scheme swaps them.
    assert yaw_deg(camera.action_to_c2w("a-3"))[-1] < 0 and camera.action_to_c2w("j-3")[-1, 0, 3] < 0
    assert np.allclose(camera.action_to_c2w("j-3")[:, :3, :3], np.eye(3))
    assert np.allclose(camera.action_to_c2w("a-3", scheme="legacy")[:, :3, :3], np.eye(3))


def test_action_scheme_matters():
    for action in ("w-5,d-5", "j-1", "ad-3,a-1", "WL-2", "jl-2,none-3,l-1"):
        assert camera.action_scheme_matters(action), action
    for action in ("w-10,none-5", "wsik-4", "ad-5", "jl-5,wi-3", "ADJL-2", "none-3"):
        assert not camera.action_scheme_matters(action), action


def test_huge_action_is_refused_at_once():
    for action in ("w-99999999", "w-99999999999999999999", f"w-{camera.MAX_ACTION_FRAMES},s-1"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match="MAX_ACTION_FRAMES"):
            camera.action_to_c2w(action)
        assert time.perf_counter() - start < 1.0
    assert len(camera.parse_action(f"w-{camera.MAX_ACTION_FRAMES - 1},s-1")) == camera.MAX_ACTION_FRAMES


# ---------------------------------------------------------------------------------------------- §2 frames, intrinsics

def test_snap_num_frames_matches_reference():
    for stride in (4, 8):
        for n in range(-2, 200):
            for upper in (None, n, n + 2, n + 20):
                assert camera.snap_num_frames(n, stride, upper) == ref.snap_num_frames(n, stride, upper_bound=upper)
    assert [camera.snap_num_frames(n) for n in (2, 10, 80, 100)] == [1, 9, 81, 97]
    assert camera.snap_num_frames(100, upper_bound=100) == 97


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("form", ["vec", "per_frame_vec", "K", "per_frame_K"])
def test_prepare_trajectory_matches_pipeline(seed, form):
    rng = np.random.default_rng(200 + seed)
    c2w = camera.action_to_c2w(random_action(rng, 3)) if seed % 2 else random_c2w(rng, int(rng.integers(2, 60)))
    num_frames = int(rng.integers(1, len(c2w) + 1))
    intrinsics = as_form(rng, random_intrinsics(rng, len(c2w), 480, 640), form)
    pipe = types.SimpleNamespace(vae_temporal_compression_ratio=8)
    their_c2w, their_k = SanaWMPipeline.prepare_camera_trajectory(pipe, c2w, None, intrinsics, num_frames)
    our_c2w, our_k = camera.prepare_trajectory(c2w, intrinsics, num_frames)
    assert our_c2w.shape == their_c2w.shape and our_k.shape == their_k.shape == (len(our_c2w), 4)
    assert max_diff(our_c2w, their_c2w) == 0 and max_diff(our_k, their_k) == 0


def test_field_of_view():
    fov_x, fov_y = camera.field_of_view([640.0, 240.0, 0.0, 0.0], width=1280, height=480)
    assert np.isclose(fov_x, 90.0) and np.isclose(fov_y, 90.0)
    fov_x, _ = camera.field_of_view(np.array([[640.0, 240.0, 0, 0], [1280 / (2 * np.tan(np.radians(30))), 240, 0, 0]]),
                                    width=1280, height=480)
    assert np.allclose(fov_x, [90.0, 60.0])
    camera.check_field_of_view([640.0, 240.0, 640.0, 240.0], 1280, 480)  # 90 x 90 degrees passes


# ---------------------------------------------------------------------------------------------- §3 first frame

@pytest.mark.parametrize("seed", SEEDS)
def test_preprocess_image_matches_reference(seed):
    rng = np.random.default_rng(300 + seed)
    height, width = [(64, 96), (96, 64), (64, 64), (32, 128)][seed % 4]
    src_w, src_h = (int(v) for v in rng.integers(20, 220, size=2))
    image = Image.fromarray(rng.integers(0, 256, size=(src_h, src_w, 3), dtype=np.uint8))
    intrinsics = random_intrinsics(rng, int(rng.integers(1, 6)), src_h, src_w)
    pixels, k = camera.preprocess_image(image, intrinsics, height, width)
    their_pixels, their_k = SanaWMImageProcessor().preprocess_with_intrinsics(image, intrinsics, height, width)
    assert pixels.shape == their_pixels.shape == (1, 3, height, width) and pixels.dtype == torch.float32
    assert torch.equal(pixels, their_pixels) and max_diff(k, their_k) == 0
    ours, theirs = camera.resize_and_center_crop(image, height, width), ref.resize_and_center_crop(image, height, width)
    assert ours[1:] == theirs[1:] and np.array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
    their_k = ref.transform_intrinsics_for_crop(intrinsics, *theirs[1:])
    assert max_diff(camera.crop_intrinsics(intrinsics, *ours[1:]), their_k) == 0


# ---------------------------------------------------------------------------------------------- §4 DiT inputs

CAMERA_CASES = [  # (num_frames, (H, W), vae_stride): frame counts 8k+1 and not, non-square sizes, other strides
    (1, (64, 96), (8, 32, 32)), (2, (96, 64), (8, 32, 32)), (5, (160, 96), (8, 32, 32)), (9, (64, 128), (8, 32, 32)),
    (12, (96, 224), (8, 32, 32)), (17, (96, 160), (8, 32, 32)), (30, (64, 96), (8, 32, 32)),
    (41, (128, 96), (8, 32, 32)), (13, (48, 80), (4, 16, 16)), (33, (96, 64), (8, 32, 32)),
]


@pytest.mark.parametrize("seed", range(len(CAMERA_CASES)))
def test_prepare_camera_matches_reference(seed):
    rng = np.random.default_rng(400 + seed)
    num_frames, size, stride = CAMERA_CASES[seed]
    c2w = random_c2w(rng, num_frames) if seed % 3 else camera.action_to_c2w(random_action(rng, 6))[:num_frames]
    intrinsics = random_intrinsics(rng, num_frames, *size)
    raymap, plucker = camera.prepare_camera(c2w, intrinsics, size=size, vae_stride=stride)
    theirs = ref.prepare_camera(c2w, intrinsics, target_size=size, vae_stride=stride)
    t = (num_frames - 1) // stride[0] + 1
    assert raymap.shape == (t, 20) and plucker.shape == (6 * stride[0], t, size[0] // stride[1], size[1] // stride[2])
    assert raymap.dtype == plucker.dtype == torch.float32
    assert max_diff(raymap, theirs["raymap"]) <= TOL and max_diff(plucker, theirs["chunk_plucker"]) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_se3_inverse_matches_reference(seed):
    poses = torch.from_numpy(random_c2w(np.random.default_rng(500 + seed), 16)).reshape(2, 8, 4, 4)
    inverse = camera.se3_inverse(poses)
    assert max_diff(inverse, ref_dit._invert_SE3(poses)) <= TOL and max_diff(inverse, ref._pose_inverse(poses)) <= TOL
    assert torch.allclose(inverse @ poses, torch.eye(4).expand_as(poses), atol=1e-5)


# ---------------------------------------------------------------------------------------------- §6 UCPE

RAY_CASES = [((64, 96), 1, torch.float32), ((96, 160), 1, torch.float32), ((160, 64), 1, torch.float32),
             ((64, 96), 2, torch.float32), ((96, 128), 1, torch.float64)]


@pytest.mark.parametrize("seed", SEEDS)
def test_ray_matrices_matches_reference(seed):
    rng = np.random.default_rng(600 + seed)
    size, patch, dtype = RAY_CASES[seed % len(RAY_CASES)]
    num_frames = int(rng.choice([9, 12, 17, 25]))
    trajectories = [random_c2w(rng, num_frames), camera.action_to_c2w(random_action(rng, 8))[:num_frames]]
    raymap = torch.stack([camera.prepare_camera(c2w, random_intrinsics(rng, num_frames, *size), size=size)[0]
                          for c2w in trajectories]).to(dtype)  # (B=2, T, 20)
    thw = (raymap.shape[1], size[0] // 32 // patch, size[1] // 32 // patch)
    P = camera.ray_matrices(raymap, thw, patch_size=patch)
    their_P, _, their_P_inv, _ = ref_dit._prepare_ucpe_ray_transforms(112, raymap, thw, (1, patch, patch))
    assert P.shape == (2, thw[0] * thw[1] * thw[2], 4, 4) and P.dtype == dtype
    assert max_diff(P, their_P) <= TOL and max_diff(camera.se3_inverse(P), their_P_inv) <= TOL
    # The reference's fx -> FoV -> fx round trip moves P by up to ~1e-6; replicating it makes P bit-identical.
    assert torch.equal(P, their_P)


def test_ray_matrices_geometry():
    """The principal ray's frame is the camera's own frame, so P = inverse(c2w) there; P maps the camera centre to 0."""
    c2w = random_c2w(np.random.default_rng(7), 1)
    k = np.array([[96.0, 64.0, 2.0, 1.0]], dtype=np.float32)  # latent pixels: principal point on token (i=1, j=2)
    raymap = torch.cat([torch.from_numpy(c2w).reshape(1, 16), torch.from_numpy(k)], dim=1)[None]
    P = camera.ray_matrices(raymap, (1, 3, 5)).reshape(3, 5, 4, 4)
    assert torch.allclose(P[1, 2], torch.linalg.inv(torch.from_numpy(c2w[0])), atol=1e-5)
    centre = torch.cat([torch.from_numpy(c2w[0, :3, 3]), torch.ones(1)])
    assert torch.allclose(P @ centre, torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(3, 5, 4), atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input

GOOD_C2W = camera.action_to_c2w("wl-16")
GOOD_K = np.array([500.0, 500.0, 320.0, 240.0], dtype=np.float32)
SCALED, REFLECTED, BAD_ROW, HAS_NAN = (GOOD_C2W.copy() for _ in range(4))
SCALED[3, :3, :3] *= 1.01
REFLECTED[2, :3, 0] *= -1
BAD_ROW[1, 3, 0] = 0.5
HAS_NAN[0, 0, 3] = np.nan
IMAGE = Image.new("RGB", (640, 480))

BAD_INPUTS = [
    # (call, name the message must contain)
    (lambda: camera.parse_action(""), "action"),
    (lambda: camera.parse_action(" \t，"), "action"),
    (lambda: camera.parse_action(None), "action"),
    (lambda: camera.parse_action("w5"), "action"),
    (lambda: camera.parse_action("w-"), "action"),
    (lambda: camera.parse_action("w-0"), "action"),
    (lambda: camera.parse_action("w-x"), "action"),
    (lambda: camera.parse_action("w-1.5"), "action"),
    (lambda: camera.parse_action("w-²"), "action"),
    (lambda: camera.parse_action("q-3"), "action"),
    (lambda: camera.parse_action("w-3,,a-2"), "action"),
    (lambda: camera.parse_action("w-3,"), "action"),
    (lambda: camera.action_to_c2w("wx-3"), "action"),
    (lambda: camera.action_to_c2w("w-3", translation_speed=float("nan")), "translation_speed"),
    (lambda: camera.action_to_c2w("w-3", translation_speed=float("inf")), "translation_speed"),
    (lambda: camera.action_to_c2w("w-3", translation_speed=-0.05), "translation_speed"),
    (lambda: camera.action_to_c2w("w-3", translation_speed=0.0, scheme="legacy"), "translation_speed"),
    (lambda: camera.action_to_c2w("w-3", translation_speed="0.05"), "translation_speed"),
    (lambda: camera.action_to_c2w("d-3", rotation_speed_deg=float("nan")), "rotation_speed_deg"),
    (lambda: camera.action_to_c2w("d-3", rotation_speed_deg=float("-inf")), "rotation_speed_deg"),
    (lambda: camera.action_to_c2w("d-3", rotation_speed_deg=-1.2, scheme="legacy"), "rotation_speed_deg"),
    (lambda: camera.action_to_c2w("i-3", pitch_limit_deg=0.0), "pitch_limit_deg"),
    (lambda: camera.action_to_c2w("w-3", scheme="v3"), "scheme"),
    (lambda: camera.action_to_c2w("w-3", scheme=None), "scheme"),
    (lambda: camera.action_to_c2w("w-99999999"), "action"),
    (lambda: camera.action_scheme_matters("d-"), "action"),
    (lambda: camera.check_c2w(np.eye(4)), "c2w"),
    (lambda: camera.check_c2w(np.zeros((3, 3, 4))), "c2w"),
    (lambda: camera.check_c2w(np.zeros((0, 4, 4))), "c2w"),
    (lambda: camera.check_c2w(SCALED), "c2w"),
    (lambda: camera.check_c2w(REFLECTED), "c2w"),
    (lambda: camera.check_c2w(BAD_ROW), "c2w"),
    (lambda: camera.check_c2w(HAS_NAN), "c2w"),
    (lambda: camera.prepare_camera(SCALED, GOOD_K, size=(64, 96)), "c2w"),
    (lambda: camera.prepare_trajectory(REFLECTED, GOOD_K, 9), "c2w"),
    (lambda: camera.normalize_intrinsics(np.ones(5), 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics(np.ones((2, 2)), 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics(np.ones((3, 3, 4)), 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics(np.ones((4, 4, 4)), 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics(np.ones((2, 4)), 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics(np.tile(np.eye(3), (2, 1, 1)), 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics([0.0, 500.0, 320.0, 240.0], 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics([[500.0, 0, 320], [0, -500.0, 240], [0, 0, 1]], 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics([500.0, np.nan, 320.0, 240.0], 3), "intrinsics"),
    (lambda: camera.normalize_intrinsics(GOOD_K, 0), "num_frames"),
    (lambda: camera.prepare_camera(GOOD_C2W, np.ones((5, 4)), size=(64, 96)), "intrinsics"),
    (lambda: camera.prepare_trajectory(GOOD_C2W, GOOD_K, 18), "num_frames"),
    (lambda: camera.prepare_trajectory(GOOD_C2W, GOOD_K, 0), "num_frames"),
    (lambda: camera.prepare_trajectory(GOOD_C2W, np.ones((8, 4)), 17), "intrinsics"),
    (lambda: camera.field_of_view(np.ones((2, 2, 4)), 640, 480), "intrinsics"),
    (lambda: camera.field_of_view([-1.0, 1.0, 0.0, 0.0], 640, 480), "intrinsics"),
    (lambda: camera.check_field_of_view([2000.0, 500.0, 320.0, 240.0], 640, 480), "intrinsics"),  # 18 deg wide
    (lambda: camera.check_field_of_view([500.0, 100.0, 320.0, 240.0], 640, 480), "intrinsics"),  # 135 deg high
    (lambda: camera.check_field_of_view(np.stack([GOOD_K, GOOD_K * [5, 5, 1, 1]]), 640, 480), "intrinsics"),
    (lambda: camera.preprocess_image(IMAGE, [3000.0, 3000.0, 320.0, 240.0], 64, 96), "intrinsics"),
    (lambda: camera.preprocess_image(IMAGE, GOOD_K, 60, 96), "height"),
    (lambda: camera.preprocess_image(np.zeros((480, 640, 3)), GOOD_K, 64, 96), "image"),
    (lambda: camera.resize_and_center_crop(IMAGE, 0, 96), "height"),
    (lambda: camera.crop_intrinsics(np.ones((3, 3)), (640, 480), (96, 72), (0, 4)), "intrinsics"),
    (lambda: camera.prepare_camera(GOOD_C2W, GOOD_K, size=(16, 96)), "size"),
    (lambda: camera.prepare_camera(GOOD_C2W, GOOD_K, size=(100, 96)), "size"),  # 3.125 latent rows
    (lambda: camera.prepare_camera(GOOD_C2W, GOOD_K, size=(64, 200)), "size"),
    (lambda: camera.prepare_camera(GOOD_C2W, GOOD_K, size=(48, 72), vae_stride=(4, 16, 16)), "size"),
    (lambda: camera.prepare_camera(GOOD_C2W, GOOD_K, size=(64, 96), vae_stride=(8, 32)), "vae_stride"),
    (lambda: camera.snap_num_frames(9, stride=0), "stride"),
    (lambda: camera.se3_inverse(torch.zeros(2, 3, 4)), "transforms"),
    (lambda: camera.ray_matrices(torch.zeros(1, 3, 16), (3, 2, 2)), "raymap"),
    (lambda: camera.ray_matrices(torch.zeros(1, 2, 20), (3, 2, 2)), "raymap"),
]


@pytest.mark.parametrize("call, name", BAD_INPUTS, ids=[f"{i}-{name}" for i, (_, name) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
