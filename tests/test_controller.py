"""The cost model: shapes chosen from the measured verify-cost table (no timing here: tables are given)."""
import pytest

from edgespec.controller import Controller, ControllerConfig, controller_for
from edgespec.models.drafting.ngram import NgramDrafter

# single-step units, as measured on an Intel Xeon (AVX-512/AMX, 2 threads): 4 rows cost less than 3
XEON = {1: 1.0, 2: 1.5, 3: 1.8, 4: 1.64, 5: 2.1, 6: 2.4, 8: 2.9, 12: 3.3, 16: 3.6}
LINEAR = {n: float(n) for n in (1, 2, 3, 4, 6, 8, 16)}  # verify as dear as plain steps: never worth it


def chain_controller(costs, accept, exact_rows=None, max_depth=6):
    ctl = Controller(ControllerConfig(max_depth=max_depth, max_nodes=16 if exact_rows is None else exact_rows - 1,
                                      probe_every=10**9))
    ctl.verify_s.update(costs)
    ctl.accept = list(accept)
    return ctl


def test_picks_the_four_row_chain_where_four_rows_are_cheapest():
    ctl = chain_controller(XEON, [0.8, 0.78, 0.76, 0.5, 0.5, 0.5])
    assert ctl.best_depth() == 3  # root + 3 drafts = 4 rows
    shape = ctl.next_shape(room=100)
    assert shape.depth == 3 and shape.depth + 1 == 4


def test_exact_never_verifies_more_than_the_exact_batch():
    ctl = chain_controller(XEON, [0.95] * 6, exact_rows=3)
    for _ in range(50):
        shape = ctl.next_shape(room=100)
        assert shape.max_nodes <= 2 and min(shape.depth, shape.max_nodes) + 1 <= 3
    ngram = controller_for(NgramDrafter(), costs=XEON, exact_rows=3)
    assert ngram.next_shape(room=100).max_nodes == 2
    amx = controller_for(NgramDrafter(), costs=XEON, exact_rows=32)  # an AMX build: the usual 16-node limit
    assert amx.next_shape(room=100).max_nodes == 16


def test_exact_stops_drafting_where_the_context_leaves_the_exact_span():
    """Exact mode drafts only while every verify row (and a tree's holes) stays below ``exact_context``; plain
    mode ignores it, and so does a controller made without an exact cap."""
    for drafter in (NgramDrafter(), None):
        exact = controller_for(drafter, costs=XEON, exact_rows=3, exact_context=256, fixed_depth=2)
        assert exact.next_shape(room=1000, n_cached=100).depth == 2
        assert exact.next_shape(room=1000, n_cached=251).depth == 2  # rows at 251..253, holes up to 255
        assert exact.next_shape(room=1000, n_cached=252).depth == 1
        assert exact.next_shape(room=1000, n_cached=253).depth == 0
        assert exact.next_shape(room=1000, n_cached=4000).depth == 0
        free = controller_for(drafter, costs=XEON, exact_context=256, fixed_depth=2)
        assert free.next_shape(room=1000, n_cached=4000).depth == 2
    gated = controller_for(NgramDrafter(), costs=XEON, exact_rows=3, exact_context=256)
    assert gated.next_shape(room=1000, n_cached=100).max_nodes == 2
    assert gated.next_shape(room=1000, n_cached=300).depth == 0


def test_no_drafting_when_verify_is_as_dear_as_plain_steps():
    ctl = chain_controller(LINEAR, [0.7] * 6)
    assert ctl.best_depth() == 0
    good = chain_controller(XEON, [0.7] * 6)
    assert good.best_depth() > 0


def test_self_gating_costs_come_from_the_envelope():
    ctl = controller_for(NgramDrafter(), costs=XEON)
    costs = ctl.node_costs()
    # the 2nd draft node takes the batch from 2 to 3 rows, the 3rd to 4 (cheaper than 3): by the envelope the
    # two together cost 0.14 steps, priced on the 2nd node and free on the 3rd
    assert abs(costs[0] - 0.5) < 1e-9 and abs(costs[1] - 0.14) < 1e-9 and costs[2] == 0.0


def test_break_even_acceptance_from_the_cost_table():
    from edgespec.machine import break_even

    # depth 1 on c(2) = 1.5: (1 + a) / 1.5 = 1 at a = 0.5; for 1.2x, a = 0.8
    assert break_even({1: 1.0, 2: 1.5}, 1.0)[1] == pytest.approx(0.5, abs=1e-3)
    assert break_even({1: 1.0, 2: 1.5}, 1.2)[1] == pytest.approx(0.8, abs=1e-3)
    # depth 2 on c(3) = 2.0: 1 + a + a^2 = 2 at a = 0.618 (the golden ratio's inverse)
    assert break_even({3: 2.0}, 1.0)[2] == pytest.approx(0.618, abs=1e-3)
    # two rows costing 2.1 steps: no acceptance rate pays; depths without a measured cost are left out
    assert break_even({2: 2.1, 4: 2.0}, 1.0) == {1: None, 3: pytest.approx(0.544, abs=1e-3)}


def test_a_chain_is_kept_by_its_best_prefix_not_node_by_node():
    from edgespec.models.drafting.drafter import TreeShape

    steep = TreeShape(depth=8, max_nodes=8, node_cost=(1.4, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3))
    # the first node alone loses 0.45 of a step; four confident nodes gain 0.95 - 1.4 + 0.9 - 0.5 + ... > 0
    assert not steep.worth(0.95, 0)
    assert steep.keep([0.95, 0.9, 0.85, 0.8]) == 4
    assert steep.keep([0.95, 0.5, 0.2, 0.1]) == 0  # no prefix gains
    assert steep.keep([0.9, 0.8, 0.7, 0.3, 0.2]) == 3  # stops where the next node costs more than it brings
    assert TreeShape(depth=8, max_nodes=2, node_cost=(0.1,) * 8).keep([0.9, 0.9, 0.9]) == 2  # node limit
    assert TreeShape(depth=3).keep([0.1, 0.1]) == 2  # unpriced: every node
    assert steep.keep([0.95, 0.9, 0.85, 0.8], n_nodes=7) == 1  # one place left in the batch


def test_bench_method_suffixes():
    from edgespec.benches.speed import parse_method

    m = parse_method("redrafter:/x/head.npz@3+exact+gate")
    assert (m.drafter, m.depth, m.exact, m.gate) == ("redrafter:/x/head.npz", 3, True, True)
    m = parse_method("redrafter+gate+exact")  # either order
    assert (m.drafter, m.exact, m.gate) == ("redrafter", True, True)
    m = parse_method("ngram+exact")
    assert (m.drafter, m.exact, m.gate) == ("ngram", True, None)
    with pytest.raises(ValueError, match="redrafter"):
        parse_method("ngram+gate")


def test_bench_speedups_leave_out_empty_answers():
    """A prompt answered with nothing (EOS at once) has no speed: it is left out of the ratios, not a NaN."""
    from edgespec.benches.speed import Run, summarize

    plain = [Run([1] * 10, 10.0), Run([], 0.0), Run([1] * 10, 20.0)]
    auto = [Run([1] * 10, 15.0), Run([], 0.0), Run([1] * 10, 20.0)]
    s = summarize({"plain": plain, "auto": auto})["auto"]
    assert s["compared"] == 2 and s["speedup_median"] == 1.25 and s["speedup_min"] == 1.0
