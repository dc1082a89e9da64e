"""Write a random tiny Qwen3 with the real Qwen3 tokenizer to a local folder (no hub access).

    python scripts/make_tiny_qwen3.py outputs/models/tiny-qwen3 [--seed 0]
"""

import argparse

from qwen3train.models.tiny import make_tiny_qwen3

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="outputs/models/tiny-qwen3")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_qwen3(args.out, seed=args.seed))
