"""Reads a sched_switch trace (tracefs text) and prints the longest off-CPU intervals of the
threads named vcpuN, with the threads that ran on that CPU meanwhile (ms each), each as
comm/thread id[/process id when the trace recorded it (tracefs option record-tgid)].
Usage: vcpu_gaps.py TRACE [OVER_MS]"""
import collections
import re
import sys

SWITCH = re.compile(
    r"-(\d+)\s+(?:\(\s*(\d+|-+)\)\s+)?\[(\d+)\].*?\s([\d.]+): sched_switch: prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ "
    r"prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)


def main(path, over_ms):
    left = {}  # vCPU pid -> (time, state, cpu) when it left its CPU
    gaps = []
    timeline = collections.defaultdict(list)  # cpu -> [(time, thread that starts running)]
    process = {}  # thread id -> process id, where the trace recorded it
    for line in open(path, errors="replace"):
        m = SWITCH.search(line)
        if not m:
            continue
        tid, tgid = int(m.group(1)), m.group(2)
        if tgid and tgid.isdigit():
            process[tid] = int(tgid)
        cpu, t = int(m.group(3)), float(m.group(4))
        prev, prev_pid, state, nxt, next_pid = m.group(5), int(m.group(6)), m.group(7), m.group(8), int(m.group(9))
        timeline[cpu].append((t, (nxt, next_pid)))
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
        for (start, comm), (end, _) in zip(events, events[1:] + [(float("inf"), ("", 0))]):
            s, e = max(start, t0), min(end, t0 + length)
            if e > s:
                ran[comm] += e - s
        name = lambda c: f"{c[0]}/{c[1]}" + (f"/{process[c[1]]}" if c[1] in process else "")
        who = ", ".join(f"{name(c)} {d * 1e3:.2f}" for c, d in ran.most_common(4))
        print(f"{length * 1e3:7.2f} ms at {t0:.4f}s {name(('vcpu', pid))} state {state} cpu{cpu}: {who}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
