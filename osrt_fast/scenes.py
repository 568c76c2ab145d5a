"""Built-in procedural multi-object scenes: sampler, analytic ray tracer, dataset writer.

The project's default dataset needs no download: `generate_dataset` writes scenes in the
ObSuRF / CLEVR3D folder layout (see `osrt_fast/data/obsurf.py`), so one loader reads both.

A scene is a grey ground plane (z = 0) with 2-6 objects (sphere, cube, cylinder) resting on it.
Sizes are half-extents: a sphere's radius, a cube's half edge, a cylinder's radius and half
height. Object centres therefore sit at z = size. Cameras come from
`cameras.hemisphere_cameras` and rays from `cameras.camera_rays`, the CLEVR3D camera.

The tracer intersects every ray with every object analytically (float64), so ids and depths
are exact: the first hit wins, ids are 1-based in object order, 0 is the ground or the sky.

CLI: python -m osrt_fast.scenes --out data/procedural --num-scenes N --height H --width W
         --num-views V [--min-objects --max-objects --seed --device --zoom --background --cameras]
It checks every argument before writing anything, and holds the output folder's lock while
it writes (a second generator on the folder, e.g. a training run generating the data on first
use, is refused, naming the first); exit code 0 when done, 2 for invalid arguments or a folder
in use.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from osrt_fast.cameras import camera_rays, hemisphere_cameras
from osrt_fast.errors import DataError, command
from osrt_fast.files import TMP_PREFIX, remove_files
from osrt_fast.files import write_atomic as _write_atomic
from osrt_fast.locks import FolderLock, LockedError

SPHERE, CUBE, CYLINDER = 1, 2, 3
SHAPE_NAMES = {SPHERE: "sphere", CUBE: "cube", CYLINDER: "cylinder"}

# Depth given to rays that hit nothing, and the PNG depth encoding's range (CLEVR3D: 40 units).
MAX_DEPTH = 40.0
SCENE_RADIUS = 3.0            # object centres lie within this distance of the origin (xy)
SIZE_RANGE = (0.4, 1.0)
GROUND_COLOR = (0.5, 0.5, 0.5)
SKY_COLOR = (0.80, 0.84, 0.90)
# Backgrounds: "ground" (a shaded grey ground plane with shadows, and sky) or "plain" (the ground
# is invisible and every pixel without an object has PLAIN_COLOR: all of an image's variation is
# then in its objects, the easier task for learning to segment).
BACKGROUNDS = ("ground", "plain")
PLAIN_COLOR = (0.2, 0.2, 0.2)
# Cameras: "random" (every scene its own, see `sample_cameras`) or "fixed" (every scene seen from
# scene 0's cameras: a much easier, nearly 2D task, for studying learning; novel views elsewhere
# are then out of distribution).
CAMERAS = ("random", "fixed")
LIGHT_DIR = (-0.45, 0.35, 0.82)   # towards the light; normalised below
AMBIENT, DIFFUSE = 0.3, 0.7
# Offset of shadow-ray origins along the surface normal, so a surface does not shadow itself.
SHADOW_EPS = 1e-6
# Rays shorter than this do not count as hits (shadow rays start on surfaces).
T_EPS = 1e-9
PALETTE = np.array([
    (0.86, 0.15, 0.15),   # red
    (0.15, 0.70, 0.20),   # green
    (0.15, 0.35, 0.90),   # blue
    (0.95, 0.85, 0.15),   # yellow
    (0.10, 0.80, 0.85),   # cyan
    (0.85, 0.20, 0.80),   # magenta
    (0.98, 0.55, 0.10),   # orange
    (0.50, 0.20, 0.85),   # purple
    (0.55, 0.35, 0.15),   # brown
    (0.95, 0.55, 0.70),   # pink
])

Seed = Union[int, Sequence[int]]


@dataclass
class Scene:
    """Objects of one scene (n objects, float64 numpy).

    shape [n] int64 codes (1 sphere, 2 cube, 3 cylinder); position [n, 3] centres (z = size);
    size [n] half-extents; rotation [n] radians about z; color [n, 3] RGB in [0, 1].
    """
    shape: np.ndarray
    position: np.ndarray
    size: np.ndarray
    rotation: np.ndarray
    color: np.ndarray

    @property
    def num_objects(self) -> int:
        return int(self.shape.shape[0])


def _seed_list(seed: Seed) -> list:
    return [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]


def _footprint(shape: int, size: float) -> float:
    """Radius of a circle in the xy plane that contains the object's footprint."""
    return size * math.sqrt(2.0) if shape == CUBE else size


