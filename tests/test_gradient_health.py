"""Per-step gradient norms: the cpu backend against the float64 reference, both
against finite differences; the tanh-RNN reference against finite differences; and the
gradient-flow report (it runs, writes JSON and PNG, and tells the story)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_problem, make_upstream, rel_err, torch_or_skip

import rnnkernels
from rnnkernels import gradient_flow, rnn_reference
from rnnkernels.reference import sigmoid

# ----------------------------------------------------------------------------- LSTM, cpu backend

NORM_TOLERANCE = {np.float32: 2e-5, np.float64: 1e-10}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "steps, batch, input_size, hidden, upstream",
    [
        (1, 1, 1, 1, "all"),
        (6, 3, 5, 17, "all"),
        (9, 1, 33, 12, "last"),  # a loss on the last step only, as in the report
        (4, 2, 3, 40, "none"),  # no upstream gradient: every norm is zero
    ],
)
def test_cpu_step_norms_match_reference(dtype, steps, batch, input_size, hidden, upstream):
    problem = make_problem(steps, batch, input_size, hidden, dtype=dtype, seed=hidden)
    up = make_upstream(steps, batch, hidden, dtype=dtype, seed=steps)
    if upstream == "last":
        up = {"dh_n": up["dh_n"]}
    elif upstream == "none":
        up = {}
    norms = {}
    for backend in ("cpu", "reference"):
        out = rnnkernels.lstm_forward(**problem, backend=backend)
        grads = rnnkernels.lstm_backward(out, **up, return_step_norms=True)
        assert grads.dh_norms.shape == grads.dc_norms.shape == (steps,)
        assert grads.dh_norms.dtype == np.float64
        norms[backend] = grads
    cpu, ref = norms["cpu"], norms["reference"]
    if upstream == "none":
        assert not cpu.dh_norms.any() and not cpu.dc_norms.any()
        return
    assert rel_err(cpu.dh_norms, ref.dh_norms) < NORM_TOLERANCE[dtype]
    assert rel_err(cpu.dc_norms, ref.dc_norms) < NORM_TOLERANCE[dtype]
    # elementwise too: the small norms far from the loss must match, not only the sum
    np.testing.assert_allclose(cpu.dh_norms, ref.dh_norms, rtol=50 * NORM_TOLERANCE[dtype])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_step_norms_match_finite_differences(backend):
    """‖∂L/∂h_t‖ and ‖∂L/∂c_t‖ (float64) against central differences of a
    hand-unrolled forward, perturbing h_t or c_t where it is made: c_t before h_t
    reads it, so the whole of ∂L/∂c_t is measured."""
    steps, batch, input_size, hidden = 4, 2, 3, 3
    p = make_problem(steps, batch, input_size, hidden, seed=21)
    up = make_upstream(steps, batch, hidden, seed=22)
    bias = p["b_ih"] + p["b_hh"]

    def loss(t_perturbed, which, delta):
        h, c, total = p["h0"], p["c0"], 0.0
        for t in range(steps):
            z = p["x"][t] @ p["w_ih"].T + h @ p["w_hh"].T + bias
            zi, zf, zg, zo = np.split(z, 4, axis=1)
            c = sigmoid(zf) * c + sigmoid(zi) * np.tanh(zg)
            if t == t_perturbed and which == "c":
                c = c + delta
            h = sigmoid(zo) * np.tanh(c)
            if t == t_perturbed and which == "h":
                h = h + delta
            total += np.sum(up["dy"][t] * h)
        return total + np.sum(up["dh_n"] * h) + np.sum(up["dc_n"] * c)

    out = rnnkernels.lstm_forward(**p, backend=backend)
    grads = rnnkernels.lstm_backward(out, **up, return_step_norms=True)
    eps = 1e-6
    for t in range(steps):
        for which, norms in (("h", grads.dh_norms), ("c", grads.dc_norms)):
            g = np.zeros((batch, hidden))
            for index in np.ndindex(batch, hidden):
                delta = np.zeros((batch, hidden))
                delta[index] = eps
                g[index] = (loss(t, which, delta) - loss(t, which, -delta)) / (2 * eps)
            assert norms[t] == pytest.approx(np.linalg.norm(g), rel=1e-7), (which, t)


# ----------------------------------------------------------------------------- tanh RNN reference


def _rnn_problem(steps=4, batch=2, input_size=3, hidden=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((steps, batch, input_size)),
        "w_ih": rng.standard_normal((hidden, input_size)) * 0.6,
        "w_hh": rng.standard_normal((hidden, hidden)) * 0.6,
        "b_ih": rng.standard_normal(hidden) * 0.3,
        "b_hh": rng.standard_normal(hidden) * 0.3,
        "h0": rng.standard_normal((batch, hidden)) * 0.5,
    }, rng.standard_normal((steps, batch, hidden)), rng.standard_normal((batch, hidden))


def test_rnn_reference_gradients_match_finite_differences():
    p, dy, dh_n = _rnn_problem()

    def loss():
        y, h_n, _ = rnn_reference.forward(**p)
        return float(np.sum(dy * y) + np.sum(dh_n * h_n))

    _, _, saved = rnn_reference.forward(**p)
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0 = rnn_reference.backward(saved, dy, dh_n)
    eps = 1e-6
    for name, analytic in (("x", dx), ("w_ih", dw_ih), ("w_hh", dw_hh), ("b_ih", db_ih), ("b_hh", db_hh),
                           ("h0", dh0)):
        value, numerical = p[name], np.zeros_like(p[name])
        for index in np.ndindex(value.shape):
            original = value[index]
            value[index] = original + eps
            plus = loss()
            value[index] = original - eps
            minus = loss()
            value[index] = original
            numerical[index] = (plus - minus) / (2 * eps)
        assert analytic.shape == value.shape
        assert rel_err(analytic, numerical) < 1e-7, name


def test_rnn_reference_step_norms_match_finite_differences():
    p, dy, dh_n = _rnn_problem(steps=5, seed=3)
    steps, batch, hidden = dy.shape
    bias = p["b_ih"] + p["b_hh"]

    def loss(t_perturbed, delta):
        h, total = p["h0"], 0.0
        for t in range(steps):
            h = np.tanh(p["x"][t] @ p["w_ih"].T + h @ p["w_hh"].T + bias)
            if t == t_perturbed:
                h = h + delta
            total += np.sum(dy[t] * h)
        return total + np.sum(dh_n * h)

    _, _, saved = rnn_reference.forward(**p)
    *_, norms = rnn_reference.backward(saved, dy, dh_n, return_step_norms=True)
    eps = 1e-6
    for t in range(steps):
        g = np.zeros((batch, hidden))
        for index in np.ndindex(batch, hidden):
            delta = np.zeros((batch, hidden))
            delta[index] = eps
            g[index] = (loss(t, delta) - loss(t, -delta)) / (2 * eps)
        assert norms[t] == pytest.approx(np.linalg.norm(g), rel=1e-7), t


def test_rnn_reference_matches_torch_rnn():
    torch = torch_or_skip()
    p, _, _ = _rnn_problem(steps=6, batch=3, input_size=5, hidden=4, seed=5)
    rnn = torch.nn.RNN(5, 4, nonlinearity="tanh", dtype=torch.float64)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.from_numpy(p["w_ih"]))
        rnn.weight_hh_l0.copy_(torch.from_numpy(p["w_hh"]))
        rnn.bias_ih_l0.copy_(torch.from_numpy(p["b_ih"]))
        rnn.bias_hh_l0.copy_(torch.from_numpy(p["b_hh"]))
        y, _ = rnn(torch.from_numpy(p["x"]), torch.from_numpy(p["h0"])[None])
    assert rel_err(rnn_reference.forward(**p)[0], y.numpy()) < 1e-13


# ----------------------------------------------------------------------------- the report


def test_gradient_flow_report_tells_the_story(tmp_path, capsys):
    json_path, png_path = tmp_path / "flow.json", tmp_path / "flow.png"
    assert gradient_flow.main(["--json", str(json_path), "--plot", str(png_path)]) == 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["config"]["steps"] == 256 and data["config"]["backend"] == "auto"
    assert data["config"]["cells"] == ["rnn_tanh", "rnn_relu", "gru", "lstm"]
    ratios = data["ratios"]
    for run in data["runs"]:
        assert len(run["dh_norms"]) == 256
        assert run["ratio"] == pytest.approx(run["dh_norms"][0] / run["dh_norms"][-1], rel=1e-12)
        assert ratios[run["key"]] == run["ratio"]
        # auto: the Numba backend wherever it implements the cell (the LSTM's always)
        assert run["backend"] == gradient_flow.resolve_backend("auto", run["cell"])
        assert f"'{run['backend']}'" in run["computed_by"]
        assert run["backend"] == "cpu" or run["cell"] != "lstm"
        assert (run["dc_norms"] is not None) == (run["cell"] == "lstm")
    tanh_runs = [r for r in data["runs"] if r["cell"] == "rnn_tanh"]
    assert len(tanh_runs) >= 3
    # the tanh RNN under standard initialization loses orders of magnitude ...
    assert ratios["rnn_tanh/pytorch_default"] < 1e-20
    assert max(r["ratio"] for r in tanh_runs) < 1e-10
    # ... the ReLU RNN too, unless W_hh starts as the identity (IRNN): then it keeps
    # the gradient of every unit that stays active
    assert ratios["rnn_relu/pytorch_default"] < 1e-20
    assert ratios["rnn_relu/irnn"] > 1e-2
    # ... and the gated cells keep far more with orthogonal W_hh and a bias on the gate
    # that keeps the state: the LSTM's forget gate, the GRU's update gate
    gated = ratios["lstm/orthogonal+forget_bias=1"]
    assert gated > 1e20 * ratios["rnn_tanh/pytorch_default"]
    assert gated > 1e15 * max(r["ratio"] for r in tanh_runs)
    assert gated > 1e20 * ratios["lstm/pytorch_default"]
    gru = ratios["gru/orthogonal+update_bias=1"]
    assert gru > 1e10 * ratios["gru/orthogonal"] > 1e10 * ratios["gru/pytorch_default"]
    assert gru > 1e15 * max(r["ratio"] for r in tanh_runs)
    assert "decades" in capsys.readouterr().out

    replot = tmp_path / "again.png"
    assert gradient_flow.main(["--from-json", str(json_path), "--plot", str(replot)]) == 0
    assert replot.stat().st_size > 0


@pytest.mark.parametrize("cell", gradient_flow.CELLS)
def test_gradient_flow_backends_agree_on_a_short_run(cell):
    """Every cell's norms from the cpu backend against the float64 reference backend."""
    if gradient_flow.resolve_backend("auto", cell) != "cpu":
        pytest.skip(f"the cpu backend does not implement {cell} yet")
    runs = gradient_flow.default_runs(cells=(cell,))
    cpu = gradient_flow.run_report(steps=24, batch=2, input_size=3, hidden=5, backend="cpu", runs=runs)
    ref = gradient_flow.run_report(steps=24, batch=2, input_size=3, hidden=5, backend="reference", runs=runs)
    for a, b in zip(cpu["runs"], ref["runs"], strict=True):
        assert a["key"] == b["key"]
        np.testing.assert_allclose(a["dh_norms"], b["dh_norms"], rtol=1e-9)
        if a["cell"] == "lstm":
            np.testing.assert_allclose(a["dc_norms"], b["dc_norms"], rtol=1e-9)


