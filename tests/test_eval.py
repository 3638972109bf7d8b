import math
import warnings

import pytest
import torch

from dmdx.data import cache_dir, load_dataset
from dmdx.eval import (FeatureClassifier, PixelBackbone, chi2_quantile, frechet_distance, get_classifier,
                       get_pixel_backbone, image_metrics, mixture_metrics, precision_recall, sliced_wasserstein)
from dmdx.mixtures import load_mixture

TINY = {"epochs": 1, "max_train": 96, "batch_size": 32, "progress": False}


# ------------------------------------------------------------------------------------------------------ vectors
def test_chi2_quantile():
    assert chi2_quantile(1 - math.exp(-4.5), 2) == pytest.approx(9.0, abs=1e-6)
    assert chi2_quantile(0.5, 1) == pytest.approx(0.454936, abs=1e-5)


def test_sliced_wasserstein():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 3, generator=g), torch.randn(3000, 3, generator=g)
    same = sliced_wasserstein(a, b)
    shifted = sliced_wasserstein(a, b + torch.tensor([2.0, 0.0, 0.0]))
    assert same < 0.05 and shifted > 0.5
    assert sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-9)
    # a pure shift by c: every projection is shifted by <c, u>, so SW^2 = E[<c, u>^2] = |c|^2 / D
    assert sliced_wasserstein(a, a + 3.0, n_proj=4000) == pytest.approx(math.sqrt(27 / 3), rel=0.05)
    with pytest.raises(ValueError):
        sliced_wasserstein(a, torch.randn(10, 2))


@pytest.mark.parametrize("name", ["ring8", "unequal"])
def test_mixture_metrics_exact_samples(name):
    gmm = load_mixture(name)
    x, _ = gmm.sample(10_000, generator=torch.Generator().manual_seed(5))
    m = mixture_metrics(x, gmm)
    assert m["quality"] == pytest.approx(1 - math.exp(-4.5), abs=0.01)
    assert m["weight_error"] < 0.03 and m["max_weight_error"] < 0.03
    assert m["coverage"] == 1.0 and m["modes_covered"] == gmm.num_components
    assert m["sw"] < 0.2 and len(m["mode_weights"]) == gmm.num_components
    assert sum(m["mode_weights"]) == pytest.approx(1.0)


def test_mixture_metrics_dropped_modes_and_junk():
    gmm = load_mixture("ring8")
    labels = torch.arange(4).repeat(1000)  # only modes 0..3
    x, _ = gmm.sample(4000, generator=torch.Generator().manual_seed(1), labels=labels)
    m = mixture_metrics(x, gmm)
    assert m["coverage"] == 0.5 and m["modes_covered"] == 4
    assert m["weight_error"] == pytest.approx(0.5, abs=0.02) and m["sw"] > 0.3
    junk = mixture_metrics(torch.zeros(100, 2), gmm)  # all at the centre, far from every mode
    assert junk["quality"] == 0 and junk["coverage"] == 0 and junk["weight_error"] == 1.0
    nan = mixture_metrics(torch.full((10, 2), float("nan")), gmm)
    assert nan["quality"] == 0
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        mixture_metrics(torch.zeros(5, 3), gmm)


def test_mixture_metrics_high_dim():
    gmm = load_mixture("ring8")
    means = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    from dmdx.mixtures import GaussianMixture

    gmm = GaussianMixture(means, [0.25] * 4, 0.3)
    x, _ = gmm.sample(8000, generator=torch.Generator().manual_seed(2))
    assert mixture_metrics(x, gmm)["quality"] == pytest.approx(1 - math.exp(-4.5), abs=0.01)


# ------------------------------------------------------------------------------------------------------- images
def test_frechet_distance_analytic():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    dmu = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert frechet_distance(f, f + dmu) == pytest.approx(float((dmu**2).sum()), rel=1e-6)
    # S2 = 4 S1 exactly: FD = |mu|^2 + tr(S) + 4 tr(S) - 2 tr(2 S) = |mu|^2 + tr(S)
    z = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    expected = float((z.mean(0) ** 2).sum() + z.var(0).sum())
    assert frechet_distance(z, 2 * z) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        frechet_distance(f, f[:, :3])


def test_precision_recall_sanity():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(600, 4, generator=g), torch.randn(600, 4, generator=g)
    p, r = precision_recall(real, fake)
    assert p > 0.8 and r > 0.8
    collapsed = real[:1].repeat(600, 1) + 0.01 * torch.randn(600, 4, generator=g)  # mode collapse
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.1
    p, r = precision_recall(real, fake + 20)
    assert p == 0 and r == 0


def test_networks_shapes():
    torch.manual_seed(0)
    for size in (8, 16, 28):
        clf = FeatureClassifier(1, size, 10)
        x = torch.randn(3, 1, size, size)
        assert clf(x).shape == (3, 10) and clf.features(x).shape == (3, 128)
        bb = PixelBackbone(1, size)
        feats = bb.features(x)
        assert len(feats) == 3 and all(f.ndim == 4 and f.shape[0] == 3 for f in feats)
        assert feats[0].shape[-1] == size and bb(x).shape == x.shape


