"""The step-level engine (continuous batching of diffusion steps) and SLO admission, in process."""

import numpy as np
import pytest

from stepadapt import StepadaptError
from stepadapt.admission import Offer, Slo, decide, step_ladder
from stepadapt.conditioning import guided, labels_cond
from stepadapt.engine import Engine, Job, Served, StepCosts, batches
from stepadapt.sampling import Router, request_trajectory, sample_images, to_uint8
from stepadapt.schedule import DEFAULT_SCHEDULER
from stepadapt.solvers import Setting

SHAPE = (3, 7, 7)


def per_row(scale, calls=None, name=""):
    """An expert whose arithmetic is per row, so sharing a call cannot change anyone's numbers."""

    def den(x, t, cond=None):
        if calls is not None:
            calls.append((name, x.shape[0]))
        y = (cond or {}).get("class_labels")
        bias = 0 if y is None else 1e-2 * y.view(-1, 1, 1, 1).float()
        return scale * x + 1e-3 * t.view(-1, 1, 1, 1).float() + bias

    return den


def served(calls=None, conditional=False):
    router = Router([0, 300, 700, 1000], [per_row(s, calls, f"e{i}") for i, s in enumerate((0.2, 0.3, 0.4))])
    return Served(guided(router, 10) if conditional else router, router)


def job(key, n, seed, sampler, steps, model="m", cond=None):
    run = request_trajectory(sampler, DEFAULT_SCHEDULER, SHAPE, n, seed, steps, cond=cond)
    return Job(key, model, run)


def alone(n, seed, sampler, steps, cond=None):
    den = served(conditional=cond is not None).denoiser
    return sample_images(den, DEFAULT_SCHEDULER, SHAPE, n, seed=seed, steps=steps, sampler=sampler, cond=cond)


REQUESTS = [  # (key, images, seed, solver, steps, step it joins at)
    ("a", 2, 11, "ddim:eta=0.7", 9, 0),
    ("b", 1, 12, "unipc", 6, 2),
    ("c", 3, 13, "dpm++2m", 12, 3),
    ("d", 1, 14, "euler-a", 5, 5),
    ("e", 2, 15, "ddpm", 7, 5),
]


def test_requests_joining_mid_flight_get_exactly_their_solo_images():
    calls = []
    engine = Engine({"m": served(calls)})
    got, step = {}, 0
    while step == 0 or len(engine) or len(got) < len(REQUESTS):
        for key, n, seed, sampler, steps, at in REQUESTS:
            if at == step:
                engine.admit(job(key, n, seed, sampler, steps))
        calls_before = len(calls)
        for j, err in engine.step():
            assert err is None
            got[j.key] = to_uint8(j.run.x)
        # one call per expert the active requests stand at: never one per request
        experts = [name for name, _ in calls[calls_before:]]
        assert len(experts) == len(set(experts))
        step += 1
    for key, n, seed, sampler, steps, _ in REQUESTS:
        assert np.array_equal(got[key], alone(n, seed, sampler, steps)), key
    assert max(rows for _, rows in calls) > 3  # requests did share calls


def test_guided_requests_share_calls_and_keep_their_images():
    engine = Engine({"m": served(conditional=True)})
    conds = [labels_cond([1, 2], 3.0), labels_cond([4], 1.0), labels_cond([0, 9, 3], 5.0)]
    jobs = [job(k, len(c["class_labels"]), 20 + k, "unipc", 5 + k, cond=c) for k, c in enumerate(conds)]
    assert [j.rows for j in jobs] == [4, 1, 6]
    for j in jobs:
        engine.admit(j)
    got = {}
    while len(engine):
        got.update({j.key: to_uint8(j.run.x) for j, err in engine.step() if err is None})
    for k, c in enumerate(conds):
        assert np.array_equal(got[k], alone(len(c["class_labels"]), 20 + k, "unipc", 5 + k, cond=c))


def test_a_dropped_request_leaves_at_the_next_step_and_the_rest_keep_their_images():
    calls = []
    engine = Engine({"m": served(calls)})
    engine.admit(job("a", 2, 1, "ddim", 8))
    engine.admit(job("b", 3, 2, "dpm++2m", 8))
    engine.step()
    assert engine.drop("b") is not None and engine.drop("b") is None
    calls.clear()
    left = []
    while len(engine):
        left += engine.step()
    assert all(rows == 2 for _, rows in calls)  # b's rows cost nothing after its drop
    assert [j.key for j, _ in left] == ["a"]
    assert np.array_equal(to_uint8(left[0][0].run.x), alone(2, 1, "ddim", 8))


