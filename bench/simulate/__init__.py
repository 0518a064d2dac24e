"""Deterministic simulation of a whole tokenguard cluster under faults (issue #22).

``python -m bench simulate`` (:mod:`bench.simulate.cli`) runs seeded simulations in one
process on trio's mock clock: several nodes, each the product's own guarded store,
keyring, limiter and settler (:mod:`~bench.simulate.node`), share the memory driver
behind a fault layer (:mod:`~bench.simulate.store`), take seeded traffic and admin
changes (:mod:`~bench.simulate.traffic`) and seeded faults
(:mod:`~bench.simulate.faults`), while an oracle (:mod:`~bench.simulate.oracle`, with
:mod:`~bench.simulate.counter_invariants` and :mod:`~bench.simulate.feed_invariant`)
checks the invariants. A violation prints its seed and the last events of its trace
(:mod:`~bench.simulate.trace`); ``--seed`` replays it exactly
(:mod:`~bench.simulate.runner`). ``--plant`` switches on a known bug
(:mod:`~bench.simulate.plants`). Every product name comes from
:mod:`~bench.simulate.product`. The model, the invariants and what is not simulated:
docs/design.md, "Simulation".
"""
