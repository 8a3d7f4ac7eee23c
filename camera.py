"""SANA-WM camera conditioning (paper §3.3): from the camera path a user gives to the DiT's camera inputs, and the
UCPE geometry; checked against diffusers 0.42.1 (the legacy action roll-out, the raymap, Plücker and UCPE inputs).
Read top to bottom, it follows the data:

  §1  action string "w-80,dw-40" -> (N+1, 4, 4) camera-to-world poses   parse_action, action_to_c2w
  §4  the DiT inputs: raymap (T, 20), chunked Plücker map (48, T, h, w)  se3_inverse, plucker_rays, prepare_camera
  §6  UCPE (Eq. 6): one SE(3) "ray <- world" matrix per token             ray_matrices
  after the marked line: frame counts, checks of poses and intrinsics, the first frame's resize and crop

Axes are OpenCV everywhere: +x right, +y down, +z forward. A camera-to-world matrix [[R, t], [0, 0, 0, 1]] holds
the camera's axes (in world coordinates) as the columns of R and the camera centre as t; the world frame is the
first camera. Intrinsics are [fx, fy, cx, cy] in pixels; pixel (u, v) = (column, row) as integer indices, with no
+0.5 centre offset anywhere (as the official code). Trajectories and intrinsics are numpy; the DiT inputs torch.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ACTION_KEYS = frozenset("wasdijkl")
FOV_RANGE_DEG = (25.0, 120.0)  # the official inference tool refuses intrinsics outside this (inference_sana_wm.py)
# Per action scheme, the defaults of action_to_c2w: translation per frame, degrees per frame, pitch limit (degrees).
ACTION_SCHEMES = {"v2": {"translation_speed": 0.025, "rotation_speed_deg": 0.6, "pitch_limit_deg": 60.0},
                  "legacy": {"translation_speed": 0.05, "rotation_speed_deg": 1.2, "pitch_limit_deg": 85.0}}
# v2's inertia (official action DSL v2): per-frame easing 1 - exp(-dt / tau), dt = 1/16 s whatever the output frame
# rate, tau = 0.45 s while a key drives the control and 1 s while it coasts.
V2_ALPHA_PRESS, V2_ALPHA_COAST = 1 - math.exp(-(1 / 16) / 0.45), 1 - math.exp(-(1 / 16) / 1.0)
# An hour and three quarters at 16 fps, 100x the longest video the release makes (961 frames = one minute); the
# cap stops a typo such as "w-99999999" from building a list of 10^8 frames before anything else is checked.
MAX_ACTION_FRAMES = 100_000


# ----------------------------------------------------------------------------------------------------------------
# §1 Action strings -> camera trajectory
# ----------------------------------------------------------------------------------------------------------------

def parse_action(action: str) -> list[frozenset[str]]:
    """One set of held keys per frame from the WASD/IJKL action language (the official action grammar; both schemes).

    `"w-80,dw-40"` is 80 frames holding w, then 40 frames holding d and w. A segment is `<keys>-<frames>`; keys are
    any of w a s d i j k l (case-insensitive, any order), `none` or nothing before the dash is an idle frame.
    Whitespace is ignored and the full-width comma `，` separates segments too. At most MAX_ACTION_FRAMES frames.
    """
    if not isinstance(action, str):
        raise ValueError(f"action must be a string such as 'w-80,dw-40', got {type(action).__name__}")
    cleaned = "".join(action.replace("，", ",").split())
    if not cleaned:
        raise ValueError("action is empty: expected segments '<keys>-<frames>' such as 'w-80,dw-40'")
    segments = []
    for segment in cleaned.split(","):
        if not segment:
            raise ValueError(f"action {action!r} has an empty segment: a comma too many?")
        keys, dash, count = segment.rpartition("-")  # split at the last dash
        if not dash or not count.isdecimal() or int(count) == 0:
            raise ValueError(f"action segment {segment!r} must be '<keys>-<positive number of frames>', e.g. 'w-80'")
        keys = keys.lower()
        held = frozenset() if keys == "none" else frozenset(keys)
        if not held <= ACTION_KEYS:
            raise ValueError(f"action segment {segment!r} has unknown keys {sorted(held - ACTION_KEYS)}: expected "
                             f"w/s (forward/back), a/d (turn left/right), i/k (look up/down), j/l (strafe "
                             f"left/right; a/d and j/l swapped in the legacy scheme) or 'none'")
        segments.append((held, int(count)))
    total = sum(count for _, count in segments)
    if total > MAX_ACTION_FRAMES:  # counted before the per-frame list is built
        raise ValueError(f"action {action[:40]!r}... asks for {total} frames, more than MAX_ACTION_FRAMES = "
                         f"{MAX_ACTION_FRAMES}")
    return [held for held, count in segments for _ in range(count)]


def action_scheme_matters(action: str) -> bool:
    """Whether `action` heads the camera differently under the v2 and the legacy scheme: True iff some frame holds
    exactly one of a/d or exactly one of j/l, the keys the schemes swap between turning and strafing (held together,
    a pair cancels in both). Speeds, pitch limit and v2's inertia differ for every moving string, but they change
    how far and how smoothly the camera goes, not which way, so they are not counted here."""
    return any(("a" in keys) != ("d" in keys) or ("j" in keys) != ("l" in keys) for keys in parse_action(action))


def _rot_x(angle: float) -> np.ndarray:
    """Rotation about x by angle (radians); with OpenCV axes a positive angle tips +z (forward) towards -y (up)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
    """Rotation about y by angle (radians); with OpenCV axes a positive angle turns +z (forward) towards +x (right)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _horizontal(axis: np.ndarray, eps: float) -> np.ndarray:
    """The axis projected on the world XZ plane (y = 0, the ground), divided by its length + eps; zero if vertical."""
    flat = axis.copy()
    flat[1] = 0.0
    norm = np.linalg.norm(flat)
    return flat / (norm + eps) if norm > 0 else flat


def _positive(name: str, value: float) -> float:
    """value as a float, refused (ValueError naming it) unless a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def action_to_c2w(action: str, translation_speed: float | None = None, rotation_speed_deg: float | None = None,
                  scheme: str = "v2", *, pitch_limit_deg: float | None = None) -> np.ndarray:
    """Roll an action string out into camera-to-world poses (N+1, 4, 4) float32 for N action frames.

    Pose 0 is the identity. Each frame the held keys set a target velocity of four controls, forward and right
    translation (world units per frame, along the camera's forward and right axes flattened onto the world XZ
    plane, so the camera never changes height), yaw about the world y axis and pitch about the camera's own x
    axis (i looks up: with +y down, Rx(+a) tips the forward axis towards -y). The camera first turns, then moves.
    None takes the scheme's default speed (per frame) and pitch limit. Rolled out in float64, returned as float32.

    scheme="v2": the official action DSL v2 (NVlabs/Sana, 2026-06), defaults 0.025 units, 0.6 deg, 60 deg.
        a/d turn left/right and j/l strafe. Velocity with inertia, at a fixed 16 fps: a frame that presses a key
        not held the frame before snaps all four controls to the target; otherwise each eases towards its target,
        v += alpha (target - v), alpha = 1 - exp(-dt/tau), tau = 0.45 s where the target is non-zero and 1 s where
        it is zero (so after a release, and through `none` frames, the camera coasts to a stop). Pitch saturates at
        +-pitch_limit_deg; the flattened axes are divided by their length + 1e-6.
    scheme="legacy": the first release's roll-out (diffusers 0.42.1's bit for bit), defaults 0.05 units, 1.2 deg,
        85 deg. a/d strafe and j/l turn; velocity = target every frame; a pitch step that would leave
        +-pitch_limit_deg is dropped whole. A legacy string converts to v2 by swapping a<->j and d<->l.
    """
    if scheme not in ACTION_SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(ACTION_SCHEMES)}, got {scheme!r}")
    given = {"translation_speed": translation_speed, "rotation_speed_deg": rotation_speed_deg,
             "pitch_limit_deg": pitch_limit_deg}
    speed, degrees, limit = (ACTION_SCHEMES[scheme][name] if value is None else _positive(name, value)
                             for name, value in given.items())
    v2, frames = scheme == "v2", parse_action(action)
    controls = ("ws", "lj", "da", "ik") if v2 else ("ws", "da", "lj", "ik")  # (+key, -key): forward, right, yaw, pitch
    scale = np.array([speed, speed, math.radians(degrees), math.radians(degrees)])
    pitch_limit, eps = math.radians(limit), 1e-6 if v2 else 0.0
    rotation, position, pitch, velocity, before = np.eye(3), np.zeros(3), 0.0, np.zeros(4), frozenset()
    rotations, positions = [rotation], [position]
    for keys in frames:
        target = scale * np.array([(plus in keys) - (minus in keys) for plus, minus in controls])
        if not v2 or keys - before:
            velocity = target
        else:
            alpha = np.where(np.abs(target) > 1e-12, V2_ALPHA_PRESS, V2_ALPHA_COAST)
            velocity = velocity + alpha * (target - velocity)
        before = keys
        forward_step, right_step, d_yaw, d_pitch = velocity
        if v2:
            d_pitch = min(max(pitch + d_pitch, -pitch_limit), pitch_limit) - pitch
            pitch += d_pitch
        elif abs(pitch + d_pitch) <= pitch_limit:
            pitch += d_pitch
        else:
            d_pitch = 0.0
        rotation = _rot_y(d_yaw) @ rotation @ _rot_x(d_pitch)  # yaw in the world frame, pitch in the camera frame
        position = position + (_horizontal(rotation[:, 2], eps) * forward_step
                               + _horizontal(rotation[:, 0], eps) * right_step)
        rotations.append(rotation)
        positions.append(position)
    c2w = np.tile(np.eye(4), (len(rotations), 1, 1))
    c2w[:, :3, :3], c2w[:, :3, 3] = rotations, positions
    return c2w.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# §4 The DiT's camera inputs: raymap and chunked Plücker map
