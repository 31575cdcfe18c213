# The low-rate logs' syncs off the paced loop's path (docs/storage.md, "Deferred syncs";
# docs/scheduling.md, "Stalls of the paced loop in a pass"): the clock, epochs,
# housekeeping and tracking logs commit without a sync; the store's "sync" duty syncs one
# of them a scheduler pass, once its oldest unsynced record is the sync age old; a durable
# write of the link (the counter ceiling) syncs them first. A sync is counted on the log's
# own file (its flush: lfs_file_sync on littlefs), on the target's real filesystem.
import os

import board
from payload import mission as missionmod
from payload import scheduler, storage, tdc

MPTEST_HELPERS = ("link_helpers.py",)
_BASE = board.mount_storage()
_PPS_PERIOD_PS = 10**12


class _Syncs:
    """A log's own open file, counting its syncs (flush); `witness()`, when set, is
    called at each sync and its value kept (what was on storage at that moment)."""

    def __init__(self, f, witness=None):
        self.f = f
        self.count = 0
        self.witness = witness
        self.seen = []

    def write(self, data):
        return self.f.write(data)

    def flush(self):
        self.count += 1
        if self.witness is not None:
            self.seen.append(self.witness())
        return self.f.flush()

    def close(self):
        return self.f.close()


def _count_syncs(log, witness=None):
    log._file = _Syncs(open(log.path, "ab"), witness)
    return log._file


def _fresh(name):
    # an empty root; the STM32 board's store is 16 KiB, so every test removes its own
    # (link_helpers' _remove_tree) when it is done
    root = _BASE + "/" + name
    _remove_tree(root)
    os.mkdir(root)
    return root


def _push_pps(drain, k):
    event = bytearray(9)
    event[1:9] = (1_000 + k * _PPS_PERIOD_PS).to_bytes(8, "little")  # channel 0: PPS
    tdc.ring_push(drain.state, drain.ring, drain.capacity, event, 1, drain.pps, drain.epochs)


def _age_us(since):
    return (board.clock.ticks_us() - since) & 0x3FFFFFFF


def test_in_a_mission_the_clock_log_costs_at_most_one_sync_a_pass_and_none_before_the_age():
    # First in the file, and before the modules only the other tests need are imported:
    # on unix the firmware was compiled from source in this process (it is .mpy since
    # session 28; the test programs still are), and each compile
    # leaves its code scattered through the heap. After the whole file's imports the
    # unix heap (512 KiB, 64-bit objects) had 324 KB free but no block of the TDC ring's
    # 18 KB, and the Mission could not be built; a board builds it at boot.
    # The real data path and scheduler: the clock duty commits a record per PPS, the
    # housekeeping log takes records between passes; no pass may sync more than once,
    # none before the oldest unsynced record is the sync age old, and then both logs are
    # synced within a few passes.
    m = missionmod.Mission(board, _fresh("t_lsync3"))
    m.store.sync_age_us = 1_500_000
    sched = scheduler.Scheduler(board.clock)
    m.duties(sched)
    clock_log = m.discipline.log
    hk_log = m.hk.log
    syncs = (_count_syncs(clock_log), _count_syncs(hk_log))
    oldest = board.clock.ticks_us()
    young_passes = 0
    for k in range(6):
        _push_pps(m.tdc, k)
        assert hk_log.append(b'{"k": %d}' % k) == k
        before = syncs[0].count + syncs[1].count
        sched.run_once()
        during = syncs[0].count + syncs[1].count - before
        assert during <= 1, k
        if _age_us(oldest) < m.store.sync_age_us:
            young_passes += 1
            assert during == 0, (k, [s.count for s in syncs])  # main: 2 a pass
    assert m.discipline.records == 6
    assert young_passes > 0
    # both logs due (the clock log's first record came in the first pass)
    while min(_age_us(clock_log.unsynced_since_us), _age_us(hk_log.unsynced_since_us)) < (
        m.store.sync_age_us
    ):
        pass
    for _ in range(2):
        before = syncs[0].count + syncs[1].count
        sched.run_once()
        assert syncs[0].count + syncs[1].count - before == 1
    assert clock_log.durable_seq == 5 and hk_log.durable_seq == 5
    assert [s.count for s in syncs] == [1, 1]
    m.store.close()
    _remove_tree(m.store.root)


