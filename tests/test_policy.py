"""Layer-wise policies: cost model, selection, calibration, budgets, plans, report and plot."""
import copy
import json
import math
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

import rewrite
from policy_timers import table_timer
from rewrite import cost
from rewrite.actions import build_target
from rewrite.passes.lower import SiteCall
from rewrite.select import Option, solve
from rewrite.sites import AttentionSite


# --- cost model ------------------------------------------------------------------------------------------

def _count_cpu_sdpa():
    """torch's FLOP counter has no formula for the CPU flash kernel that SDPA dispatches to: give it one
    (the two products), so mixers that call SDPA internally are counted fairly."""
    from torch.utils.flop_counter import register_flop_formula
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return

    def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        *lead, n, d = query_shape
        nk, dv = key_shape[-2], value_shape[-1]
        bh = 1
        for s in lead:
            bh *= s
        return 2 * bh * n * nk * d + 2 * bh * n * nk * dv

    try:
        register_flop_formula(op)(sdpa_flops)
    except RuntimeError:  # already registered (by torch itself, or an earlier import)
        pass


_count_cpu_sdpa()


def brute_force(options: dict, max_error=None, max_cost=None) -> dict:
    """Exhaustive reference for ``solve`` (small inputs only)."""
    import itertools
    sites = list(options)
    best, best_plan = math.inf, None
    for combo in itertools.product(*(options[s] for s in sites)):
        err = sum(o.error for o in combo)
        cost = sum(o.cost for o in combo)
        if max_error is not None and err <= max_error + 1e-12 and cost < best:
            best, best_plan = cost, combo
        if max_cost is not None and cost <= max_cost + 1e-9 and err < best:
            best, best_plan = err, combo
    return {s: o.key for s, o in zip(sites, best_plan)} if best_plan else {}


def _eager_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("name", sorted(rewrite.action_types()))
def test_cost_model_tracks_counted_flops(name):
    """Each action's symbolic FLOPs against torch's FLOP counter on its reference implementation:
    never below the counted products, and at most the softmax/elementwise work above them."""
    torch.manual_seed(0)
    b, h, n, d = 1, 4, 512, 32
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    action = rewrite.action_types()[name]()
    site = AttentionSite(name="x", heads=h, kv_heads=h, head_dim=d, q_shape=(b, h, n, d), k_shape=(b, h, n, d),
                         v_shape=(b, h, n, d))
    fn = _eager_attention if name == "Exact" else build_target(action, SiteCall(q=None, k=None, v=None), site)
    assert not isinstance(fn, str), fn
    if hasattr(fn, "fit"):
        try:
            fn.fit(q, k, v)
        except TypeError:
            fn.fit(q, k)
    with FlopCounterMode(display=False) as counter:
        fn(q, k, v)
    counted = counter.get_total_flops()
    modelled = cost.evaluate(action.flops(), B=b * h, H=1, N=n, Nk=n, d=d, dv=d)
    if counted == 0:  # no products at all (pooling, FFT): the model must still count the mixing work
        assert modelled > 0
        return
    assert counted <= modelled <= 1.35 * counted, (counted, modelled)


def test_exact_cost_is_quadratic_and_linear_attention_crosses_over():
    expr = rewrite.Exact().flops()
    assert cost.evaluate(expr, B=1, H=1, N=2048, Nk=2048, d=64, dv=64) == pytest.approx(
        4 * cost.evaluate(expr, B=1, H=1, N=1024, Nk=1024, d=64, dv=64))
    n_star = cost.crossover(rewrite.Linear(), rewrite.Exact(), head_dim=64)
    assert 30 < n_star < 200
    lin, ex = rewrite.Linear().flops(), rewrite.Exact().flops()
    at = lambda e, n: cost.evaluate(e, B=1, H=1, N=n, Nk=n, d=64, dv=64)  # noqa: E731
    assert at(lin, n_star * 1.5) < at(ex, n_star * 1.5) and at(lin, n_star / 1.5) > at(ex, n_star / 1.5)


