"""auto() adds token merging (a block-level action) after its per-site plan, on whole rewritten models: the
fastest setting within the error budget that is faster, the ladder stopping at the first over the budget."""
import torch
from transformers import BertConfig, BertModel

import rewrite
from rewrite.timing import SiteRun

LADDER = [rewrite.MergeTokens(r=2), rewrite.MergeTokens(r=4), rewrite.MergeTokens(r=8)]


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                     vocab_size=100, attn_implementation="eager")
    return BertModel(cfg).eval()


def batch(seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 32 - pad:] = 0
    return {"input_ids": torch.randint(0, 100, (2, 32), generator=g), "attention_mask": mask}


def merged_is_faster(speed: dict):
    """Sites cost 1 ms each; a whole model 10 ms, times ``speed[r]`` with MergeTokens(r) in its plan."""
    def timer(runs):
        out = {}
        for label in runs:
            if isinstance(label, SiteRun):
                out[label] = 1e-3
                continue
            rs = [int(a.split("r=")[1].split(",")[0]) for *_, a in label.plan if a.startswith("MergeTokens")]
            out[label] = 1e-2 * (speed[rs[0]] if rs else 1.0)
        return out
    return timer


def cosine_error(a, b):
    return (1 - torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))).mean().item()


def test_the_fastest_setting_within_the_budget_is_chosen_and_outputs_keep_their_shape():
    model, calib = tiny_bert(), [batch(1), batch(2, pad=5)]
    with torch.no_grad():
        refs = [model(**b).last_hidden_state for b in calib]
    policy = rewrite.auto(max_error=0.05, candidates=LADDER, timer=merged_is_faster({2: 0.8, 4: 0.6, 8: 0.5}),
                          progress=False)
    rewrite.optimize(model, policy, example_kwargs=batch(0), calibration=calib)
    rep = rewrite.report(model)
    rows = rep.calibration.token_merging
    tried = [r.action.split(",")[0] for r in rows]
    assert tried[0] == "MergeTokens(r=2"
    over = [r for r in rows if "over the budget" in r.outcome]
    within = [r for r in rows if r.error <= 0.05]
    assert within, rep.calibration_table()
    chosen = [r for r in rows if r.outcome == "chosen"]
    assert len(chosen) == 1 and chosen[0] is within[-1]          # the harshest within budget: the fastest here
    assert all(rows.index(r) > rows.index(chosen[0]) for r in over)
    assert all(chosen[0].action == s.action for s in rep.sites), rep
    assert "Token merging" in rep.calibration_table() and rep.to_json()["calibration"]["token_merging"]
    with torch.no_grad():
        for b, ref in zip(calib, refs):
            out = model(**b).last_hidden_state
            assert out.shape == ref.shape
            assert cosine_error(ref, out) < 0.2


def test_no_merging_over_the_budget_or_when_it_is_not_faster():
    for budget, speed, why in ((1e-7, {2: 0.5, 4: 0.5, 8: 0.5}, "over the budget"),
                               (0.5, {2: 1.0, 4: 1.2, 8: 1.5}, "not faster")):
        model = tiny_bert()
        policy = rewrite.auto(max_error=budget, candidates=LADDER, timer=merged_is_faster(speed), progress=False)
        rewrite.optimize(model, policy, example_kwargs=batch(0), calibration=[batch(1), batch(2)])
        rep = rewrite.report(model)
        assert all(s.action.startswith("Exact") for s in rep.sites), rep
        assert rep.calibration.token_merging and all(why in r.outcome for r in rep.calibration.token_merging
                                                     if r.outcome != "") , rep.calibration_table()


def test_one_rewritten_copy_serves_every_setting():
    """The mergers of one copy take each setting of the ladder: what they read on their next call."""
    from rewrite.merge_schedule import set_merging
    from rewrite.mixers.merge_tokens import TokenMerger
    mergers = [TokenMerger(8), TokenMerger(8)]
    set_merging(mergers, rewrite.MergeTokens(r=3, window=5))
    assert all((m.r, m.window, m.protect_first, m.metric) == (3, 5, 1, "hidden") for m in mergers)
    x = torch.randn(1, 12, 4)
    assert mergers[0](x, None, None, None, None, None, None)[0].shape == (1, 9, 4)


