"""The interleaved protocol of align's benchmark references (lm::reference).

align starts the reference once and then alternates: one unit of its own
work, one unit of the reference's, so that both see the same state of a
shared machine. The reference answers on stdout, one JSON object per line:

    {"ready": true}                   after setting up and one warm-up unit
    {"seconds": t, ...}               for each "run" line read from stdin
    {...final info...}                for the "done" line, then it exits
"""
import json
import sys

# The protocol owns stdout; whatever the libraries print goes to stderr.
_channel = sys.stdout
sys.stdout = sys.stderr


def reply(obj):
    print(json.dumps(obj), file=_channel, flush=True)


def ready():
    reply({"ready": True})


def next_command():
    """The next command from align: "run" or "done" ("done" at end of input)."""
    line = sys.stdin.readline()
    cmd = line.strip() or "done"
    if cmd not in ("run", "done"):
        raise SystemExit(f"unknown command {cmd!r}")
    return cmd


def serve(unit, final_info):
    """Runs `unit()` (which returns its seconds) once as a warm-up, then on
    every "run"; answers "done" with `final_info()`."""
    unit()
    ready()
    while next_command() == "run":
        reply({"seconds": unit()})
    reply(final_info())
