"""Rendering novel views: chunked decoding, a scene's frames and videos along a camera motion
(the motions: `cameras.camera_motion`), and the training visualisation grids (`visualize`).

Output layout of `render_scene_frames` (the reference's, under `<run>/render/<name>/<sceneid>/`):
    input_{i}.png             every input view
    renders/{frame}.png       rendered RGB
    segmentations/{frame}.png colourised argmax over slots (slot decoders only)
    strip.png                 input 0, then 8 frames along the motion, segmentations below (ours)
    renders.mp4               the renders as a video
    video.mp4                 side by side: input 0 (scaled to the render height) | render | seg
"""
from __future__ import annotations

import functools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, NamedTuple, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from . import parallel
from .cameras import MOTIONS, apply_fade, camera_motion, rotate_about_z
from .data.records import to_device
from .drawing import colorize_segmentation, draw_visualization_grid, to_uint8
from .metrics import fg_ari
from .progress import progress_bar


# --------------------------------------------------------------------------- chunked decoding

def render_image(decoder: Callable, latents, camera_pos: torch.Tensor, rays: torch.Tensor,
                 max_rays: int = 16384) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Decodes whole images, at most `max_rays` rays at a time, so memory stays bounded at any
    resolution.

    Args:
        decoder: a ray decoder, `decoder(latents, camera_pos [B, R, 3], rays [B, R, 3],
            max_rays=N) -> (pixels [B, R, 3], extras)` (model.RayDecoder: it decodes in chunks
            of at most N rays over all scenes); extras maps names to per-ray tensors [B, R, ...]
            (e.g. 'segmentation' [B, R, K]).
        latents: whatever the encoder returned (passed through unchanged).
        camera_pos: [B, 3] one camera per scene.
        rays: [B, H, W, 3] ray directions.
        max_rays: rays per decoder pass, summed over the batch (the reference uses
            num_points * batch_size, i.e. a training step's worth).
    Returns:
        img [B, H, W, 3] and extras with each per-ray tensor reshaped to [B, H, W, ...]; extras
        that are not per-ray tensors are dropped.

    Gradient mode is the caller's choice: wrap in `torch.no_grad()` for inference.
    """
    if rays.dim() != 4 or rays.shape[-1] != 3:
        raise ValueError(f"rays must be [B, H, W, 3], got {tuple(rays.shape)}")
    batch_size, height, width = rays.shape[:3]
    if camera_pos.shape != (batch_size, 3):
        raise ValueError(f"camera_pos must be [B, 3] = [{batch_size}, 3], "
                         f"got {tuple(camera_pos.shape)}")
    num_rays = height * width
    flat_pos = camera_pos[:, None, :].expand(batch_size, num_rays, 3).contiguous()
    pixels, extras = decoder(latents, flat_pos, rays.reshape(batch_size, num_rays, 3),
                             max_rays=int(max_rays))
    per_ray = {k: v.reshape(batch_size, height, width, *v.shape[2:]) for k, v in (extras or {}).items()
               if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (batch_size, num_rays)}
    return pixels.reshape(batch_size, height, width, -1), per_ray


# --------------------------------------------------------------------------- videos

def _even_frame(frame, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """uint8 [H, W, 3] padded (edge pixels repeated) to even height and width for yuv420p."""
    frame = to_uint8(frame)
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, -1)
    frame = frame[..., :3]
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def check_video_support() -> None:
    """Raises RuntimeError with the fix when videos can't be written (imageio-ffmpeg missing)."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise RuntimeError("writing videos needs the imageio-ffmpeg package (it bundles ffmpeg): "
                           "pip install imageio-ffmpeg, or render frames only with --novideo "
                           "(video=False)") from None


def write_video(frames: Iterable, path: str, fps: float = 30, quality: float = 7) -> int:
    """Encodes frames (uint8 [H, W, 3], or float in [0, 1]) to an H.264 / yuv420p mp4.

    Uses imageio-ffmpeg's bundled ffmpeg, so no system ffmpeg is needed. Odd heights or widths
    are padded by one edge pixel (yuv420p needs even sizes). All frames must have the first
    frame's size. The file is written under a temporary name and renamed when complete, so an
    interrupted run never leaves a truncated video that looks finished.
    Returns the number of frames written.
    """
    check_video_support()
    import imageio_ffmpeg

    it = iter(frames)
    try:
        first = _even_frame(next(it))
    except StopIteration:
        raise ValueError(f"write_video({path!r}) got no frames") from None
    h, w = first.shape[:2]
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial{ext or '.mp4'}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        tmp, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=quality,
        macro_block_size=2, ffmpeg_log_level="error")
    count = 0
    try:
        writer.send(None)
        frame = first
        while True:
            if frame.shape[:2] != (h, w):
                raise ValueError(f"frame {count} has size {frame.shape[:2]}, expected {(h, w)} "
                                 "like the first frame (after padding to even sizes)")
            writer.send(frame)
            count += 1
            try:
                frame = _even_frame(next(it))
            except StopIteration:
                break
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    return count