# --- selection -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(30))
def test_selection_is_optimal_on_synthetic_sites(seed):
    rng = random.Random(seed)
    unit = 0.001
    options = {f"layer{i}": [Option(None, 100.0, 0.0)] + [
        Option(f"c{j}", float(rng.randint(5, 95)), unit * rng.randint(0, 12)) for j in range(3)] for i in range(4)}
    budget = unit * rng.randint(0, 30)
    plan = solve(options, max_error=budget, grid=int(round(budget / unit)) or 1)
    best = brute_force(options, max_error=budget)
    pick = lambda p: [next(o for o in options[s] if o.key == p[s]) for s in options]  # noqa: E731
    assert sum(o.error for o in pick(plan)) <= budget + 1e-12
    assert sum(o.cost for o in pick(plan)) == sum(o.cost for o in pick(best))
    cap = float(rng.randint(100, 400))
    best2 = brute_force(options, max_cost=cap)
    if not best2:  # nothing fits: the solver must say so rather than return an over-budget plan
        with pytest.raises(ValueError, match="no plan fits"):
            solve(options, max_cost=cap, grid=int(cap))
        return
    plan2 = solve(options, max_cost=cap, grid=int(cap))  # a unit of 1: integer costs are represented exactly
    assert sum(o.cost for o in pick(plan2)) <= cap
    assert sum(o.error for o in pick(plan2)) == pytest.approx(sum(o.error for o in pick(best2)))


# --- calibration end to end -------------------------------------------------------------------------------

def _bert(layers=3):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=layers, intermediate_size=128,
                     vocab_size=200, attn_implementation="eager", initializer_range=0.2)
    return BertModel(cfg).eval()


def _batch(seed, n=96):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 200, (2, n), generator=g)}


CANDIDATES = [rewrite.SlidingWindow(window=32, sinks=1), rewrite.TopK(k=8)]


def fake_timer(site_ms: dict, exact_ms: float = 1.0, rest_ms: float = 10.0, calls: list = None):
    """A deterministic timer: a mixer alone takes ``site_ms[its key]`` ms (exact: ``exact_ms``); the whole model
    takes ``rest_ms`` plus its sites' times (three sites). ``calls`` collects what it was asked to time."""
    return table_timer(site_ms, exact_ms, rest_ms, log=calls, sites=3)


#: every candidate twice as fast as exact: the error budget alone decides
FAST = fake_timer({rewrite.calibrate.candidate_key(c): 0.5 for c in CANDIDATES})


def _cos_err(a, b):
    return (1 - torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))).mean().item()


@pytest.fixture(scope="module")
def auto_run():
    model = _bert()
    ref = copy.deepcopy(model)
    budget = 0.02
    rewrite.optimize(model, rewrite.auto(max_error=budget, candidates=CANDIDATES, progress=False, timer=FAST),
                     example_kwargs=_batch(0), calibration=[_batch(s) for s in (1, 2, 3, 4)])
    return model, ref, budget


def test_auto_respects_the_budget_on_held_out_batches(auto_run):
    model, ref, budget = auto_run
    rep = model.rewrite_report
    cal = rep.calibration
    assert cal is not None and cal.joint_error <= budget
    assert len(cal.rows) == 3 and all(len(r.candidates) == 2 for r in cal.rows)
    assert all(r.stats["calls"] >= 4 and 0 <= r.stats["entropy"] <= 1 for r in cal.rows)
    chosen = [r for r in rep.sites if not r.exact]
    assert chosen, "with this budget some site must take a cheaper mixer"
    before, after = rep.attention_flops()
    assert after < before
    with torch.no_grad():  # the metric is an average over examples: so is the held-out check
        held_out = [_batch(seed) for seed in (10, 11, 12, 13)]
        errors = [_cos_err(model(**b).last_hidden_state, ref(**b).last_hidden_state) for b in held_out]
    assert sum(errors) / len(errors) <= budget, errors


def test_plan_round_trips_through_json(auto_run):
    model, _, _ = auto_run
    plan = json.loads(json.dumps(model.rewrite_report.to_json()["plan"]))
    again = _bert()
    rewrite.optimize(again, plan, example_kwargs=_batch(0))
    assert [(r.name, r.action) for r in again.rewrite_report.sites] == [(r.name, r.action) for r in model.rewrite_report.sites]
    with torch.no_grad():
        b = _batch(20)
        assert torch.allclose(again(**b).last_hidden_state, model(**b).last_hidden_state, atol=1e-5)


