"""Camera maths: every camera the project reads, makes or moves, as positions and rays.

- The CLEVR3D / ObSuRF camera (world frame, z up; the procedural scenes' too): a camera at
  `camera_pos` looks at `track_point` (the origin by default). Its sensor plane lies at
  `focal_length` along the view axis; the horizontal sensor axis is cross(view, up) and the
  vertical one cross(view, horizontal), so image row 0 is the top and column 0 the left. Rays go
  through pixel centres and have unit length (`camera_rays`, `world_to_camera`).
- Ray matrices, the form scene records store every camera in (data/records.py): the ray through
  pixel (row y, column x) points along normalize(M @ [x + 0.5, y + 0.5, 1]). One maker per
  camera convention a reader meets (`camera_ray_matrix`: CLEVR3D; `pinhole_ray_matrix`: OpenCV
  K, R, t, as Kubric stores them; `nmr_ray_matrix`: the NMR release's), and the rays of a matrix
  (`ray_directions` in numpy, `matrix_rays` in torch, as make_batch computes them).
- Poses: camera-to-world rotations in the OpenCV convention (columns: image right, image down,
  viewing direction) with a vertical field of view in radians; `pose_from_rays` reads them off a
  dataset's per-pixel rays, `pinhole_rays` makes rays from them (slot export and the viewer).
- The reference's camera motions for rendering videos (`camera_motion`).

Arrays are float64 numpy unless a name or docstring says torch.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

FOCAL_LENGTH = 0.035
SENSOR_WIDTH = 0.032
UP = np.array((0.0, 0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# The CLEVR3D camera

def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def camera_axes(camera_pos, track_point=None):
    """Unit view, horizontal and vertical axes, each [..., 3], of cameras at `camera_pos` [..., 3]."""
    camera_pos = np.asarray(camera_pos, dtype=np.float64)
    track_point = np.zeros(3) if track_point is None else np.asarray(track_point, np.float64)
    view = _normalize(track_point - camera_pos)
    horizontal = _normalize(np.cross(view, UP))
    vertical = _normalize(np.cross(view, horizontal))
    return view, horizontal, vertical


def camera_rays(camera_pos, height: int, width: int, focal_length: float = FOCAL_LENGTH,
                sensor_width: float = SENSOR_WIDTH, track_point=None) -> np.ndarray:
    """Unit ray directions [..., height, width, 3] (float32) of cameras at `camera_pos` [..., 3]."""
    view, horizontal, vertical = camera_axes(camera_pos, track_point)
    sensor_height = sensor_width / width * height
    # Pixel centres, from -size/2 to +size/2.
    u = ((np.arange(width) + 0.5) / width * 2 - 1) * sensor_width / 2        # [W]
    v = ((np.arange(height) + 0.5) / height * 2 - 1) * sensor_height / 2     # [H]
    exp = lambda a: a[..., None, None, :]                                    # noqa: E731
    rays = (exp(view) * focal_length
            + exp(horizontal) * u[None, :, None]
            + exp(vertical) * v[:, None, None])
    return _normalize(rays).astype(np.float32)


def world_to_camera(camera_pos, track_point=None) -> np.ndarray:
    """4x4 extrinsic matrices [..., 4, 4] mapping world to camera coordinates.

    Camera axes are (horizontal, vertical, view), as the reference's `get_extrinsic`.
    """
    camera_pos = np.asarray(camera_pos, dtype=np.float64)
    view, horizontal, vertical = camera_axes(camera_pos, track_point)
    rot = np.stack((horizontal, vertical, view), -2)                         # [..., 3, 3]
    trans = -np.einsum("...ij,...j->...i", rot, camera_pos)
    out = np.zeros(camera_pos.shape[:-1] + (4, 4))
    out[..., :3, :3] = rot
    out[..., :3, 3] = trans
    out[..., 3, 3] = 1.0
    return out


def hemisphere_cameras(rng: np.random.Generator, num_views: int, radius_range=(9.0, 12.0),
                       elevation_range_deg=(20.0, 50.0)) -> np.ndarray:
    """Camera positions [num_views, 3] on a hemisphere around the origin, looking at it.

    Azimuths are spread evenly from a random start (like CLEVR3D's 0/120/240 degree views) with
    a little jitter, so that views of one scene see it from different sides.
    """
    start = rng.uniform(0, 2 * math.pi)
    azimuth = start + 2 * math.pi * np.arange(num_views) / num_views \
        + rng.uniform(-0.2, 0.2, num_views) * (2 * math.pi / num_views)
    elevation = np.deg2rad(rng.uniform(*elevation_range_deg, num_views))
    radius = rng.uniform(*radius_range, num_views)
    return np.stack((radius * np.cos(elevation) * np.cos(azimuth),
                     radius * np.cos(elevation) * np.sin(azimuth),
                     radius * np.sin(elevation)), -1)


# ----------------------------------------------------------------------------------------------
# Ray matrices (scene records' cameras)

def camera_ray_matrix(camera_pos, height: int, width: int, focal_length: float = FOCAL_LENGTH,
                      sensor_width: float = SENSOR_WIDTH, track_point=None) -> np.ndarray:
    """[..., 3, 3] float32 matrices M with camera_rays(...)[y, x] = normalize(M @ [x + .5, y + .5, 1]):
    the same cameras as `camera_rays`, in the loaders' pixel -> ray form."""
    view, horizontal, vertical = camera_axes(camera_pos, track_point)
    sensor_height = sensor_width / width * height
    cols = (horizontal * sensor_width / width, vertical * sensor_height / height,
            view * focal_length - horizontal * sensor_width / 2 - vertical * sensor_height / 2)
    return np.stack(cols, -1).astype(np.float32)


def pinhole_ray_matrix(intrinsics, world_to_camera_rotation) -> np.ndarray:
    """[..., 3, 3] ray matrices of OpenCV pinhole cameras: R_c2w @ K^-1, where X_cam =
    R X_world + t and pixel (x, y) has centre (x + 0.5, y + 0.5)."""
    k = np.asarray(intrinsics, np.float64)
    r = np.asarray(world_to_camera_rotation, np.float64)
    return (np.swapaxes(r, -1, -2) @ np.linalg.inv(k)).astype(np.float32)


def pinhole_origin(world_to_camera_rotation, translation) -> np.ndarray:
    """Camera centres [..., 3] of X_cam = R X_world + t cameras: -R^T t."""
    r = np.asarray(world_to_camera_rotation, np.float64)
    t = np.asarray(translation, np.float64)
    return (-np.einsum("...ji,...j->...i", r, t)).astype(np.float32)


# The NMR release's change of frame (the reference's): its y-up world to a z-up one.
NMR_FRAME_ROTATION = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)


