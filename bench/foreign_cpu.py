#!/usr/bin/env python3
"""What else uses the CPUs while a benchmark runs (for bench/channels.sh).

    foreign_cpu.py INTERVAL OUT ROOT...

Every INTERVAL seconds appends one line to OUT:

    <unix time> <foreign %> <compilers> <top>

- foreign %: CPU time used over the interval by processes that are not descendants of a ROOT,
  in % of one CPU (200 = both CPUs of a 2-core machine). Kernel threads are left out.
- compilers: `-`, or the names among rustc, cargo, cc1, ld, … that used CPU in the interval
  (another engineer's build on a shared machine).
- top: the three foreign processes that used most, as name:percent.

A ROOT is a process id, or a file whose first line is one (a PostgreSQL postmaster.pid, read
again each time: the cluster may start later). Processes that start and end within one interval
are not seen; a compiler run lasts longer.
"""
import os
import sys
import time

COMPILERS = {
    "rustc", "cargo", "cargo-nextest", "clippy-driver", "rust-analyzer", "cc1", "cc1plus", "cc", "c++",
    "gcc", "g++", "ld", "ld.lld", "rust-lld", "mold", "collect2", "as",
}
HZ = os.sysconf("SC_CLK_TCK")


def snapshot():
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is field 3 of proc(5): ppid is field 4, utime 14, stime 15.
        procs[int(entry)] = (comm, int(fields[1]), int(fields[11]) + int(fields[12]))
    return procs


def roots(args):
    found = set()
    for arg in args:
        try:
            if arg.isdigit():
                found.add(int(arg))
            else:
                with open(arg) as f:
                    found.add(int(f.readline().strip()))
        except (OSError, ValueError):
            pass
    return found


def main():
    interval, out, root_args = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    previous, before = snapshot(), time.monotonic()
    with open(out, "a", buffering=1) as log:
        while True:
            time.sleep(interval)
            current, now = snapshot(), time.monotonic()
            children = {}
            for pid, (_, ppid, _) in current.items():
                children.setdefault(ppid, []).append(pid)
            ours, stack = set(), [pid for pid in roots(root_args) if pid in current]
            while stack:
                pid = stack.pop()
                if pid not in ours:
                    ours.add(pid)
                    stack.extend(children.get(pid, []))
            used, compilers = {}, set()
            for pid, (comm, ppid, ticks) in current.items():
                if pid in ours or pid == 2 or ppid == 2:
                    continue
                delta = ticks - previous[pid][2] if pid in previous else ticks
                if delta <= 0:
                    continue
                used[comm] = used.get(comm, 0) + delta
                if comm in COMPILERS:
                    compilers.add(comm)
            seconds = max(now - before, 1e-3)
            share = lambda ticks: 100.0 * ticks / HZ / seconds
            top = sorted(used.items(), key=lambda item: -item[1])[:3]
            log.write("%.1f %.0f %s %s\n" % (
                time.time(), share(sum(used.values())), ",".join(sorted(compilers)) or "-",
                " ".join("%s:%.0f" % (comm.replace(" ", "_"), share(ticks)) for comm, ticks in top) or "-"))
            previous, before = current, now


if __name__ == "__main__":
    main()
