"""Caption images: `python demos/caption.py [--model DIR] a.jpg b.png ...` (default: the shipped multimodal model
and the bundled example scene)."""
import argparse

import mm
import mm.assets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="*", help="image files (default: the bundled example)")
    p.add_argument("--model", default=None, help="multimodal, llava-hf, original LLaVA or mm-llava directory")
    p.add_argument("--prompt", default=None, help="question about each image (default: describe it)")
    args = p.parse_args(argv)
    model = mm.load(args.model)
    for path in args.images or [str(mm.assets.example("scene.png"))]:
        print(f"{path}: {model.caption(path, prompt=args.prompt)}")


if __name__ == "__main__":
    main()
