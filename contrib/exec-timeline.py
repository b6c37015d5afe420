#!/usr/bin/env python3
r"""Where an execution's time goes, step by step, from the kernel's side.

Record a sandbox bench against a running server with a handful of tracepoints, then pair
each execution's events by process and print the p50 of every step (docs/PERFORMANCE.md,
"An execution, step by step"):

    perf record -q -o exec.data -a -e 'syscalls:sys_enter_writev,syscalls:sys_enter_connect,\
syscalls:sys_exit_accept4,syscalls:sys_enter_sendto,syscalls:sys_enter_execve,\
sched:sched_process_fork,sched:sched_process_exit' -- \
        trident bench --url http://127.0.0.1:7200 --suite sandbox --iterations 200
    perf script -i exec.data -F comm,pid,tid,time,event,trace > exec.txt
    contrib/exec-timeline.py exec.txt "$(pgrep -f 'trident serve')"

Nothing else may run executions on that server meanwhile: the pairing follows one execution
at a time (the sandbox suite's are sequential). The steps, per execution: the server's 101
answer (its `writev`), its connect to the runner's control socket, the accept in the runner,
the handler's fork (none when a spare handler accepted), the command's clone, its exec, the
handler's `Started`, the server's `start` frame, the command's exit, the handler's `Exited`
and the server's `exit` frame.
"""

import re
import statistics
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)")
STEPS = [
    ("upgrade", "101 sent"),
    ("connect", "the server connects to the runner"),
    ("accept", "accepted in the runner"),
    ("handler", "the handler is forked (0: a spare accepted)"),
    ("clone", "the command is cloned"),
    ("exec", "the command execs"),
    ("started", "`Started` sent"),
    ("start_frame", "the `start` frame sent"),
    ("command_exit", "the command exits"),
    ("exited", "`Exited` sent"),
    ("exit_frame", "the `exit` frame sent"),
]


def events(path):
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                _comm, pid, _tid, t, event, rest = m.groups()
                yield float(t) * 1000.0, int(pid), event, rest


def child_of(rest):
    return int(re.search(r"child_pid=(\d+)", rest).group(1))


def executions(path, server):
    all_events = sorted(events(path))
    parent, forked_at = {}, {}
    for t, pid, event, rest in all_events:
        if event == "sched:sched_process_fork":
            child = child_of(rest)
            parent[child], forked_at[child] = pid, t
    current = None
    for t, pid, event, rest in all_events:
        if pid == server and event == "syscalls:sys_enter_writev":
            current = {"upgrade": t}
            continue
        if current is None:
            continue
        if pid == server and event == "syscalls:sys_enter_connect":
            current.setdefault("connect", t)
        elif event == "syscalls:sys_exit_accept4" and pid != server and "connect" in current:
            current.setdefault("accept", t)
            current.setdefault("acceptor", pid)
        elif event == "syscalls:sys_enter_execve" and "accept" in current and pid in parent:
            if "exec" in current:
                continue
            current["exec"], current["command"] = t, pid
            current["handler_pid"] = parent[pid]
            current["clone"] = forked_at[pid]
            # A handler forked after the accept, or a spare that accepted itself.
            current["handler"] = (
                forked_at[parent[pid]] if parent[pid] != current["acceptor"] else current["accept"]
            )
        elif event == "syscalls:sys_enter_sendto" and pid == current.get("handler_pid"):
            # Its first frame is `Started`, its second `Exited`.
            current.setdefault("exited" if "started" in current else "started", t)
        elif event == "syscalls:sys_enter_sendto" and pid == server and "started" in current:
            if "start_frame" not in current:
                current["start_frame"] = t
            elif "exited" in current:
                current["exit_frame"] = t
                yield current
                current = None
        elif event == "sched:sched_process_exit" and pid == current.get("command"):
            current.setdefault("command_exit", t)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = [r for r in executions(sys.argv[1], int(sys.argv[2])) if all(k in r for k, _ in STEPS)]
    if not rows:
        sys.exit("no complete execution found: is the second argument the server's pid?")
    print(f"{len(rows)} executions; p50 of each step, from the end of the one before (ms)")
    for (before, _), (step, what) in zip(STEPS, STEPS[1:]):
        took = statistics.median(r[step] - r[before] for r in rows)
        print(f"{took:8.3f}  {what}")
    total = statistics.median(r["exec"] - r["upgrade"] for r in rows)
    print(f"{total:8.3f}  101 → the command execs")
    total = statistics.median(r["exit_frame"] - r["upgrade"] for r in rows)
    print(f"{total:8.3f}  101 → the `exit` frame")


if __name__ == "__main__":
    main()
