"""A live browser viewer of what a trained OSRT sees: novel views, segmentations, slot editing.

    python -m osrt_fast.view CONFIG [--checkpoint P] [--sceneid N] [--split val]
        [--slots FILE] [--host 127.0.0.1] [--port 8080] [--height 128] [--no-cuda]

It encodes the chosen scene once (or takes its slots from a file of `python -m osrt_fast.encode`,
--slots) and serves a page (viser) at the printed URL. As the camera orbits, pans and zooms the
model renders the view from the slots, at a quarter of the pixels while the camera moves and at
full resolution once it stops. The input views stand in the scene as camera frustums with their
images. The panel switches between the render, the segmentation (render.py's slot colours), the
two blended and one slot's weight map; hides or solos slots (the Slot Mixer then mixes each
pixel from the remaining slots: object removal, as in the paper's editing figures); picks the
scene; sets the resolution; saves the current view as a PNG.

`Viewer` (no server) holds the model and a scene's slots and renders images: the tested core.
`LiveView` serves a Viewer: start() starts its server and render thread, stop() ends them (or
`with LiveView(...) as live:`).
Exit codes: 0 after Ctrl-C; 2 for bad arguments, config, checkpoint, data or slots file, a port
that cannot be served, or the viewer extra (viser) missing.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from . import process
from .errors import MissingExtra, UsageError, command
from .runs import output_dir_for
from .slots import SlotSet, SlotsError, check_model_matches, encode_scenes, load_slots, render_view
from .drawing import segmentation_colors

MODES = ("render", "segmentation", "blend", "slot weight")
HOME_BACK = 1.3     # the start view: input view 0's camera moved back by this factor
INSTALL_HINT = "the viewer needs viser: pip install -e '.[viewer]' (or pip install viser)"


@dataclass
class ViewSettings:
    """What the viewer shows. mode: one of MODES; hidden / solo: slot editing (see
    slots.visible_slots); weight_slot: the slot whose weight map 'slot weight' shows."""
    mode: str = "render"
    hidden: frozenset = field(default_factory=frozenset)
    solo: Optional[int] = None
    weight_slot: int = 0


def compose(rgb: torch.Tensor, weights: torch.Tensor, settings: ViewSettings) -> np.ndarray:
    """A rendered view (rgb [H, W, 3] in [0, 1], slot weights [H, W, K]) -> the image shown,
    uint8 [H, W, 3]."""
    rgb = rgb.float().cpu().numpy()
    if settings.mode == "render":
        out = rgb
    elif settings.mode == "slot weight":
        k = settings.weight_slot
        if not 0 <= k < weights.shape[-1]:
            raise SlotsError(f"slot {k} does not exist: the model has {weights.shape[-1]} slots")
        out = np.repeat(weights[..., k].float().cpu().numpy()[..., None], 3, -1)
    else:
        colors = segmentation_colors(weights.shape[-1]).astype(np.float32) / 255
        seg = colors[weights.argmax(-1).cpu().numpy()]
        out = seg if settings.mode == "segmentation" else 0.5 * rgb + 0.5 * seg
    if settings.mode not in MODES:
        raise ValueError(f"unknown mode {settings.mode!r}; one of {', '.join(MODES)}")
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


class Viewer:
    """A trained model and the scenes it shows: encodes a scene on first view (or takes the
    slots of a `SlotSet`) and renders it from any camera.

    source: a dataset split (scenes encoded as they are picked, their input views as `spec`,
    a `BatchSpec`, makes them: `data.batch_spec(cfg.data, dataset)`) or a SlotSet."""

    def __init__(self, model, source, config: Optional[dict] = None, max_rays: int = 16384,
                 spec=None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.source, self.config, self.max_rays = source, config or {}, max_rays
        if spec is None and not isinstance(source, SlotSet):
            raise ValueError("a dataset source needs the BatchSpec of its run "
                             "(osrt_fast.data.batch_spec(cfg.data, dataset))")
        self.spec = spec
        self.lock = threading.Lock()
        self.scene: Optional[SlotSet] = None
        self.scene_id: Optional[int] = None
        if isinstance(source, SlotSet):
            check_model_matches(source, model)

    def scene_ids(self) -> list:
        if isinstance(self.source, SlotSet):
            return self.source.scene_ids.tolist()
        return list(range(len(self.source)))

    def load_scene(self, scene_id: int) -> SlotSet:
        """Makes `scene_id` the current scene (one scene's SlotSet, slots on the model's device)."""
        with self.lock:
            if isinstance(self.source, SlotSet):
                one = self.source.select(self.source.index(scene_id))
            else:
                if not 0 <= scene_id < len(self.source):
                    raise SlotsError(f"scene {scene_id} is not in the split (0-"
                                     f"{len(self.source) - 1})")
                one = encode_scenes(self.model, self.source, self.spec, [scene_id], self.config,
                                    self.device)
            one.slots = one.slots.to(self.device)
            self.scene, self.scene_id = one, int(scene_id)
            return one

    @property
    def num_slots(self) -> int:
        return int(self.scene.slots.shape[1])

    def home_camera(self, back: float = 1.0):
        """(position [3], rotation [3, 3], vertical fov) of the scene's first input view, `back`
        times as far from the origin."""
        s = self.scene
        return s.input_camera_pos[0, 0] * back, s.input_camera_rot[0, 0], float(s.input_fov[0, 0])

    def render(self, position, rot, fov_y: float, height: int, width: int,
               settings: Optional[ViewSettings] = None) -> np.ndarray:
        """The current scene from a pinhole camera (see slots.render_view), as shown: uint8
        [height, width, 3]."""
        settings = settings or ViewSettings()
        with self.lock:
            rgb, weights = render_view(self.model, self.scene.slots[0], position, rot, fov_y,
                                       height, width, hide=settings.hidden, solo=settings.solo,
                                       max_rays=self.max_rays)
        return compose(rgb, weights, settings)


# ----------------------------------------------------------------------------------------------
# The browser front end (viser)

def require_viser():
    try:
        import viser
    except ImportError:
        raise MissingExtra(INSTALL_HINT) from None
    return viser


@dataclass(frozen=True, eq=False)
class CameraState:
    """A client's camera as one update left it: position [3], rotation [3, 3] (camera-to-world,
    OpenCV axes), vertical fov (radians), aspect (width / height) and moved_at (time.monotonic()
    of the update). eq=False: states compare by identity, so a new update is a new camera even
    where it repeats the last pose."""
    position: np.ndarray
    rotation: np.ndarray
    fov_y: float
    aspect: float
    moved_at: float

    def width(self, height: int) -> int:
        """The image width that keeps the camera's aspect at `height` pixels."""
        return max(1, round(height * self.aspect))


