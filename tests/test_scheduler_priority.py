"""Background priority in the scheduler (shadow runs): admitted only when no normal request waits,
at most half the seats, preempted before any normal request, never 'starved' ahead of normal ones.
Fake requests, no model (see test_scheduler.py for the helpers)."""

from __future__ import annotations

from test_scheduler import make_request, make_scheduler

from loraplex.scheduler.request import RequestState


def bg(rid: object, **kw):
    r = make_request(rid, **kw)
    r.priority = 1
    return r


def run_step(s, batch):
    s.postprocess(batch, [7] * batch.num_logits)


def test_background_waits_while_normal_requests_wait():
    s, _ = make_scheduler(max_num_seqs=4, budget=64)
    shadow = bg("shadow", max_tokens=50)
    s.add(shadow)  # arrives first
    normal = [make_request(f"n{i}", max_tokens=50) for i in range(4)]
    for r in normal:
        s.add(r)
    batch = s.schedule()
    assert [q.request.request_id for q in batch.seqs] == ["n0", "n1", "n2", "n3"]  # all seats to normal
    assert shadow.state is RequestState.WAITING
    run_step(s, batch)
    s.check()


def test_background_takes_at_most_half_the_seats_and_only_spare_ones():
    s, _ = make_scheduler(max_num_seqs=4, budget=64)
    shadows = [bg(f"s{i}", max_tokens=50) for i in range(4)]
    for r in shadows:
        s.add(r)
    batch = s.schedule()
    assert sorted(q.request.request_id for q in batch.seqs) == ["s0", "s1"]  # half of 4 seats
    run_step(s, batch)
    late = make_request("late", max_tokens=50)
    s.add(late)
    batch = s.schedule()
    assert late.state is RequestState.RUNNING  # a normal request still finds a seat at once
    assert shadows[2].state is RequestState.WAITING
    run_step(s, batch)
    s.check()


def test_background_is_preempted_first():
    # 6 blocks of 4 tokens: two normal and one background request fill the pool as they decode
    s, _ = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=4, budget=64)
    older_bg = bg("bg", n=4, max_tokens=20)
    s.add(older_bg)
    batch = s.schedule()
    run_step(s, batch)
    normal = [make_request(f"n{i}", n=4, max_tokens=20) for i in range(2)]
    for r in normal:
        s.add(r)
    preempted = []
    for _ in range(12):
        batch = s.schedule()
        preempted += [r.request_id for r in batch.preempted]
        if not batch.seqs:
            break
        run_step(s, batch)
        s.check()
        if preempted:
            break
    assert preempted and preempted[0] == "bg"  # older than both, but background: it goes first
    assert all(r.state is RequestState.RUNNING for r in normal)


def test_starved_background_never_blocks_normal_admission():
    s, _ = make_scheduler(max_num_seqs=2, budget=64, max_wait=1)
    hog = [make_request(f"hog{i}", max_tokens=30) for i in range(2)]
    for r in hog:
        s.add(r)
    run_step(s, s.schedule())
    shadow = bg("shadow", max_tokens=5)
    s.add(shadow)
    for _ in range(5):  # the shadow waits long past max_wait_steps
        run_step(s, s.schedule())
    s.abort("hog0")
    late = make_request("late", max_tokens=5)
    s.add(late)
    batch = s.schedule()
    assert late.state is RequestState.RUNNING and shadow.state is RequestState.WAITING
    run_step(s, batch)
    s.check()