def test_classifier_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("DMDX_HOME", str(tmp_path))
    model, info = get_classifier("digits", **TINY)
    assert (tmp_path / "digits" / "classifier.safetensors").exists()
    assert 0 <= info["test_acc"] <= 1 and info["epochs"] == 1 and info["num_train"] == 96
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    again, info2 = get_classifier("digits")  # from the cache: no training arguments needed
    assert info2["test_acc"] == info["test_acc"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # a corrupt file is retrained with a warning
    (cache_dir("digits") / "classifier.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="retraining"):
        _, info3 = get_classifier("digits", **TINY)
    assert info3["num_train"] == 96


def test_evaluation_networks_train_under_no_grad(tmp_path, monkeypatch):
    """A classifier or contrastive encoder missing from the cache trains on first use even when it is asked for under
    ``torch.no_grad()`` (an evaluation script's usual mode; it raised "element 0 of tensors does not require grad")."""
    monkeypatch.setenv("DMDX_HOME", str(tmp_path))
    from dmdx.eval import get_contrastive

    with torch.no_grad():
        _, info = get_classifier("digits", **TINY)
        _, cinfo = get_contrastive("digits", **TINY)
    assert 0 <= info["test_acc"] <= 1 and cinfo["epochs"] == 1 and cinfo["num_train"] == 96


def test_pixel_backbone_is_separate(tmp_path, monkeypatch):
    monkeypatch.setenv("DMDX_HOME", str(tmp_path))
    bb = get_pixel_backbone("digits", **TINY)
    assert isinstance(bb, PixelBackbone) and not bb.training
    assert not any(p.requires_grad for p in bb.parameters())
    assert (tmp_path / "digits" / "pixel_backbone.safetensors").exists()
    feats = bb.features(torch.zeros(2, 1, 8, 8))
    assert [f.shape[-1] for f in feats] == [8, 4, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb2, info = get_pixel_backbone("digits", return_info=True)  # cached: no retraining, no warning
    assert info["epochs"] == 1


def test_image_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("DMDX_HOME", str(tmp_path))
    clf = get_classifier("digits", **TINY)
    test = load_dataset("digits", "test")
    outside = torch.where(test.x.abs() == 1, 3 * test.x, test.x)  # out-of-range values are clamped back
    real = image_metrics(outside, test.labels, "digits", classifier=clf)
    # identical sets: FD is 0 up to sqrt of round-off on near-null covariance directions
    assert real["fd"] < 1e-2 and real["precision"] == 1 and real["recall"] == 1
    assert real["class_acc"] == pytest.approx(clf[1]["test_acc"])
    assert real["classifier_test_acc"] == clf[1]["test_acc"]
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = image_metrics(noise, None, "digits", classifier=clf)
    assert bad["fd"] > real["fd_train_vs_test"] and bad["class_acc"] is None
    null = image_metrics(test.x[:20], torch.full((20,), 10), "digits", classifier=clf)
    assert null["class_acc"] is None  # the null label is skipped
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        image_metrics(torch.zeros(4, 1, 16, 16), None, "digits", classifier=clf)
    with pytest.raises(ValueError, match="image data set"):
        get_classifier("ring8")


# ------------------------------------------------------------------------- the second feature space (contrastive)
def test_nt_xent_is_exact_on_aligned_orthogonal_views():
    """Views that equal their partner and are orthogonal to everything else: each row's logits are 1/T for its
    partner and 0 for the 2B - 2 others, so the loss is log(1 + (2B - 2) e^(-1/T)); swapped partners cost more."""
    from dmdx.eval.contrastive import TEMPERATURE, nt_xent

    z = torch.eye(8)[:4]
    assert nt_xent(z, z).item() == pytest.approx(math.log(1 + 6 * math.exp(-1 / TEMPERATURE)), rel=1e-5)
    assert nt_xent(z, z.roll(1, 0)).item() > nt_xent(z, z).item() + 1


def test_contrastive_encoder_is_a_separate_judge(tmp_path, monkeypatch):
    """Its own network, objective, seed and cache file: nothing shared with the evaluation classifier or ADP's pixel
    backbone.  Real test images score FD ~0 and recall 1 against themselves; noise is farther than real train images."""
    from dmdx.eval import ContrastiveEncoder, contrastive_metrics, get_contrastive

    monkeypatch.setenv("DMDX_HOME", str(tmp_path))
    for size in (8, 16, 28):
        assert ContrastiveEncoder(1, size).features(torch.randn(3, 1, size, size)).shape == (3, 128)
    enc = get_contrastive("digits", **TINY)
    model, info = enc
    assert isinstance(model, ContrastiveEncoder) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert info["seed"] != get_classifier("digits", **TINY)[1]["seed"] and "NT-Xent" in info["objective"]
    files = {p.name for p in (tmp_path / "digits").iterdir()}
    assert "contrastive.safetensors" in files and "classifier.safetensors" in files
    assert not (tmp_path / "digits" / "pixel_backbone.safetensors").exists()  # trained only by ADP's set-up
    again, info2 = get_contrastive("digits")  # cached
    assert info2["final_train_loss"] == info["final_train_loss"]
    test = load_dataset("digits", "test")
    same = contrastive_metrics(test.x, "digits", encoder=enc)
    assert same["fd_contrastive"] < 1e-2 and same["recall_contrastive"] == 1
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = contrastive_metrics(noise, "digits", encoder=enc)
    assert bad["fd_contrastive"] > same["fd_contrastive_train_vs_test"] > 0
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        contrastive_metrics(torch.zeros(4, 1, 16, 16), "digits", encoder=enc)
