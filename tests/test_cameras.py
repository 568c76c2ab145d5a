"""Camera maths (osrt_fast/cameras.py): the CLEVR3D camera against the other forms of the same
cameras (ray matrices, OpenCV K, R, t, poses), and the reference's camera motions."""
import math

import numpy as np
import pytest
import torch

from osrt_fast.cameras import (MOTIONS, apply_fade, camera_motion, camera_ray_matrix, camera_rays,
                               hemisphere_cameras, look_at_rotation, pinhole_origin,
                               pinhole_ray_matrix, pinhole_rays, pose_from_rays, ray_directions,
                               rotate_about_z, world_to_camera)

BASE_POS = torch.tensor([[7.5, -4.0, 6.0]])


# ----------------------------------------------------------------------------- forms of a camera

def test_pinhole_cameras():
    """OpenCV K, R, t -> ray matrix and origin agree with projecting points back."""
    rng = np.random.default_rng(0)
    cams = hemisphere_cameras(rng, 3)
    w2c = world_to_camera(cams)
    k = np.array([[40.0, 0, 16], [0, 40, 12], [0, 0, 1]])
    r, t = w2c[:, :3, :3], w2c[:, :3, 3]
    np.testing.assert_allclose(pinhole_origin(r, t), cams, atol=1e-5)
    mats = pinhole_ray_matrix(np.broadcast_to(k, (3, 3, 3)), r)
    # A world point projects to pixel (u, v); the ray through (u, v) points at it.
    point = np.array([0.3, -0.2, 0.5])
    for i in range(3):
        cam_p = r[i] @ point + t[i]
        u, v = (k @ cam_p)[:2] / cam_p[2]
        d = mats[i] @ np.array([u, v, 1.0])
        want = (point - cams[i]) / np.linalg.norm(point - cams[i])
        np.testing.assert_allclose(d / np.linalg.norm(d), want, atol=1e-5)
    # The CLEVR camera in both forms gives the same rays.
    h, w = 6, 10
    np.testing.assert_allclose(ray_directions(camera_ray_matrix(cams, h, w), h, w),
                               camera_rays(cams, h, w), atol=1e-6)


@pytest.mark.parametrize("size", [(16, 16), (15, 22)])
def test_pose_from_the_datasets_rays_gives_back_the_same_rays(size):
    """The dataset's camera (camera_rays, a pinhole) -> pose -> pinhole_rays: the same
    unit rays; the pose is the look-at rotation of a camera aimed at the origin."""
    height, width = size
    cams = np.array([[7.0, -3.0, 5.0], [-2.0, 9.0, 4.0]])
    rays = camera_rays(cams, height, width)
    rot, fov = pose_from_rays(rays)
    assert rot.shape == (2, 3, 3) and fov.shape == (2,)
    for i in range(2):
        again = pinhole_rays(rot[i], fov[i], height, width)
        torch.testing.assert_close(again, torch.as_tensor(rays[i]), atol=2e-6, rtol=0)
        torch.testing.assert_close(rot[i], look_at_rotation(cams[i]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6,
                               rtol=0)


# ----------------------------------------------------------------------------- camera motions

@pytest.mark.parametrize("motion", MOTIONS)
def test_motions_give_finite_unit_rays(motion):
    for t in (0.0, 0.25, 0.5, 0.9):
        pos, rays = camera_motion(motion, BASE_POS, t, 6, 10)
        assert pos.shape == (1, 3) and rays.shape == (1, 6, 10, 3)
        assert pos.dtype == rays.dtype == torch.float32
        assert torch.isfinite(pos).all() and torch.isfinite(rays).all()
        torch.testing.assert_close(rays.norm(dim=-1), torch.ones(1, 6, 10), atol=1e-5, rtol=0)


@pytest.mark.parametrize("motion", ["rotate", "zoom", "closeup", "rotate_and_closeup"])
def test_motions_start_at_the_input_camera(motion):
    pos, rays = camera_motion(motion, BASE_POS, 0.0, 5, 7)
    base = torch.from_numpy(camera_rays(BASE_POS[0].numpy(), 5, 7))[None]
    torch.testing.assert_close(pos, BASE_POS)
    torch.testing.assert_close(rays, base, atol=1e-6, rtol=0)


def test_rotate_is_a_rotation_about_z():
    pos, rays = camera_motion("rotate", BASE_POS, 0.25, 4, 4)
    torch.testing.assert_close(pos, rotate_about_z(BASE_POS, math.pi / 2))
    # Rotating the camera and its rays together equals rays of the rotated camera.
    expect = torch.from_numpy(camera_rays(pos[0].double().numpy(), 4, 4))[None]
    torch.testing.assert_close(rays, expect, atol=1e-5, rtol=0)


def test_closeup_ends_looking_at_its_track_point():
    pos, rays = camera_motion("closeup", BASE_POS, 1.0, 8, 8)
    p = BASE_POS[0].double()
    torch.testing.assert_close(pos[0].double(), torch.stack([0.2 * p[0], 0.2 * p[1], 0.1 * p[2]]),
                               atol=1e-5, rtol=0)
    track = p - 3 * p
    track[2] = 0
    view = (track - pos[0].double())
    centre = rays[0, 3:5, 3:5].double().mean((0, 1))
    torch.testing.assert_close(centre / centre.norm(), view / view.norm(), atol=1e-5, rtol=0)


def test_zoom_narrows_the_field_of_view():
    _, r0 = camera_motion("zoom", BASE_POS, 0.0, 4, 4)
    _, r1 = camera_motion("zoom", BASE_POS, 0.75, 4, 4)
    spread = lambda r: (r[0, 0, 0] * r[0, -1, -1]).sum()  # noqa: E731  cos of the corner angle
    assert spread(r1) > spread(r0)


def test_eyeroll_keeps_the_camera_and_tracks_the_circle():
    pos, rays = camera_motion("eyeroll", BASE_POS, 0.25, 8, 8)
    torch.testing.assert_close(pos, BASE_POS)
    track = np.array((0.0, -1.5, 0.0))   # theta = -pi/2
    expect = torch.from_numpy(camera_rays(BASE_POS[0].numpy(), 8, 8, track_point=track))
    torch.testing.assert_close(rays[0], expect, atol=1e-6, rtol=0)


def test_unknown_motion_names_the_valid_ones():
    with pytest.raises(ValueError, match="rotate_and_closeup"):
        camera_motion("spin", BASE_POS, 0.0, 4, 4)


def test_transform_round_trip():
    # A pure translation of the world: the motion must happen in world space.
    transform = torch.eye(4)
    transform[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    model_pos = BASE_POS + transform[:3, 3]
    pos, rays = camera_motion("rotate", model_pos, 0.25, 3, 3, transform=transform)
    pos_w, rays_w = camera_motion("rotate", BASE_POS, 0.25, 3, 3)
    torch.testing.assert_close(pos, pos_w + transform[:3, 3])
    torch.testing.assert_close(rays, rays_w)


def test_apply_fade_matches_the_reference_curve():
    assert apply_fade(0.0) == 0.0
    assert apply_fade(1.0) == pytest.approx(1.0)
    assert apply_fade(0.5) == pytest.approx(0.5)
    assert apply_fade(0.1) == pytest.approx(0.5 * (1.25 / 0.2) * 0.01)
    ts = np.linspace(0, 1, 101)
    assert np.all(np.diff([apply_fade(t) for t in ts]) >= 0)

