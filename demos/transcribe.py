"""Transcribe audio with word timestamps: `python demos/transcribe.py [--model DIR] speech.wav ...`.

Without --model: the shipped multimodal model (its decoder writes the text, its CTC head times the words)."""
import argparse

import mm
import mm.assets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("audio", nargs="*", help="audio files (default: the bundled example)")
    p.add_argument("--model", default=None, help="ESPnet/Dolphin experiment, mm ASR or multimodal directory "
                   "(default: the shipped multimodal model)")
    p.add_argument("--decode", default=None, choices=["ctc", "attention", "joint", "rescore"])
    args = p.parse_args(argv)
    asr = mm.load(args.model)
    for path in args.audio or [str(mm.assets.example("question.wav"))]:
        result = asr.transcript(path, decode=args.decode)
        print(f"{path}: {result.text}")
        for w in result.words:
            print(f"  {w.start:7.2f} {w.end:7.2f}  {w.text}")


if __name__ == "__main__":
    main()
