"""The interleaved protocol of align's benchmark references.

align starts the reference once and then alternates: one unit of its own
work, one unit of the reference's, so that both see the same state of a
shared machine. The reference answers on stdout, one JSON object per line:

    {"ready": true}                   after setting up and one warm-up unit
    {"seconds": t}                    for each "run" line read from stdin
    {...final info...}                for the "done" line, then it exits
"""
import json
import sys


def serve(unit, final_info):
    """Runs `unit()` (which returns its seconds) once as a warm-up, then on
    every "run" line of stdin; prints `final_info()` on "done"."""
    unit()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            print(json.dumps({"seconds": unit()}), flush=True)
        elif cmd == "done":
            break
        else:
            raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(final_info()), flush=True)
