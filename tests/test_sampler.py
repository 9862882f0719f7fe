"""The resumable sampler (lit_mllm/data/sampler.py): DistributedSampler's order, resumed exactly.

The end-to-end check (SIGKILL mid-training, resume, bit-identical weights) is tests/test_resume.py.
"""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from lit_mllm.data.sampler import ResumableSampler


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("size", "replicas"), [(10, 1), (11, 2), (13, 3), (2, 3)])
def test_sampler_order_equals_distributed_sampler(size, replicas, drop_last) -> None:
    for epoch in (0, 3):
        for rank in range(replicas):
            ours = ResumableSampler(
                size, seed=5, num_replicas=replicas, rank=rank, drop_last=drop_last
            )
            theirs = DistributedSampler(
                range(size), num_replicas=replicas, rank=rank, seed=5, drop_last=drop_last
            )
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.parametrize("replicas", [1, 3])
def test_sampler_resumes_at_the_exact_next_sample(replicas) -> None:
    samplers = [
        ResumableSampler(23, seed=1, num_replicas=replicas, rank=r) for r in range(replicas)
    ]
    for s in samplers:
        s.set_epoch(2)
    full = [list(s) for s in samplers]
    for consumed in (0, 1, 4, len(full[0]) - 1):
        for rank, s in enumerate(samplers):
            resumed = ResumableSampler(23, seed=1, num_replicas=replicas, rank=rank)
            resumed.load_state_dict(s.state_dict(consumed=consumed))
            assert resumed.epoch == 2 and len(resumed) == len(full[rank])
            assert list(resumed) == full[rank][consumed:]
            assert list(resumed) == full[rank][consumed:]  # every iterator of that epoch
            resumed.set_epoch(3)  # the next epoch is whole again
            assert len(list(resumed)) == len(full[rank])
    finished = samplers[0].state_dict(consumed=len(full[0]))
    assert (finished["epoch"], finished["consumed"]) == (3, 0)


def test_sampler_resume_with_another_world_size_skips_the_same_samples() -> None:
    old = [ResumableSampler(40, seed=0, num_replicas=4, rank=r) for r in range(4)]
    seen = [i for s in old for i in list(s)[:3]]  # 3 samples per rank trained before the crash
    state = old[0].state_dict(consumed=3)
    new = [ResumableSampler(40, seed=0, num_replicas=2, rank=r) for r in range(2)]
    for s in new:
        s.load_state_dict(state)
    rest = [list(s) for s in new]
    assert len(rest[0]) == len(rest[1])  # ranks stay in step (no DDP hang)
    assert sorted(seen + rest[0] + rest[1]) == list(range(40))


def test_sampler_refuses_to_resume_on_other_data() -> None:
    state = ResumableSampler(10, seed=0).state_dict(consumed=4)
    with pytest.raises(ValueError, match="size: checkpoint 10, now 12"):
        ResumableSampler(12, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(10, seed=1).load_state_dict(state)
