"""Cameras and rays in the CLEVR3D / ObSuRF convention (world frame, z up).

A camera at `camera_pos` looks at `track_point` (the origin by default). Its sensor plane lies
at `focal_length` along the view axis; the horizontal sensor axis is cross(view, up) and the
vertical one cross(view, horizontal), so image row 0 is the top and column 0 the left. Rays go
through pixel centres and have unit length. Arrays are float64 numpy unless a name says torch.
"""
from __future__ import annotations

import math

import numpy as np
import torch

FOCAL_LENGTH = 0.035
SENSOR_WIDTH = 0.032
UP = np.array((0.0, 0.0, 1.0))


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


def camera_ray_matrix(camera_pos, height: int, width: int, focal_length: float = FOCAL_LENGTH,
                      sensor_width: float = SENSOR_WIDTH, track_point=None) -> np.ndarray:
    """[..., 3, 3] float32 matrices M with camera_rays(...)[y, x] = normalize(M @ [x + .5, y + .5, 1]):
    the same cameras as `camera_rays`, in the loaders' pixel -> ray form."""
    view, horizontal, vertical = camera_axes(camera_pos, track_point)
    sensor_height = sensor_width / width * height
    cols = (horizontal * sensor_width / width, vertical * sensor_height / height,
            view * focal_length - horizontal * sensor_width / 2 - vertical * sensor_height / 2)
    return np.stack(cols, -1).astype(np.float32)


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