class Shown(NamedTuple):
    """The frame on a client's screen: the camera it was rendered for and its height."""
    camera: CameraState
    height: int


def next_job(cameras: dict, shown: dict, full_height: int, settle_s: float,
             now: float) -> Optional[Tuple[int, CameraState, int]]:
    """(client id, camera, height) of the next frame to render, or None when every screen is up
    to date. cameras: client id -> CameraState; shown: client id -> Shown. A camera moved less
    than settle_s before `now` gets a quick frame (half the height); a resting one its
    full-resolution frame, once."""
    for client_id, camera in cameras.items():
        on_screen = shown.get(client_id)
        resting = now - camera.moved_at >= settle_s
        height = full_height if resting else max(16, full_height // 2)
        if (on_screen is None or on_screen.camera is not camera
                or (resting and on_screen.height != full_height)):
            return client_id, camera, height
    return None


class LiveView:
    """Serves `viewer` with viser: GUI, input frustums, and a render loop that answers camera
    moves (low resolution while moving, full once the camera rests for `settle_s`).

    The constructor only stores its options; start() starts the server and the render thread,
    stop() ends both. `with LiveView(...) as live:` does the two around a block."""

    def __init__(self, viewer: Viewer, host: str = "127.0.0.1", port: int = 8080,
                 height: int = 128, save_dir: str = ".", settle_s: float = 0.25,
                 mode: str = "render", stop_timeout_s: float = 5.0):
        self.viewer, self.host, self.port = viewer, host, port
        self.save_dir, self.settle_s, self.stop_timeout_s = save_dir, settle_s, stop_timeout_s
        # `wake` guards what the GUI callbacks and the render thread share: cameras, shown,
        # settings, full_height, redraws and stopping.
        self.wake = threading.Condition()
        self.settings = ViewSettings(mode=mode)
        self.full_height = height
        self.cameras: dict = {}          # client id -> CameraState
        self.shown: dict = {}            # client id -> Shown
        # Counts redraw requests: a frame begun before one is not what the screen should show.
        self.redraws = 0
        self.stopping = False
        self.first_frame_reported: set = set()
        self.frames = 0
        self.last_frame: Optional[np.ndarray] = None
        self.viser = None
        self.server = None
        self.thread: Optional[threading.Thread] = None

    def start(self) -> "LiveView":
        """Starts the server (GUI, input frustums, a camera callback per client) and the render
        thread; returns self. A LiveView starts once."""
        if self.server is not None:
            raise RuntimeError("this LiveView was started already; a LiveView starts once")
        self.viser = require_viser()
        self.server = self.viser.ViserServer(host=self.host, port=self.port, verbose=False)
        try:
            self.server.scene.set_up_direction("+z")
            self._build_gui()
            self._show_inputs()
            self.server.on_client_connect(self._connect)
            self.thread = threading.Thread(target=self._loop, name="osrt-view-render",
                                           daemon=True)
            self.thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Ends the render loop, waits up to stop_timeout_s for a frame in flight, then stops
        the server. Safe to call twice, or before start()."""
        with self.wake:
            if self.stopping or self.server is None:
                return
            self.stopping = True
            self.wake.notify_all()
        # The thread first: a frame in flight is sent to a server that still runs.
        if self.thread is not None:
            self.thread.join(timeout=self.stop_timeout_s)
        self.server.stop()

    def __enter__(self) -> "LiveView":
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("LiveView.url: the server is not started; call start() first "
                               "(or use `with LiveView(...) as live:`)")
        host = self.server.get_host()
        return f"http://{'localhost' if host in ('0.0.0.0', '127.0.0.1') else host}:" \
               f"{self.server.get_port()}"

    # -- GUI
    def _build_gui(self):
        gui, v = self.server.gui, self.viewer
        ids = v.scene_ids()
        gui.add_markdown("**osrt-fast viewer**: orbit, pan and zoom; the model renders each view "
                         "from the scene's slots.")
        self.scene_box = gui.add_number("scene", v.scene_id, min=min(ids), max=max(ids), step=1)
        self.mode_box = gui.add_dropdown("show", MODES, initial_value=self.settings.mode)
        self.height_box = gui.add_slider("height (pixels)", min=16, max=512, step=16,
                                         initial_value=self.full_height)
        with gui.add_folder("slots"):
            self.solo_box = gui.add_dropdown("solo", ("none",) + tuple(map(str, range(v.num_slots))),
                                             initial_value="none")
            self.weight_box = gui.add_dropdown("weight map of", tuple(map(str, range(v.num_slots))),
                                               initial_value="0")
            self.slot_boxes = [gui.add_checkbox(f"slot {k} visible", True)
                               for k in range(v.num_slots)]
        self.save_button = gui.add_button("save view as PNG")
        self.home_button = gui.add_button("back to the start view")
        self.status = gui.add_markdown("")
        for box in [self.mode_box, self.solo_box, self.weight_box, *self.slot_boxes]:
            box.on_update(lambda _: self._settings_changed())
        self.height_box.on_update(lambda _: self._height_changed())
        self.scene_box.on_update(lambda _: self._scene_changed())
        self.save_button.on_click(lambda event: self._save(event.client))
        self.home_button.on_click(lambda event: self._home(event.client))

    def _settings_changed(self):
        hidden = frozenset(k for k, box in enumerate(self.slot_boxes) if not box.value)
        solo = None if self.solo_box.value == "none" else int(self.solo_box.value)
        if len(hidden) == len(self.slot_boxes) and solo is None:
            self.status.content = "all slots hidden: showing the last view"
            return
        settings = ViewSettings(self.mode_box.value, hidden, solo, int(self.weight_box.value))
        self.status.content = ""
        with self.wake:
            self.settings = settings
            self._redraw_locked()

    def _height_changed(self):
        with self.wake:
            self.full_height = int(self.height_box.value)
            self._redraw_locked()

    def _scene_changed(self):
        try:
            self.viewer.load_scene(int(self.scene_box.value))
        except SlotsError as e:
            self.status.content = str(e)
            return
        self._show_inputs()
        for client in self.server.get_clients().values():
            self._home(client)
        with self.wake:
            self._redraw_locked()

    def _show_inputs(self):
        v, so3 = self.viewer, self.viser.transforms.SO3
        s = v.scene
        for i in range(s.input_images.shape[1]):
            images = s.input_images[0, i].numpy()
            pos = s.input_camera_pos[0, i].numpy()
            self.server.scene.add_camera_frustum(
                f"/inputs/view_{i}", fov=float(s.input_fov[0, i]),
                aspect=images.shape[1] / images.shape[0], scale=0.08 * float(np.linalg.norm(pos)),
                image=images, wxyz=so3.from_matrix(s.input_camera_rot[0, i].numpy()).wxyz,
                position=pos)

    def _home(self, client):
        # Behind input view 0 (looking at the scene's centre), so that its frustum is in view.
        pos, _, fov = self.viewer.home_camera(back=HOME_BACK)
        client.camera.up_direction = (0.0, 0.0, 1.0)
        client.camera.position = tuple(float(x) for x in pos)
        client.camera.look_at = (0.0, 0.0, 0.0)
        client.camera.fov = fov

    def _save(self, client):
        with self.wake:
            camera = self.cameras.get(client.client_id)
            settings, height = self.settings, self.full_height
        if camera is None:
            return
        from PIL import Image
        img = self.viewer.render(camera.position, camera.rotation, camera.fov_y, height,
                                 camera.width(height), settings)
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, f"view_scene{self.viewer.scene_id}_"
                                           f"{time.strftime('%Y%m%d-%H%M%S')}.png")
        Image.fromarray(img).save(path)
        self.status.content = f"saved {path}"
        print(f"osrt_fast.view: saved {path}", flush=True)

    # -- cameras and the render loop
    def _connect(self, client):
        self._home(client)

        @client.camera.on_update
        def _(camera):
            rot = self.viser.transforms.SO3(np.asarray(camera.wxyz)).as_matrix()
            state = CameraState(np.asarray(camera.position, np.float32), rot.astype(np.float32),
                                float(camera.fov), float(camera.aspect), time.monotonic())
            with self.wake:
                self.cameras[client.client_id] = state
                self.wake.notify()

    def _redraw_locked(self):
        """Asks the loop to render every client's view again; the caller holds `wake`."""
        self.shown.clear()
        self.redraws += 1
        self.wake.notify()

    def _loop(self):
        while True:
            # One frame's job, settings and full height, read together.
            with self.wake:
                if self.stopping:
                    return
                todo = next_job(self.cameras, self.shown, self.full_height, self.settle_s,
                                time.monotonic())
                if todo is None:
                    self.wake.wait(timeout=self.settle_s)
                    continue
                settings, full_height, redraws = self.settings, self.full_height, self.redraws
            client_id, camera, height = todo
            client = self.server.get_clients().get(client_id)
            if client is None:
                with self.wake:
                    self.cameras.pop(client_id, None)
                continue
            try:
                img = self.viewer.render(camera.position, camera.rotation, camera.fov_y, height,
                                         camera.width(height), settings)
            except Exception as e:      # shown in the panel; the loop (and the page) live on
                self.status.content = f"cannot render this view: {e}"
                if not isinstance(e, SlotsError):
                    print(f"osrt_fast.view: rendering failed: {type(e).__name__}: {e}",
                          file=sys.stderr, flush=True)
                self._mark_shown(client_id, camera, height, redraws)
                continue
            client.scene.set_background_image(img, format="png")
            self.last_frame, self.frames = img, self.frames + 1
            if height == full_height and client_id not in self.first_frame_reported:
                self.first_frame_reported.add(client_id)
                print(f"osrt_fast.view: client {client_id}: first full frame, {img.shape[1]}x"
                      f"{img.shape[0]}", flush=True)
            self._mark_shown(client_id, camera, height, redraws)

    def _mark_shown(self, client_id: int, camera: CameraState, height: int, redraws: int):
        # A redraw asked for while the frame rendered (new settings, height or scene) leaves
        # the client unmarked, so that the loop renders its view again.
        with self.wake:
            if self.redraws == redraws:
                self.shown[client_id] = Shown(camera, height)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m osrt_fast.view",
                                description="Live browser viewer of a trained OSRT.")
    p.add_argument("config", help="the run's config (its folder, or runs/<name>, holds model.pt)")
    p.add_argument("--checkpoint", help="checkpoint file (default <run dir>/model.pt)")
    p.add_argument("--sceneid", type=int, help="first scene shown (default: the first)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--slots", help="show the scenes of this slots file (python -m "
                                   "osrt_fast.encode) instead of encoding the split's")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--height", type=int, default=128, help="full-resolution image height")
    p.add_argument("--save-dir", help="where 'save view as PNG' writes (default <run dir>/views, "
                                      "e.g. runs/demo/views)")
    p.add_argument("--mode", default="render", choices=MODES, help="what is shown at first")
    p.add_argument("--no-cuda", action="store_true", help="run on the CPU (default: the config's "
                                                           "training.device)")
    return p


