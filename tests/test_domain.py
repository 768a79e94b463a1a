"""eval.py's domain metrics on real Fashion-MNIST: the committed classifier, FD, precision/recall, accuracy, coverage.

Each check is one the instrument must pass to be trusted (issue: "checks that the instrument measures what it
claims"): real data scores well, a collapsed generator loses its recall but not its precision, disturbances
raise FD monotonically (Heusel et al. 2017's test), missing classes show in the coverage.
"""
import re
import time

import numpy as np
import pytest
import torch

import eval as ev
import teacher


@pytest.fixture(scope="module")
def fm():
    """The committed classifier, 2000 test and 2000 train images (fixed subsets) and their features."""
    net = ev.load_classifier(ev.CLASSIFIERS["fashion-mnist"])
    x, y = teacher.load_data("fashion-mnist", 0, "train")
    xt, yt = teacher.load_data("fashion-mnist", 0, "test")
    rng = np.random.default_rng(0)
    i, it = rng.permutation(len(x))[:2000], rng.permutation(len(xt))[:2000]
    f, p = ev.domain_features(net, x[i])
    ft, pt = ev.domain_features(net, xt[it])
    return dict(net=net, x=x[i], y=y[i], xt=xt[it], yt=yt[it], f=f, p=p, ft=ft, pt=pt, x_all=x, y_all=y)


def brute_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019, Eq. 1-2, by explicit loops in float64 (an independent computation)."""
    def radii(a):
        return np.array([np.sort(np.linalg.norm(a - a[i], axis=1))[k] for i in range(len(a))])

    def share(q, s, r):
        return np.mean([any(np.linalg.norm(s[j] - q[i]) <= r[j] for j in range(len(s))) for i in range(len(q))])
    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def test_precision_recall_match_a_brute_force_computation():
    g = np.random.default_rng(1)
    real, fake = g.normal(size=(60, 5)), g.normal(0.7, 1.3, size=(45, 5))
    p, r = ev.precision_recall(real, fake, k=3)
    bp, br = brute_precision_recall(real, fake, 3)
    assert (p, r) == pytest.approx((bp, br), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1
    assert ev.knn_radii(np.arange(5.0)[:, None], k=1).tolist() == [1, 1, 1, 1, 1]   # itself excluded


@pytest.mark.slow
def test_cli_5k_train_images_against_5k_test_images(tmp_path, capsys):
    """The CLI as the benchmark calls it (--ref-num as many as the samples): 5000 real train images score like real
    data against 5000 test images (FD 1.29 measured; a student's is 50 or more), in under 30 s."""
    x, y = teacher.load_data("fashion-mnist", 0, "train")
    keep = np.random.default_rng(0).permutation(len(x))[:5000]
    np.savez(tmp_path / "s.npz", images=x[keep], labels=y[keep])
    t0 = time.time()
    ev.main(["domain", "--samples", str(tmp_path / "s.npz"), "--ref", "fashion-mnist-test", "--ref-num", "5000"])
    wall = time.time() - t0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"FD_FMNIST ([0-9.]+) PRECISION ([0-9.]+) RECALL ([0-9.]+) ACCURACY ([0-9.]+)", last)
    assert m, last
    fd, p, r, acc = map(float, m.groups())
    assert fd < 2.0 and p >= 0.6 and r >= 0.6 and acc >= 0.92, last
    assert wall < 30, f"{wall:.1f} s"