def test_gradient_flow_step_norms_are_the_cell_references_own():
    """The norms the report reads through the API for the GRU and the Elman RNN are
    those of the cells' float64 references (themselves checked against finite
    differences in test_cell_references)."""
    from rnnkernels import gru_reference, init

    rng = np.random.default_rng(4)
    x, dy_last = rng.standard_normal((7, 2, 3)), rng.standard_normal((2, 4))
    for cell, module, extra in (("gru", gru_reference, {}), ("rnn_relu", rnn_reference, {"nonlinearity": "relu"}),
                                ("rnn_tanh", rnn_reference, {"nonlinearity": "tanh"})):
        params = init.cell_parameters(cell, 3, 4, "orthogonal", rng=1, dtype=np.float64)
        params["b_ih"] += 0.1  # biases that are not zero, so that folding them matters
        params["b_hh"] -= 0.3
        dh_norms, dc_norms = gradient_flow.step_norms(cell, x, dy_last, params, "reference")
        _, _, saved = module.forward(x, **params, **extra)
        *_, want = module.backward(saved, dh_n=dy_last, return_step_norms=True)
        np.testing.assert_allclose(dh_norms, want, rtol=1e-12)
        assert dc_norms is None


def test_gradient_flow_cell_option(tmp_path, capsys):
    json_path = tmp_path / "gru.json"
    assert gradient_flow.main(["--cell", "gru", "--steps", "12", "--hidden", "6", "--backend", "reference",
                               "--json", str(json_path), "--plot", str(tmp_path / "gru.png")]) == 0
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert {run["cell"] for run in data["runs"]} == {"gru"} and data["config"]["cells"] == ["gru"]
    assert "GRU, orthogonal per gate + update bias 1" in capsys.readouterr().out
    assert gradient_flow.build_parser().parse_args(["--cell", "rnn,lstm"]).cell == ("rnn_tanh", "rnn_relu", "lstm")
    with pytest.raises(SystemExit) as info:
        gradient_flow.main(["--cell", "transformer"])
    assert info.value.code == 2


