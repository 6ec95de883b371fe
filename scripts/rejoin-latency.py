#!/usr/bin/env python3
# Fast rejoin (#19 item 3): how long a restarted peer takes from its process start to the state
# adopted and to its first contribution, read from a P2P run directory's merged events.jsonl and
# metrics.csv.
#
#   python3 scripts/rejoin-latency.py RUN_DIR [RUN_DIR ...]
#
# For each restart of a peer (a `node_restart` event of the launcher, written right after the
# spawn), in ms after it:
#   start    the restarted peer's `start` event (node set up: data, model, network);
#   adopted  its `synced` event (the state of a live peer adopted, round entered);
#   first    the first metrics row of another peer, after the restart and after the round it
#            entered, whose round had every peer as contributor (the restarted one included);
#   cold     cold starts in the restarted peer's ledger (its whole life after the last restart).
import csv
import json
import sys
from pathlib import Path


def events(run):
    with open(run / "events.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def rejoins(run):
    ev = events(run)
    nodes = next(e["nodes"] for e in ev if e["event"] == "start" and "nodes" in e)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    for r in (e for e in ev if e["event"] == "node_restart" and e["node"] == "peer"):
        i, t0 = r["index"], r["t_ms"]
        mine = [e for e in ev if e.get("peer") == i and e["t_ms"] >= t0]
        start = next(e["t_ms"] for e in mine if e["event"] == "start")
        synced = next(e for e in mine if e["event"] == "synced")
        first = min(
            int(row["t_ms"])
            for row in rows
            if int(row["peer"]) != i
            and int(row["t_ms"]) > t0
            and int(row["round"]) > synced["round"]
            and int(row["contributors"]) == nodes
        )
        ledger = list(csv.DictReader(open(run / "peers" / str(i) / "ledger.csv")))
        cold = sum(1 for l in ledger if l["cold_start"] == "true")
        yield i, start - t0, synced["t_ms"] - t0, first - t0, cold, len(ledger)


def main():
    print("run\tpeer\tstart_ms\tadopted_ms\tfirst_ms\tcold_starts/invocations")
    for arg in sys.argv[1:]:
        for i, start, adopted, first, cold, n in rejoins(Path(arg)):
            print(f"{arg}\t{i}\t{start}\t{adopted}\t{first}\t{cold}/{n}")


if __name__ == "__main__":
    main()