def save_dir_of(args) -> str:
    """Where 'save view as PNG' writes: --save-dir, else the run folder's views/ (not the
    current folder, which is often a clone's root)."""
    return args.save_dir or os.path.join(output_dir_for(args.config, args.checkpoint), "views")


def open_viewer(args) -> Viewer:
    """The Viewer of parsed CLI arguments, its first scene loaded."""
    from .data import batch_spec, get_dataset
    from .checkpoint import load_trained_model
    cfg, model, _, _ = load_trained_model(args.config, args.checkpoint,
                                          "cpu" if args.no_cuda else None)
    if args.slots:
        viewer = Viewer(model, load_slots(args.slots), cfg.to_dict())
    else:
        dataset = get_dataset(args.split, cfg.data)
        viewer = Viewer(model, dataset, cfg.to_dict(), spec=batch_spec(cfg.data, dataset))
    ids = viewer.scene_ids()
    first = ids[0] if args.sceneid is None else args.sceneid
    viewer.load_scene(first)
    return viewer


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    process.setup()
    require_viser()
    viewer = open_viewer(args)
    try:
        live = LiveView(viewer, args.host, args.port, args.height, save_dir_of(args),
                        mode=args.mode).start()
    except OSError as e:            # the port is taken, or the host is not this machine's
        raise UsageError(f"cannot serve the viewer on {args.host}:{args.port} ({e.strerror or e}); "
                         f"choose another --port or --host") from None
    print(f"osrt_fast.view: scene {viewer.scene_id}, {viewer.num_slots} slots, on "
          f"{viewer.device}; open {live.url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        live.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
