"""Models of the Hopper engine's barrier protocols, checked under random interleavings. Forward
(cuda/attn_sm90.cuh): one producer and two consumer warpgroups share Q and a two-stage K/V ring
across the work tiles of a persistent CTA. Backward (cuda/attn_bwd_sm90.cuh): a fixed tile per
work tile and a two-stage ring of streamed tiles, one full and one empty barrier each.
Every wait is a parity wait on an mbarrier (true iff the phase
of that parity has completed, i.e. the completed-phase count has the other parity), so a barrier
that completes twice while a waiter looks for the first completion deadlocks it; the model finds
such orders (two were found this way), stale reads of a stage, and lost tiles. Keep it in step
with the kernel: each `yield` is a point where other agents may run."""

from __future__ import annotations

import random

import pytest

STAGES = 2


class Barrier:
    def __init__(self, count: int):
        self.count, self.pending, self.phases, self.tx = count, count, 0, 0

    def arrive(self, tx: int = 0):
        self.tx += tx
        self.pending -= 1
        self._settle()

    def complete_tx(self, n: int):
        self.tx -= n
        self._settle()

    def _settle(self):
        if self.pending == 0 and self.tx == 0:
            self.phases += 1
            self.pending = self.count

    def done(self, parity: int) -> bool:
        return (self.phases & 1) != parity


def wait(bar, parity):
    while not bar.done(parity):
        yield


def run_agents(rnd, producer, consumer, copies, work, seed) -> None:
    """Runs the producer, two consumers and the TMA unit (landing one copy in flight: barrier,
    buffer, slot, content) in a random
    order until all are done; each consumer must log every (work tile, tile) in order."""
    logs = [[], []]
    agents = [producer(), consumer(logs[0]), consumer(logs[1])]
    alive = [True, True, True]
    for _ in range(200_000):
        if not any(alive) and not copies:
            break
        choices = [i for i in range(3) if alive[i]] + (["tma"] if copies else [])
        pick = rnd.choice(choices)
        if pick == "tma":
            bar, where, s, what = copies.pop(rnd.randrange(len(copies)))
            where[s] = what  # the TMA unit lands a copy in flight
            bar.complete_tx(1)
        else:
            try:
                next(agents[pick])
            except StopIteration:
                alive[pick] = False
    else:
        raise AssertionError(f"deadlock: work {work}, seed {seed}")
    expect = [(w, j) for w, n in enumerate(work) for j in range(n)]
    assert logs[0] == expect and logs[1] == expect