# ----------------------------------------------------------------------------------------------------------------

def se3_inverse(transforms: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of rigid transforms (..., 4, 4): [[R, t], [0, 1]]^-1 = [[R^T, -R^T t], [0, 1]]
    (as the official code). Exact up to rounding where a general inverse is not, and cheap per token."""
    if transforms.shape[-2:] != (4, 4):
        raise ValueError(f"transforms must have shape (..., 4, 4), got {tuple(transforms.shape)}")
    rotation = transforms[..., :3, :3].transpose(-1, -2)
    translation = -torch.einsum("...ij,...j->...i", rotation, transforms[..., :3, 3])
    bottom = transforms.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(*transforms.shape[:-2], 1, 4)
    return torch.cat([torch.cat([rotation, translation[..., None]], dim=-1), bottom], dim=-2)


def plucker_rays(intrinsics: torch.Tensor, c2w: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Plücker coordinates (d, o x d) of the ray through every pixel (paper §3.3, Fine Branch): (F, height, width, 6).

    intrinsics (F, 4), c2w (F, 4, 4). d = R ((u - cx)/fx, (v - cy)/fy, 1) made unit length, in world axes (OpenCV
    camera axes, integer pixel indices); o = t is the camera centre, and the moment o x d places the line, so the
    six numbers name the ray itself, not just its direction.
    """
    fx, fy, cx, cy = (intrinsics[:, i, None, None] for i in range(4))
    grid = dict(dtype=intrinsics.dtype, device=intrinsics.device)
    v, u = torch.meshgrid(torch.arange(height, **grid), torch.arange(width, **grid), indexing="ij")
    x, y = (u - cx) / fx, (v - cy) / fy
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    d_world = torch.einsum("fij,fhwj->fhwi", c2w[:, :3, :3], d_cam)
    d_world = d_world / d_world.norm(dim=-1, keepdim=True)  # plain division, no eps, as the reference
    origin = c2w[:, None, None, :3, 3].expand_as(d_world)
    return torch.cat([d_world, torch.cross(origin, d_world, dim=-1)], dim=-1)


def prepare_camera(c2w, intrinsics, size: tuple[int, int] = (704, 1280),
                   vae_stride: tuple[int, int, int] = (8, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT's two camera inputs from F poses (paper §3.3), float32 torch tensors:

    raymap (T, 20): per latent frame k, the pose of raw frame 8k relative to frame 0 (16 numbers, row-major), then
        [fx, fy, cx, cy] on the latent grid; the transformer's `camera_conditions` (batched), see ray_matrices.
    plucker (48, T, h, w): per latent frame, the Plücker map (plucker_rays) of the 8 raw frames it covers
        (8k-7 .. 8k; frame 0 uses 0 .. 7), channel 6*f + m for frame f of the 8 and component m of (d, o x d).

    c2w (F, 4, 4) and intrinsics in any form normalize_intrinsics takes, in pixels of the size = (H, W) image
    (after preprocess_image), multiples of the spatial strides. T = (F-1)//8 + 1, h = H/32, w = W/32. OpenCV axes.
    """
    poses = torch.from_numpy(check_c2w(c2w))
    num_frames = len(poses)
    k = torch.from_numpy(normalize_intrinsics(intrinsics, num_frames))
    if len(size) != 2 or len(vae_stride) != 3 or not all(isinstance(n, int) and n > 0 for n in (*size, *vae_stride)):
        raise ValueError(f"size must be (H, W) and vae_stride (t, h, w), positive integers; got {size}, {vae_stride}")
    (height, width), (stride_t, stride_h, stride_w) = size, vae_stride
    if height % stride_h or width % stride_w:  # the VAE makes no latent grid for such an image: a caller's mistake
        raise ValueError(f"size {size} must be multiples of vae_stride's spatial strides ({stride_h}, {stride_w})")
    h, w = height // stride_h, width // stride_w

    # §4.1 poses relative to the first (closed-form inverse); pose 0 is written as exactly the identity.
    rel = torch.cat([torch.eye(4)[None], se3_inverse(poses[0]) @ poses[1:]])
    # §4.2 intrinsics on the latent grid: x values scale with w/W, y values with h/H.
    k_lat = k.clone()
    k_lat[:, 0::2] *= w / width
    k_lat[:, 1::2] *= h / height
    # §4.3-4.4 latent frame k is represented by raw frame 8k: frame 0 alone, then the last of each group of 8.
    idx = torch.arange(0, num_frames, stride_t)
    raymap = torch.cat([rel[idx].reshape(len(idx), 16), k_lat[idx]], dim=1)
    # §4.5 the 8 raw frames under each latent frame; a video shorter than 8 frames repeats its last frame.
    frames = ((idx[:, None] - (stride_t - 1)).clamp_min(0) + torch.arange(stride_t)).clamp_max(num_frames - 1)
    rays = plucker_rays(k_lat, rel, h, w)[frames]  # (T, 8, h, w, 6)
    plucker = rays.permute(0, 1, 4, 2, 3).reshape(len(idx), 6 * stride_t, h, w).transpose(0, 1)
    return raymap, plucker.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# §6 UCPE: one ray frame per token
# ----------------------------------------------------------------------------------------------------------------

def _focal_through_fov(focal: torch.Tensor, image_size: int, grid_size: int) -> torch.Tensor:
    """focal -> field of view (degrees) -> focal on the token grid, the way the reference does it (paper §3.3,
    the unified camera model with xi = 0, i.e. pinhole). Mathematically focal * grid_size / image_size; the float
    round trip through atan, degrees and cos/sin moves it by ~1 ulp, kept so that P matches bit for bit."""
    fov = torch.rad2deg(2.0 * torch.atan(1.0 / (2.0 * focal / image_size)))
    half = torch.deg2rad(0.5 * fov)
    return (grid_size * 0.5) * torch.cos(half) / torch.sin(half).clamp_min(torch.finfo(focal.dtype).eps)


def ray_matrices(raymap: torch.Tensor, thw: tuple[int, int, int], patch_size: int = 1) -> torch.Tensor:
    """UCPE ray matrices P (B, T*h*w, 4, 4): per token, the rigid transform from world to the frame of its ray
    (paper §3.3, Coarse Branch), in token order n = (t*h + i)*w + j and in raymap's dtype.

    raymap (B, T, 20) is prepare_camera's raymap, batched: relative c2w (16) + [fx, fy, cx, cy] in latent pixels;
    thw = (T, h, w) the token grid (patch_size spatial pixels per token; 1 in the release). The ray of token (i, j)
    has direction d = R (x, y, 1)/|(x, y, 1)|, x = (j - cx)/fx, y = (i - cy)/fy (OpenCV axes, integer pixel indices).
    Its frame: z = d, x = normalize(y_cam x z), y = z x x, where y_cam is the camera's down axis; P = [[R_l2w^T,
    -R_l2w^T t], [0, 1]], the identity where d is NaN. Attention applies P^T to queries, se3_inverse(P) to keys and
    values and P to its output (paper Eq. 6), so q.k sees the relative transform between two rays.

    The reference also builds an "absolute map" (up vector and latitude per pixel); it only feeds
    `raymap_embedder`, which the released config (Plücker injection on) never uses, so it is not built here.
    """
    t_dim, h, w = thw
    if raymap.ndim != 3 or raymap.shape[1:] != (t_dim, 20) or not raymap.is_floating_point():
        raise ValueError(f"raymap must be a float tensor (B, {t_dim}, 20) for thw={tuple(thw)}, "
                         f"got {raymap.dtype} {tuple(raymap.shape)}")
    batch, dtype, device = raymap.shape[0], raymap.dtype, raymap.device
    # The geometry runs in raymap's dtype (the reference's precision), so autocast must not recast the einsums.
    with torch.autocast(device_type=device.type, enabled=False):
        c2w = raymap[..., :16].reshape(batch, t_dim, 4, 4)
        fx, fy, cx, cy = (raymap[..., 16 + i, None, None] for i in range(4))
        fx, fy = _focal_through_fov(fx, w * patch_size, w), _focal_through_fov(fy, h * patch_size, h)
        x = (torch.arange(w, dtype=dtype, device=device) - cx / patch_size) / fx  # (B, T, 1, w)
        y = (torch.arange(h, dtype=dtype, device=device)[:, None] - cy / patch_size) / fy  # (B, T, h, 1)
        r2 = x * x + y * y
        scale = torch.sqrt(1 + r2) / (1 + r2)  # = 1/|(x, y, 1)|, in the reference's order of operations
        d_cam = torch.stack(torch.broadcast_tensors(scale * x, scale * y, scale), dim=-1)  # (B, T, h, w, 3)

        rotation, centre = c2w[..., :3, :3], c2w[..., :3, 3]
        d_world = torch.einsum("btij,bthwj->bthwi", rotation, d_cam)
        z_axis = F.normalize(d_world, dim=-1, eps=1e-6)
        cam_down = rotation[..., None, None, :, 1].expand_as(z_axis)
        x_axis = F.normalize(torch.cross(cam_down, z_axis, dim=-1), dim=-1, eps=1e-6)
        y_axis = F.normalize(torch.cross(z_axis, x_axis, dim=-1), dim=-1, eps=1e-6)
        world_to_ray = torch.stack([x_axis, y_axis, z_axis], dim=-2)  # rows: the ray frame's axes
        translation = -torch.einsum("bthwij,bthwj->bthwi", world_to_ray, centre[:, :, None, None].expand_as(z_axis))
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=dtype, device=device).expand(*z_axis.shape[:-1], 1, 4)
        P = torch.cat([torch.cat([world_to_ray, translation[..., None]], dim=-1), bottom], dim=-2)
        # A NaN ray gets the identity (as the reference); torch.where keeps this free of a host sync on the GPU.
        P = torch.where(torch.isnan(d_world).any(-1)[..., None, None], torch.eye(4, dtype=dtype, device=device), P)
    return P.reshape(batch, t_dim * h * w, 4, 4)


# ================================================================================================================
# Machinery below this line: the inputs' checks and preparation (frame counts, pose and intrinsics checks, the
# first frame's resize and crop). The camera control above is complete without it.
# ================================================================================================================

# ----------------------------------------------------------------------------------------------------------------
# §2 Frame counts, poses, intrinsics
# ----------------------------------------------------------------------------------------------------------------

def snap_num_frames(n: int, stride: int = 8, upper_bound: int | None = None) -> int:
    """The frame count stride*k + 1 nearest to n (official): the causal VAE encodes frame 0 alone, then each
    further `stride` frames into one latent frame. Ties round up; a result above upper_bound falls back to the count
    below; n < 1 gives 1. Examples: 2 -> 1, 10 -> 9, 80 -> 81, 100 -> 97."""
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if n < 1:
        return 1
    below = n - (n - 1) % stride
    if below == n:
        return n
    above = below + stride
    snapped = below if n - below < above - n else above
    return below if upper_bound is not None and snapped > upper_bound else snapped


def check_c2w(c2w) -> np.ndarray:
    """Camera-to-world poses (F, 4, 4) as float32, after checking each is a rigid transform [[R, t], [0, 0, 0, 1]]
    with R a rotation (R^T R = I within 1e-3, det R > 0). OpenCV axes (+x right, +y down, +z forward)."""
    poses = np.asarray(c2w, dtype=np.float32)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) == 0:
        raise ValueError(f"c2w must be camera-to-world poses of shape (F, 4, 4) with F >= 1, got shape {poses.shape}")
    if not np.isfinite(poses).all():
        raise ValueError("c2w must be finite, got NaN or infinite entries")
    rotation = poses[:, :3, :3].astype(np.float64)
    orthonormal_error = np.abs(rotation.transpose(0, 2, 1) @ rotation - np.eye(3)).max(axis=(1, 2))
    bottom_error = np.abs(poses[:, 3] - np.array([0, 0, 0, 1])).max(axis=1)
    bad = (orthonormal_error > 1e-3) | (np.linalg.det(rotation) <= 0) | (bottom_error > 1e-3)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"c2w[{i}] is not a rigid transform: expected [[R, t], [0, 0, 0, 1]] with R a rotation "
                         f"(R^T R = I within 1e-3, det R = +1); got |R^T R - I| = {orthonormal_error[i]:.2e}, "
                         f"det R = {np.linalg.det(rotation[i]):.4f}, last row {poses[i, 3].tolist()}")
    return poses


def normalize_intrinsics(intrinsics, num_frames: int) -> np.ndarray:
    """Per-frame [fx, fy, cx, cy] as a (num_frames, 4) float32 array (as the official pipeline).

    Accepts [fx, fy, cx, cy] (4,) or a 3x3 K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] for every frame, or (F', 4) /
    (F', 3, 3) per frame with F' >= num_frames (frames past num_frames are dropped). Pixels of whatever image the
    values describe; focal lengths must be positive.
    """
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    k = np.asarray(intrinsics, dtype=np.float32)
    given = k.shape
    if k.ndim in (2, 3) and k.shape[-2:] == (3, 3):
        k = np.stack([k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]], axis=-1)
    if k.shape == (4,):
        k = np.broadcast_to(k, (num_frames, 4))
    if k.ndim != 2 or k.shape[1] != 4 or len(k) < num_frames:
        raise ValueError(f"intrinsics must be [fx, fy, cx, cy] (4,), a 3x3 K, or per frame (F, 4) / (F, 3, 3) with "
                         f"F >= {num_frames} frames; got shape {given}")
    k = np.array(k[:num_frames])
    bad = ~np.isfinite(k).all(axis=1) | ~(k[:, :2] > 0).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"intrinsics must be finite with positive focal lengths fx, fy; got {k[i].tolist()} "
                         f"for frame {i}")
    return k


def prepare_trajectory(c2w, intrinsics, num_frames: int, stride: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Poses and intrinsics cut to the frame count the model will generate (official): num_frames snapped to
    stride*k + 1 (never above the number of poses), then c2w (F, 4, 4) and intrinsics (F, 4) trimmed to it.

    diffusers silently makes the video shorter when fewer poses than num_frames are given; here that is an error
    (an action string of N frames gives N+1 poses).
    """
    poses = check_c2w(c2w)
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if num_frames > len(poses):
        raise ValueError(f"num_frames={num_frames} asks for more frames than c2w has poses ({len(poses)}); "
                         f"an action string of N frames gives N+1 poses")
    num_frames = snap_num_frames(num_frames, stride, upper_bound=len(poses))
    return poses[:num_frames], normalize_intrinsics(intrinsics, num_frames)


def field_of_view(intrinsics, width: int, height: int):
    """Horizontal and vertical field of view in degrees, 2 atan(W / 2fx) and 2 atan(H / 2fy), of a pinhole camera
    with [fx, fy, cx, cy] (4,) or (F, 4) in the pixels of a width x height image. Floats, or (F,) arrays."""
    k = np.asarray(intrinsics, dtype=np.float64)
    if k.ndim not in (1, 2) or k.shape[-1] != 4:
        raise ValueError(f"intrinsics must be [fx, fy, cx, cy] (4,) or (F, 4), got shape {k.shape}")
    if not (k[..., :2] > 0).all():
        raise ValueError(f"intrinsics must have positive focal lengths fx, fy, got {k.tolist()}")
    if not (width > 0 and height > 0):
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    return np.degrees(2 * np.arctan(width / (2 * k[..., 0]))), np.degrees(2 * np.arctan(height / (2 * k[..., 1])))


def check_field_of_view(intrinsics, width: int, height: int) -> None:
    """Refuse intrinsics whose field of view lies outside [25, 120] degrees on a width x height image.

    The official inference tool (inference_sana_wm.py) checks its estimated intrinsics this way, on the original
    image before the resize and crop, with open bounds; here any intrinsics are checked (the bounds themselves
    pass), and preprocess_image does it at that same point. Accepts every form normalize_intrinsics does; catches
    focal lengths given in the wrong pixels.
    """
    k = np.asarray(intrinsics, dtype=np.float32)
    k = normalize_intrinsics(k, max(len(k), 1) if k.ndim in (2, 3) and k.shape != (3, 3) else 1)
    fov_x, fov_y = field_of_view(k, width, height)
    low, high = FOV_RANGE_DEG
    bad = (fov_x < low) | (fov_x > high) | (fov_y < low) | (fov_y > high)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"intrinsics give a field of view of {fov_x[i]:.1f} x {fov_y[i]:.1f} degrees (frame {i}) on "
                         f"the {width}x{height} image, outside [{low:g}, {high:g}]: fx, fy must be in pixels of "
                         f"the original image")


# ----------------------------------------------------------------------------------------------------------------
# §3 The first frame
# ----------------------------------------------------------------------------------------------------------------

def resize_and_center_crop(image: Image.Image, height: int = 704, width: int = 1280):
    """Scale the image (Lanczos), keeping its aspect ratio, until it covers height x width, then cut out the centre
    (as the official pipeline). Returns (cropped, (src_w, src_h), (resized_w, resized_h), (left, top)) for
    crop_intrinsics."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"height and width must be positive integers, got {height!r} x {width!r}")
    src_w, src_h = image.size
    scale = max(height / src_h, width / src_w)
    # Python's round (half to even) as in the reference; max() guards against landing one pixel short.
    resized_w, resized_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    left, top = (resized_w - width) // 2, (resized_h - height) // 2
    cropped = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS).crop(
        (left, top, left + width, top + height))
    return cropped, (src_w, src_h), (resized_w, resized_h), (left, top)


def crop_intrinsics(intrinsics, src_size: tuple[int, int], resized_size: tuple[int, int],
                    offset: tuple[int, int]) -> np.ndarray:
    """[fx, fy, cx, cy] (..., 4) of the original image -> of the resized and cropped one (as the official pipeline):
    scale by the resize factors, then shift the principal point by the crop offset. float32, like the pipeline."""
    k = np.array(intrinsics, dtype=np.float32)
    if k.ndim not in (1, 2) or k.shape[-1] != 4:
        raise ValueError(f"intrinsics must be [fx, fy, cx, cy] (4,) or (F, 4), got shape {k.shape}")
    (src_w, src_h), (resized_w, resized_h), (left, top) = src_size, resized_size, offset
    scale_x, scale_y = resized_w / src_w, resized_h / src_h
    k[..., 0] *= scale_x
    k[..., 1] *= scale_y
    k[..., 2] = k[..., 2] * scale_x - left
    k[..., 3] = k[..., 3] * scale_y - top
    return k


def preprocess_image(image: Image.Image, intrinsics, height: int = 704, width: int = 1280):
    """The first frame as the VAE takes it, and the intrinsics that go with it (as the official pipeline; what
    diffusers calls SanaWMImageProcessor.preprocess_with_intrinsics).

    image: any-size PIL image; intrinsics: [fx, fy, cx, cy] (4,) or (F, 4) in its pixels, refused when the field of
    view leaves [25, 120] degrees (check_field_of_view). Returns ((1, 3, height, width) float32 in [-1, 1],
    intrinsics of the cropped image, same shape as given).
    """
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
            and height % 32 == 0 and width % 32 == 0):
        raise ValueError(f"height and width must be positive multiples of 32 (the VAE's spatial stride), "
                         f"got {height!r} x {width!r}")
    cropped, src_size, resized_size, offset = resize_and_center_crop(image, height, width)
    check_field_of_view(intrinsics, *src_size)
    pixels = torch.from_numpy(np.asarray(cropped.convert("RGB")).astype(np.float32) / 255.0)
    pixels = 2.0 * pixels.permute(2, 0, 1)[None] - 1.0
    return pixels.contiguous(), crop_intrinsics(intrinsics, src_size, resized_size, offset)
