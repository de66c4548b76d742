"""Schedules: values at chosen steps against closed forms (and torch where installed); factory errors; the
stateful plateau / early-stopping helpers and their state round trip."""
import math

import pytest

from ndtrain.engine import schedules as S


def test_constant_and_step_decay():
    assert S.constant(0.1)(0) == S.constant(0.1)(10 ** 6) == 0.1
    f = S.step_decay(1.0, step_size=3, gamma=0.5)
    assert [f(i) for i in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_cosine_start_mid_end():
    f = S.cosine(lr=1.0, total_steps=100, min_lr=0.1)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(25) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_warmup_cosine_is_nanogpt_get_lr():
    lr, min_lr, warmup, decay = 6e-4, 6e-5, 10, 110

    def get_lr(it):  # nanoGPT train.py
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    f = S.warmup_cosine(lr=lr, warmup_steps=warmup, total_steps=decay, min_lr=min_lr)
    for it in range(0, 130):
        assert f(it) == pytest.approx(get_lr(it), rel=1e-12, abs=0)
    assert f(0) == pytest.approx(lr / 11)
    assert f(warmup) == pytest.approx(lr)  # warmup end: the peak
    assert f(60) == pytest.approx((lr + min_lr) / 2)  # midpoint of the decay
    assert f(decay) == pytest.approx(min_lr) and f(10 ** 6) == min_lr


def test_inverse_sqrt_warmup_peak_and_decay():
    f = S.inverse_sqrt_warmup(d_model=512, warmup_steps=4000, scale=2.0)
    peak = 2.0 / math.sqrt(512 * 4000)
    assert f(3999) == pytest.approx(peak)  # paper step 4000
    assert f(0) == pytest.approx(2.0 * 512 ** -0.5 * 4000 ** -1.5)
    assert f(15999) == pytest.approx(peak / 2)  # n^-0.5: 4x the steps, half the lr
    assert max(f(i) for i in range(0, 8000, 7)) <= peak * (1 + 1e-12)


def test_inverse_sqrt_is_fairseqs():
    f = S.inverse_sqrt(lr=5e-4, warmup_steps=4000, warmup_init_lr=1e-7)
    # fairseq: lr = warmup_init_lr + num_updates * lr_step during warmup, then decay_factor * num_updates ** -0.5
    lr_step = (5e-4 - 1e-7) / 4000
    assert f(0) == pytest.approx(1e-7 + lr_step)
    assert f(1999) == pytest.approx(1e-7 + 2000 * lr_step)
    assert f(3999) == pytest.approx(5e-4)  # the peak after warmup_steps updates
    assert f(15999) == pytest.approx(5e-4 * math.sqrt(4000) / math.sqrt(16000))  # 4x the updates: half the lr
    assert max(f(i) for i in range(0, 9000, 3)) <= 5e-4 * (1 + 1e-12)
    with pytest.raises(ValueError, match="warmup_init_lr"):
        S.inverse_sqrt(lr=1e-3, warmup_init_lr=1.0)
    # through the trainer's config: optim.lr is the peak
    from ndtrain.launch.optimizer_setup import make_schedule_fn
    from ndtrain.launch.config import OptimConfig
    g = make_schedule_fn(OptimConfig(lr=2e-3, schedule="inverse_sqrt", schedule_kwargs={"warmup_steps": 10}), 100)
    assert g(9) == pytest.approx(2e-3) and g(39) == pytest.approx(1e-3)


def test_one_cycle_values():
    f = S.one_cycle(max_lr=1.0, total_steps=100, pct_start=0.25, div_factor=10, final_div_factor=100)
    assert f(0) == pytest.approx(0.1)
    assert f(24) == pytest.approx(1.0)  # end of the first phase: pct_start * total - 1
    assert f(99) == pytest.approx(0.1 / 100)
    assert f(12) == pytest.approx(1.0 + (0.1 - 1.0) / 2 * (math.cos(math.pi * 12 / 24) + 1))


@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_and_cosine_match_torch(three_phase):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=50, pct_start=0.3,
                                                three_phase=three_phase)
    f = S.one_cycle(max_lr=0.5, total_steps=50, pct_start=0.3, three_phase=three_phase)
    for step in range(50):
        assert f(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()


def test_make_schedule_and_errors_name_the_field():
    f = S.make_schedule("warmup_cosine", lr=1.0, warmup_steps=5, total_steps=20, min_lr=0.0)
    assert f(5) == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        S.make_schedule("cosin", lr=1.0)
    with pytest.raises(ValueError, match="unknown field 'warmup'"):
        S.make_schedule("cosine", lr=1.0, total_steps=5, warmup=3)
    with pytest.raises(ValueError, match="missing field 'total_steps'"):
        S.make_schedule("cosine", lr=1.0)
    with pytest.raises(ValueError, match="field 'total_steps'"):
        S.make_schedule("warmup_cosine", lr=1.0, warmup_steps=10, total_steps=0)


def test_warmup_cosine_run_shorter_than_warmup_stays_in_warmup():
    """nanoGPT's get_lr: a 20-step try of a preset with warmup 200 is legal and only warms up."""
    f = S.make_schedule("warmup_cosine", lr=1.0, warmup_steps=200, total_steps=20, min_lr=0.1)
    lrs = [f(i) for i in range(20)]
    assert lrs == [(i + 1) / 201 for i in range(20)]


def test_reduce_lr_on_plateau_and_state_round_trip():
    r = S.ReduceLROnPlateau(1.0, factor=0.5, patience=2, cooldown=1, min_lr=0.2)
    lrs = [r.step(m) for m in [5, 4, 4, 4, 4, 4, 4, 4, 4, 4]]
    # 4 is best at step 1; bad at 2, 3, 4 -> reduce after the third bad (num_bad > patience); cooldown 1
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    r2 = S.ReduceLROnPlateau(1.0, factor=0.5, patience=2, cooldown=1, min_lr=0.2)
    r2.load_state_dict(r.state_dict())
    assert [r2.step(4) for _ in range(6)] == [r.step(4) for _ in range(6)]
    assert r.lr == 0.2  # floored at min_lr


def test_reduce_lr_on_plateau_matches_torch():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1, threshold=0.01)
    ours = S.ReduceLROnPlateau(1.0, factor=0.5, patience=1, cooldown=1, threshold=0.01)
    for m in [3.0, 2.0, 1.995, 1.99, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]:
        ref.step(m)
        assert ours.step(m) == pytest.approx(opt.param_groups[0]["lr"])


def test_early_stopping():
    es = S.EarlyStopping(patience=2, min_delta=0.1, mode="max")
    assert [es.step(m) for m in [0.5, 0.7, 0.75]] == [False, False, False]
    assert es.best == 0.7 and not es.improved
    es2 = S.EarlyStopping(patience=2, min_delta=0.1, mode="max")
    es2.load_state_dict(es.state_dict())
    assert es.step(0.6) is True and es2.step(0.6) is True