def simulate(work: list[int], seed: int, sentinel_waits_v: bool = True) -> None:
    """work[w]: key tiles of work tile w (0: none). Raises on deadlock or a stale read.
    sentinel_waits_v=False: the first version's release of the sentinel's V stage."""
    rnd = random.Random(seed)
    q_full, q_empty = Barrier(1), Barrier(2)
    k_full, v_full = [Barrier(1) for _ in range(STAGES)], [Barrier(1) for _ in range(STAGES)]
    k_empty, v_empty = [Barrier(2) for _ in range(STAGES)], [Barrier(2) for _ in range(STAGES)]
    q_tile, k_smem, v_smem, tile_k0 = [None], [None] * STAGES, [None] * STAGES, [None] * STAGES
    copies = []  # TMA loads in flight: (barrier, where, what)

    def producer():
        it = 0
        for w, n in enumerate(work):
            if w > 0:
                yield from wait(q_empty, (w - 1) & 1)
            q_full.arrive(tx=1)
            copies.append((q_full, q_tile, 0, w))
            for j in [*range(n), -1]:  # -1: the end-of-tile sentinel
                s, parity = it % STAGES, ((it // STAGES) - 1) & 1
                if it >= STAGES:
                    yield from wait(k_empty[s], parity)
                tile_k0[s] = (w, j)
                if j < 0:
                    k_full[s].arrive()
                else:
                    k_full[s].arrive(tx=1)
                    copies.append((k_full[s], k_smem, s, (w, j)))
                yield
                if it >= STAGES:
                    yield from wait(v_empty[s], parity)
                if j < 0:
                    v_full[s].arrive()
                else:
                    v_full[s].arrive(tx=1)
                    copies.append((v_full[s], v_smem, s, (w, j)))
                yield
                it += 1

    def consumer(done_tiles):
        it = 0

        def release_sentinel(s, it):
            k_empty[s].arrive()
            if sentinel_waits_v:
                yield from wait(v_full[s], (it // STAGES) & 1)
            v_empty[s].arrive()
            yield

        for w in range(len(work)):
            yield from wait(q_full, w & 1)
            assert q_tile[0] == w, "stale Q"
            s = it % STAGES
            yield from wait(k_full[s], (it // STAGES) & 1)
            first = tile_k0[s]
            if first[1] >= 0:
                assert k_smem[s] == first, "stale K"
                k_empty[s].arrive()
                yield
                prev, prev_tile = it, first
                it += 1
                while True:
                    s = it % STAGES
                    yield from wait(k_full[s], (it // STAGES) & 1)
                    tile = tile_k0[s]
                    if tile[1] < 0:
                        break
                    assert k_smem[s] == tile, "stale K"
                    yield from wait(v_full[prev % STAGES], (prev // STAGES) & 1)
                    assert v_smem[prev % STAGES] == prev_tile, "stale V"
                    yield  # both GEMMs in flight
                    assert k_smem[s] == tile and v_smem[prev % STAGES] == prev_tile, "overwritten"
                    k_empty[s].arrive()
                    v_empty[prev % STAGES].arrive()
                    done_tiles.append(prev_tile)
                    yield
                    prev, prev_tile = it, tile
                    it += 1
                q_empty.arrive()
                yield from release_sentinel(s, it)
                yield from wait(v_full[prev % STAGES], (prev // STAGES) & 1)
                assert v_smem[prev % STAGES] == prev_tile, "stale V"
                yield
                v_empty[prev % STAGES].arrive()
                done_tiles.append(prev_tile)
            else:
                q_empty.arrive()
                yield from release_sentinel(s, it)
            it += 1

    run_agents(rnd, producer, consumer, copies, work, seed)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("model", ["forward", "backward"])
def test_engine_barrier_protocol(model, seed):
    run = simulate if model == "forward" else simulate_bwd
    rnd = random.Random(seed)
    for trial in range(250):
        work = [rnd.choice([0, 1, 1, 2, 3, 5]) for _ in range(rnd.randint(1, 6))]
        run(work, seed * 1000 + trial)


def test_model_finds_the_double_completion_deadlock():
    """Releasing the sentinel's V stage before its phase is posted deadlocks (a bug the model
    found in the first persistent version): the check has teeth."""
    with pytest.raises(AssertionError, match="deadlock"):
        for seed in range(200):
            simulate([3, 0], seed, sentinel_waits_v=False)


def simulate_bwd(work: list[int], seed: int) -> None:
    """The backward's protocol. work[w]: streamed tiles of work tile w (0: none, the consumers
    still store). Raises on deadlock, a stale read or an overwrite of a tile in use."""
    rnd = random.Random(seed)
    fix_full, fix_empty = Barrier(1), Barrier(2)
    full, empty = [Barrier(1) for _ in range(STAGES)], [Barrier(2) for _ in range(STAGES)]
    fixed, stream, step = [None], [None] * STAGES, [None] * STAGES
    copies = []

    def producer():
        it = 0
        for w, n in enumerate(work):
            if w > 0:
                yield from wait(fix_empty, (w - 1) & 1)
            fix_full.arrive(tx=1)
            copies.append((fix_full, fixed, 0, w))
            for j in [*range(n), -1]:
                s = it % STAGES
                if it >= STAGES:
                    yield from wait(empty[s], ((it // STAGES) - 1) & 1)
                step[s] = (w, j)
                if j < 0:
                    full[s].arrive()
                    it += 1
                    break
                full[s].arrive(tx=1)
                copies.append((full[s], stream, s, (w, j)))
                yield
                it += 1

    def consumer(done_steps):
        it = 0
        for w in range(len(work)):
            yield from wait(fix_full, w & 1)
            assert fixed[0] == w, "stale fixed tile"
            while True:
                s = it % STAGES
                yield from wait(full[s], (it // STAGES) & 1)
                tile = step[s]
                if tile[1] < 0:
                    break
                assert stream[s] == tile and fixed[0] == w, "stale streamed tile"
                yield  # GEMMs in flight
                assert stream[s] == tile and fixed[0] == w, "overwritten"
                done_steps.append(tile)
                empty[s].arrive()
                it += 1
            empty[it % STAGES].arrive()  # the sentinel's stage
            it += 1
            fix_empty.arrive()
            yield

    run_agents(rnd, producer, consumer, copies, work, seed)
