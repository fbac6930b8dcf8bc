"""The frozen trunk: layers below the mask run once per ZO step, and the scalars keep their bits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model, zo
from meerkat_hf.testing.tiny import tiny_config


def deep_tiny(family: str = "llama", layers: int = 4):
    cfg = tiny_config(family)
    cfg.num_hidden_layers = layers
    if hasattr(cfg, "layer_types"):
        cfg.layer_types = None
        cfg.__post_init__() if hasattr(cfg, "__post_init__") else None
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def random_mask(model, **spec):
    return compute_mask(model, SparseMaskConfig(method="random", density=0.05, seed=3, **spec), progress=False)


def batch_of(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 300, (3, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def scalars(mm, estimator: str, n: int, reuse: bool, batch=None):
    batch = batch or batch_of()
    mm.reuse_frozen_trunk = reuse
    dirs = [zo.gaussian_direction(zo.derive_seed(5, j), mm.num_selected) for j in range(n)]
    return zo.step_scalars(mm, lambda: mm(**batch).loss, dirs, 1e-3, estimator)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("estimator,n", [("spsa", 1), ("spsa", 3), ("fzoo", 3)])
def test_a_top_layer_mask_reuses_the_trunk_and_keeps_every_bit(family, estimator, n):
    mm = get_meerkat_model(deep_tiny(family), random_mask(deep_tiny(family), layers_to_transform=[-2, -1]))
    assert all(".layers.2." in name or ".layers.3." in name or name.endswith("norm.weight") and ".layers." not in name
               for name in mm.mask.indices), list(mm.mask.indices)
    before = mm.values.clone()
    plain = scalars(mm, estimator, n, reuse=False)
    cached = scalars(mm, estimator, n, reuse=True)
    assert cached == plain  # bit for bit: the server's replay cannot tell
    trunk = mm._trunk
    assert trunk.depth == 2
    forwards = 2 * n if estimator == "spsa" else n + 1
    assert trunk.reused_forwards == forwards - 1  # all but the first skip layers 0-1
    assert torch.equal(mm.values, before)
    assert all("forward" not in layer.__dict__ for layer in mm.base_model.model.layers)  # restored


def test_a_mask_in_the_first_layer_runs_every_layer():
    model = deep_tiny()
    mm = get_meerkat_model(model, random_mask(model, layers_to_transform=[0, 3]))
    assert scalars(mm, "spsa", 2, reuse=True) == scalars(mm, "spsa", 2, reuse=False)
    assert mm._trunk.depth == 0 and mm._trunk.reused_forwards == 0


def test_a_mask_on_the_final_norm_only_skips_every_layer():
    model = deep_tiny()
    mask = compute_mask(model, SparseMaskConfig(method="random", density=1.0, include_patterns=[r"^model\.norm\."]),
                        progress=False)
    mm = get_meerkat_model(model, mask)
    assert scalars(mm, "fzoo", 4, reuse=True) == scalars(mm, "fzoo", 4, reuse=False)
    assert mm._trunk.depth == 4 and mm._trunk.reused_forwards == 4


def test_other_inputs_inside_the_context_are_computed_afresh():
    model = deep_tiny()
    mm = get_meerkat_model(model, random_mask(model, layers_to_transform=[3]))
    a, b = batch_of(0), batch_of(1)
    with torch.no_grad():
        want_a, want_b = float(mm(**a).loss), float(mm(**b).loss)
        with mm.frozen_trunk():
            got = [float(mm(**a).loss), float(mm(**b).loss), float(mm(**b).loss), float(mm(**a).loss)]
    assert got == [want_a, want_b, want_b, want_a]
    assert mm._trunk.reused_forwards == 1  # only the repeated b directly after b
    with torch.no_grad():  # and the model is itself again outside the context
        assert float(mm(**a).loss) == want_a


def test_training_steps_with_and_without_the_trunk_reach_the_same_bits():
    model = deep_tiny()
    mask = random_mask(model, layers_to_transform=[-1])
    runs = []
    for reuse in (True, False):
        mm = get_meerkat_model(deep_tiny(), mask)
        for step in range(3):
            batch = batch_of(step)
            mm.reuse_frozen_trunk = reuse
            dirs = [zo.gaussian_direction(zo.derive_seed(9, step, j), mm.num_selected) for j in range(2)]
            grads = zo.step_scalars(mm, lambda: mm(**batch).loss, dirs, 1e-3)
            zo.apply_step(mm.values, zo.ZOStep(tuple(zo.derive_seed(9, step, j) for j in range(2)), tuple(grads), 1e-2))
            mm.sync_weights()
        runs.append(mm.values.clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("bad", [[], [7], [-9], "2", [1.5], [True]])
def test_bad_layers_to_transform_is_one_line(bad):
    with pytest.raises(ValueError) as err:
        random_mask(deep_tiny(), layers_to_transform=bad)
    assert "layers_to_transform" in str(err.value) and "\n" not in str(err.value)


def test_a_federation_and_the_mask_cache_know_layers_to_transform():
    from meerkat_hf.federated.federation_config import FederationConfig
    from meerkat_hf.masks.cache import mask_cache_key

    cfg = FederationConfig.from_dict({"mask": {"layers_to_transform": [-2, -1]}})
    assert cfg.mask.spec().layers_to_transform == [-2, -1]
    model = deep_tiny()
    plain, top = SparseMaskConfig(), SparseMaskConfig(layers_to_transform=[-1])
    assert mask_cache_key(model, plain, "x") != mask_cache_key(model, top, "x")


def test_a_federated_client_sends_the_same_bytes_and_the_server_replays_them():
    from meerkat_hf.federated import FederatedClient, FederatedServer, LRSchedule, ProtocolParams

    def collate(feats):
        return {"input_ids": torch.stack(feats), "attention_mask": torch.ones(len(feats), feats[0].numel(), dtype=torch.long),
                "labels": torch.stack(feats)}

    model = deep_tiny()
    mask = random_mask(model, layers_to_transform=[-1])
    mm = get_meerkat_model(model, mask)
    rows = list(batch_of(7)["input_ids"]) * 4
    params = ProtocolParams(11, LRSchedule(1e-2), q=3)
    uplinks = {}
    for reuse in (True, False):
        mm.reuse_frozen_trunk = reuse
        server = FederatedServer(mm.base_values, mask.checksum, mask.fingerprint, params, num_clients=1,
                                 pretrain_grad=mask.pretrain_grad, keep_client_finals=True)
        server.begin_round(0, {0: 3})
        client = FederatedClient(0, rows, collate, batch_size=4, data_seed=5)
        res = client.train_zo(mm, server.values, 0, 3, params, mask.checksum, 1e-3, keep_final=True)
        uplinks[reuse] = res.uplink
        assert server.receive(res.uplink) is None
        assert torch.equal(server.finish_round().finals[0], res.final_values)
    assert uplinks[True] == uplinks[False]
    assert mm._trunk.depth == 3 and mm._trunk.reused_forwards > 0


def test_the_benchmark_times_both_paths_and_finds_the_same_bits(tmp_path):
    """`benchmarks/frozen_trunk.py` on a tiny saved model: every mask placement, both paths, same scalars."""
    import json

    from conftest import load_script
    from meerkat_hf.testing.toy_federation import make_model_dir

    bench = load_script("benchmarks/frozen_trunk.py")
    out = tmp_path / "rec.json"
    rows = bench.main(["--model", make_model_dir(tmp_path), "--layers", "all", "last1", "norm", "--n", "1", "3",
                       "--k", "40", "--repeats", "1", "--json", str(out)])
    depths = {(r["layers"], r["n"]): r["trunk_depth"] for r in rows}
    assert depths == {("all", 1): 0, ("all", 3): 0, ("last1", 1): 1, ("last1", 3): 1, ("norm", 1): 2, ("norm", 3): 2}
    assert all(r["same_bits"] and r["s_per_step_trunk"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
    quick = bench.main(["--model", make_model_dir(tmp_path), "--layers", "norm", "--n", "2", "--k", "40",
                        "--repeats", "1", "--trunk-only"])
    assert "same_bits" not in quick[0] and quick[0]["trunk_depth"] == 2


def test_a_forward_that_raises_inside_the_context_leaves_nothing_behind():
    model = deep_tiny()
    mm = get_meerkat_model(model, random_mask(model, layers_to_transform=[3]))
    a, b = batch_of(0), batch_of(1)
    boom = {"on": False}

    def fail(_module, _args):
        if boom["on"]:
            raise RuntimeError("boom")

    handle = mm.base_model.model.layers[3].register_forward_pre_hook(fail)
    with torch.no_grad():
        want_a, want_b = float(mm(**a).loss), float(mm(**b).loss)
        with mm.frozen_trunk():
            boom["on"] = True
            with pytest.raises(RuntimeError):
                mm(**a)  # the very first forward fails after the trunk ran
            boom["on"] = False
            assert float(mm(**b).loss) == want_b
            boom["on"] = True
            with pytest.raises(RuntimeError):
                mm(**a)  # a later one fails after keeping a's trunk
            boom["on"] = False
            assert [float(mm(**b).loss), float(mm(**b).loss), float(mm(**a).loss)] == [want_b, want_b, want_a]
    handle.remove()
    layers = mm.base_model.model.layers
    assert all(not layer._forward_hooks and "forward" not in layer.__dict__ for layer in layers)


def test_forwards_that_need_every_layer_run_whole_inside_the_context():
    model = deep_tiny()
    mm = get_meerkat_model(model, random_mask(model, layers_to_transform=[3]))
    a = batch_of(0)
    with torch.no_grad():
        want = mm(**a, output_hidden_states=True, use_cache=True)
        with mm.frozen_trunk():
            mm(**a)
            mm(**a)  # kept and replayed
            got = mm(**a, output_hidden_states=True, use_cache=True)
    assert mm._trunk.reused_forwards == 1
    for h_want, h_got in zip(want.hidden_states, got.hidden_states):
        assert torch.equal(h_want, h_got)
    assert got.past_key_values.get_seq_length() == want.past_key_values.get_seq_length()
    assert len(got.past_key_values.layers) == len(want.past_key_values.layers) == 4