def nmr_ray_matrix(world_mat_inv, camera_mat_inv, height: int, width: int) -> np.ndarray:
    """Ray matrices [..., 3, 3] (float32) of NMR cameras, given their data-frame 4 x 4
    world_mat_inv and camera_mat_inv [..., 4, 4], for height x width images.

    The reference's ray through grid point (x, y, 1) is A[:3, :3] @ (x, y, 1) with
    A = rot @ world_mat_inv @ camera_mat_inv; the records' is M @ (column + 0.5, row + 0.5, 1).
    So M = A[:3, :3] @ P, where P maps pixel centres to the linspace grid:
    x = -1 + 2 * column / (W - 1) = 2 / (W - 1) * (column + 0.5) - 1 - 1 / (W - 1).
    """
    a = (NMR_FRAME_ROTATION @ np.asarray(world_mat_inv, np.float64)
         @ np.asarray(camera_mat_inv, np.float64))
    sx, sy = 2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)
    grid = np.array([[sx, 0.0, -1.0 - sx / 2], [0.0, sy, -1.0 - sy / 2], [0.0, 0.0, 1.0]])
    return (a[..., :3, :3] @ grid).astype(np.float32)


def nmr_origin(world_mat_inv) -> np.ndarray:
    """Camera centres [..., 3] (float32, z-up world) of data-frame world_mat_inv [..., 4, 4]."""
    a = NMR_FRAME_ROTATION @ np.asarray(world_mat_inv, np.float64)
    return a[..., :3, 3].astype(np.float32)


