"""Caption images with a LLaVA checkpoint: `python demos/caption.py --model DIR a.jpg b.png ...`."""
import argparse

import mm


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="llava-hf, original LLaVA or mm checkpoint directory")
    p.add_argument("--prompt", default=None, help="question about each image (default: describe it)")
    args = p.parse_args(argv)
    model = mm.load(args.model)
    for path in args.images:
        print(f"{path}: {model.caption(path, prompt=args.prompt)}")


if __name__ == "__main__":
    main()
