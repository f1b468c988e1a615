"""Seeding torch costs microseconds per message and draws what ``torch.manual_seed`` draws on the CPU."""

from __future__ import annotations

import traceback

import pytest
import torch

from medtasks.seeding import seed_everything, seed_torch


def test_seed_torch_draws_the_numbers_of_torch_manual_seed_on_the_cpu() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(5), torch.randn(3, 3)
    seed_torch(1234)
    assert torch.equal(torch.rand(5), expected[0]) and torch.equal(torch.randn(3, 3), expected[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines seed CUDA at once, without a queue")
def test_seeding_queues_no_lazy_accelerator_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("a lazy accelerator seeding captured a stack trace")

    monkeypatch.setattr(traceback, "format_stack", refuse)
    seed_torch(7)
    seed_everything(7, "train", 3, 1)
    with pytest.raises(AssertionError, match="stack trace"):  # what torch.manual_seed does on such a machine
        torch.manual_seed(7)


def test_drawing_from_a_seed_leaves_the_global_stream_where_it_was() -> None:
    from medtasks.seeding import drawing_from

    torch.manual_seed(5)
    untouched = torch.rand(4)
    torch.manual_seed(5)
    with drawing_from(99):
        inside = torch.rand(4)
    assert torch.equal(torch.rand(4), untouched)  # the block drew from its own seed, not the global stream
    torch.manual_seed(99)
    assert torch.equal(inside, torch.rand(4))
