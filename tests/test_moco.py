"""MoCo and MoCoWeighting against a plain float64 loop of SPEC §2, and the class contract."""

from __future__ import annotations

import re

import pytest
import torch
import torchjd
from torchjd import aggregation as ta

import fusedjd

from fusedjd import reference
from fusedjd.reference import rel_err

from conftest import DEVICES

HYPER = [
    dict(),
    dict(rho=0.5),
    dict(simplex="projection"),
    dict(simplex="projection", rho=0.2, gamma=2.0),
    dict(beta=0.9, beta_sigma=0.0, gamma=0.5, gamma_sigma=1.0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "defaults")
@pytest.mark.parametrize("m,n", [(1, 7), (2, 33), (5, 1001), (8, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moco_and_weighting_equal_reference(device, hyper, m, n, dtype):
    gen = torch.Generator().manual_seed(m * 100 + n)
    ref = reference.MoCo(**hyper)
    agg, weighting = fusedjd.MoCo(**hyper), fusedjd.MoCoWeighting(**hyper)
    tol = 1e-11 if dtype == torch.float64 else 3e-5
    for step in range(1, 21):
        J = (torch.randn(m, n, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
        lam_ref, out_ref = ref(J)
        out = agg(J.to(device))
        lam = weighting(J.to(device))
        assert out.dtype == dtype and out.shape == (n,)
        assert rel_err(out, out_ref) < tol, step
        assert rel_err(lam, lam_ref) < tol, step
        assert rel_err(weighting.y, ref.Y) < tol
        assert int(weighting.step) == step  # sync-ok in a test


def test_subclasses_and_repr():
    assert isinstance(fusedjd.MoCo(), ta.Aggregator) and not isinstance(fusedjd.MoCo(), ta.WeightedAggregator)
    assert isinstance(fusedjd.MoCoWeighting(), ta.Weighting)
    assert isinstance(fusedjd.MoCo(), torchjd.Stateful) and isinstance(fusedjd.MoCoWeighting(), torchjd.Stateful)
    assert repr(fusedjd.MoCo()) == (
        "MoCo(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, simplex='softmax')"
    )
    assert str(fusedjd.MoCo(rho=1.0)) == "MoCo"
    assert repr(fusedjd.MoCoWeighting(simplex="projection")).startswith("MoCoWeighting(beta=0.5")


def test_validated_properties():
    for name in ["beta_sigma", "gamma", "gamma_sigma", "rho"]:
        with pytest.raises(ValueError, match=rf"Attribute `{name}` must be non-negative. Found {name}=-1.0."):
            fusedjd.MoCo(**{name: -1.0})
    with pytest.raises(ValueError, match=r"Attribute `beta` must be in \[0, 1\]. Found beta=2."):
        fusedjd.MoCoWeighting(beta=2)
    with pytest.raises(ValueError, match=r"Attribute `simplex` must be one of .* Found simplex='sparsemax'."):
        fusedjd.MoCo(simplex="sparsemax")
    agg = fusedjd.MoCo()
    agg.gamma = 0.3
    assert agg.gamma == 0.3
    with pytest.raises(ValueError):
        agg.rho = float("nan")


def test_y_before_first_call_raises():
    w = fusedjd.MoCoWeighting()
    with pytest.raises(RuntimeError, match="moving gradient estimate"):
        _ = w.y
    assert int(w.step) == 0
    w(torch.randn(3, 5))
    assert w.y.shape == (3, 5) and int(w.step) == 1


@pytest.mark.parametrize("make", [fusedjd.MoCo, fusedjd.MoCoWeighting])
def test_state_dict_round_trip_continues_exactly(make):
    gen = torch.Generator().manual_seed(2)
    Js = [torch.randn(4, 30, generator=gen) for _ in range(8)]
    a = make(rho=0.1)
    for J in Js[:4]:
        a(J)
    sd = a.state_dict()
    prefix = "weighting." if make is fusedjd.MoCo else ""  # MoCo keeps its state in .weighting
    assert {prefix + "_y", prefix + "_lam", prefix + "_step"} <= set(sd)
    b = make(rho=0.1)
    b.load_state_dict(sd)
    for J in Js[4:]:
        assert torch.equal(a(J), b(J))
    assert int(b.step) == 8


def test_state_resets_on_change_and_reset():
    agg = fusedjd.MoCo()
    J = torch.randn(3, 10)
    first = agg(J)
    agg(J)
    for changed in [torch.randn(4, 10), torch.randn(3, 11), torch.randn(3, 10, dtype=torch.float64)]:
        assert torch.equal(agg(changed), fusedjd.MoCo()(changed))
        assert int(agg.step) == 1
    agg(J)
    agg.reset()
    assert torch.equal(agg(J), first)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [fusedjd.MoCo, fusedjd.MoCoWeighting])
def test_nonfinite_input_keeps_state(device, make):
    agg = make()
    J = torch.randn(3, 20, device=device)
    agg(J)
    agg(J)
    saved = {k: v.clone() for k, v in agg.state_dict().items()}
    for bad in [float("nan"), float("inf")]:
        Jb = J.clone()
        Jb[2, 3] = bad
        assert torch.isnan(agg(Jb)).all()
        for k, v in agg.state_dict().items():
            assert torch.equal(v, saved[k]), k
    # and it carries on from where it was
    ref = make()
    ref.load_state_dict(saved)
    assert torch.equal(agg(J), ref(J))


def test_empty_inputs():
    agg = fusedjd.MoCo()
    assert torch.equal(agg(torch.zeros(0, 6)), torch.zeros(6))
    assert agg(torch.zeros(3, 0)).shape == (0,)
    assert fusedjd.MoCoWeighting()(torch.zeros(0, 4)).shape == (0,)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"Parameter `matrix` should be a tensor of dimension 2"):
        fusedjd.MoCo()(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match=r"Parameter `matrix` must be a floating-point tensor. Found dtype=torch.int32"):
        fusedjd.MoCoWeighting()(torch.ones(2, 3, dtype=torch.int32))


def test_outputs_do_not_require_grad():
    J = torch.randn(3, 8, requires_grad=True)
    assert not fusedjd.MoCo()(J).requires_grad
    assert not fusedjd.MoCoWeighting()(J).requires_grad


def _allocated_bytes(fn) -> int:
    """Bytes allocated on the CPU while ``fn`` runs (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_no_m_by_n_temporary(dtype):
    """A CPU step allocates O(n) bytes of tensors (its output), never an m x n tensor: Y is updated in
    place. The lower bound shows the counter sees the output. (The profiler counts torch's
    allocator only: the kernel's own scratch, a staging tile and R x R sums per thread, is bounded
    by construction; see csrc/cpu/gram_engine.h.)"""
    m, n = 8, 100_000
    agg = fusedjd.MoCo()
    J = torch.randn(m, n).to(dtype)
    agg(J)
    y = agg.y.data_ptr()
    size = J.element_size()
    allocated = _allocated_bytes(lambda: agg(J))
    assert n * size <= allocated <= 3 * n * size, allocated  # an m x n temporary is 8 n * size
    assert agg.y.data_ptr() == y
    # the counter does see an m x n temporary
    assert _allocated_bytes(lambda: (J * 2).sum(0)) >= m * n * size


def test_moco_keeps_its_state_in_a_weighting_submodule():
    agg = fusedjd.MoCo(beta=0.3, rho=0.2, simplex="projection")
    assert isinstance(agg.weighting, fusedjd.MoCoWeighting)
    assert (agg.weighting.beta, agg.weighting.rho, agg.weighting.simplex) == (0.3, 0.2, "projection")
    agg.gamma = 0.7
    assert agg.weighting.gamma == 0.7
    J = torch.randn(3, 20, dtype=torch.float64)
    out = agg(J)
    assert agg.y is agg.weighting.y and int(agg.step) == 1
    torch.testing.assert_close(out, agg.weighting._lam @ agg.weighting.y)
    assert repr(agg) == ("MoCo(beta=0.3, beta_sigma=0.5, gamma=0.7, gamma_sigma=0.5, rho=0.2, "
                         "simplex='projection')")


@pytest.mark.parametrize("make", [fusedjd.MoCo, fusedjd.MoCoWeighting])
@pytest.mark.parametrize("name", ["beta", "beta_sigma", "gamma", "gamma_sigma", "rho"])
def test_non_number_hyper_parameter_is_named(make, name):
    with pytest.raises(TypeError, match=f"Attribute `{name}` must be a real number. Found {name}='0.5'"):
        make(**{name: "0.5"})
    with pytest.raises(TypeError, match=f"Found {name}=True"):
        make(**{name: True})


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    Js = [torch.randn(4, 50, generator=gen) for _ in range(4)]
    compiled_agg, eager_agg = fusedjd.MoCo(rho=0.1), fusedjd.MoCo(rho=0.1)

    def step(agg, J):
        return agg(J) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    for J in Js:
        torch.testing.assert_close(compiled(compiled_agg, J), step(eager_agg, J))
    assert torch.equal(compiled_agg.y, eager_agg.y) and int(compiled_agg.step) == 4


def test_hooks_on_the_weighting_run():
    J = [torch.randn(4, 30, dtype=torch.float64) for _ in range(3)]
    plain, hooked = fusedjd.MoCo(), fusedjd.MoCo()
    seen = []
    hooked.weighting.register_forward_hook(lambda module, args, out: seen.append(out))
    for x in J:
        torch.testing.assert_close(hooked(x), plain(x), rtol=1e-12, atol=1e-14)
    assert len(seen) == 3 and torch.equal(seen[-1], plain.weighting._lam)
    # the state lives in the weighting: a state_dict keyed on MoCo itself is not MoCo's
    flat = {k.removeprefix("weighting."): v for k, v in plain.state_dict().items()}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fusedjd.MoCo().load_state_dict(flat)


@pytest.mark.parametrize("move", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_state_keeps_its_dtype_through_to(move):
    """An aggregator inside a model moved to another dtype keeps its state's dtypes (it follows
    only the device): the run goes on exactly as if it had not been moved."""
    gen = torch.Generator().manual_seed(2)
    Js = [torch.randn(4, 50, generator=gen) for _ in range(4)]
    moved, plain = fusedjd.MoCo(), fusedjd.MoCo()
    for J in Js[:2]:
        moved(J), plain(J)
    move(moved)
    assert moved.weighting._lam.dtype == torch.float32 and moved.y.dtype == torch.float32
    for J in Js[2:]:
        assert torch.equal(moved(J), plain(J))
    assert int(moved.step) == 4


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_unsupported_dtypes_are_refused_before_the_state_is_touched(dtype):
    gen = torch.Generator().manual_seed(4)
    J = torch.randn(4, 30, generator=gen)
    agg = fusedjd.MoCo()
    agg(J)
    state = {k: v.clone() for k, v in agg.state_dict().items()}
    with pytest.raises(TypeError, match=r"Parameter `matrix` must have dtype float16, bfloat16, float32 or float64\. "
                                        rf"Found dtype={re.escape(str(dtype))}\."):
        agg(J.to(dtype))
    assert all(torch.equal(v, agg.state_dict()[k]) for k, v in state.items())


def test_bad_blocks_are_refused_before_the_state_changes():
    """A list of blocks (jac_to_grad's form) with a block that is not a matrix is refused with the
    op's message, the state as it was."""
    moco = fusedjd.MoCo()
    moco(torch.randn(2, 5))
    saved = {k: v.clone() for k, v in moco.state_dict().items()}
    for blocks, message in [([torch.randn(2, 3, 4)], r"`J\[0\]` must have 2 dimensions, got shape \[2, 3, 4\]"),
                            ([torch.randn(2, 3), torch.randn(5)], r"`J\[1\]` must have 2 dimensions, got shape \[5\]")]:
        with pytest.raises(RuntimeError, match=message):
            moco.weighting.update(blocks, None)
        assert all(torch.equal(v, saved[k]) for k, v in moco.state_dict().items())
