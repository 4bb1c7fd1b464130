"""Input validation at the call API: every wrong input is one ValueError that names the tensor and
says what was expected — never a broadcasting accident, an einsum error deep in the runtime, or a
silently ignored argument."""

from __future__ import annotations

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs

B, T, H, D = 2, 7, 3, 4


@pytest.fixture(scope="module")
def titans():
    return memdsl.compile("rules/titans.mem")


@pytest.fixture(scope="module")
def moneta():
    return memdsl.compile("rules/moneta.mem")


def call(rule, change):
    tok, gates, params = make_inputs(rule, B=B, T=T, H=H, D=D, dtype=torch.float32)
    args = {"q": tok["q"], "k": tok["k"], "v": tok["v"], "gates": gates, "params": params, "state": None,
            "kw": {}}
    change(args)
    return rule(args["q"], args["k"], args["v"], args["gates"], args["params"], args["state"], **args["kw"])


def gate(name, value):
    def change(a):
        a["gates"] = {**a["gates"], name: value(a["gates"][name])}
    return change


def token(name, value):
    def change(a):
        a[name] = value(a[name])
    return change


def kw(**opts):
    def change(a):
        a["kw"] = opts
    return change


META = torch.device("meta")


def fresh_state():
    return memdsl.compile("rules/titans.mem").init_state(B, H, D)


CASES = {
    "q not a tensor": (token("q", lambda t: t.tolist()), r"`q` must be a tensor, got list"),
    "q 3-D": (token("q", lambda t: t[:, :, 0]), r"`q` must be \[B, T, H, D\], got shape \(2, 7, 4\)"),
    "q wrong width": (token("q", lambda t: t[..., :3]), r"`q` must have 4 features per head, got 3 "
                                                        r"\(sizes taken from the other inputs: d = 4 from `k`\)"),
    "v wrong batch": (token("v", lambda t: t[:1]), r"`v` has \[B, T, H\] = \(1, 7, 3\), q has \(2, 7, 3\)"),
    "k integer": (token("k", lambda t: t.long()), r"`k` must be floating point, got torch.int64"),
    "v on another device": (token("v", lambda t: torch.empty(t.shape, device=META)), r"`v` is on meta but q is on cpu"),
    "gate missing": (lambda a: a["gates"].pop("eta"), r"missing gate `eta`: expected a \[B, T, H\] tensor"),
    "gates not a dict": (lambda a: a.update(gates=torch.zeros(B, T, H)), r"`gates` must be a dict"),
    "gate wrong shape": (gate("theta", lambda g: g[:, :, 0]),
                         r"gate `theta` must have shape \(2, 7, 3\), got \(2, 7\)"),
    "gate wrong length": (gate("theta", lambda g: g[:, :5]),
                          r"gate `theta` must have shape \(2, 7, 3\), got \(2, 5, 3\)"),
    "gate not a tensor": (gate("theta", lambda g: 0.5), r"gate `theta` must have shape \(2, 7, 3\), got float"),
    "gate integer": (gate("theta", lambda g: g.long()), r"gate `theta` must be floating point, got torch.int64"),
    "gate on another device": (gate("theta", lambda g: torch.empty(g.shape, device=META)),
                               r"gate `theta` is on meta, expected cpu"),
    "gate unknown": (lambda a: a["gates"].update(thetta=a["gates"]["theta"]), r"unknown gate\(s\) \['thetta'\]"),
    "memory wrong shape": (lambda a: a["params"].update(W1=a["params"]["W1"][:, :2]),
                           r"initial memory params\[`W1`\] must be \(16, 4\) or \(3, 16, 4\), got \(3, 2, 4\)"),
    "params unknown": (lambda a: a["params"].update(W3=torch.zeros(4)), r"unknown params \['W3'\]"),
    "params not a dict": (lambda a: a.update(params=[1, 2]), r"`params` must be a dict"),
    "state missing key": (lambda a: a.update(state={"A.W1": torch.zeros(B, H, 16, D)}),
                          r"state is missing `S.W1` \(make one with init_state\)"),
    "state wrong shape": (lambda a: a.update(state={k: x[:1] for k, x in fresh_state().items()}),
                          r"state\[`A.W1`\] must be \(2, 3, 16, 4\), got \(1, 3, 16, 4\)"),
    "state on another device": (lambda a: a.update(state={k: torch.empty(x.shape, device=META)
                                                          for k, x in fresh_state().items()}),
                                r"state\[`A.W1`\] is on meta, expected cpu"),
    "state not a dict": (lambda a: a.update(state=torch.zeros(3)), r"`state` must be a dict"),
    "chunk zero": (kw(chunk=0), r"chunk must be an integer ≥ 1, got 0"),
    "chunk text": (kw(chunk="16"), r"chunk must be an integer ≥ 1, got '16'"),
    "backend unknown": (kw(backend="cuda"), r"backend must be one of"),
    "backend without kernel": (kw(backend="wy"), r"rule titans is not a delta rule: no WY backend"),
    "read order": (kw(read_order="never"), r"read_order must be 'after', 'before' or 'chunk_start'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_inputs_are_one_clear_value_error(titans, case):
    change, message = CASES[case]
    with pytest.raises(ValueError, match=message):
        call(titans, change)


def test_channel_gate_shape_names_the_channels(moneta):
    with pytest.raises(ValueError, match=r"gate `eta` must have shape \(2, 7, 3, 4\), got \(2, 7, 3\)"):
        call(moneta, gate("eta", lambda g: g[..., 0]))
    with pytest.raises(ValueError, match=r"missing gate `alpha`: expected a \[B, T, H, 4\] tensor"):
        call(moneta, lambda a: a["gates"].pop("alpha"))


def test_outer_shape_and_missing_outer():
    rule = memdsl.compile("rules/ttt_linear.mem")
    with pytest.raises(ValueError, match=r"params\[`ln_w`\] must be \(4,\) or \(3, 4\), got \(5,\)"):
        call(rule, lambda a: a["params"].update(ln_w=torch.ones(5)))
    bare = memdsl.compile(open("rules/ttt_linear.mem").read().replace("outer ln_w : [d] init ones",
                                                                        "outer ln_w : [d]"))
    with pytest.raises(ValueError, match=r"missing outer constant `ln_w` in params \(shape \(4,\)\)"):
        call(bare, lambda a: a["params"].pop("ln_w"))


def test_a_free_size_must_be_given():
    rule = memdsl.compile("memory m {\n dim n\n param W : [d, n]\n param U : [n, d]\n"
                          " model M(x) = W @ (U @ x)\n loss sum((M(k) - v)^2)\n optim gd(lr = 1)\n read M(q)\n}\n")
    q = torch.randn(1, 3, 1, 2)
    with pytest.raises(ValueError, match=r"pass the size\(s\) \['n'\] as sizes="):
        rule(q, q, q)
    y, _ = rule(q, q, q, sizes={"n": 5})
    assert y.shape == (1, 3, 1, 2)


def test_good_inputs_in_every_accepted_form_still_run(titans):
    tok, gates, params = make_inputs(titans, B=B, T=T, H=H, D=D, dtype=torch.bfloat16)
    y, state = titans(tok["q"], tok["k"], tok["v"], gates, {"W1": params["W1"][0], "W2": params["W2"]})
    assert y.dtype == torch.bfloat16 and state["A.W1"].dtype == torch.float32  # bf16 in, fp32 state
    y2, _ = titans(tok["q"], tok["k"], tok["v"], gates, state=state, chunk=4)
    assert torch.isfinite(y2.float()).all()
