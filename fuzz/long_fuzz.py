"""Long fuzzing run (not CI): at least 1,000,000 mutated frames through both parsers.

Each input is a seed frame (Scapy-built, every link type, plus the shared captures' records) with
random byte flips, insertions, cuts and lying length fields, under a random link type. The scalar
parser must never raise and the vectorised parser must agree with it row for row.

    python fuzz/long_fuzz.py [--inputs 1000000] [--seed 1] [--structure]

With --structure, the inputs are whole pcap/pcapng files damaged in their structure instead
(fuzz/structure_fuzz.py: cut blocks, lying lengths, huge lengths, sections of both byte orders).
"""

from __future__ import annotations

import argparse
import random
import time

import structure_fuzz
from corpus import LINKTYPES, built_frames, file_frames

from analysis.headers import LocalMatcher, pack_records, pack_records_scalar, parse_frame


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random mutation: flips, a lying 16-bit field, an insertion, or a cut."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if b and op < 0.4:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif len(b) > 2 and op < 0.6:
            i = rng.randrange(len(b) - 1)
            b[i:i + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x00\x05", b"\x05\xdc"])
        elif op < 0.8:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del b[rng.randrange(len(b) + 1):]
    return bytes(b)


def run(inputs: int, seed: int, batch: int = 2000, engine=None) -> int:
    """Fuzz `inputs` frames; returns how many ran. With `engine`, each batch also goes through its
    counters and detectors."""
    rng = random.Random(seed)
    seeds = built_frames() + file_frames()
    matcher = LocalMatcher(nets=[])
    done = 0
    while done < inputs:
        recs = []
        for _ in range(min(batch, inputs - done)):
            lt, data = rng.choice(seeds)
            if rng.random() < 0.2:
                lt = rng.choice(LINKTYPES)
            frame = mutate(rng, data)
            parse_frame(lt, frame)  # must not raise
            recs.append((float(done), frame, len(frame), lt))
        fast, slow = pack_records(recs, matcher), pack_records_scalar(recs, matcher)
        if fast.tobytes() != slow.tobytes():
            bad = next(i for i in range(len(recs)) if fast[i].tobytes() != slow[i].tobytes())
            raise AssertionError(f"parsers disagree on linktype {recs[bad][3]} frame {recs[bad][1].hex()}")
        if engine is not None:
            engine.ingest_records(recs)
        done += len(recs)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--structure", action="store_true", help="fuzz the file readers' structure, not frames")
    args = ap.parse_args()
    t = time.perf_counter()
    if args.structure:
        tallies = structure_fuzz.run(args.inputs, args.seed)
        print(f"structure-fuzzed {tallies['inputs']:,} files ({tallies['cut']:,} cut, {tallies['other']:,} "
              f"otherwise damaged) in {time.perf_counter() - t:.0f} s, seed {args.seed}: no exception, every "
              f"record before the damage kept, every error names where")
        return
    n = run(args.inputs, args.seed)
    print(f"fuzzed {n:,} inputs in {time.perf_counter() - t:.0f} s: no exception, both parsers agree")


if __name__ == "__main__":
    main()