def test_gradient_flow_replots_a_report_saved_before_the_cells(tmp_path):
    """Reports written when only the tanh RNN and the LSTM ran name the cell "model"."""
    pytest.importorskip("matplotlib")
    old = {"config": {"steps": 3, "batch": 1, "input_size": 1, "hidden": 1, "backend": "cpu"},
           "runs": [{"model": model, "label": f"{model}, x", "ratio": 0.5, "decades": -0.3, "seconds": 0.0,
                     "dh_norms": [0.5, 0.7, 1.0]} for model in ("rnn_tanh", "lstm")]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old), encoding="utf-8")
    assert gradient_flow.main(["--from-json", str(path), "--plot", str(tmp_path / "old.png")]) == 0


def test_gradient_flow_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        gradient_flow.main(["--steps", "0"])
    assert info.value.code == 2
    assert gradient_flow.main(["--forget-bias", "nan"]) == 2
    assert gradient_flow.main(["--update-bias", "inf"]) == 2
    with pytest.raises(ValueError, match="backend"):
        gradient_flow.run_report(steps=2, backend="cuda")


def test_gradient_flow_run_does_not_depend_on_the_others():
    runs = gradient_flow.default_runs()
    alone = gradient_flow.run_report(steps=6, batch=1, input_size=2, hidden=3, backend="reference", runs=runs[-1:])
    both = gradient_flow.run_report(steps=6, batch=1, input_size=2, hidden=3, backend="reference", runs=runs[-2:])
    assert alone["runs"][0]["dh_norms"] == both["runs"][1]["dh_norms"]


def test_readme_table_is_the_saved_report():
    """The README's gradient-flow table lists the saved report's ratios, run by run
    (regenerate both with `rnnkernels-bench gradient-flow --json
    benchmarks/results/gradient-flow.json --plot benchmarks/results/gradient-flow.png`)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    data = json.loads((repo / "benchmarks/results/gradient-flow.json").read_text(encoding="utf-8"))
    readme = (repo / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| network and initialization |"):].split("\n\n", 1)[0]
    shown = [line.rsplit("|", 2)[1].strip() for line in table.splitlines()[2:]]
    assert shown == [f"{run['ratio']:.1e}" for run in data["runs"]]