def _resize_to_height(img: np.ndarray, height: int) -> np.ndarray:
    if img.shape[0] == height:
        return img
    width = max(1, round(img.shape[1] * height / img.shape[0]))
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------- scenes

class SceneInputs(NamedTuple):
    """A scene's input views as the encoder takes them, batched as one scene, on one device."""
    images: torch.Tensor                 # [1, V, 3, H, W]
    camera_pos: torch.Tensor             # [1, V, 3]
    rays: Optional[torch.Tensor]         # [1, V, H, W, 3]; None when the slots are given
    transform: Optional[torch.Tensor]    # [4, 4] world to model, for canonical-camera datasets


def _batched_tensor(x, device, ndim: int) -> torch.Tensor:
    """Item entry -> float tensor on device with a leading batch dim of 1 (added if missing)."""
    t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    t = t.to(device=device, dtype=torch.float32)
    if t.dim() == ndim - 1:
        t = t[None]
    if t.dim() != ndim or t.shape[0] != 1:
        raise ValueError(f"expected an unbatched item or a batch of one, got shape "
                         f"{tuple(t.shape)}")
    return t


def scene_inputs(item: dict, device, with_rays: bool = True) -> SceneInputs:
    """The input views of a dataset item (numpy or torch, with or without a leading batch dim of
    1); input_rays is read only `with_rays`."""
    transform = item.get("transform")
    return SceneInputs(
        images=_batched_tensor(item["input_images"], device, 5),
        camera_pos=_batched_tensor(item["input_camera_pos"], device, 3),
        rays=_batched_tensor(item["input_rays"], device, 5) if with_rays else None,
        transform=None if transform is None else _batched_tensor(transform, device, 3)[0])


