import numpy as np
import pytest
import torch

from osrt_fast.metrics import adjusted_rand_index, fg_ari, psnr, ssim
from conftest import require_reference_vectors


def test_reference_ari_vectors():
    d = torch.load(require_reference_vectors("ari.pt"), weights_only=False)
    ari = adjusted_rand_index(d["true_masks"], d["pred_masks"])
    fg = fg_ari(d["true_masks"], d["pred_masks"])
    assert ari.dtype == torch.float64
    torch.testing.assert_close(ari, d["ari"].double(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fg, d["fg_ari"].double(), rtol=1e-10, atol=1e-12)
    # The special cases the vectors cover: no foreground at all, and a single cluster each.
    assert fg[0].item() == 1.0 and ari[1].item() == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_per_scene(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    batch, points, true_k, pred_k = 4, 300, 6, 5
    true_ids = torch.randint(0, true_k, (batch, points), generator=g)
    # Correlated predictions, so scores are spread rather than all near 0.
    pred_ids = torch.where(torch.rand(batch, points, generator=g) < 0.6, true_ids % pred_k,
                           torch.randint(0, pred_k, (batch, points), generator=g))
    true = torch.nn.functional.one_hot(true_ids, true_k).float()
    logits = torch.randn(batch, points, pred_k, generator=g) * 0.1
    logits.scatter_add_(2, pred_ids[..., None], torch.ones(batch, points, 1))
    ari = adjusted_rand_index(true, logits.softmax(-1))
    fg = fg_ari(true, logits.softmax(-1))
    for i in range(batch):
        expected = sklearn_metrics.adjusted_rand_score(true_ids[i].numpy(), pred_ids[i].numpy())
        assert ari[i].item() == pytest.approx(expected, abs=1e-12)
        keep = (true_ids[i] != 0).numpy()
        expected_fg = sklearn_metrics.adjusted_rand_score(true_ids[i].numpy()[keep],
                                                          pred_ids[i].numpy()[keep])
        assert fg[i].item() == pytest.approx(expected_fg, abs=1e-12)


def test_perfect_and_permuted_segmentation_score_one():
    ids = torch.randint(0, 4, (2, 200))
    true = torch.nn.functional.one_hot(ids, 4).float()
    perm = torch.tensor([2, 0, 3, 1])
    pred = torch.nn.functional.one_hot(perm[ids], 4).float()
    assert torch.allclose(adjusted_rand_index(true, pred), torch.ones(2, dtype=torch.float64))


def test_psnr():
    assert psnr(torch.tensor(0.01)).item() == pytest.approx(20.0)
    assert np.isclose(psnr(torch.tensor([1e-3])).item(), 30.0)


def test_ssim_reads_the_rays_as_row_major_views():
    """ssim of [B, V*H*W, 3] rays is the mean over each scene's V views of torchmetrics' SSIM of
    the images they came from (odd sizes, so a transposed reshape would not match), 1 for a
    perfect render, and refuses sampled rays."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    g = torch.Generator().manual_seed(0)
    b, v, h, w = 2, 3, 13, 17
    true = torch.rand(b, v, h, w, 3, generator=g)
    pred = (true + 0.1 * torch.randn(b, v, h, w, 3, generator=g)).clamp(0, 1)
    got = ssim(pred.reshape(b, -1, 3), true.reshape(b, -1, 3), (v, h, w))
    expected = structural_similarity_index_measure(
        pred.flatten(0, 1).permute(0, 3, 1, 2), true.flatten(0, 1).permute(0, 3, 1, 2),
        data_range=1.0, reduction="none").reshape(b, v).mean(1)
    torch.testing.assert_close(got, expected)
    assert 0 < got.max() < 0.99
    torch.testing.assert_close(ssim(true.reshape(b, -1, 3), true.reshape(b, -1, 3), (v, h, w)),
                               torch.ones(b))
    with pytest.raises(ValueError, match="--full-scale"):
        ssim(pred.reshape(b, -1, 3)[:, :100], true.reshape(b, -1, 3)[:, :100], (v, h, w))


def test_lpips_where_it_can_be_built_and_a_single_note_where_not(monkeypatch, capsys):
    """Without torchvision or its weights (as here): None, and one note for the process. Where
    torchmetrics' LPIPS builds (a stand-in network here), the mean over each scene's views."""
    import torchmetrics.image.lpip as lpip_module

    from osrt_fast import metrics

    class Broken:
        def __init__(self, **kwargs):
            raise ModuleNotFoundError("no torchvision")
    monkeypatch.setattr(lpip_module, "LearnedPerceptualImagePatchSimilarity", Broken)
    monkeypatch.setattr(metrics, "_LPIPS_NOTED", False)
    assert metrics.lpips_metric("cpu") is None and metrics.lpips_metric("cpu") is None
    assert capsys.readouterr().err.count("LPIPS is not reported: no torchvision") == 1

    class StandIn(torch.nn.Module):
        def __init__(self, net_type, reduction, normalize):
            super().__init__()
            assert (net_type, reduction, normalize) == ("alex", "mean", True)

        def forward(self, a, b):
            return (a - b).abs().mean()
    monkeypatch.setattr(lpip_module, "LearnedPerceptualImagePatchSimilarity", StandIn)
    fn = metrics.lpips_metric("cpu")
    true = torch.rand(2, 3, 5, 7, 3)
    pred = true.clone()
    pred[1, 2] = 0.0
    got = fn(pred.reshape(2, -1, 3), true.reshape(2, -1, 3), (3, 5, 7))
    torch.testing.assert_close(got, torch.stack([torch.tensor(0.0), true[1, 2].mean() / 3]))
