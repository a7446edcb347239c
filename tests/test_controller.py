"""The cost model: shapes chosen from the measured verify-cost table (no timing here: tables are given)."""

from edgespec.models.ngram import NgramDrafter

from edgespec.controller import Controller, ControllerConfig, controller_for

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
