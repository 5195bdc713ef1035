"""`llm_audit.run.watcher.WeightWatcher` against WeightWatcher 0.7.7 on the same torch models.

Both walk the same model: the rows (`layer_id`, `name`) must be the same, and alpha,
log_norm and num_spikes equal (WeightWatcher's fits, on eigenvalues computed twice).
WeightWatcher's shuffles use numpy's global generator, so its trap count is compared only
where it is unambiguous: the same for two numpy seeds; there ours must equal it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from llm_audit.errors import UsageError
from llm_audit.run.watcher import WeightWatcher

from .conftest import quiet

RTOL = 1e-6


def _mlp_with_trap() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(48, 120),
        torch.nn.ReLU(),
        torch.nn.Linear(120, 96),
        torch.nn.ReLU(),
        torch.nn.Linear(96, 10),
    )
    with torch.no_grad():
        weight = model[2].weight
        weight[7, 11] = 40 * weight.std()  # one large entry: a correlation trap
    return model


def _tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=120,
        n_positions=40,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embeddings
    return model


def _conv_net() -> torch.nn.Module:
    """Weights only: WeightWatcher never runs the model, so shapes need not chain."""
    torch.manual_seed(2)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 24, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(24 * 4 * 4, 10),
        torch.nn.Conv2d(2, 3, (5, 6)),  # channels < kernel: WeightWatcher's other branch
    )


MODELS = {"mlp": _mlp_with_trap, "gpt2": _tiny_gpt2, "conv": _conv_net}


def _ww(model, seed, randomize=True, **options):
    import weightwatcher as ww

    np.random.seed(seed)
    with quiet():
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        watcher = ww.WeightWatcher(model=model)
        details = watcher.analyze(randomize=randomize, mp_fit=randomize, **options)
        return details, watcher.get_summary()


@pytest.mark.parametrize("which", list(MODELS))
def test_parity_with_weightwatcher(which):
    model = MODELS[which]()
    ref, ref_summary = _ww(model, 0)
    ours_watcher = WeightWatcher(model=model)
    ours = ours_watcher.analyze(randomize=True, mp_fit=True, seed=0)

    assert list(zip(ours.layer_id, ours.name, strict=True)) == list(
        zip(ref.layer_id, ref.name, strict=True)
    )
    assert list(ours.longname) == list(ref.longname)
    assert list(ours.layer_type) == [str(t) for t in ref.layer_type]
    for col in ("N", "M", "rf", "num_evals", "num_spikes", "status"):
        assert list(ours[col]) == list(ref[col]), col
    assert set(ours.status) == {"success"} and set(ours.audit_status) == {"ok"}
    for col in ("alpha", "log_norm", "lambda_max", "stable_rank", "sv_max", "xmax", "W_scale"):
        np.testing.assert_allclose(ours[col], ref[col], rtol=RTOL, err_msg=col)
    # rand_W_scale is W_scale (a shuffle keeps the norm); rand_bulk_min / rand_bulk_max is
    # a function of Q alone, so it is comparable though the two shuffles differ
    np.testing.assert_allclose(ours.rand_W_scale, ref.rand_W_scale, rtol=RTOL)
    np.testing.assert_allclose(
        ours.rand_bulk_min / ours.rand_bulk_max, ref.rand_bulk_min / ref.rand_bulk_max, rtol=RTOL
    )

    other = _ww(model, 1)[0].rand_num_spikes
    clear = [other[i] == ref.rand_num_spikes[i] for i in range(len(ref))]
    assert sum(clear) >= len(ref) // 2, "too few unambiguous trap counts to compare"
    for i in np.flatnonzero(clear):
        assert ours.rand_num_spikes[i] == ref.rand_num_spikes[i], ours.longname[i]
    assert list(ours.num_traps) == list(ours.rand_num_spikes)

    summary = ours_watcher.get_summary()
    assert summary.keys() == ref_summary.keys()
    for key, value in ref_summary.items():
        assert summary[key] == pytest.approx(value, rel=RTOL), key
    assert ours_watcher.get_details() is ours


def test_planted_trap_found_and_seeded():
    model = _mlp_with_trap()
    first = WeightWatcher(model=model).analyze(randomize=True, seed=3)
    again = WeightWatcher(model=model).analyze(randomize=True, seed=3)
    trapped = first.set_index("longname").loc["2"]
    assert trapped.rand_num_spikes >= 1
    assert trapped.trap_entries[0]["row"] == 7 and trapped.trap_entries[0]["col"] == 11
    assert list(first.rand_num_spikes) == list(again.rand_num_spikes)
    assert list(first.max_rand_eval) == list(again.max_rand_eval)


def test_state_dict_rows_match_weightwatcher():
    state = _conv_net().state_dict()
    ref, _ = _ww(state, 0)
    ours = WeightWatcher(model=state).analyze(randomize=True, mp_fit=True)
    assert list(zip(ours.layer_id, ours.name, strict=True)) == list(
        zip(ref.layer_id, ref.name, strict=True)
    )
    np.testing.assert_allclose(ours.alpha, ref.alpha, rtol=RTOL)
    np.testing.assert_allclose(ours.log_norm, ref.log_norm, rtol=RTOL)
    # a training checkpoint {"state_dict": ...}: unwrapped, as WeightWatcher does
    ref_wrapped, _ = _ww({"state_dict": state}, 0)
    wrapped = WeightWatcher(model={"state_dict": state, "epoch": 3}).analyze(randomize=True)
    assert list(wrapped.layer_id) == list(ref_wrapped.layer_id) == list(ref.layer_id)
    assert list(wrapped.alpha) == list(ours.alpha)
    with pytest.raises(UsageError, match=r"mappings under 'model'.*model=checkpoint\['model'\]"):
        WeightWatcher(model={"model": state, "step": 10}).analyze()


def test_layer_filters_and_limits_as_weightwatcher():
    model = _mlp_with_trap()
    for options in (
        {"layers": [3]},
        {"layers": [-1]},
        {"layers": ["-4"]},
        {"min_evals": 20},
        {"max_evals": 0},  # no limit, as any falsy max_evals
    ):
        ref, _ = _ww(model, 0, randomize=False, **options)
        ours = WeightWatcher(model=model).analyze(**options)
        assert list(ours.layer_id) == list(ref.layer_id), options
    ours = WeightWatcher(model=model).analyze(max_evals=50, max_N=100)
    assert list(ours.layer_id) == [5]
    gpt2 = _tiny_gpt2()
    for options in ({"layers": ["embedding"]}, {"layers": ["c_fc", "lm_head"]}):
        ref, _ = _ww(gpt2, 0, randomize=False, **options)
        ours = WeightWatcher(model=gpt2).analyze(**options)
        assert list(zip(ours.layer_id, ours.longname, strict=True)) == list(
            zip(ref.layer_id, ref.longname, strict=True)
        ), options
        np.testing.assert_allclose(ours.alpha, ref.alpha, rtol=RTOL)


def test_unsupported_options_are_refused():
    watcher = WeightWatcher(model=_mlp_with_trap())
    with pytest.raises(UsageError, match="plot=True is not supported"):
        watcher.analyze(plot=True)
    with pytest.raises(UsageError, match="unknown option 'colour'"):
        watcher.analyze(colour="red")
    with pytest.raises(UsageError, match=r"must be a torch nn\.Module"):
        WeightWatcher(model=42).analyze()
    # WeightWatcher's own svd_method names change nothing in our eigenvalues; others it
    # refuses, and so do we
    assert len(watcher.analyze(svd_method="accurate")) == 3
    with pytest.raises(UsageError, match=r"svd_method='bogus' is not supported \(only 'fast', "):
        watcher.analyze(svd_method="bogus")
    # tolerance sets WeightWatcher's weak_rank_loss, pl_package its fitter: not ours
    with pytest.raises(UsageError, match=r"tolerance=0\.5 is not supported"):
        watcher.analyze(tolerance=0.5)
    with pytest.raises(UsageError, match="pl_package='powerlaw' is not supported"):
        watcher.analyze(pl_package="powerlaw")
    assert len(WeightWatcher(model=_mlp_with_trap(), framework="pytorch").analyze()) == 3
    with pytest.raises(UsageError, match="framework='keras' is not supported"):
        WeightWatcher(model=_mlp_with_trap(), framework="keras")
    # WeightWatcher(model, log_level=logging.WARNING) is a common call: the drop-in, which
    # writes no log, takes it
    assert len(WeightWatcher(model=_mlp_with_trap(), log_level=logging.INFO).analyze()) == 3


def test_a_skipped_layer_keeps_its_shape():
    """A zeroed layer is skipped ('failed' in WeightWatcher's `status`), but like
    WeightWatcher's its row has N and M, so the frame's integer columns stay integers."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 200), torch.nn.Linear(200, 10))
    with torch.no_grad():
        model[1].weight.zero_()
    details = WeightWatcher(model=model).analyze()
    zeroed = details.set_index("longname").loc["1"]
    assert (zeroed.N, zeroed.M, zeroed.status, zeroed.audit_status) == (
        200,
        10,
        "failed",
        "skipped",
    )
    assert list(details.status) == ["success", "failed"]
    assert details.N.dtype == details.M.dtype == np.int64


class _NotMatrices(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.bil = torch.nn.Bilinear(16, 24, 12)  # weight [12, 16, 24]
        self.conv = torch.nn.Conv1d(8, 16, 9)  # weight [16, 8, 9]
        self.fc = torch.nn.Linear(32, 20)


def test_a_weight_that_is_not_a_matrix_gets_a_failed_row():
    """WeightWatcher gives nn.Bilinear and nn.Conv1d (3-D weights) a row, fitting the
    largest singular values of the slices pooled; ours is the same row, not analyzed."""
    model = _NotMatrices()
    ref, _ = _ww(model, 0, randomize=False)
    ours = WeightWatcher(model=model).analyze()
    for col in ("layer_id", "name", "layer_type", "N", "M"):
        assert list(ours[col]) == list(ref[col]), col
    assert list(ours.status) == ["failed", "failed", "success"]
    assert list(ours.audit_status) == ["skipped", "skipped", "ok"]
    assert ours.reason[0].startswith("its weight is 3-D [12, 16, 24], not a matrix")
    assert ours.alpha[2] == pytest.approx(ref.alpha[2], rel=RTOL)


def test_conv2d_with_fewer_outputs_than_inputs_keeps_n_above_m():
    """Where out < in and out + in < kh + kw, WeightWatcher's channels-flip branch reports
    N = out < M = in (Q < 1) and fits MP with that Q; the ESD is the same, ours keeps
    N >= M (a documented difference: README, "What is computed")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 2, 7))
    ref, _ = _ww(model, 0, randomize=False)
    ours = WeightWatcher(model=model).analyze()
    assert (ref.N[0], ref.M[0], ours.N[0], ours.M[0]) == (2, 8, 8, 2)
    assert (ours.rf[0], ours.num_evals[0]) == (ref.rf[0], ref.num_evals[0]) == (49, 98)
    for col in ("alpha", "log_norm", "lambda_max"):
        assert ours[col][0] == pytest.approx(ref[col][0], rel=RTOL), col


def test_weightwatcher_methods_not_provided_are_refused_by_name():
    watcher = WeightWatcher(model=torch.nn.Linear(32, 16))
    with pytest.raises(UsageError, match=r"WeightWatcher\.describe is not provided"):
        watcher.describe()
    with pytest.raises(AttributeError, match="no attribute 'colour'"):
        _ = watcher.colour


def test_module_only_options_are_refused_for_a_folder(tmp_path):
    with pytest.raises(UsageError, match=r"start_ids and conv2d_norm apply to an nn\.Module"):
        WeightWatcher(model=str(tmp_path)).analyze(start_ids=1)
    with pytest.raises(UsageError, match="start_ids and conv2d_norm"):
        WeightWatcher(model=tmp_path).analyze(conv2d_norm=False)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    _tiny_gpt2().save_pretrained(folder)  # model.safetensors, lm_head tied to wte
    return folder


def test_a_folder_filters_by_weightwatcher_type_and_module_name(gpt2_folder, monkeypatch):
    """On a folder the rows are the audit's (c_attn split into q, k, v): `layer_type` is
    the type WeightWatcher's folder walk gives the tensor, a name matches the module, and
    integer ids, which would name other layers than WeightWatcher's, are refused."""
    from llm_audit.run import api

    real, reports = api.audit, []

    def audit_once(reference, out, **settings):  # one real audit, reused by the filters
        if not reports:
            reports.append(real(reference, out, **settings))
        return reports[0]

    monkeypatch.setattr(api, "audit", audit_once)
    folder = str(gpt2_folder)
    full = WeightWatcher(model=folder).analyze()
    assert len(full) == 8 and set(full.layer_type) == {"dense"}
    assert set(full.status) == {"success"} and set(full.audit_status) == {"ok"}
    assert list(full.kind[:3]) == ["q_proj", "k_proj", "v_proj"]
    for options in (
        {"layers": ["dense"]},
        {"layers": ["transformer.h.0.attn.c_attn", "transformer.wte"]},
        {"layers": ["-transformer.wte"]},
    ):
        ref, _ = _ww(folder, 0, randomize=False, **options)
        ours = WeightWatcher(model=folder).analyze(**options)
        modules = ours.tensor.str.removesuffix(".weight")
        assert len(ref) and set(modules) == set(ref.name), options
        whole = ref.set_index("name").alpha  # a tensor that is one row has WeightWatcher's
        for module, alpha in zip(modules, ours.alpha, strict=True):
            if (modules == module).sum() == 1:
                assert alpha == pytest.approx(whole[module], rel=RTOL), module
    assert len(reports) == 1
    with pytest.raises(UsageError, match=r"layers=\[1, 2\]: on a folder or hub id the rows"):
        WeightWatcher(model=folder).analyze(layers=[1, 2])


def test_a_folders_weight_normed_conv_is_its_module_and_conv1d(tmp_path):
    """A weight-normed conv (wav2vec2's position conv) is audited as W = g * v / |v| under
    the weight's name: on a folder its rows are `conv1d`, one per kernel position, and the
    module's name selects them."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file(
        {
            "pos_conv.weight_g": np.ones((1, 1, 3), np.float32),
            "pos_conv.weight_v": rng.standard_normal((32, 16, 3)).astype(np.float32),
            "fc.weight": rng.standard_normal((32, 16)).astype(np.float32),
        },
        tmp_path / "model.safetensors",
    )
    rows = WeightWatcher(model=str(tmp_path)).analyze(layers=["pos_conv"], randomize=False)
    assert list(rows.name) == [f"pos_conv.weight[{k}]" for k in range(3)]
    assert set(rows.layer_type) == {"conv1d"} and set(rows.status) == {"success"}