def test_a_failing_request_fails_alone():
    def bad(x, t, cond=None):
        out = 0.3 * x
        out[x[:, 0, 0, 0] > 1e3] = float("nan")  # rows of the poisoned request
        return out

    router = Router([0, 1000], [bad])
    engine = Engine({"m": Served(router, router)})
    good, poisoned = job("good", 1, 1, "ddim", 4), job("bad", 1, 2, "ddim", 4)
    poisoned.run.x = poisoned.run.x + 1e4
    engine.admit(good)
    engine.admit(poisoned)
    left = engine.step()
    assert [(j.key, type(e)) for j, e in left] == [("bad", StepadaptError)]
    assert "NaN" in str(left[0][1])
    while len(engine):
        left = engine.step()
    assert left[0][0].key == "good" and left[0][1] is None


def test_calls_are_capped_in_rows_and_batches_never_split_a_request():
    assert batches([("m", 0, 3), ("m", 0, 3), ("m", 1, 2), ("m", 0, 2)], 5) == [
        ("m", 0, [0]), ("m", 0, [1, 3]), ("m", 1, [2]),
    ]  # fmt: skip
    assert batches([("m", 0, 9)], 4) == [("m", 0, [0])]
    calls = []
    engine = Engine({"m": served(calls)}, max_rows=4)
    for k in range(3):
        engine.admit(job(k, 2, k, "ddim", 3))
    engine.step()
    assert sorted(rows for _, rows in calls) == [2, 4]


def test_admission_refuses_unknown_models_and_duplicate_keys():
    engine = Engine({"m": served()})
    with pytest.raises(StepadaptError, match="no model 'x' here; there are m"):
        engine.admit(job("a", 1, 0, "ddim", 3, model="x"))
    engine.admit(job("a", 1, 0, "ddim", 3))
    with pytest.raises(StepadaptError, match="already running"):
        engine.admit(job("a", 1, 0, "ddim", 3))


def test_step_costs_fit_a_line_and_follow_the_latest_calls():
    c = StepCosts(window=4)
    assert c.predict(("m", 0), 5) == 0.0 and not c.known(("m", 0))
    for rows in (1, 2, 4, 8):
        c.observe(("m", 0), rows, 0.01 + 0.002 * rows)
    assert c.predict(("m", 0), 16) == pytest.approx(0.01 + 0.032)
    for _ in range(4):  # the machine got twice as slow
        c.observe(("m", 0), 4, 2 * (0.01 + 0.008))
    assert c.predict(("m", 0), 4) == pytest.approx(0.036)


def fake_clock_engine(per_row_s=0.01, fixed_s=0.0):
    engine = Engine({"big": served(), "small": served()})
    for model, scale in (("big", 1.0), ("small", 0.25)):
        for e in range(3):
            for rows in (1, 4):
                engine.costs.observe((model, e), rows, scale * (fixed_s + per_row_s * rows))
    return engine


def test_finish_times_replay_the_engine_with_its_costs():
    engine = fake_clock_engine()
    a, b = job("a", 1, 0, "ddim", 10, model="big"), job("b", 2, 1, "ddim", 5, model="small")
    engine.admit(a)
    t = engine.finish_times([b])
    assert t["b"] == pytest.approx(5 * (0.01 + 0.005))  # five steps beside a
    assert t["a"] == pytest.approx(10 * 0.01 + 5 * 0.005)
    idle = Engine(engine.models, costs=engine.costs)  # b alone: the same costs, nobody else
    assert idle.finish_times([b])["b"] == pytest.approx(5 * 0.005)


def test_the_step_ladder_goes_down_by_quarters_to_the_floor():
    assert step_ladder(20, 4) == [20, 15, 12, 9, 7, 6, 5, 4]
    assert step_ladder(4, 4) == [4] and step_ladder(5, 4) == [5, 4]