def test_report_shows_the_calibration_and_plots(auto_run, tmp_path):
    model, _, _ = auto_run
    text = str(model.rewrite_report)
    assert "Calibration: policy auto" in text and "Attention FLOPs" in text
    path = model.rewrite_report.plot(str(tmp_path / "plan.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unreachable_cost_budget_falls_back_to_exact_with_a_message():
    model = _bert(2)
    rewrite.optimize(model, rewrite.auto(max_cost=0.01, candidates=CANDIDATES, progress=False),
                     example_kwargs=_batch(0), calibration=[_batch(1)])
    rep = model.rewrite_report
    assert all(r.exact for r in rep.sites)
    assert "no plan reaches max_cost=0.01" in rep.calibration.message
    assert "no plan reaches" in str(rep)


def test_cost_budget_mode_stays_within_the_flops_budget():
    model = _bert(2)
    rewrite.optimize(model, rewrite.auto(max_cost=0.9, candidates=CANDIDATES, progress=False, objective="flops"),
                     example_kwargs=_batch(0), calibration=[_batch(1)])
    cal = model.rewrite_report.calibration
    total_exact = sum(r.exact_flops for r in cal.rows)
    spent = sum(next((c.flops for c in r.candidates if c.action == r.choice), r.exact_flops) for r in cal.rows)
    assert spent <= 0.9 * total_exact


def test_measured_policies_need_calibration_and_a_valid_budget():
    with pytest.raises(rewrite.RewriteError, match="calibration"):
        rewrite.optimize(_bert(1), "auto", example_kwargs=_batch(0))
    with pytest.raises(rewrite.RewriteError, match="one budget"):
        rewrite.auto(max_error=None)
    with pytest.raises(rewrite.RewriteError, match="Unknown metric"):
        rewrite.optimize(_bert(1), rewrite.auto(metric="bleu"), example_kwargs=_batch(0), calibration=[_batch(1)])


def test_mixed_span_keeps_the_most_damaged_layers_exact():
    model = _bert(3)
    rewrite.optimize(model, rewrite.mixed_span(full_layers=1, local=rewrite.SlidingWindow(window=16), progress=False),
                     example_kwargs=_batch(0), calibration=[_batch(1), _batch(2)])
    cal = model.rewrite_report.calibration
    exact = [r for r in cal.rows if r.choice.startswith("Exact")]
    assert len(exact) == 1
    damage = {r.name: r.candidates[0].error for r in cal.rows}
    assert damage[exact[0].name] == max(damage.values())


def test_isomer_shares_the_query_only_where_queries_do_not_matter():
    model = _bert(2)
    rewrite.optimize(model, rewrite.isomer(threshold=0.0, max_site_error=1.0, progress=False),
                     example_kwargs=_batch(0), calibration=[_batch(1)])
    cal = model.rewrite_report.calibration
    assert all(r.choice.startswith("SharedQuery") for r in cal.rows)
    model2 = _bert(2)
    rewrite.optimize(model2, rewrite.isomer(threshold=1.01, progress=False), example_kwargs=_batch(0),
                     calibration=[_batch(1)])
    assert all(r.choice.startswith("Exact") and "query-independence" in r.why
               for r in model2.rewrite_report.calibration.rows)


def test_custom_metric_callable_is_used_per_example():
    """The metric sees each calibration example alone (the error bound is over examples), its batch sliced."""
    seen = []

    def metric(ref, new, batch):
        seen.append(batch["input_ids"].shape)
        return rewrite.calibrate.relative_l2_error(ref, new)

    rewrite.optimize(_bert(1), rewrite.auto(max_error=0.05, metric=metric, candidates=CANDIDATES[:1], progress=False,
                                            timer=FAST),
                     example_kwargs=_batch(0), calibration=[_batch(1)])
    assert seen and all(s == (1, 96) for s in seen) and len(seen) % 2 == 0
