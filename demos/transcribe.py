"""Transcribe audio with word timestamps: `python demos/transcribe.py [--model DIR] speech.wav ...`.

Without --model: the shipped multimodal model (its decoder writes the text, its CTC head times the words)."""
import argparse

import mm
import mm.assets
import mm.models.multimodal


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("audio", nargs="*", help="audio files (default: the bundled example)")
    p.add_argument("--model", default=None, help="ESPnet/Dolphin experiment, mm ASR or multimodal directory "
                   "(default: the shipped multimodal model)")
    p.add_argument("--decode", default=None, choices=["ctc", "attention", "joint", "rescore"])
    args = p.parse_args(argv)
    asr = mm.load(args.model)
    for path in args.audio or [str(mm.assets.example("question.wav"))]:
        if isinstance(asr, mm.models.multimodal.MultimodalModel):
            result = asr.transcript(path)
        else:
            result = asr.transcribe(path, decode=args.decode, timestamps=True)
        print(f"{path}: {result.text}")
        for w in result.words:
            print(f"  {w.start:7.2f} {w.end:7.2f}  {w.text}")


if __name__ == "__main__":
    main()