def test_slo_degrade_keeps_the_most_steps_it_can_and_reject_refuses():
    engine = fake_clock_engine()
    asked = Offer("big", Setting("ddim", 20))
    slo = Slo(ms=150, margin=1.0, keep=1.0)

    def job_for(offer):
        return job("new", 1, 0, offer.setting.sampler, offer.setting.steps, model=offer.model)

    d = decide(engine, asked, ["small"], job_for, deadline=0.15, now=0.0, slo=slo)  # 20 x 0.01 s: too slow
    assert d.degraded and d.job is not None
    # small at the asked 20 steps (0.05 s) before big at 15 (0.15 s): steps before size
    assert d.offer == Offer("small", Setting("ddim", 20)) and d.predicted == pytest.approx(0.05)
    d = decide(engine, asked, ["small"], job_for, deadline=0.045, now=0.0, slo=slo)
    assert d.offer == Offer("small", Setting("ddim", 15))  # 0.0375 s, not big at 4 steps (0.04 s)
    d = decide(engine, asked, [], job_for, deadline=0.045, now=0.0, slo=slo)
    assert d.offer == Offer("big", Setting("ddim", 4))  # no smaller bundle: fewer steps
    refused = decide(engine, asked, ["small"], job_for, deadline=0.001, now=0.0, slo=slo)
    assert refused.job is None and "too busy" in refused.why and "0.01 s" in refused.why
    strict = decide(
        engine, asked, ["small"], job_for, deadline=0.15, now=0.0, slo=slo.replace(policy="reject")
    )
    assert strict.job is None and strict.offer == asked
    fine = decide(engine, asked, ["small"], job_for, deadline=0.5, now=0.0, slo=slo)
    assert not fine.degraded and fine.offer == asked


def test_slo_keeps_its_promises_to_requests_already_admitted():
    engine = fake_clock_engine()
    first = job("first", 1, 0, "ddim", 10, model="big")
    first.deadline = 0.12  # predicted 0.10 alone
    engine.admit(first)
    slo = Slo(ms=1000, margin=1.0, keep=1.0)
    asked = Offer("big", Setting("ddim", 10))
    d = decide(engine, asked, ["small"], lambda o: job("n", 1, 1, o.setting.sampler, o.setting.steps,
               model=o.model), deadline=10.0, now=0.0, slo=slo)  # fmt: skip
    # the asked offer fits its own deadline, but would make "first" take 0.2 s: a smaller one is given
    assert d.degraded and engine.finish_times([d.job])["first"] <= 0.12


def test_slo_options_round_trip_and_refuse_nonsense():
    slo = Slo(ms=250, per="request", policy="reject")
    assert Slo.from_json(slo.to_json()) == slo
    assert slo.seconds(4) == 0.25 and Slo(ms=250).seconds(4) == 1.0
    for bad, match in (
        (dict(ms=0), "positive number of milliseconds"),
        (dict(ms=10, policy="drop"), "unknown SLO policy"),
        (dict(ms=10, per="batch"), "per image or per request"),
    ):
        with pytest.raises(StepadaptError, match=match):
            Slo(**bad)


def test_calibration_times_every_expert_of_every_model():
    engine = Engine({"a": served(), "b": served()})
    engine.calibrate(SHAPE, DEFAULT_SCHEDULER, rows=(1, 2))
    assert all(engine.costs.known((m, e)) for m in "ab" for e in range(3))
    assert not engine.costs.known(("a", 3))


def test_urgent_first_steps_run_the_earliest_deadline_alone_and_predict_it():
    """step_rows=1: each step runs only the most urgent job (earliest deadline, then admission order);
    the replayed finish times say so, and every job still gets its solo images."""
    calls = []
    engine = Engine({"m": served(calls)}, step_rows=1)
    for expert in range(3):
        engine.costs.observe(("m", expert), 1, 0.01)
    late, soon, plain = (
        job("late", 1, 1, "ddim", 4),
        job("soon", 1, 2, "unipc", 3),
        job("plain", 1, 3, "ddim", 2),
    )
    late.deadline, soon.deadline = 10.0, 1.0
    for j in (plain, late, soon):
        engine.admit(j)
    predicted = engine.finish_times()
    assert predicted["soon"] == pytest.approx(0.03) and predicted["late"] == pytest.approx(0.07)
    assert predicted["plain"] == pytest.approx(0.09)  # no deadline: after every one that has one
    order = []
    while len(engine):
        order += [j.key for j, err in engine.step() if err is None]
    assert order == ["soon", "late", "plain"] and all(rows == 1 for _, rows in calls)
    assert np.array_equal(to_uint8(soon.run.x), alone(1, 2, "unipc", 3))


def test_engines_say_their_load_where_the_front_reads_it(tmp_path, monkeypatch):
    """The fronts send each request to the engine that holds the fewest (join the shortest queue)."""
    from stepadapt.serving import cancel

    monkeypatch.setenv(cancel.ENV, str(tmp_path))
    assert cancel.load("router_1") == 0  # nothing said yet
    cancel.set_load("router_1", 7)
    cancel.set_load("router", 2)
    cancel.set_load("router_1", 3)
    assert (cancel.load("router"), cancel.load("router_1")) == (2, 3)
    cancel.set_load("../evil", 1)  # only model names name a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load-router", "load-router_1"]
