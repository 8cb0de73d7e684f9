"""Generate tests/data/cron/dst_reference.json: cron instants around DST changes.

For each case (a 5-field cron expression, an IANA zone and a UTC start instant)
this records two lists of the next 12 fire instants strictly after the start,
as RFC 3339 UTC strings:

* "croniter": exactly what the croniter library (see README.md for the pinned
  version) returns when iterated from a zoneinfo-aware start time.
* "expected_keel": computed here WITHOUT croniter, by walking real UTC instants
  minute by minute and applying keel's intended rules:
    1. an hour field other than a single number ("*", a step, a range, a list)
       fires at every real instant whose local wall time matches, so a
       repeated (fall-back) hour fires twice; wall times inside a
       spring-forward gap never occur and so never fire;
    2. a single-number hour field whose wall time occurs twice fires once, at
       the earlier occurrence;
    3. a single-number hour field whose wall time falls in a spring-forward
       gap fires once, at the first real instant after the gap.

Run:  python tests/data/cron/generate.py   (rewrites dst_reference.json)
"""

import json
import os
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from croniter import croniter

COUNT = 12
MINUTE = timedelta(minutes=1)

CASES = [
    ("*/15 * * * *", "America/New_York", "2026-11-01T04:50:00Z"),
    ("0 * * * *", "America/New_York", "2026-11-01T03:30:00Z"),
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z"),
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z"),
    ("*/30 * * * *", "Europe/Berlin", "2026-10-25T00:10:00Z"),
    ("0 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z"),
    ("15 * * * *", "Europe/Berlin", "2026-03-29T00:00:00Z"),
    ("*/20 1-3 * * *", "America/New_York", "2026-11-01T04:00:00Z"),
]

# (low, high) of each field: minute, hour, day of month, month, day of week.
BOUNDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def parse_utc(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone(timezone.utc)


def fmt_utc(dt):
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_field(text, low, high):
    """Return the set of values a cron field matches (numbers only, no names)."""
    values = set()
    for part in text.split(","):
        rng, _, step = part.partition("/")
        if rng == "*":
            a, b = low, high
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-"))
        else:
            a = b = int(rng)
            if step:
                b = high
        values.update(range(a, b + 1, int(step) if step else 1))
    return values


class Schedule:
    def __init__(self, expr):
        fields = expr.split()
        assert len(fields) == 5, expr
        self.minute, self.hour, self.dom, self.month, self.dow = (
            parse_field(f, *b) for f, b in zip(fields, BOUNDS)
        )
        if 7 in self.dow:
            self.dow.add(0)
        self.dom_star = fields[2].startswith("*")
        self.dow_star = fields[4].startswith("*")
        self.fixed_hour = fields[1].isdigit()

    def matches(self, wall):
        """Does a naive local wall time match?  (Vixie dom/dow OR rule.)"""
        if wall.minute not in self.minute or wall.hour not in self.hour:
            return False
        if wall.month not in self.month:
            return False
        dom_ok = wall.day in self.dom
        dow_ok = (wall.isoweekday() % 7) in self.dow
        if self.dom_star or self.dow_star:
            return dom_ok and dow_ok
        return dom_ok or dow_ok


def wall(t, tz):
    """Naive local wall time of a UTC instant, plus whether it is the repeat."""
    local = t.astimezone(tz)
    return local.replace(tzinfo=None, fold=0), local.fold == 1


def expected_keel(expr, tz, start):
    sched = Schedule(expr)
    out = []
    t = start.replace(second=0, microsecond=0) + MINUTE
    prev_wall, _ = wall(t - MINUTE, tz)
    while len(out) < COUNT:
        cur_wall, repeated = wall(t, tz)
        fire = sched.matches(cur_wall) and not (sched.fixed_hour and repeated)
        if sched.fixed_hour and not fire:
            # Rule 3: wall minutes skipped between the previous instant and
            # this one (a spring-forward gap) fire here, once.
            w = prev_wall + MINUTE
            while w < cur_wall and not fire:
                fire = sched.matches(w)
                w += MINUTE
        if fire:
            out.append(fmt_utc(t))
        prev_wall = cur_wall
        t += MINUTE
        assert t - start < timedelta(days=400), expr
    return out


def croniter_next(expr, tz, start):
    it = croniter(expr, start.astimezone(tz))
    return [fmt_utc(it.get_next(datetime)) for _ in range(COUNT)]


def main():
    cases = []
    for expr, tz_name, start_s in CASES:
        tz, start = ZoneInfo(tz_name), parse_utc(start_s)
        case = {
            "expr": expr,
            "tz": tz_name,
            "from": start_s,
            "croniter": croniter_next(expr, tz, start),
            "expected_keel": expected_keel(expr, tz, start),
        }
        for key in ("croniter", "expected_keel"):
            got = [parse_utc(s) for s in case[key]]
            assert got[0] > start and all(a < b for a, b in zip(got, got[1:])), case
        cases.append(case)
        if case["croniter"] != case["expected_keel"]:
            print("differs:", expr, tz_name, start_s)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dst_reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cases, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", path, len(cases), "cases")


if __name__ == "__main__":
    main()
