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


def test_background_never_shares_a_step_with_normal_requests_and_resumes_after():
    """On CPU every adapter in a step slows every sequence in it: a running background request pauses
    (keeps its KV blocks, computes nothing) in any step that holds a normal sequence, and goes on
    where it stopped once the normal work is done."""
    s, _ = make_scheduler(max_num_seqs=4, budget=64)
    shadow = bg("shadow", n=6, max_tokens=5, adapter="b")
    s.add(shadow)
    batch = s.schedule()
    assert [q.request.request_id for q in batch.seqs] == ["shadow"]  # idle machine: it runs
    run_step(s, batch)
    assert len(shadow.output_token_ids) == 1
    normal = make_request("n", n=5, max_tokens=3, adapter="a")
    s.add(normal)
    steps_with_normal = 0
    while not normal.is_finished:
        batch = s.schedule()
        kinds = {q.request.priority for q in batch.seqs}
        assert kinds == {0}, [q.request.request_id for q in batch.seqs]
        steps_with_normal += 1
        computed = shadow.num_computed
        run_step(s, batch)
        assert shadow.state is RequestState.RUNNING and shadow.num_computed == computed  # paused, not preempted
        s.check()
    assert steps_with_normal == 3 and len(shadow.output_token_ids) == 1
    while not shadow.is_finished:
        batch = s.schedule()
        assert [q.request.request_id for q in batch.seqs] == ["shadow"]
        run_step(s, batch)
    assert len(shadow.output_token_ids) == 5 and shadow.num_preemptions == 0
    s.check()


def test_background_prefill_comes_in_short_chunks():
    from loraplex.scheduler.scheduler import BACKGROUND_CHUNK

    s, _ = make_scheduler(max_num_seqs=4, budget=512, num_blocks=512)
    shadow = bg("shadow", n=3 * BACKGROUND_CHUNK, max_tokens=2)
    s.add(shadow)
    sizes = []
    while shadow.num_computed < 3 * BACKGROUND_CHUNK:
        batch = s.schedule()
        sizes.append(batch.num_tokens)
        run_step(s, batch)
    assert sizes == [BACKGROUND_CHUNK] * 3  # a normal prompt of that length is one 192-token step
    normal = make_request("n", n=3 * BACKGROUND_CHUNK, max_tokens=2)
    s.add(normal)
    assert s.schedule().num_tokens == 3 * BACKGROUND_CHUNK
