"""The events behind data/checkpoint-v1.bin: a checkpoint that kpimon 0.x (checkpoint format 1) wrote."""

DAY = 86_400_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def scenario_events() -> list[bytes]:
    """Users across days, purchases, refunds, invites and signups; the last two days still wait (lateness 2d)."""
    out = []
    for i in range(60):
        t = T0 + i * 3 * 3_600_000 + i * 7_001  # every 3 hours and a bit, over 7.5 days
        uid = i % 9
        kind = i % 6
        if kind == 0:
            out.append(b'{"event_id":"s%d","user_id":"u%d","type":"signup","channel":"paid_search","ts":%d}'
                       % (i, uid, t))
        elif kind == 1:
            out.append(b'{"event_id":"p%d","user_id":"u%d","type":"purchase","amount":"%d.25","ts":%d}'
                       % (i, uid, i, t))
        elif kind == 2:
            out.append(b'{"event_id":"r%d","user_id":"u%d","type":"refund","amount":"1.10","ts":%d}' % (i, uid, t))
        elif kind == 3:
            out.append(b'{"event_id":"i%d","user_id":"u%d","type":"invite","ts":%d}' % (i, uid, t))
        else:
            out.append(b'{"event_id":"l%d","user_id":"u%d","type":"login","ts":%d}' % (i, uid, t))
        if kind == 1:  # the same purchase instant twice under another id
            out.append(b'{"event_id":"q%d","user_id":"u%d","type":"purchase","amount":"2.00","ts":%d}' % (i, uid, t))
    return out
