import numpy as np
import pytest
import torch

from osrt_fast.metrics import adjusted_rand_index, fg_ari, psnr
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
