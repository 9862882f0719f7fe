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


def _grouped(size: int, lengths: list[int], replicas: int = 1, rank: int = 0, **kw):
    return ResumableSampler(size, seed=3, num_replicas=replicas, rank=rank, lengths=lengths, **kw)


def test_length_grouping_sorts_groups_and_shuffles_their_batches() -> None:
    lengths = [(i * 37) % 101 for i in range(100)]  # 100 samples, batch 4, groups of 5 batches
    sampler = _grouped(100, lengths, batch_size=4, group_batches=5)
    order = sampler.global_order(0)
    assert sorted(order) == list(range(100))
    assert order == sampler.global_order(0) and order != sampler.global_order(1)
    plain = ResumableSampler(100, seed=3).global_order(0)
    for g in range(0, 100, 20):  # a group holds the same samples as the plain order's stretch
        assert sorted(order[g : g + 20]) == sorted(plain[g : g + 20])
        batches = [order[g + b : g + b + 4] for b in range(0, 20, 4)]
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
        # the group's batches cut its sorted lengths into runs that do not interleave
        assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:], strict=False))
    batch_max = [max(lengths[i] for i in order[b : b + 4]) for b in range(0, 100, 4)]
    plain_max = [max(lengths[i] for i in plain[b : b + 4]) for b in range(0, 100, 4)]
    assert sum(batch_max) < 0.8 * sum(plain_max)  # less padding
    # the batches of a group come out shuffled, not longest first
    firsts = [
        max(lengths[i] for i in order[g + b : g + b + 4]) for g in range(0, 100, 20) for b in (0, 4)
    ]
    assert any(a < b for a, b in zip(firsts[::2], firsts[1::2], strict=True))


def test_length_grouping_keeps_the_partial_batch_last_and_ranks_in_step() -> None:
    lengths = list(range(30))
    order = _grouped(30, lengths, batch_size=4, group_batches=2).global_order(0)
    assert sorted(order) == list(range(30))
    tail = sorted(order[24:])  # the last group: 6 samples, one full batch and the 2 left over
    assert order[-2:] == [tail[1], tail[0]]  # the group's shortest, after its full batch
    ranks = [_grouped(32, lengths + [0, 0], 2, r, batch_size=2, group_batches=2) for r in range(2)]
    shards = [list(s) for s in ranks]
    global_order = ranks[0].global_order(0)
    for step in range(0, 16, 2):  # step k of both ranks = global batch k (4 samples)
        together = shards[0][step : step + 2] + shards[1][step : step + 2]
        assert sorted(together) == sorted(global_order[2 * step : 2 * step + 4])


def test_length_grouping_resumes_exactly_and_refuses_another_grouping() -> None:
    lengths = [(i * 7) % 23 for i in range(50)]
    full = list(_grouped(50, lengths, batch_size=5, group_batches=3))
    state = _grouped(50, lengths, batch_size=5, group_batches=3).state_dict(consumed=15)
    resumed = _grouped(50, lengths, batch_size=5, group_batches=3)
    resumed.load_state_dict(state)
    assert list(resumed) == full[15:]
    with pytest.raises(ValueError, match="group_batches: checkpoint 3, now 0"):
        ResumableSampler(50, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size: checkpoint 5, now 4"):
        _grouped(50, lengths, batch_size=4, group_batches=3).load_state_dict(state)
    with pytest.raises(ValueError, match="num_replicas: checkpoint 1, now 2"):
        _grouped(50, lengths, 2, 0, batch_size=5, group_batches=3).load_state_dict(state)
    epoch_start = _grouped(50, lengths, batch_size=5, group_batches=3).state_dict(consumed=50)
    two_ranks = _grouped(50, lengths, 2, 0, batch_size=4, group_batches=3)
    two_ranks.load_state_dict(epoch_start)  # a whole epoch done: other devices may go on
    assert two_ranks.epoch == 1 and len(list(two_ranks)) == 25
    old_state = {k: v for k, v in ResumableSampler(50, seed=3).state_dict(consumed=5).items()}
    for key in ("group_batches", "batch_size"):  # a state written before grouping existed
        old_state.pop(key)
    plain = ResumableSampler(50, seed=3)
    plain.load_state_dict(old_state)
    assert list(plain) == list(ResumableSampler(50, seed=3))[5:]
    with pytest.raises(ValueError, match="needs 50 lengths, got none"):
        ResumableSampler(50, group_batches=2)