@dataclass(frozen=True)
class CameraPath:
    """The camera of each frame of a motion: frame f is at t = f / num_frames, eased by
    `apply_fade` when `fade` is set. base_pos [1, 3] and transform [4, 4] live on the CPU, where
    the rays are made (in a worker thread, while the device decodes the frame before)."""
    motion: str
    base_pos: torch.Tensor
    transform: Optional[torch.Tensor]
    num_frames: int
    height: int
    width: int
    fade: bool = False

    def time(self, frame: int) -> float:
        t = frame / self.num_frames
        # The reference's zoom runs on the raw frame fraction even with --fade.
        return apply_fade(t) if self.fade and self.motion != "zoom" else t

    def camera(self, frame: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(camera_pos [1, 3], rays [1, H, W, 3]) of `frame`, on the CPU."""
        return camera_motion(self.motion, self.base_pos, self.time(frame), self.height,
                             self.width, self.transform)


def _save_png(img: np.ndarray, path: str) -> None:
    Image.fromarray(img).save(path)


def save_frame(out_dir: str, frame: int, rgb: np.ndarray, labels: Optional[np.ndarray],
               num_slots: int) -> None:
    """renders/{frame}.png from rgb [H, W, 3] in [0, 1], and segmentations/{frame}.png from
    labels [H, W] (the argmax over `num_slots` slots) when there are any."""
    _save_png(to_uint8(rgb), os.path.join(out_dir, "renders", f"{frame}.png"))
    if labels is not None:
        _save_png(colorize_segmentation(labels, num_slots),
                  os.path.join(out_dir, "segmentations", f"{frame}.png"))


def render_frames(decode: Callable, latents, path: CameraPath, out_dir: str, device,
                  max_rays: int = 16384, progress: bool = True) -> bool:
    """Decodes every frame of `path` into out_dir/renders/ (and out_dir/segmentations/ when the
    decoder gives a segmentation, which it returns). `decode` and `latents` as `render_image`
    takes them; call it under torch.no_grad()."""
    os.makedirs(os.path.join(out_dir, "renders"), exist_ok=True)
    segmentation = False
    pending = []
    # Worker threads compute the next frame's rays and compress PNGs (PIL and numpy release the
    # GIL) while the accelerator decodes, so the device is not idle between frames.
    with ThreadPoolExecutor(max_workers=3) as pool:
        next_camera = pool.submit(path.camera, 0)
        frames = progress_bar(range(path.num_frames), enabled=progress,
                              desc=f"render {path.motion}", unit="frame")
        for frame in frames:
            camera_pos, rays = next_camera.result()
            if frame + 1 < path.num_frames:
                next_camera = pool.submit(path.camera, frame + 1)
            img, extras = render_image(decode, latents, camera_pos.to(device), rays.to(device),
                                       max_rays)
            seg = extras.get("segmentation")
            labels, num_slots = None, 0
            if seg is not None:
                if not segmentation:
                    os.makedirs(os.path.join(out_dir, "segmentations"), exist_ok=True)
                    segmentation = True
                labels, num_slots = seg[0].argmax(-1).cpu().numpy(), seg.shape[-1]
            pending.append(pool.submit(save_frame, out_dir, frame, img[0].float().cpu().numpy(),
                                       labels, num_slots))
            # Bounded backlog: surfaces write errors early and caps memory at a few frames.
            while len(pending) > 4:
                pending.pop(0).result()
        for write in pending:
            write.result()
    return segmentation


def write_videos(out_dir: str, num_frames: int, input_view: np.ndarray, segmentation: bool,
                 fps: float = 30) -> Tuple[str, str]:
    """out_dir/renders.mp4 (the renders) and out_dir/video.mp4 (input view 0 scaled to the
    render height, as the reference's plot video shows it | render | segmentation, when there
    are segmentations) from the frames `render_frames` wrote; returns their paths."""
    def frame_png(kind: str, frame: int) -> np.ndarray:
        return _read_png(os.path.join(out_dir, kind, f"{frame}.png"))

    renders_video = os.path.join(out_dir, "renders.mp4")
    write_video((frame_png("renders", f) for f in range(num_frames)), renders_video, fps)

    def side_by_side():
        left = _resize_to_height(input_view, frame_png("renders", 0).shape[0])
        for f in range(num_frames):
            parts = [left, frame_png("renders", f)]
            if segmentation:
                parts.append(frame_png("segmentations", f))
            yield np.concatenate(parts, 1)

    video = os.path.join(out_dir, "video.mp4")
    write_video(side_by_side(), video, fps)
    return renders_video, video


def _device_of(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def render_scene_frames(model, item: dict, out_dir: str, motion: str, num_frames: int = 360,
                        height: Optional[int] = None, width: Optional[int] = None,
                        fade: bool = False, device=None, fps: float = 30, video: bool = True,
                        max_rays: int = 16384, progress: bool = True,
                        slots: Optional[torch.Tensor] = None,
                        visible: Optional[torch.Tensor] = None) -> dict:
    """Renders one scene along a camera motion into `out_dir` (layout in the module docstring).

    Args:
        model: `OSRT` (`.encoder(images [B,V,3,H,W], camera_pos [B,V,3], rays [B,V,H,W,3])`,
            `.decoder(latents, camera_pos [B,R,3], rays [B,R,3]) -> (pixels, extras)`).
        item: a dataset item (numpy or torch, with or without a leading batch dim of 1) with
            input_images [V,3,H,W], input_camera_pos [V,3], input_rays [V,H,W,3] and optionally
            transform [4,4].
        motion: one of MOTIONS; the base camera is the first input view.
        num_frames: frames over one full motion (t = frame / num_frames).
        height, width: render size; default the input images' size.
        fade: ease in and out (`apply_fade`). As in the reference, 'zoom' ignores it.
        device: where to run; default the model's device.
        fps: video frame rate.
        video: also write renders.mp4 and video.mp4.
        max_rays: rays per decoder call (see `render_image`).
        slots: the scene's slots [K, D] (e.g. from a slots file): then the encoder is not run and
            `item` needs no input_rays.
        visible: indices of the slots to mix from (slot editing; see osrt_fast/slots.py).
    Returns:
        dict with 'dir', 'num_frames', 'seconds' (rendering only), 'segmentation' (bool) and the
        paths 'strip' (strip.png, `write_strip`) and 'renders_video' / 'video' (None without
        videos).
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; valid motions are: {', '.join(MOTIONS)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if video:
        check_video_support()   # before minutes of rendering, not after
    device = torch.device(device) if device is not None else _device_of(model)
    scene = scene_inputs(item, device, with_rays=slots is None)
    height = int(height or scene.images.shape[3])
    width = int(width or scene.images.shape[4])
    transform = scene.transform.cpu() if scene.transform is not None else None
    path = CameraPath(motion, scene.camera_pos[:, 0].cpu(), transform, num_frames, height, width,
                      fade)

    os.makedirs(out_dir, exist_ok=True)
    inputs = to_uint8(scene.images[0].permute(0, 2, 3, 1))              # [V, H, W, 3]
    for i, img in enumerate(inputs):
        _save_png(img, os.path.join(out_dir, f"input_{i}.png"))

    model.eval()
    decode = model.decoder if visible is None else functools.partial(model.decoder,
                                                                     visible=visible.to(device))
    start = time.perf_counter()
    with torch.no_grad():
        latents = (model.encoder(scene.images, scene.camera_pos, scene.rays) if slots is None
                   else slots.to(device)[None])
        segmentation = render_frames(decode, latents, path, out_dir, device, max_rays, progress)
    seconds = time.perf_counter() - start

    result = {"dir": out_dir, "num_frames": num_frames, "seconds": seconds,
              "segmentation": segmentation, "renders_video": None, "video": None,
              "strip": write_strip(out_dir, num_frames, inputs[0], segmentation)}
    if video:
        result["renders_video"], result["video"] = write_videos(out_dir, num_frames, inputs[0],
                                                                segmentation, fps)
    return result


def write_strip(out_dir: str, num_frames: int, input_view: np.ndarray, segmentation: bool,
                frames: int = 8) -> str:
    """`out_dir`/strip.png: input view 0, then up to `frames` evenly spaced frames of the motion,
    renders above their segmentations (when there are any): the motion at a glance."""
    picks = sorted({round(i * num_frames / frames) for i in range(frames)} - {num_frames})
    rows = [[_read_png(os.path.join(out_dir, "renders", f"{f}.png")) for f in picks]]
    if segmentation:
        rows.append([_read_png(os.path.join(out_dir, "segmentations", f"{f}.png")) for f in picks])
    height = rows[0][0].shape[0]
    first = [_resize_to_height(input_view, height)]
    first.append(np.zeros_like(first[0]) if segmentation else None)
    gap = np.full((height, 2, 3), 255, np.uint8)
    lines = []
    for lead, row in zip(first, rows):
        parts = [lead]
        for frame in row:
            parts += [gap, frame]
        lines.append(np.concatenate(parts, 1))
    path = os.path.join(out_dir, "strip.png")
    _save_png(np.concatenate(lines, 0), path)
    return path


@torch.no_grad()
def visualize(model, batch: dict, path: Optional[str], device, num_angles: int = 6,
              max_rays: int = 16384, precision: str = "fp32"):
    """A grid per scene: input views, true segmentation, renders and predicted segmentations from
    cameras rotated about the scene's z axis. With several processes every one renders (a
    sharded model needs them all) and the one given a `path` writes it."""
    model = parallel.for_inference(model)
    was_training = model.training
    model.eval()
    batch = to_device(batch, device)
    images, cam, rays = batch["input_images"], batch["input_camera_pos"], batch["input_rays"]
    if parallel.is_sharded(model):
        # Through the root module (its hooks gather the parameters); it encodes once and
        # decodes in chunks of max_rays.
        latents = None

        def decode(_, target_cam, target_rays, max_rays):
            return model(images, cam, rays, target_cam, target_rays, max_rays=max_rays)
    else:
        with parallel.autocast(device, precision):
            latents = model.encoder(images, cam, rays)
        decode = model.decoder
    columns = [(f"input {i + 1}" if images.shape[1] > 1 else "input",
                images[:, i].permute(0, 2, 3, 1).cpu().numpy(), "image") for i in range(images.shape[1])]
    labels = None
    if "input_masks" in batch:
        true = batch["input_masks"][:, 0]
        columns.append(("true seg 0°", true.argmax(-1).cpu().numpy(), "clustering"))
    for i in range(num_angles):
        angle = 2 * math.pi * i / num_angles
        with parallel.autocast(device, precision):
            img, extras = render_image(decode, latents, rotate_about_z(cam[:, 0], angle),
                                       rotate_about_z(rays[:, 0], angle), max_rays=max_rays)
        columns.append((f"render {360 * i // num_angles}°", img.float().clamp(0, 1).cpu().numpy(), "image"))
        if "segmentation" in extras:
            seg = extras["segmentation"].float()
            columns.append((f"pred seg {360 * i // num_angles}°", seg.argmax(-1).cpu().numpy(),
                            "clustering"))
            if i == 0 and "input_masks" in batch:
                score = fg_ari(true.flatten(1, 2).float(), seg.flatten(1, 2).float())
                labels = [f"FG-ARI {s:.2f}" for s in score.tolist()]
    if path is not None:
        draw_visualization_grid(columns, path, row_labels=labels)
    if was_training:
        model.train()
