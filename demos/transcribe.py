"""Transcribe audio with word timestamps: `python demos/transcribe.py --model DIR speech.wav ...`."""
import argparse

import mm


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("audio", nargs="+")
    p.add_argument("--model", required=True, help="ESPnet/Dolphin experiment directory or mm ASR checkpoint")
    p.add_argument("--decode", default=None, choices=["ctc", "attention", "joint", "rescore"])
    args = p.parse_args(argv)
    asr = mm.load(args.model)
    for path in args.audio:
        result = asr.transcribe(path, decode=args.decode, timestamps=True)
        print(f"{path}: {result.text}")
        for w in result.words:
            print(f"  {w.start:7.2f} {w.end:7.2f}  {w.text}")


if __name__ == "__main__":
    main()