def sample_scene(seed: Seed, min_objects: int = 2, max_objects: int = 6) -> Scene:
    """Samples a scene deterministically from `seed` (an int or a sequence of ints).

    Positions are rejection-sampled so that objects' footprint circles (plus a small gap) do not
    overlap; as all objects rest on the ground, that rules out interpenetration.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    rng = np.random.default_rng(_seed_list(seed))
    n = int(rng.integers(min_objects, max_objects + 1))
    shapes = rng.integers(1, 4, n)
    sizes = rng.uniform(*SIZE_RANGE, n)
    rotations = rng.uniform(0, 2 * math.pi, n)
    replace = n > len(PALETTE)
    colors = PALETTE[rng.choice(len(PALETTE), n, replace=replace)]
    colors = np.clip(colors + rng.uniform(-0.06, 0.06, (n, 3)), 0.0, 1.0)
    gap = 0.05
    xy = np.zeros((n, 2))
    for k in range(n):
        placed = False
        while not placed:
            # Crowded scenes: shrink the object a little after many failed tries.
            for _ in range(100):
                r = SCENE_RADIUS * math.sqrt(rng.uniform())
                phi = rng.uniform(0, 2 * math.pi)
                cand = np.array((r * math.cos(phi), r * math.sin(phi)))
                need = np.array([_footprint(shapes[k], sizes[k]) + _footprint(shapes[j], sizes[j])
                                 + gap for j in range(k)])
                if k == 0 or np.all(np.linalg.norm(xy[:k] - cand, axis=1) > need):
                    xy[k] = cand
                    placed = True
                    break
            if not placed:
                sizes[k] *= 0.9
    position = np.concatenate((xy, sizes[:, None]), 1)
    return Scene(shape=shapes.astype(np.int64), position=position, size=sizes,
                 rotation=rotations, color=colors)


CAMERA_DISTANCE = (9.0, 12.0)     # from the scene's centre, at zoom 1


def sample_cameras(seed: Seed, num_views: int, zoom: float = 1.0) -> np.ndarray:
    """Camera positions [num_views, 3] for the scene with this seed (own stream, so the cameras
    do not depend on how many random numbers the object sampler drew); `zoom` > 1 brings them
    closer (distance / zoom), so objects fill more of the image (and some leave it)."""
    rng = np.random.default_rng(_seed_list(seed) + [0x63616D])
    near, far = CAMERA_DISTANCE
    return hemisphere_cameras(rng, num_views, radius_range=(near / zoom, far / zoom))


def scene_seed(dataset_seed: int, index: int) -> tuple:
    """The seed of scene `index` in a dataset generated with `dataset_seed`."""
    return (int(dataset_seed), int(index))


# ----------------------------------------------------------------------------------------------
# Ray tracing (torch, float64, batched over scenes)


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pack_scenes(scenes: Sequence[Scene], device) -> dict:
    """Pads scenes to the largest object count; returns float64/int64 tensors [B, n, ...]."""
    b = len(scenes)
    n = max(1, max(s.num_objects for s in scenes))
    shape = np.zeros((b, n), np.int64)
    pos = np.zeros((b, n, 3))
    size = np.ones((b, n))
    rot = np.zeros((b, n))
    col = np.zeros((b, n, 3))
    for i, s in enumerate(scenes):
        k = s.num_objects
        shape[i, :k], pos[i, :k], size[i, :k] = s.shape, s.position, s.size
        rot[i, :k], col[i, :k] = s.rotation, s.color
    t = lambda a: torch.as_tensor(a, device=device)   # noqa: E731
    return dict(shape=t(shape), position=t(pos), size=t(size), rotation=t(rot), color=t(col))


def _slab(lo: torch.Tensor, hi: torch.Tensor):
    """Nearest positive parameter of an interval [lo, hi] along a ray, inf where none."""
    hit = (lo <= hi) & (hi > T_EPS)
    t = torch.where(lo > T_EPS, lo, hi)
    return torch.where(hit, t, torch.full_like(t, math.inf))


# Bounding-sphere radius / size per shape code (0: padding, never hit).
_BOUND = (0.0, 1.0, math.sqrt(3.0), math.sqrt(2.0))


def _intersect(origins: torch.Tensor, dirs: torch.Tensor, objs: dict) -> torch.Tensor:
    """Ray parameters t [B, R, n] of the first hit of rays with each object (inf: no hit).

    origins, dirs [B, R, 3]; objs from `_pack_scenes` ([B, n, ...]). Objects cover a small part
    of the image, so a cheap bounding-sphere test picks the (ray, object) pairs that need the
    exact test; that is several times faster than testing every pair exactly.
    """
    o = origins[:, :, None, :] - objs["position"][:, None, :, :]            # [B, R, n, 3]
    d = dirs[:, :, None, :]
    bound = torch.as_tensor(_BOUND, dtype=o.dtype, device=o.device)[objs["shape"]]
    radius = (objs["size"] * bound * (1 + 1e-6))[:, None, :]                # [B, 1, n]
    a = (d * d).sum(-1)
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - radius ** 2
    disc = b * b - a * c
    cand = (disc >= 0) & (-b + torch.sqrt(disc.clamp_min(0)) > T_EPS * a) & (radius > 0)
    t = torch.full(cand.shape, math.inf, dtype=o.dtype, device=o.device)
    bi, ri, ni = cand.nonzero(as_tuple=True)
    if bi.numel():
        t[bi, ri, ni] = _intersect_pairs(o[bi, ri, ni], dirs[bi, ri], objs["size"][bi, ni],
                                         objs["rotation"][bi, ni], objs["shape"][bi, ni])
    return t


def _intersect_pairs(o: torch.Tensor, d: torch.Tensor, size: torch.Tensor, rotation: torch.Tensor,
                     shape: torch.Tensor) -> torch.Tensor:
    """Exact first-hit parameters t [M] (inf: no hit) of M rays with M objects.

    o [M, 3]: ray origins relative to the object centres; d [M, 3]: directions; size, rotation,
    shape [M].
    """
    inf = torch.full(size.shape, math.inf, dtype=o.dtype, device=o.device)

    # Sphere: |o + t d|^2 = r^2. Keep a = |d|^2: float32 rays are unit only to ~1e-7, which
    # would otherwise put hits ~1e-6 inside the sphere (and shadow them by their own surface).
    a = (d * d).sum(-1)
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - size ** 2
    disc = b * b - a * c
    sq = torch.sqrt(disc.clamp_min(0))
    t_sphere = torch.where(disc >= 0, _slab((-b - sq) / a, (-b + sq) / a), inf)

    # Cube: slabs in the box frame (the box is rotated by `rotation` about z).
    cr = torch.cos(rotation)
    sr = torch.sin(rotation)
    ol = torch.stack((cr * o[..., 0] + sr * o[..., 1], -sr * o[..., 0] + cr * o[..., 1],
                      o[..., 2]), -1)
    dl = torch.stack((cr * d[..., 0] + sr * d[..., 1], -sr * d[..., 0] + cr * d[..., 1],
                      d[..., 2]), -1)
    # Axis-parallel rays: a tiny nonzero direction keeps the slab bounds finite or +-inf, not nan.
    dl = torch.where(dl.abs() < 1e-300, torch.full_like(dl, 1e-300), dl)
    t1 = (-size[..., None] - ol) / dl
    t2 = (size[..., None] - ol) / dl
    lo = torch.minimum(t1, t2).amax(-1)
    hi = torch.maximum(t1, t2).amin(-1)
    t_cube = _slab(lo, hi)

    # Cylinder (vertical axis): the infinite cylinder's interval meets the z slab's.
    a = d[..., 0] ** 2 + d[..., 1] ** 2
    bc = o[..., 0] * d[..., 0] + o[..., 1] * d[..., 1]
    cc = o[..., 0] ** 2 + o[..., 1] ** 2 - size ** 2
    disc = bc * bc - a * cc
    sq = torch.sqrt(disc.clamp_min(0))
    vertical = a < 1e-24
    safe_a = torch.where(vertical, torch.ones_like(a), a)
    lo_c = torch.where(vertical, torch.where(cc <= 0, -inf, inf), (-bc - sq) / safe_a)
    hi_c = torch.where(vertical, torch.where(cc <= 0, inf, -inf), (-bc + sq) / safe_a)
    miss = (~vertical) & (disc < 0)
    dz = torch.where(d[..., 2].abs() < 1e-300, torch.full_like(a, 1e-300), d[..., 2])
    z1 = (-size - o[..., 2]) / dz
    z2 = (size - o[..., 2]) / dz
    lo = torch.maximum(lo_c, torch.minimum(z1, z2))
    hi = torch.minimum(hi_c, torch.maximum(z1, z2))
    t_cyl = torch.where(miss, inf, _slab(lo, hi))

    t = torch.where(shape == SPHERE, t_sphere,
                    torch.where(shape == CUBE, t_cube,
                                torch.where(shape == CYLINDER, t_cyl, inf)))
    return t


def _normals(points: torch.Tensor, ids: torch.Tensor, objs: dict) -> torch.Tensor:
    """Outward unit normals [B, R, 3] at surface points [B, R, 3] of objects ids [B, R]
    (1-based; 0 = ground, normal +z)."""
    idx = (ids - 1).clamp_min(0)
    gather = lambda a: torch.gather(a, 1, idx) if a.dim() == 2 else \
        torch.gather(a, 1, idx[..., None].expand(*idx.shape, a.shape[-1]))   # noqa: E731
    shape, pos, size, rot = (gather(objs[k]) for k in ("shape", "position", "size", "rotation"))
    p = points - pos
    sphere_n = p / size[..., None]
    c, s = torch.cos(rot), torch.sin(rot)
    pl = torch.stack((c * p[..., 0] + s * p[..., 1], -s * p[..., 0] + c * p[..., 1], p[..., 2]), -1)
    axis = (pl.abs() / size[..., None]).argmax(-1, keepdim=True)
    nl = torch.zeros_like(pl).scatter_(-1, axis, torch.gather(torch.sign(pl), -1, axis))
    cube_n = torch.stack((c * nl[..., 0] - s * nl[..., 1], s * nl[..., 0] + c * nl[..., 1],
                          nl[..., 2]), -1)
    radial = torch.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2)
    on_cap = p[..., 2].abs() >= radial
    side = torch.stack((p[..., 0], p[..., 1], torch.zeros_like(radial)), -1) \
        / radial.clamp_min(1e-12)[..., None]
    cap = torch.zeros_like(p)
    cap[..., 2] = torch.sign(p[..., 2])
    cyl_n = torch.where(on_cap[..., None], cap, side)
    up = torch.zeros_like(p)
    up[..., 2] = 1
    sh = shape[..., None]
    n = torch.where(sh == SPHERE, sphere_n, torch.where(sh == CUBE, cube_n, cyl_n))
    n = torch.where((ids == 0)[..., None], up, n)
    return n / n.norm(dim=-1, keepdim=True)


def trace(origins: torch.Tensor, dirs: torch.Tensor, objs: dict):
    """Casts rays [B, R, 3] into packed scenes; returns (t [B, R], ids [B, R] int64).

    ids: k = object k (1-based), 0 = ground plane or nothing; t = inf where nothing is hit.
    """
    t_obj = _intersect(origins, dirs, objs)
    t_best, arg = t_obj.min(-1)
    ids = torch.where(torch.isfinite(t_best), arg + 1, torch.zeros_like(arg))
    dz = dirs[..., 2]
    t_ground = torch.where(dz < 0, -origins[..., 2] / torch.where(dz < 0, dz, -torch.ones_like(dz)),
                           torch.full_like(dz, math.inf))
    ground_first = t_ground < t_best
    ids = torch.where(ground_first, torch.zeros_like(ids), ids)
    return torch.minimum(t_best, t_ground), ids


def _render_packed(objs: dict, camera_pos: torch.Tensor, height: int, width: int,
                   background: str = "ground"):
    """Renders B packed scenes from cameras [B, V, 3]; returns rgb, ids, depth [B, V, H, W, ...].
    The ground is traced (depths, masks) for either `background`; "plain" only paints it."""
    b, v = camera_pos.shape[:2]
    device = camera_pos.device
    rays = camera_rays(camera_pos.cpu().numpy(), height, width)    # float32 [B,V,H,W,3]
    # Trace exactly the float32 rays the loader uses, so depth * ray lands on the surface.
    dirs = torch.as_tensor(rays, device=device).double().reshape(b, -1, 3)
    origins = camera_pos[:, :, None, None, :].expand(b, v, height, width, 3).reshape(b, -1, 3)
    t, ids = trace(origins, dirs, objs)
    hit_any = torch.isfinite(t)
    t_safe = torch.where(hit_any, t, torch.zeros_like(t))
    points = origins + t_safe[..., None] * dirs
    normals = _normals(points, ids, objs)

    light = torch.tensor(LIGHT_DIR, dtype=torch.float64, device=device)
    light = light / light.norm()
    # Shadow rays point up (the light is above the horizon), so the ground never blocks them.
    shadow_t, _ = trace(points + SHADOW_EPS * normals, light.expand_as(points), objs)
    lit = ~torch.isfinite(shadow_t)
    lambert = (normals * light).sum(-1).clamp_min(0) * lit
    shade = AMBIENT + DIFFUSE * lambert

    obj_color = torch.gather(objs["color"], 1,
                             (ids - 1).clamp_min(0)[..., None].expand(*ids.shape, 3))
    ground = torch.tensor(GROUND_COLOR, dtype=torch.float64, device=device)
    base = torch.where((ids > 0)[..., None], obj_color, ground.expand_as(obj_color))
    rgb = (base * shade[..., None]).clamp(0, 1)
    sky = torch.tensor(SKY_COLOR, dtype=torch.float64, device=device)
    rgb = torch.where(hit_any[..., None], rgb, sky.expand_as(rgb))
    if background == "plain":
        plain = torch.tensor(PLAIN_COLOR, dtype=torch.float64, device=device)
        rgb = torch.where((ids > 0)[..., None], rgb, plain.expand_as(rgb))
    depth = torch.where(hit_any, t, torch.full_like(t, MAX_DEPTH)).clamp_max(MAX_DEPTH)
    shape = (b, v, height, width)
    return rgb.float().reshape(*shape, 3), ids.reshape(shape), depth.float().reshape(shape)


def render_views(scene: Scene, camera_pos, height: int, width: int, device="cpu",
                 background: str = "ground") -> dict:
    """Renders one scene from cameras `camera_pos` [V, 3].

    Returns numpy dict: rgb float32 [V, H, W, 3] in [0, 1], instances int64 [V, H, W]
    (0 = ground or sky, k = object k), depth float32 [V, H, W] (Euclidean distance along the
    ray; MAX_DEPTH where nothing is hit, and clipped to it). `background`: one of BACKGROUNDS.
    """
    return {k: v[0] for k, v in render_batch([scene], np.asarray(camera_pos)[None],
                                             height, width, device, background).items()}


render_scene = render_views   # the name in docs/DESIGN.md


def render_batch(scenes: Sequence[Scene], camera_pos, height: int, width: int,
                 device="cpu", background: str = "ground") -> dict:
    """Renders B scenes, each from its cameras `camera_pos` [B, V, 3], in one batched call.

    Returns the `render_views` dict with a leading batch axis [B, V, ...].
    """
    dev = _resolve_device(device)
    objs = _pack_scenes(scenes, dev)
    cams = torch.as_tensor(np.asarray(camera_pos, np.float64), device=dev)
    with torch.no_grad():
        rgb, ids, depth = _render_packed(objs, cams, height, width, background)
    return dict(rgb=rgb.cpu().numpy(), instances=ids.cpu().numpy(), depth=depth.cpu().numpy())


# ----------------------------------------------------------------------------------------------
# Dataset writer (ObSuRF / CLEVR3D layout)


def scene_files(root: str, scene: int, num_views: int) -> list:
    """Paths of all image files of one scene."""
    out = []
    for v in range(num_views):
        out += [os.path.join(root, "images", f"img_{scene}_{v}.png"),
                os.path.join(root, "masks", f"masks_{scene}_{v}.png"),
                os.path.join(root, "depths", f"depths_{scene}_{v}.png")]
    return out


def encode_depth(depth: np.ndarray) -> np.ndarray:
    """Depth (float) -> 16-bit PNG values, value = depth / 40 * 65536 clipped to 65535."""
    value = np.round(depth.astype(np.float64) / MAX_DEPTH * 65536)
    return np.clip(value, 0, 65535).astype(np.uint16)


def decode_depth(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) / 65536 * MAX_DEPTH


SUBFOLDERS = ("images", "masks", "depths")
SETTINGS_FILE = "generator.json"
# Temporary files are "<TMP_PREFIX><final name>.<random>", beside the file they become
# (files.write_atomic).
# Instance masks are 8-bit PNGs holding object ids 1 .. MAX_OBJECTS (0 is the background).
MAX_OBJECTS = 255
LOCK_HINT = (" (the built-in data is generated once, by `python -m osrt_fast.scenes` or by the "
             "first training run that needs it; once that has finished, later runs reuse it)")


def _write_png(path: str, array: np.ndarray) -> None:
    from PIL import Image
    _write_atomic(path, lambda f: Image.fromarray(array).save(f, format="PNG", compress_level=1))


def _remove_stale_temporaries(root: str) -> int:
    """Deletes the temporary files a killed generator left in `root` (also the fixed names
    '*.tmp.png' and 'metadata.tmp.npz' of earlier versions); returns how many. Call it only
    while holding the folder lock: a running generator's temporaries would go too."""
    def stale(name):
        return name.startswith(TMP_PREFIX) or name.endswith(".tmp.png") or name == "metadata.tmp.npz"
    return sum(remove_files(folder, stale)[0]
               for folder in [root] + [os.path.join(root, sub) for sub in SUBFOLDERS])