def test_the_low_rate_logs_are_opened_deferred_and_synced_by_the_store():
    # every low-rate producer, as the firmware builds it, on a store with a clock
    store = storage.Storage(_fresh("t_lsync1"), -1, storage.RECORDS_PER_SYNC, board.clock)
    drain = tdc.TdcDrain(None, store, ring_events=64)
    discipline = tdc.ClockDiscipline(drain, store, _PPS_PERIOD_PS)
    epochs = tdc.EmissionEpochs(drain, store)

    class _Holder:
        pass

    holder = _Holder()
    holder.store = store
    holder.bus = None
    hk = missionmod.Housekeeping(holder)
    from payload import tracking_duty

    product = tracking_duty.TrackingProduct(None, store)
    logs = (discipline.log, epochs.log, hk.log, product.log)
    assert [log.records_per_sync for log in logs] == [0, 0, 0, 0]
    assert store.deferred == list(logs)
    store.sync_age_us = 1_000_000
    syncs = [_count_syncs(log) for log in logs]
    first = board.clock.ticks_us()
    for k in range(5):
        _push_pps(drain, k)
        discipline.step()  # a CLOCK_DISCIPLINE record per pulse
        for log in logs[1:]:
            assert log.append(b"r%d" % k) == k
    assert discipline.records == 5
    # no commit synced (on main each of the 20 did); the store's duty waits for the age
    assert [s.count for s in syncs] == [0, 0, 0, 0], [s.count for s in syncs]
    assert [log.durable_seq for log in logs] == [-1, -1, -1, -1]
    calls = 0
    youngest = product.log  # its first record was the last one committed
    while True:
        before = sum(s.count for s in syncs)
        synced = store.sync_step()
        calls += 1
        done = sum(s.count for s in syncs) - before
        assert done == (1 if synced else 0)  # one log a call at most
        if _age_us(first) < store.sync_age_us:  # the oldest still young after it: no sync
            assert done == 0
        if _age_us(youngest.unsynced_since_us) >= store.sync_age_us:
            break
    # every log due now: the rest synced one a call, each once
    while store.sync_step():
        calls += 1
    assert not store.sync_step()
    assert [s.count for s in syncs] == [1, 1, 1, 1], [s.count for s in syncs]
    assert [log.durable_seq for log in logs] == [4, 4, 4, 4]
    assert store.worst_sync_age_us >= store.sync_age_us
    assert calls > 0
    store.close()
    _remove_tree(store.root)


def test_a_deferred_record_is_synced_within_the_age_bound_even_without_the_duty():
    store = storage.Storage(_fresh("t_lsync2"), -1, storage.RECORDS_PER_SYNC, board.clock)
    store.sync_age_us = 150_000
    log = store.open_log("clock", storage.KIND_CLOCK_DISCIPLINE, 28, deferred=True)
    syncs = _count_syncs(log)
    assert log.append(b"a") == 0
    committed = log.unsynced_since_us
    # the scheduler's duty, called as passes call it: never before the age, and the first
    # call that starts with the record that old syncs it
    while True:
        age_before = _age_us(committed)
        synced = store.sync_step()
        age_after = _age_us(committed)
        if synced:
            assert age_after >= store.sync_age_us, age_after
            break
        assert age_before < store.sync_age_us, age_before
        assert syncs.count == 0 and log.durable_seq == -1
    assert syncs.count == 1 and log.durable_seq == 0
    # no duty running (a store used without the scheduler): the next commit after twice
    # the age syncs, so a record is never left unsynced much longer than the bound
    assert log.append(b"b") == 1
    assert syncs.count == 1
    while _age_us(log.unsynced_since_us) < 2 * store.sync_age_us:
        pass
    assert log.append(b"c") == 2
    assert syncs.count == 2 and log.durable_seq == 2
    # a store without a clock (tools, tests) keeps the old per-record sync
    plain = storage.Storage(_fresh("t_lsync2p"))
    other = plain.open_log("clock", storage.KIND_CLOCK_DISCIPLINE, 28, deferred=True)
    assert other.records_per_sync == 1 and plain.deferred == []
    assert other.append(b"x") == 0 and other.durable_seq == 0
    store.close()
    plain.close()
    _remove_tree(store.root)
    _remove_tree(plain.root)


def test_a_counter_ceiling_write_syncs_the_logs_first():
    # committed-before-durable: the first telecommand of a boot writes the counter ceiling
    # (before it acts); the records committed before it are synced before that write
    key = b"s" * 32
    root = _fresh_root(key)
    store = storage.Storage(root, -1, storage.RECORDS_PER_SYNC, board.clock)
    log = store.open_log("housekeeping", storage.KIND_HOUSEKEEPING, 64, deferred=True)
    from payload import telecommands

    ceiling = root + "/" + telecommands.LINK_DIR + "/" + telecommands.COUNTER_FILE

    def ceiling_written():
        try:
            os.stat(ceiling)
            return True
        except OSError:
            return False

    syncs = _count_syncs(log, ceiling_written)
    for k in range(3):
        assert log.append(b"hk%d" % k) == k
    assert syncs.count == 0

    class _StoreMission:
        def __init__(self, store):
            self.store = store

        def status(self):
            return {"pass_running": True}

    link, sent = _link(root, _StoreMission(store))
    link.handle(_tc(key, 1, 17, 1))  # are you alive: accepted, so its counter is kept
    assert _verification(sent[0]) == (True, 0)
    assert ceiling_written()
    assert syncs.seen[:1] == [False], syncs.seen  # synced, and before the ceiling
    assert log.durable_seq == 2
    store.close()
    _remove_tree(root)