def plans_timed(per_site_plan: float, merged_after_plan: float, merging_alone: float):
    """Sites: exact 1 ms, SlidingWindow 0.5 ms. Whole models (10 ms exact) by what their plan holds."""
    def timer(runs):
        out = {}
        for label in runs:
            if isinstance(label, SiteRun):
                out[label] = 0.5e-3 if label.action.startswith("SlidingWindow") else 1e-3
                continue
            actions = [a for *_, a in label.plan]
            window = any(a.startswith("SlidingWindow") for a in actions)
            merging = any(a.startswith("MergeTokens") for a in actions)
            factor = {(False, False): 1.0, (True, False): per_site_plan, (True, True): merged_after_plan,
                      (False, True): merging_alone}[(window, merging)]
            out[label] = 1e-2 * factor
        return out
    return timer


def test_merging_alone_replaces_a_per_site_plan_when_it_is_faster_and_the_report_says_so():
    """The per-site plan routes both sites, so no merger can follow it (merging goes where the plan left a site
    exact); merging alone is then tried with every site exact, and wins only when it is the faster whole plan."""
    ladder = [rewrite.SlidingWindow(window=8), rewrite.MergeTokens(r=2), rewrite.MergeTokens(r=4)]
    for merging_alone, alone_wins in ((0.5, True), (0.95, False)):
        model = tiny_bert()
        policy = rewrite.auto(max_error=10.0, candidates=ladder, progress=False,
                              timer=plans_timed(0.9, 0.9, merging_alone))
        rewrite.optimize(model, policy, example_kwargs=batch(0), calibration=[batch(1), batch(2)])
        rep = rewrite.report(model)
        rows = rep.calibration.token_merging
        assert {r.base for r in rows} == {"per-site plan", "every site exact"}, rep.calibration_table()
        chosen = [r for r in rows if r.outcome == "chosen"]
        actions = {s.action.split("(")[0] for s in rep.sites}
        if alone_wins:
            assert len(chosen) == 1 and chosen[0].base == "every site exact", rep.calibration_table()
            assert actions == {"MergeTokens"}, rep
            assert all(r.choice.startswith("Exact") and "merging alone is faster" in r.why
                       for r in rep.calibration.rows), rep.calibration_table()
            assert "every site exact" in rep.calibration.message
            assert rep.calibration.model_ms == rep.calibration.exact_model_ms * chosen[0].ms / chosen[0].plan_ms
        else:
            assert not chosen and actions == {"SlidingWindow"}, rep.calibration_table()
            assert any("per-site plan with its merging is as fast or faster" in r.outcome for r in rows)
            assert all(r.choice.startswith("SlidingWindow") for r in rep.calibration.rows)


def test_a_decoder_declines_merging_once_with_the_reason():
    """Every site declines merging (causal): one row says why, and nothing is measured or timed for it."""
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100, attn_implementation="eager")).eval()
    ids = [{"input_ids": torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(s))} for s in range(3)]
    policy = rewrite.auto(max_error=0.05, candidates=LADDER, timer=merged_is_faster({2: 0.5, 4: 0.5, 8: 0.5}),
                          progress=False)
    rewrite.optimize(model, policy, example_kwargs=ids[0], calibration=ids[1:])
    rep = rewrite.report(model)
    rows = rep.calibration.token_merging
    assert len(rows) == 1 and rows[0].error is None and rows[0].ms is None, rep.calibration_table()
    assert rows[0].outcome.startswith("declined at every site") and "causal" in rows[0].outcome
    assert all(s.action.startswith("Exact") for s in rep.sites)
    assert "declined at every site" in rep.calibration_table()
