"""Gradient compression (cluster/compress.py): bf16 rounding against an independent reference, fp16 saturation,
error feedback unbiased over steps (sum of decompressed = sum of inputs - final residual), PowerSGD exact on a
rank-r matrix, its multi-rank sums and warm start, and checkpointable state."""
import numpy as np
import pytest

from ndtrain.cluster.compress import (BF16_MAX, FP16_MAX, HalfCompressor, PowerSGD, bf16_decode, bf16_encode,
                                      make_compressor, orthogonalize, sum_decoded)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """Nearest bf16 by distance in float64 between the two candidates around x, ties to the even one."""
    out = np.empty(x.size, np.uint16)
    for i, v in enumerate(x.astype(np.float32)):
        bits = int(np.array([v]).view(np.uint32)[0])
        if np.isnan(v):
            out[i] = 0x7FC0 | (bits >> 16) & 0x8000
            continue
        lo = bits >> 16
        hi = lo + 1
        f = lambda b: float(np.array([b << 16], np.uint32).view(np.float32)[0])  # noqa: E731
        # IEEE rounds as if the exponent were unbounded: past the largest finite bf16 the next value is 2^128
        flo, fhi = f(lo), (f(hi) if (hi & 0x7FFF) < 0x7F80 else 2.0 ** 128)
        dlo, dhi = abs(float(v) - flo), abs(fhi - float(v))
        if np.isinf(v):
            out[i] = lo
        elif dlo < dhi or (dlo == dhi and lo % 2 == 0):
            out[i] = lo
        else:
            out[i] = hi
    return out


def special_values():
    bits = np.array([0x3F808000,  # tie, even below: stays 0x3F80
                     0x3F818000,  # tie, odd below: rounds up to 0x3F82
                     0x3F807FFF, 0x3F808001,
                     0x7F7FFFFF,  # the largest float32: rounds to inf in IEEE
                     0x00000001, 0x80000001, 0x00008000, 0x00018000,  # subnormals and ties among them
                     0x7F800000, 0xFF800000, 0x00000000, 0x80000000], np.uint32)
    return bits.view(np.float32)


def test_bf16_rounding_matches_the_reference():
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(3000) * 10.0 ** rng.integers(-30, 30, 3000)).astype(np.float32),
                        rng.integers(0, 2 ** 32, 2000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        special_values()])
    finite = x[np.isfinite(x)]
    got = bf16_encode(finite)
    np.testing.assert_array_equal(got, bf16_reference(finite))
    assert bf16_encode(special_values()[:2]).tolist() == [0x3F80, 0x3F82]
    nan = bf16_encode(np.array([np.nan, -np.nan, np.array([0x7F80FFFF], np.uint32).view(np.float32)[0]],
                               np.float32))
    assert np.isnan(bf16_decode(nan)).all()  # a NaN whose payload is in the low bits does not become inf
    # decode is exact: encode(decode(u)) == u for every finite bf16
    u = np.arange(0, 0x7F80, 7, dtype=np.uint16)
    np.testing.assert_array_equal(bf16_encode(bf16_decode(u)), u)


def test_bf16_matches_torch_when_installed():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32) * 1e3
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_encode(x), want)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_error_feedback_is_unbiased_over_steps(fmt):
    rng = np.random.default_rng(2)
    T, n = 60, 4096
    c = HalfCompressor(fmt)
    # a persistent direction (as gradients have) plus noise: plain rounding then errs the same way every step
    base = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)
    gs = [(base * (1 + 0.01 * rng.standard_normal(n))).astype(np.float32) for _ in range(T)]
    sum_d = np.zeros(n)
    biggest = np.zeros(n)
    for g in gs:
        d = c.decode(c.compress("b0", g))
        sum_d += d
        biggest = np.maximum(biggest, np.abs(d))
    sum_g = np.sum(np.array(gs, dtype=np.float64), axis=0)
    e_T = c.state_dict()["residual/b0"].astype(np.float64)
    # sum D_t = sum g_t - e_T, up to the rounding of g + e in float32 (half an ulp a step), element by element
    tol = T * 2.0 ** -23 * biggest
    assert (np.abs(sum_d - (sum_g - e_T)) <= tol).all()
    # without error feedback the same sums drift far beyond that (so the test has teeth)
    plain = np.sum([c.decode(c.encode(g)).astype(np.float64) for g in gs], axis=0)
    assert np.median(np.abs(plain - sum_g) / tol) > 100
    # and the residual stays within one unit in the last place of the format, relative to what was sent (fp16's
    # subnormals below 6e-5 have an absolute step of 2^-24)
    ulp = biggest * (2.0 ** -10 if fmt == "fp16" else 2.0 ** -7) + (2.0 ** -24 if fmt == "fp16" else 0.0)
    assert (np.abs(e_T) <= ulp).all()


def test_fp16_saturates_and_feedback_carries_the_excess():
    c = HalfCompressor("fp16")
    g = np.array([1e5, -2e5, 1.0], np.float32)
    sent = [c.decode(c.compress(0, g if t == 0 else np.zeros(3, np.float32))) for t in range(4)]
    assert all(np.isfinite(s).all() for s in sent)
    np.testing.assert_allclose(np.sum(sent, axis=0), g, rtol=1e-3)  # the excess arrives over later steps
    assert sent[0][0] == FP16_MAX
    assert c.decode(c.compress(9, np.array([3.4e38], np.float32)))[0] == FP16_MAX
    b = HalfCompressor("bf16")
    assert b.decode(b.compress(0, np.array([3.4028235e38], np.float32)))[0] == np.float32(BF16_MAX)


