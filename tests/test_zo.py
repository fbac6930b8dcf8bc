"""The ZO arithmetic (zo.py) and its optimizer (zo_optimizer.py): determinism, exact restore, unbiasedness."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import tiny_model

from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model, zo
from meerkat_hf.zo.optimizer import ZOSGD
from meerkat_hf.zo import spsa


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _meerkat(dtype=torch.float32, density=0.05, seed=0, exclude=None):
    model = tiny_model("llama", dtype=dtype)
    cfg = SparseMaskConfig(method="random", density=density, seed=seed)
    if exclude is not None:
        cfg.exclude_patterns = exclude
    return get_meerkat_model(model, compute_mask(model, cfg, progress=False))


def _batch(n=2, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 320, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_params_equal(model, snap):
    for name, p in model.named_parameters():
        assert torch.equal(p, snap[name]), name


# ------------------------------------------------------------------------------------ seeds
def test_derive_seed_is_stable_across_versions_and_machines():
    # Computed once and frozen: changing them would break every published virtual path.
    assert zo.derive_seed(0) == 1786884285633530058
    assert zo.derive_seed(42, 0, 0) == 2357508442973936618
    assert zo.derive_seed(1, 2, 3, 4) == 5971943691875951595
    assert zo.derive_seed(42, 0, 1) != zo.derive_seed(42, 1, 0)
    assert 0 <= zo.derive_seed(-1, 2**70) < 2**63


def test_gaussian_direction_is_bit_identical_and_seed_dependent():
    a, b = zo.gaussian_direction(123, 1000), zo.gaussian_direction(123, 1000)
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a, zo.gaussian_direction(124, 1000))
    expected = [-0.41627880930900574, 0.5659500360488892, -0.2881450653076172, -0.1258431226015091]
    assert zo.gaussian_direction(zo.derive_seed(42, 0, 0), 4).tolist() == expected


def test_check_eps():
    assert zo.check_eps(1e-3) == 1e-3
    for bad in (0, -1e-3, float("nan"), float("inf"), "1e-3", None):
        with pytest.raises(ValueError):
            zo.check_eps(bad)


# ----------------------------------------------------------------------- projected gradient
@torch.no_grad()
def test_projected_gradient_restores_fp32_weights_bit_exactly():
    m = _meerkat()
    batch = _batch()
    snap, master = _snapshot(m), m.values.clone()
    for seed in range(20):
        g = zo.projected_gradient(m, lambda: m(**batch).loss, zo.gaussian_direction(seed, m.num_selected), 1e-3)
        assert math.isfinite(g) and g != 0.0
    _assert_params_equal(m, snap)
    assert torch.equal(m.values, master)


@torch.no_grad()
def test_bf16_weights_never_drift_from_the_master():
    m = _meerkat(dtype=torch.bfloat16)
    batch = _batch()
    snap = _snapshot(m)
    for seed in range(50):  # +eps / -eps rounds that would drift if applied as increments in bf16
        zo.projected_gradient(m, lambda: m(**batch).loss, zo.gaussian_direction(seed, m.num_selected), 1e-2)
    _assert_params_equal(m, snap)
    # and after real updates the bf16 weights are exactly the fp32 master cast to bf16
    for t in range(10):
        step = zo.ZOStep(seeds=(t,), grads=(0.5,), lr=1e-2)
        zo.apply_step(m.values, step)
        m.sync_weights()
        zo.projected_gradient(m, lambda: m(**batch).loss, zo.gaussian_direction(100 + t, m.num_selected), 1e-2)
    for s in m.sparse.slices:
        weights = s.param.detach().view(-1)[s.index]
        assert torch.equal(weights, m.values[s.start : s.stop].to(torch.bfloat16)), s.name
    assert not torch.equal(m.values, m.base_values)


@torch.no_grad()
def test_nan_loss_gives_nan_estimate_and_restores_weights():
    m = _meerkat()
    snap = _snapshot(m)
    z = zo.gaussian_direction(0, m.num_selected)
    assert math.isnan(zo.projected_gradient(m, lambda: torch.tensor(float("nan")), z, 1e-3))
    assert math.isnan(zo.projected_gradient(m, lambda: float("inf"), z, 1e-3))
    _assert_params_equal(m, snap)

    def boom():
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        zo.projected_gradient(m, boom, z, 1e-3)
    _assert_params_equal(m, snap)  # restored even when the forward raises


def test_zo_estimate_points_along_the_true_masked_gradient():
    """E[g z] = grad: the mean of 2000 two-point estimates has cosine > 0.9 with the backprop gradient.

    (With k=186 the expected cosine is about 1/sqrt(1 + k/n) = 0.96; these seeds give 0.944.)
    """
    m = _meerkat(dtype=torch.float64, density=0.01)  # k ~ 200 coordinates
    batch = _batch(n=2, length=8)
    k = m.num_selected
    assert 100 <= k <= 400

    params = [s.param for s in m.sparse.slices]
    for p in params:
        p.requires_grad_(True)
    m(**batch).loss.backward()
    true = torch.cat([s.param.grad.view(-1)[s.index].float() for s in m.sparse.slices])
    for p in params:
        p.grad = None
        p.requires_grad_(False)

    n = 2000
    estimate = torch.zeros(k, dtype=torch.float64)
    with torch.no_grad():
        for j in range(n):
            z = zo.gaussian_direction(zo.derive_seed(7, j), k)
            g = zo.projected_gradient(m, lambda: m(**batch).loss, z, 1e-3)
            estimate += g * z.double()
    estimate /= n
    cosine = torch.nn.functional.cosine_similarity(estimate, true.double(), dim=0).item()
    assert cosine > 0.9, cosine


# ------------------------------------------------------------------------ update and replay
def test_apply_step_and_replay_agree_bit_for_bit():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    steps = [
        zo.ZOStep(seeds=(zo.derive_seed(1, t, 0), zo.derive_seed(1, t, 1)), grads=(0.3 - t / 10, 1.5), lr=1e-2 / (t + 1),
                  weight_decay=0.1 if t % 2 else 0.0)
        for t in range(7)
    ]
    live = values.clone()
    for step in steps:
        if step.seeds[0] % 2:  # the held directions and regenerated ones give the same bits
            zo.apply_step(live, step, directions=[zo.gaussian_direction(s, 1000) for s in step.seeds])
        else:
            zo.apply_step(live, step)
    replayed = zo.replay(values, steps)
    assert torch.equal(live, replayed)
    assert not torch.equal(values, replayed)
    with pytest.raises(ValueError):
        zo.apply_step(values.double(), steps[0])
    with pytest.raises(ValueError):
        zo.ZOStep(seeds=(1, 2), grads=(0.1,), lr=1.0)


# --------------------------------------------------------------------------------- ZOSGD
def test_zosgd_step_accumulates_applies_and_records():
    m = _meerkat()
    opt = ZOSGD(m, lr=0.1, weight_decay=0.01)
    assert opt.param_groups[0]["params"][0] is m.values
    start = m.values.clone()
    opt.step()  # nothing accumulated: a no-op
    assert torch.equal(m.values, start) and opt.num_steps == 0
    seeds = (11, 12)
    opt.accumulate(seeds, [0.5, -1.0])
    opt.accumulate(seeds, [0.25, 0.5])  # summed, like .grad
    with pytest.raises(ValueError, match="same perturbation seeds"):
        opt.accumulate((13, 14), [0.0, 0.0])
    opt.param_groups[0]["lr"] = 0.05  # what a scheduler does
    opt.zero_grad()  # harmless: nothing pending is lost, no .grad appears
    opt.step()
    assert opt.history == [zo.ZOStep(seeds=seeds, grads=(0.75, -0.5), lr=0.05, weight_decay=0.01)]
    assert torch.equal(m.values, zo.replay(start, opt.history))
    assert torch.equal(m.sparse.gather(), m.values)  # weights synced
    assert m.values.grad is None and all(p.grad is None for p in m.parameters())
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)


def test_zosgd_skips_non_finite_steps(caplog):
    m = _meerkat()
    opt = ZOSGD(m, lr=0.1)
    start = m.values.clone()
    opt.accumulate((1,), [float("nan")])
    with caplog.at_level("WARNING"):
        opt.step()
    assert "skipped" in caplog.text
    assert opt.num_skipped == 1 and opt.num_steps == 0 and not opt.history
    assert torch.equal(m.values, start) and not opt.pending


def test_zosgd_stops_with_a_clear_error_when_every_loss_is_nan():
    m = _meerkat()
    opt = ZOSGD(m, lr=0.5, max_consecutive_skips=3)
    opt.accumulate((1,), [float("nan")])
    opt.step()
    opt.accumulate((2,), [1.0])
    opt.step()  # a finite step resets the run of skips
    assert opt.consecutive_skips == 0
    for seed in (3, 4):
        opt.accumulate((seed,), [float("inf")])
        opt.step()
    opt.accumulate((5,), [float("nan")])
    with pytest.raises(FloatingPointError, match=r"3 ZO steps in a row had a NaN/inf loss \(lr=0.5"):
        opt.step()
    assert opt.num_skipped == 4


def test_zosgd_state_dict_round_trip():
    m = _meerkat()
    opt = ZOSGD(m, lr=0.1)
    for t in range(3):
        opt.accumulate((zo.derive_seed(0, t, 0),), [0.1 * (t + 1)])
        opt.param_groups[0]["lr"] = 0.1 / (t + 1)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what Trainer does on resume

    fresh = _meerkat()
    opt2 = ZOSGD(fresh, lr=1.0)
    opt2.load_state_dict(state)
    assert opt2.history == opt.history and opt2.num_steps == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(zo.replay(fresh.base_values, opt2.history), m.values)

    other = ZOSGD(_meerkat(seed=1), lr=1.0)  # another mask
    with pytest.raises(ValueError, match="another mask"):
        other.load_state_dict(state)


def test_zosgd_rejects_plain_models_and_bad_hyperparameters():
    with pytest.raises(TypeError, match="get_meerkat_model"):
        ZOSGD(tiny_model(), lr=0.1)
    m = _meerkat()
    with pytest.raises(ValueError):
        ZOSGD(m, lr=float("nan"))
    with pytest.raises(ValueError):
        ZOSGD(m, lr=0.1, weight_decay=-1.0)


def test_perturbed_states_are_the_bits_of_w_plus_and_minus_eps_z():
    """`_two_point_losses` reuses one buffer; the model must see exactly w + eps z and w - eps z."""
    k, eps = 5003, 1e-3
    seen = []

    class Target:
        values = torch.randn(k, generator=torch.Generator().manual_seed(1))

        def write(self, v):
            seen.append(v.clone())

    z = zo.gaussian_direction(3, k)
    target = Target()
    spsa._two_point_losses(target, lambda: 0.0, z, eps)
    w = target.values
    assert torch.equal(seen[0], w + eps * z) and torch.equal(seen[1], w - eps * z) and torch.equal(seen[2], w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value_anywhere(bad):
    for k in (1, 2, 4099):
        for pos in {0, k // 2, k - 1}:
            x = torch.randn(k)
            x[pos] = bad
            assert not zo.all_finite(x)
        assert zo.all_finite(torch.randn(k))
    assert zo.all_finite(torch.zeros(0)) and zo.all_finite(torch.arange(3))


def test_chunked_gradip_matches_the_direct_sum_and_is_deterministic():
    import numpy as np

    from meerkat_hf.federated.protocol import virtual_path as vp

    k = (1 << 20) * 2 + 12345  # three chunks
    z = zo.gaussian_direction(5, k)
    g64 = np.random.default_rng(0).standard_normal(k)
    direct = 0.7 * float(np.add.reduce(g64 * z.numpy().astype(np.float64)))
    chunked = vp.gradip(g64, z, 0.7)
    assert chunked == vp.gradip(g64, z, 0.7)  # the same bits on every call (every replica)
    assert math.isclose(chunked, direct, rel_tol=1e-12)
    small = z[:1000]  # at most one chunk: the unchanged formula, bit for bit
    assert vp.gradip(g64[:1000], small, 0.7) == 0.7 * float(np.add.reduce(g64[:1000] * small.numpy().astype(np.float64)))


def test_long_directions_are_drawn_in_seeded_chunks_with_the_same_bits_on_any_thread_count():
    """Above DIRECTION_CHUNK values, chunk c is randn from derive_seed(seed, c) (protocol v2), filled by
    as many threads as torch uses: 1 or 3 threads, fresh or `out=`, give the same bits; below it a
    direction is still the single stream it was."""
    chunk = zo.DIRECTION_CHUNK
    k = 2 * chunk + 123
    expected = torch.cat([torch.randn(n, generator=torch.Generator().manual_seed(zo.derive_seed(9, c)))
                          for c, n in enumerate((chunk, chunk, 123))])
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert torch.equal(zo.gaussian_direction(9, k), expected)
            assert torch.equal(zo.gaussian_direction(9, k, out=torch.empty(k)), expected)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(zo.gaussian_direction(9, chunk), torch.randn(chunk, generator=torch.Generator().manual_seed(9)))
