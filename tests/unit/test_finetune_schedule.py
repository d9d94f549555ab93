"""What each step takes: batch split, data order, learning rate, dropout seed — functions of settings and step."""

import pytest

from rugpt.errors import UsageError
from rugpt.training.schedule import BatchPlan, DataOrder, dropout_seed, learning_rate, plan_batches, scheduled_lr
from rugpt.training.settings import FinetuneSettings, Schedule


def settings(**fields):
    return FinetuneSettings(data="d.txt", out="o", **fields)


def test_batch_plan_keeps_the_global_batch_on_any_number_of_processes():
    assert plan_batches(settings(batch_size=8, micro_batch_size=2), 1) == BatchPlan(2, accumulation=4, processes=1)
    assert plan_batches(settings(batch_size=8, micro_batch_size=2), 2) == BatchPlan(2, 2, 2)
    assert plan_batches(settings(batch_size=8), 4) == BatchPlan(2, 1, 4)
    with pytest.raises(UsageError, match=r"batch_size=6 must be a multiple of micro_batch_size × processes = 4 × 1"):
        plan_batches(settings(batch_size=6, micro_batch_size=4), 1)


def test_data_order_visits_every_block_once_per_epoch_and_is_reproducible():
    order = DataOrder(blocks=10, batch_size=4, seed=1)
    stream = [int(i) for step in range(5) for i in order.rows(step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    assert DataOrder(10, 4, seed=1).rows(3).tolist() == stream[12:16]  # step 3 alone, as after a resume


def test_learning_rate_warms_up_then_decays():
    s = settings(lr=1.0)
    assert [learning_rate(s, step, 10, 2) for step in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert learning_rate(s, 9, 10, 2) == pytest.approx(0.0386, abs=1e-3)
    assert learning_rate(settings(lr=1.0, schedule="linear"), 6, 10, 2) == pytest.approx(0.5)
    assert learning_rate(settings(lr=1.0, schedule="constant"), 9, 10, 2) == 1.0


def test_one_schedule_serves_a_wall_clock_budget_with_a_floor():
    assert scheduled_lr(1.0, 0, 4, 0.0, Schedule.cosine, floor=0.1) == 0.25  # warm-up ignores progress
    assert scheduled_lr(1.0, 50, 4, 0.0, Schedule.cosine, floor=0.1) == 1.0
    assert scheduled_lr(1.0, 50, 4, 1.0, Schedule.cosine, floor=0.1) == pytest.approx(0.1)
    assert scheduled_lr(1.0, 50, 4, 7.0, Schedule.linear, floor=0.1) == pytest.approx(0.1)  # past the budget


def test_settings_give_back_their_command_with_planner_flags():
    command = settings(gradient_checkpointing=False, optimizer="adafactor", max_memory="16GB").to_command()
    assert "--no-gradient-checkpointing --optimizer adafactor --max-memory 16GB" in command


def test_dropout_seed_depends_on_seed_step_and_place_only():
    assert dropout_seed(1, 2, 3) == dropout_seed(1, 2, 3)
    assert len({dropout_seed(1, 2, 3), dropout_seed(1, 2, 4), dropout_seed(1, 3, 3), dropout_seed(2, 2, 3)}) == 4