SETTING_KEYS = ("num_scenes", "height", "width", "num_views", "min_objects", "max_objects",
                "seed")


def _settings(*values, zoom: float = 1.0, background: str = "ground",
              cameras: str = "random") -> dict:
    """generator.json's content: the SETTING_KEYS with these values, as ints, and `zoom`,
    `background` and `cameras` where they are not the defaults (so folders written before they
    existed keep matching)."""
    settings = {k: int(v) for k, v in zip(SETTING_KEYS, values)}
    if zoom != 1.0:
        settings["zoom"] = float(zoom)
    if background != "ground":
        settings["background"] = background
    if cameras != "random":
        settings["cameras"] = cameras
    return settings


def _device_problem(device) -> Optional[str]:
    """Why `device` cannot render here, or None."""
    try:
        dev = _resolve_device(device)
    except (RuntimeError, ValueError):
        return f"device {device!r} is not a device name; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
    if dev.type == "cuda" and not (torch.cuda.is_available()
                                   and (dev.index or 0) < torch.cuda.device_count()):
        return f"device {device!r} is not available here; use 'cpu' or 'auto'"
    return None


def check_settings(num_scenes: int, height: int, width: int, num_views: int, min_objects: int,
                   max_objects: int, seed: int, device="cpu",
                   batch_scenes: Optional[int] = None, zoom: float = 1.0,
                   background: str = "ground", cameras: str = "random") -> None:
    """DataError naming every invalid generator argument (before anything is written)."""
    problems = [f"{name} must be at least 1, got {value}" for name, value in
                (("num_scenes", num_scenes), ("height", height), ("width", width),
                 ("num_views", num_views), ("min_objects", min_objects)) if value < 1]
    if min_objects > max_objects:
        problems.append(f"min_objects ({min_objects}) must not exceed max_objects "
                        f"({max_objects})")
    if max_objects > MAX_OBJECTS:
        problems.append(f"max_objects must be at most {MAX_OBJECTS} (8-bit instance masks), "
                        f"got {max_objects}")
    if seed < 0:
        problems.append(f"seed must be 0 or more, got {seed}")
    if not 0.5 <= zoom <= 4.0:
        problems.append(f"zoom must be between 0.5 and 4, got {zoom}")
    if background not in BACKGROUNDS:
        problems.append(f"background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
    if cameras not in CAMERAS:
        problems.append(f"cameras must be one of {', '.join(CAMERAS)}, got {cameras!r}")
    if batch_scenes is not None and batch_scenes < 1:
        problems.append(f"batch_scenes must be at least 1, got {batch_scenes}")
    device_problem = _device_problem(device)
    if device_problem:
        problems.append(device_problem)
    if problems:
        raise DataError("invalid generator settings: " + "; ".join(problems) + ". Nothing was "
                        "written.")


def read_settings(root: str) -> Optional[dict]:
    """The settings in `root`'s generator.json, None if it has none; DataError if the file is
    damaged (unreadable JSON, or not the generator's settings)."""
    path = os.path.join(root, SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {e}"
    else:
        missing = [k for k in SETTING_KEYS if not isinstance(settings, dict)
                   or not isinstance(settings.get(k), int)]
        if not missing:
            return settings
        reason = f"no integer setting(s) {missing}"
    raise DataError(f"'{path}' is damaged ({reason}). Delete the folder '{root}' to generate the "
                    f"built-in data again.")


def _claim_folder(root: str, settings: dict, progress: bool) -> None:
    """Prepares `root` for generation with `settings` (the folder lock held): removes stale
    temporaries, creates the subfolders, and records the settings in generator.json, or checks
    that the ones recorded there match."""
    removed = _remove_stale_temporaries(root)
    if removed and progress:
        print(f"removed {removed} temporary files a stopped generator left in {root}", flush=True)
    for sub in SUBFOLDERS:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    old = read_settings(root)
    if old is None:
        _write_atomic(os.path.join(root, SETTINGS_FILE),
                      lambda f: f.write(json.dumps(settings).encode()))
    elif old != settings:
        raise DataError(
            f"{root} holds a procedural dataset generated with other settings ({old}); "
            f"asked for {settings}. Use another --out folder or delete this one.")


def _sample_metadata(settings: dict) -> tuple:
    """(metadata arrays, scenes) of a dataset with these settings (see `generate_dataset`)."""
    n, v, o = settings["num_scenes"], settings["num_views"], settings["max_objects"] + 1
    meta = dict(camera_pos=np.zeros((n, v, 3), np.float32),
                shape=np.zeros((n, o), np.int64),
                **{"3d_coords": np.zeros((n, o, 3), np.float32)},
                color=np.zeros((n, o, 3), np.float32),
                size=np.zeros((n, o), np.float32),
                rotation=np.zeros((n, o), np.float32))
    scenes = []
    for i in range(n):
        seed = scene_seed(settings["seed"], i)
        s = sample_scene(seed, settings["min_objects"], settings["max_objects"])
        k = s.num_objects
        camera_seed = scene_seed(settings["seed"], 0) \
            if settings.get("cameras", "random") == "fixed" else seed
        meta["camera_pos"][i] = sample_cameras(camera_seed, v, settings.get("zoom", 1.0))
        meta["shape"][i, 1:k + 1] = s.shape
        meta["3d_coords"][i, 1:k + 1] = s.position
        meta["color"][i, 1:k + 1] = s.color
        meta["size"][i, 1:k + 1] = s.size
        meta["rotation"][i, 1:k + 1] = s.rotation
        scenes.append(s)
    return meta, scenes


def _render_scenes(root: str, todo: list, scenes: list, camera_pos: np.ndarray, height: int,
                   width: int, device, progress: bool, batch_scenes: int,
                   background: str) -> None:
    """Renders scenes `todo` and writes their images, masks and depths."""
    num_views = camera_pos.shape[1]
    bar = None
    if progress and todo:
        from osrt_fast.progress import progress_counter
        bar = progress_counter(len(todo), f"generating {root}", "scene")
    for start in range(0, len(todo), batch_scenes):
        chunk = todo[start:start + batch_scenes]
        # Camera positions are rendered from the stored float32 values: the loader's rays
        # come from those, so images and rays agree exactly.
        out = render_batch([scenes[i] for i in chunk], camera_pos[chunk].astype(np.float64),
                           height, width, device, background)
        for j, i in enumerate(chunk):
            for v in range(num_views):
                img_p, mask_p, depth_p = scene_files(root, i, num_views)[3 * v:3 * v + 3]
                _write_png(img_p, np.round(out["rgb"][j, v] * 255).astype(np.uint8))
                _write_png(mask_p, out["instances"][j, v].astype(np.uint8))
                _write_png(depth_p, encode_depth(out["depth"][j, v]))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def generate_dataset(root: str, num_scenes: int, height: int = 64, width: int = 64,
                     num_views: int = 4, min_objects: int = 2, max_objects: int = 6,
                     seed: int = 0, device="cpu", progress: bool = True,
                     batch_scenes: Optional[int] = None, zoom: float = 1.0,
                     background: str = "ground", cameras: str = "random") -> str:
    """Writes `num_scenes` procedural scenes to `root` in the ObSuRF / CLEVR3D layout.

    zoom: cameras closer by this factor (larger objects); background: one of BACKGROUNDS;
    cameras: one of CAMERAS.

    metadata.npz: camera_pos float32 [N, V, 3]; shape int64 [N, O], 3d_coords float32 [N, O, 3],
    color float32 [N, O, 3], size float32 [N, O], rotation float32 [N, O], with O = max_objects
    + 1 and column 0 the background (zeros). images/img_{s}_{v}.png RGB uint8, masks/
    masks_{s}_{v}.png uint8 instance ids, depths/depths_{s}_{v}.png uint16 depth codes.

    The arguments are checked before anything is written (DataError). Generation holds the
    folder's lock (`locks.FolderLock`): a second generator on the same folder gets a DataError
    naming the first. Resumable: scenes whose files all exist are skipped; every file is written
    under a unique temporary name and renamed, and metadata.npz is written last, so its presence
    marks a complete dataset. Returns `root`.
    """
    check_settings(num_scenes, height, width, num_views, min_objects, max_objects, seed, device,
                   batch_scenes, zoom, background, cameras)
    settings = _settings(num_scenes, height, width, num_views, min_objects, max_objects, seed,
                         zoom=zoom, background=background, cameras=cameras)
    lock = FolderLock(root, what="dataset folder", hint=LOCK_HINT)
    try:
        lock.acquire()
    except LockedError as e:
        raise DataError(str(e)) from None
    try:
        _claim_folder(root, settings, progress)
        meta, scenes = _sample_metadata(settings)
        todo = [i for i in range(num_scenes)
                if not all(os.path.exists(p) for p in scene_files(root, i, num_views))]
        if batch_scenes is None:
            # About 64k rays per torch call: big enough to amortise overhead, small in memory.
            batch_scenes = max(1, 65536 // (height * width * num_views))
        _render_scenes(root, todo, scenes, meta["camera_pos"], height, width, device, progress,
                       batch_scenes, background)
        _write_atomic(os.path.join(root, "metadata.npz"), lambda f: np.savez(f, **meta))
    finally:
        lock.release()
    return root


@command
def main(argv: Optional[Iterable[str]] = None) -> int:
    """The CLI; returns the exit code: 0 done, 2 invalid arguments or folder in use."""
    p = argparse.ArgumentParser(prog="python -m osrt_fast.scenes",
                                description="Generate the built-in procedural dataset "
                                            "(ObSuRF / CLEVR3D folder layout).")
    p.add_argument("--out", default="data/procedural", help="output folder")
    p.add_argument("--num-scenes", type=int, default=1000)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--num-views", type=int, default=4)
    p.add_argument("--min-objects", type=int, default=2)
    p.add_argument("--max-objects", type=int, default=6, help=f"at most {MAX_OBJECTS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    p.add_argument("--zoom", type=float, default=1.0,
                   help="cameras closer by this factor (0.5-4): larger objects in the images")
    p.add_argument("--background", default="ground", choices=BACKGROUNDS,
                   help="'ground': a shaded ground plane and sky; 'plain': one flat colour "
                        "behind the objects (easier to learn to segment)")
    p.add_argument("--cameras", default="random", choices=CAMERAS,
                   help="'random': each scene its own cameras; 'fixed': all scenes seen from the "
                        "same cameras (a nearly 2D task, for studying learning)")
    a = p.parse_args(None if argv is None else list(argv))
    t0 = time.time()
    generate_dataset(a.out, a.num_scenes, a.height, a.width, a.num_views, a.min_objects,
                     a.max_objects, a.seed, a.device, zoom=a.zoom,
                     background=a.background, cameras=a.cameras)
    dt = time.time() - t0
    print(f"wrote {a.num_scenes} scenes to {a.out} in {dt:.1f} s "
          f"({a.num_scenes / max(dt, 1e-9):.1f} scenes/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