@pytest.mark.slow
def test_collapsed_generator_has_no_recall_but_keeps_precision(fm):
    """One image per class, repeated (a perfectly collapsed class-conditional generator): recall ~ 0; precision
    stays high, since each template is a typical real image (the one nearest its class's mean feature)."""
    picks = []
    for c in range(10):
        idx = np.flatnonzero(fm["y"] == c)
        picks.append(idx[np.argmin(np.linalg.norm(fm["f"][idx] - fm["f"][idx].mean(0), axis=1))])
    images, labels = np.repeat(fm["x"][picks], 200, 0), np.repeat(np.arange(10), 200)
    m = ev.domain_metrics(fm["net"], images, fm["xt"], labels)
    real = ev.domain_metrics(fm["net"], fm["x"], fm["xt"], fm["y"])
    assert m["recall"] < 0.05 and m["precision"] >= 0.8, m
    assert m["spread"] == pytest.approx(0, abs=1e-12) and real["spread"] > 0.05
    assert m["fd"] > 10 * real["fd"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_disturbances_raise_fd_monotonically(fm, kind):
    """Heusel et al. 2017, Fig. 1: Gaussian noise or blur of increasing strength on real images raises FD."""
    x = fm["x"][:1000].astype(np.float64) / 255
    g = np.random.default_rng(0)
    levels = [0, 0.05, 0.1, 0.2, 0.4] if kind == "noise" else [0, 0.5, 1.0, 1.5, 2.5]
    fds = []
    for lv in levels:
        if kind == "noise":
            d = x + lv * g.normal(size=x.shape)
        else:
            d = x if lv == 0 else gaussian_blur(x, lv)
        u8 = np.clip(np.round(d * 255), 0, 255).astype(np.uint8)
        f, _ = ev.domain_features(fm["net"], u8)
        fds.append(ev.frechet_distance(f.mean(0), np.cov(f, rowvar=False), fm["ft"].mean(0),
                                       np.cov(fm["ft"], rowvar=False)))
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def gaussian_blur(x, sigma):
    """(N, H, W) float images blurred by a separable Gaussian of std sigma pixels (zero padding)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k = torch.tensor(k / k.sum())
    t = torch.tensor(x)[:, None]
    t = torch.nn.functional.conv2d(t, k.view(1, 1, 1, -1), padding=(0, r))
    return torch.nn.functional.conv2d(t, k.view(1, 1, -1, 1), padding=(r, 0))[:, 0].numpy()


def test_coverage_shows_two_missing_classes(fm):
    assert ev.class_coverage(fm["pt"]) > 0.7
    keep = ~np.isin(fm["yt"], [3, 7])
    assert ev.class_coverage(fm["pt"][keep]) < 0.05
    assert ev.class_coverage(np.repeat(np.arange(10), 5)) == 1.0
    assert ev.class_accuracy(fm["pt"], fm["yt"]) >= 0.9


@pytest.mark.slow
def test_cli_unconditional_samples_report_coverage_and_32px_needs_crop(fm, tmp_path, capsys):
    np.savez(tmp_path / "u.npz", images=fm["x"][:300])
    ev.main(["domain", "--samples", str(tmp_path / "u.npz"), "--ref", str(tmp_path / "u.npz")])
    *_, shares, last = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"FD_FMNIST [0-9.]+ PRECISION 1\.0000 RECALL 1\.0000 COVERAGE [0-9.]+", last), last
    m = re.fullmatch(r"CLASS SHARES ((?:[0-9.]+ ){10})\(predicted classes 0-9\)", shares)   # which classes, not only
    assert m and np.allclose([float(v) for v in m.group(1).split()],             # the smallest share
                             np.bincount(fm["p"][:300], minlength=10) / 300, atol=5e-4), shares
    canvas = np.pad(fm["x"][:300], ((0, 0), (2, 2), (2, 2)))
    np.savez(tmp_path / "c.npz", images=canvas, labels=fm["y"][:300])
    ev.main(["domain", "--samples", str(tmp_path / "c.npz"), "--ref", "fashion-mnist-test", "--crop", "28"])
    assert capsys.readouterr().out.strip().endswith(f"ACCURACY {ev.class_accuracy(fm['p'][:300], fm['y'][:300]):.4f}")
    with pytest.raises(SystemExit) as e:
        ev.main(["domain", "--samples", str(tmp_path / "c.npz"), "--ref", "fashion-mnist-test"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--crop 28" in err and len(err.strip().splitlines()) == 1


def test_within_class_spread_matches_a_direct_pairwise_computation():
    rng = np.random.default_rng(0)
    ims, labels = (rng.random((30, 4, 4)) * 255).astype(np.uint8), rng.integers(0, 3, 30)
    x = ims.reshape(30, -1) / 255
    want = np.mean([np.mean([((x[i] - x[j]) ** 2).mean() for i in np.flatnonzero(labels == c)
                             for j in np.flatnonzero(labels == c) if i != j]) for c in range(3)])
    assert ev.within_class_spread(ims, labels) == pytest.approx(want, rel=1e-12)
    same = np.repeat(ims[:1], 30, 0)            # one template per class -> 0
    assert ev.within_class_spread(same, labels) == pytest.approx(0, abs=1e-12)
