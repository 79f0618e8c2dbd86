"""Reads a sched_switch trace (tracefs text) and prints the longest off-CPU intervals of the
threads named vcpuN, with the threads that ran on that CPU meanwhile (ms each).
Usage: vcpu_gaps.py TRACE [OVER_MS]"""
import collections
import re
import sys

SWITCH = re.compile(
    r"\[(\d+)\].*?\s([\d.]+): sched_switch: prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ "
    r"prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)


def main(path, over_ms):
    left = {}  # vCPU pid -> (time, state, cpu) when it left its CPU
    gaps = []
    timeline = collections.defaultdict(list)  # cpu -> [(time, comm that starts running)]
    for line in open(path, errors="replace"):
        m = SWITCH.search(line)
        if not m:
            continue
        cpu, t = int(m.group(1)), float(m.group(2))
        prev, prev_pid, state, nxt, next_pid = m.group(3), int(m.group(4)), m.group(5), m.group(6), int(m.group(7))
        timeline[cpu].append((t, nxt))
        if prev.startswith("vcpu"):
            left[prev_pid] = (t, state, cpu)
        if nxt.startswith("vcpu") and next_pid in left:
            t0, st, cpu0 = left.pop(next_pid)
            gaps.append((t - t0, t0, st, cpu0, next_pid))
    gaps.sort(reverse=True)
    print(f"{len(gaps)} off-CPU intervals of vCPU threads; those over {over_ms} ms "
          "(state R: preempted, S: asleep, e.g. paused):")
    for length, t0, state, cpu, pid in gaps:
        if length * 1e3 < over_ms:
            break
        ran = collections.Counter()
        events = timeline[cpu]
        for (start, comm), (end, _) in zip(events, events[1:] + [(float("inf"), "")]):
            s, e = max(start, t0), min(end, t0 + length)
            if e > s:
                ran[comm] += e - s
        who = ", ".join(f"{c} {d * 1e3:.2f}" for c, d in ran.most_common(4))
        print(f"{length * 1e3:7.2f} ms at {t0:.4f}s vcpu pid {pid} state {state} cpu{cpu}: {who}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
