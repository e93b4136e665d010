"""The scheduler without a model: admission policies, the pass plan's rows, cancellation at the step
boundary, and a pass's failure ending its requests (the passes themselves: test_stepping.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sencache.runtime.cache import NoCache
from sencache.runtime.errors import BadInput, Cancelled, Failed
from sencache.runtime.pass_runner import Outcome, PassResult
from sencache.runtime.placement import PassPlan
from sencache.runtime.request import GenerationParams, RequestState
from sencache.runtime.scheduler import Scheduler, StaticBatching, StepLevel, admission


def state(samples: int, guidance: float = 4.0) -> RequestState:
    """A queued request of `samples` samples (2 rows each with guidance), its tensors placeholders."""
    request = GenerationParams([f"p{i}" for i in range(samples)], list(range(samples)), 4, guidance)
    empty = torch.zeros(samples, 1)
    return RequestState(0, request, NoCache(samples), None, [], [0.0] * 4, [guidance] * 4, empty, empty, empty)


def test_step_level_admits_in_order_while_rows_fit_and_a_large_one_holds_back_the_rest():
    queue = [state(1), state(2), state(1)]  # 2, 4 and 2 rows
    assert StepLevel().admit(queue, [], max_rows=6) == 2
    assert StepLevel().admit(queue, [state(1)], max_rows=6) == 1  # the 4-row one does not fit: none behind it joins
    assert StepLevel().admit(queue[1:], [state(1)], max_rows=6) == 1


def test_static_batching_admits_only_when_nothing_runs():
    queue = [state(1), state(1), state(1, guidance=1.0)]  # 2, 2 and 1 rows
    assert StaticBatching().admit(queue, [state(1)], max_rows=8) == 0
    assert StaticBatching().admit(queue, [], max_rows=4) == 2
    assert StaticBatching().admit(queue, [], max_rows=8) == 3


def test_admission_by_name_refuses_an_unknown_policy():
    assert isinstance(admission("step"), StepLevel) and isinstance(admission("static"), StaticBatching)
    with pytest.raises(BadInput, match="batching must be one of step, static") as refused:
        admission("greedy")
    assert refused.value.param == "batching"


def test_the_plan_holds_the_running_requests_in_row_order():
    scheduler = Scheduler(max_rows=8, admission=StepLevel())
    ids = [scheduler.enqueue(state(n, g)) for n, g in ((1, 4.0), (2, 1.0), (1, 4.0))]
    plan = scheduler.schedule()
    assert [j.id for j in plan.jobs] == ids
    assert plan.offsets.tolist() == [0, 2, 4, 6] and plan.rows == 6
    assert [scheduler.poll(i).state for i in ids] == ["running"] * 3
    assert scheduler.stats()["active_rows"] == 6


def test_cancellation_ends_a_queued_request_at_once_and_a_running_one_at_the_boundary():
    scheduler = Scheduler(max_rows=2, admission=StepLevel())
    running, queued = scheduler.enqueue(state(1)), scheduler.enqueue(state(1))
    scheduler.schedule()
    assert scheduler.cancel(queued) and scheduler.poll(queued).state == "cancelled"
    assert scheduler.cancel(running) and scheduler.poll(running).state == "running"
    assert scheduler.schedule().jobs == ()
    assert scheduler.poll(running).state == "cancelled" and not scheduler.cancel(running)
    with pytest.raises(Cancelled):
        scheduler.result(running)
    assert sorted(scheduler.update_from_output(PassPlan.of([]), PassResult({}), 0.0)) == [running, queued]


def test_a_failed_pass_fails_its_requests_and_frees_their_rows():
    scheduler = Scheduler(max_rows=4, admission=StepLevel())
    first, second = scheduler.enqueue(state(1)), scheduler.enqueue(state(1))
    plan = scheduler.schedule()
    error = RuntimeError("the blocks stage failed")
    ended = scheduler.update_from_output(plan, PassResult({j.id: Outcome(failure=error) for j in plan.jobs}), 0.0)
    assert sorted(ended) == [first, second]
    with pytest.raises(Failed, match="the blocks stage failed") as failed:
        scheduler.result(first)
    assert failed.value.__cause__ is error
    stats = scheduler.stats()
    assert stats["active_rows"] == 0 and stats["requests_failed_total"] == 2 and stats["steps_total"] == 1
    assert all(job.x.numel() == 0 for job in plan.jobs)  # released
    np.testing.assert_array_equal(PassPlan.of(list(plan.jobs)).offsets, [0, 2, 4])