def ray_directions(ray_mats, height: int, width: int, rows=None, cols=None) -> np.ndarray:
    """Unit ray directions [..., h, w, 3] (numpy) of ray matrices [..., 3, 3] at the given pixel
    rows and columns (default: all). The numpy twin of what `make_batch` computes."""
    rows = np.arange(height) if rows is None else np.asarray(rows)
    cols = np.arange(width) if cols is None else np.asarray(cols)
    pix = np.stack(np.broadcast_arrays(cols[None, :] + 0.5, rows[:, None] + 0.5,
                                       np.ones((1, 1))), -1)                   # [h, w, 3]
    m = np.asarray(ray_mats, np.float64)
    d = np.einsum("...ij,hwj->...hwi", m, pix)
    return (d / np.linalg.norm(d, axis=-1, keepdims=True)).astype(np.float32)


def matrix_rays(ray_mats: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Unit rays [..., 3] (torch, float32) of ray matrices [..., 3, 3] at pixel columns / rows
    [...] (broadcast against each other): what `make_batch` computes on the device."""
    pix = torch.stack(torch.broadcast_tensors(cols + 0.5, rows + 0.5, torch.ones_like(cols)), -1)
    d = (ray_mats.float() * pix.float()[..., None, :]).sum(-1)
    return F.normalize(d, dim=-1)


# ----------------------------------------------------------------------------------------------
# Poses (camera-to-world rotations, OpenCV axes)

def pose_from_rays(rays) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pinhole rays [..., H, W, 3] -> (camera-to-world rotations [..., 3, 3] with columns right,
    down, forward; vertical fields of view [...] in radians)."""
    rays = torch.as_tensor(rays, dtype=torch.float64)
    height, width = rays.shape[-3:-1]
    rays = rays / rays.norm(dim=-1, keepdim=True)
    # The optical axis: the mean of the central 2x2 (or 1x1) rays, by symmetry of pixel centres.
    rows = slice((height - 1) // 2, height // 2 + 1)
    cols = slice((width - 1) // 2, width // 2 + 1)
    forward = rays[..., rows, cols, :].mean((-3, -2))
    forward = forward / forward.norm(dim=-1, keepdim=True)
    right = rays[..., :, -1, :].mean(-2) - rays[..., :, 0, :].mean(-2)
    right = right - (right * forward).sum(-1, keepdim=True) * forward
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.cross(forward, right, dim=-1)
    rot = torch.stack((right, down, forward), -1)
    # Focal length in pixels from the top and bottom rows' central rays: the ray of a pixel
    # centre at offset (H - 1) / 2 from the axis makes an angle a with tan(a) = offset / f.
    cam = torch.einsum("...ji,...hwj->...hwi", rot, rays)                   # camera frame
    tan = (cam[..., -1, cols, 1] / cam[..., -1, cols, 2]).mean(-1)
    focal = ((height - 1) / 2) / tan
    fov = 2 * torch.atan(height / 2 / focal)
    return rot.float(), fov.float()


def pinhole_rays(rot, fov_y: float, height: int, width: int) -> torch.Tensor:
    """Unit ray directions [H, W, 3] (float32) of a pinhole camera with rotation `rot` [3, 3]
    (camera-to-world, OpenCV axes), vertical field of view `fov_y` (radians), square pixels."""
    rot = torch.as_tensor(rot, dtype=torch.float64)
    focal = (height / 2) / math.tan(float(fov_y) / 2)
    x = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2) / focal
    y = (torch.arange(height, dtype=torch.float64) + 0.5 - height / 2) / focal
    cam = torch.stack((x[None, :].expand(height, width), y[:, None].expand(height, width),
                       torch.ones(height, width, dtype=torch.float64)), -1)
    world = cam @ rot.T.to(cam.device)
    return (world / world.norm(dim=-1, keepdim=True)).float()


def look_at_rotation(position, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """Rotation [3, 3] (OpenCV axes) of a camera at `position` looking at `target`, `up` up."""
    position = torch.as_tensor(position, dtype=torch.float64)
    forward = torch.as_tensor(target, dtype=torch.float64) - position
    forward = forward / forward.norm()
    right = torch.cross(forward, torch.as_tensor(up, dtype=torch.float64), dim=-1)
    if right.norm() < 1e-9:
        raise ValueError("the camera looks along `up`; give another up direction")
    right = right / right.norm()
    down = torch.cross(forward, right, dim=-1)
    return torch.stack((right, down, forward), -1).float()


# ----------------------------------------------------------------------------------------------
# Transforms

def transform_points(points: torch.Tensor, transform: torch.Tensor,
                     translate: bool = True) -> torch.Tensor:
    """Applies [..., 3|4, 4] affine transforms to points [..., 3] (torch, broadcasting)."""
    out = torch.einsum("...ij,...j->...i", transform[..., :3, :3], points)
    if translate:
        out = out + transform[..., :3, 3]
    return out


def rotate_about_z(points: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotates points [..., 3] (torch) by `theta` radians about the world z axis."""
    c, s = math.cos(theta), math.sin(theta)
    x, y, z = points.unbind(-1)
    return torch.stack((c * x - s * y, s * x + c * y, z), -1)


# ----------------------------------------------------------------------------------------------
# Camera motions (the reference's render.py)
#
# Pure functions of time t in [0, 1): from the base camera (the first input view's position,
# [1, 3]) they give that frame's (camera_pos [1, 3], rays [1, H, W, 3]), so any frame can be
# reproduced on its own. Constants and easing are the reference's.

MOTIONS = ("rotate", "zoom", "closeup", "rotate_and_closeup", "eyeroll")

# The reference's 'zoom' motion narrows the sensor from its default width to a fifth of it.
ZOOM_SENSOR_MAX = SENSOR_WIDTH
ZOOM_SENSOR_MIN = SENSOR_WIDTH / 5
EYEROLL_RADIUS = 1.5


def lerp(x, y, t):
    return x + (y - x) * t


def easeout(t: float) -> float:
    """Starts at speed 1.5, ends at speed 0.5: the reference's easing of the closeup's height."""
    return -0.5 * t ** 2 + 1.5 * t


def apply_fade(t: float, t_fade: float = 0.2) -> float:
    """Maps t in [0, 1] to a position in [0, 1] with constant acceleration for the first and last
    `t_fade` and constant speed in between (the reference's ease in/out)."""
    v_max = 1.0 / (1.0 - t_fade)
    acc = v_max / t_fade
    if t <= t_fade:
        return 0.5 * acc * t ** 2
    if t <= 1.0 - t_fade:
        return 0.5 * acc * t_fade ** 2 + v_max * (t - t_fade)
    return 1.0 - 0.5 * acc * (t - 1.0) ** 2


def _as_np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def camera_rays_torch(camera_pos: torch.Tensor, height: int, width: int,
                      sensor_width: float = SENSOR_WIDTH,
                      track_point=None) -> torch.Tensor:
    """Rays [1, H, W, 3] of a camera at camera_pos [1, 3] (torch, same device, float32)."""
    rays = camera_rays(_as_np(camera_pos)[0], height, width, sensor_width=sensor_width,
                       track_point=track_point)
    return torch.from_numpy(rays)[None].to(device=camera_pos.device, dtype=torch.float32)


def rotate_camera(camera_pos: torch.Tensor, rays: torch.Tensor, t: float):
    """Rotates camera_pos [..., 3] and rays [..., 3] by 2*pi*t about the world z axis."""
    theta = 2 * math.pi * t
    return rotate_about_z(camera_pos, theta), rotate_about_z(rays, theta)


def closeup_camera(camera_pos: torch.Tensor, rays: torch.Tensor, t: float, zoomout: float = 1.0,
                   closeup: float = 0.2, z_closeup: float = 0.1, lookup: float = 3.0):
    """The reference's `get_camera_closeup`: fly toward the scene centre while panning up.

    The camera moves from `zoomout * camera_pos` to `closeup` times that (its height eased to
    `z_closeup` times the original), and the tracked point from the origin to a point on the
    ground `lookup` times as far along the original view direction, so the camera ends up low
    and looking across the scene. The base rays [1, H, W, 3] are carried along by the relative
    rotation between the original and the current extrinsics.

    Args: camera_pos [1, 3], rays [1, H, W, 3], t in [0, 1].
    Returns: (camera_pos [1, 3], rays [1, H, W, 3]).
    """
    orig_pos = _as_np(camera_pos)[0] * zoomout
    orig_track = np.zeros(3)
    orig_ext = world_to_camera(orig_pos, orig_track)

    final_pos = closeup * orig_pos
    final_pos[2] = z_closeup * orig_pos[2]
    final_track = orig_pos + (orig_track - orig_pos) * lookup
    final_track[2] = 0.0

    cur_pos = lerp(orig_pos, final_pos, t)
    cur_pos[2] = lerp(orig_pos[2], final_pos[2], easeout(t))
    cur_track = lerp(orig_track, final_track, t)
    new_ext = world_to_camera(cur_pos, cur_track)

    # Camera-to-new-camera rotation in float64, then one float32 rotation of the rays.
    relative = torch.from_numpy(np.linalg.inv(new_ext) @ orig_ext).to(rays.device, rays.dtype)
    cur_rays = transform_points(rays, relative, translate=False)
    cur_pos_t = torch.from_numpy(cur_pos)[None].to(camera_pos.device, camera_pos.dtype)
    return cur_pos_t, cur_rays


def camera_motion(motion: str, camera_pos: torch.Tensor, t: float, height: int, width: int,
                  transform: Optional[torch.Tensor] = None):
    """One frame's camera of a motion.

    Args:
        motion: one of MOTIONS.
            'rotate': orbit about the z axis by 2*pi*t, tracking the scene centre.
            'zoom': stationary, the sensor narrows from 0.032 to 0.032/5 (5x zoom).
            'closeup': `closeup_camera` at t.
            'rotate_and_closeup': orbit while moving in and out (closeup at
                (1 - cos(2*pi*t)) / 4 with lookup 1.5).
            'eyeroll': stationary, tracking a point circling the centre at radius 1.5.
        camera_pos: [1, 3] base camera (in model coordinates).
        t: time in [0, 1).
        height, width: image size.
        transform: optional [4, 4] world-to-model transform of datasets stored in canonical
            camera coordinates; motions then happen in world space, as in the reference.
    Returns:
        (camera_pos [1, 3], rays [1, H, W, 3]) torch float32 on camera_pos's device.
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; valid motions are: {', '.join(MOTIONS)}")
    camera_pos = camera_pos.float()
    if camera_pos.shape != (1, 3):
        raise ValueError(f"camera_pos must be [1, 3], got {tuple(camera_pos.shape)}")
    if transform is not None:
        transform = transform.to(camera_pos.device, torch.float32)
        camera_pos = transform_points(camera_pos, torch.inverse(transform))

    if motion == "rotate":
        rays = camera_rays_torch(camera_pos, height, width)
        cur_pos, cur_rays = rotate_camera(camera_pos, rays, t)
    elif motion == "zoom":
        sensor = lerp(ZOOM_SENSOR_MAX, ZOOM_SENSOR_MIN, t)
        cur_pos, cur_rays = camera_pos, camera_rays_torch(camera_pos, height, width,
                                                          sensor_width=sensor)
    elif motion == "closeup":
        rays = camera_rays_torch(camera_pos, height, width)
        cur_pos, cur_rays = closeup_camera(camera_pos, rays, t)
    elif motion == "rotate_and_closeup":
        rays = camera_rays_torch(camera_pos, height, width)
        t_closeup = (1.0 - math.cos(2 * math.pi * t)) * 0.25
        cur_pos, cur_rays = closeup_camera(camera_pos, rays, t_closeup, lookup=1.5)
        cur_pos, cur_rays = rotate_camera(cur_pos, cur_rays, t)
    else:  # eyeroll
        theta = -2 * math.pi * t
        track = EYEROLL_RADIUS * np.array((math.cos(theta), math.sin(theta), 0.0))
        cur_pos, cur_rays = camera_pos, camera_rays_torch(camera_pos, height, width,
                                                          track_point=track)

    if transform is not None:
        cur_pos = transform_points(cur_pos, transform)
        cur_rays = transform_points(cur_rays, transform, translate=False)
    return cur_pos, cur_rays