def test_a_nonfinite_gradient_does_not_poison_later_steps():
    c = HalfCompressor("bf16")
    c.compress(0, np.array([np.inf, 1.0], np.float32))
    d = c.decode(c.compress(0, np.array([1.0, 1.0], np.float32)))
    assert np.isfinite(d).all()


def test_sum_decoded_is_the_rank_ordered_sum():
    c = HalfCompressor("bf16")
    xs = [np.random.default_rng(r).standard_normal(100).astype(np.float32) for r in range(3)]
    payloads = [bf16_encode(x) for x in xs]
    got = sum_decoded(payloads, c.decode, np.empty(100, np.float32))
    want = (bf16_decode(payloads[0]) + bf16_decode(payloads[1])) + bf16_decode(payloads[2])
    assert got.tobytes() == want.tobytes()


def test_powersgd_of_a_rank_r_matrix_is_exact():
    rng = np.random.default_rng(3)
    for n, m, r in ((40, 30, 2), (64, 17, 4), (5, 50, 1)):
        M = (rng.standard_normal((n, r)) @ rng.standard_normal((r, m))).astype(np.float32)
        ps = PowerSGD(rank=r, seed=1)
        D = ps.roundtrip("w", M)
        np.testing.assert_allclose(D, M, rtol=1e-4, atol=1e-4 * np.abs(M).max())
        assert np.abs(ps.state_dict()["residual/w"]).max() <= 1e-4 * np.abs(M).max()
        assert ps.wire_values((n, m)) == (n + m) * r < n * m or n * m <= (n + m) * r


def test_powersgd_error_feedback_and_warm_start():
    rng = np.random.default_rng(4)
    ps = PowerSGD(rank=2, seed=0)
    T, shape = 30, (24, 16)
    gs = [rng.standard_normal(shape).astype(np.float32) for _ in range(T)]
    sum_d = np.zeros(shape)
    for g in gs:
        sum_d += ps.roundtrip("b", g)
    e_T = ps.state_dict()["residual/b"]
    np.testing.assert_allclose(sum_d, np.sum(gs, axis=0, dtype=np.float64) - e_T, atol=2e-4)
    # warm start: a fixed matrix, no feedback to disturb it, approaches its best rank-2 approximation (power iteration)
    M = rng.standard_normal(shape).astype(np.float32)
    u, s, vt = np.linalg.svd(M.astype(np.float64))
    best = (u[:, :2] * s[:2]) @ vt[:2]
    ps2 = PowerSGD(rank=2, seed=0)
    errs = []
    for _ in range(40):
        D = ps2.roundtrip("m", M)
        ps2.ef.residual.clear()
        errs.append(np.linalg.norm(D - best) / np.linalg.norm(best))
    assert errs[-1] < 0.02 < errs[0]


def test_powersgd_across_ranks_sums_and_keeps_a_per_rank_identity():
    rng = np.random.default_rng(5)
    W, shape = 3, (20, 12)
    comps = [PowerSGD(rank=3, seed=7) for _ in range(W)]
    total_d, total_g = np.zeros(shape), np.zeros(shape)
    for _ in range(10):
        gs = [rng.standard_normal(shape).astype(np.float32) for _ in range(W)]
        ms = [g + comps[r].ef.residual.get("k", 0) for r, g in enumerate(gs)]
        p_sum = sum(c.p("k", g) for c, g in zip(comps, gs))
        q_sum = sum(c.q("k", p_sum) for c in comps)
        ds = [c.decompress("k", q_sum) for c in comps]
        for d in ds[1:]:
            assert d.tobytes() == ds[0].tobytes()  # every rank holds the same decompressed sum
        p_hat = orthogonalize(p_sum)
        np.testing.assert_allclose(ds[0], p_hat @ p_hat.T @ np.sum(ms, axis=0), rtol=1e-4, atol=1e-4)
        total_d += ds[0]
        total_g += np.sum(gs, axis=0)
        for c in comps:
            np.testing.assert_array_equal(c.q_warm["k"], q_sum.astype(np.float32))  # next step's warm start
    resid = sum(c.state_dict()["residual/k"] for c in comps)
    np.testing.assert_allclose(total_d, total_g - resid, atol=1e-3)


def test_orthogonalize():
    p = np.random.default_rng(6).standard_normal((30, 4)).astype(np.float32)
    q = orthogonalize(p)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
    coeff = np.linalg.lstsq(q, p, rcond=None)[0]
    np.testing.assert_allclose(q @ coeff, p, atol=1e-4)  # the same column space


@pytest.mark.parametrize("name", ["fp16", "bf16", "powersgd"])
def test_state_dict_resumes_bitwise(name):
    rng = np.random.default_rng(8)
    gs = [rng.standard_normal((12, 9)).astype(np.float32) for _ in range(6)]

    def step(c, g):
        if name == "powersgd":
            return c.roundtrip("x", g)
        return c.decode(c.compress("x", g.reshape(-1)))

    a = make_compressor(name, powersgd_rank=2, seed=3)
    straight = [step(a, g) for g in gs]
    b = make_compressor(name, powersgd_rank=2, seed=3)
    for g in gs[:3]:
        step(b, g)
    state = {k: np.array(v) for k, v in b.state_dict().items()}  # plain arrays (what a checkpoint stores)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    c = make_compressor(name, powersgd_rank=2, seed=3)
    c.load_state_dict(state)
    resumed = [step(c, g) for g in gs[3:]]
    for x, y in zip(straight[3:], resumed):
        assert x.tobytes() == y.tobytes()


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="fp16, bf16, powersgd"):
        make_compressor("int8")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        PowerSGD(rank=0)
    with pytest.raises(ValueError, match="2-D"):
        PowerSGD().p("v", np.zeros(5, np.float32))
