"""`python -m qwen3next.train train CONFIG [key=value ...]` or `python -m qwen3next.train data ...`: the entry
points without the main CLI (handy under torchrun: `torchrun --nproc_per_node 8 -m qwen3next.train train ...`)."""
import sys

from .commands import data_main, train_main

USAGE = "usage: python -m qwen3next.train train CONFIG [section.key=value ...] | data {corpus,tokenizer,prepare,default} ..."


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "data"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        if argv[0] == "data":
            return data_main(argv[1:])
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            return 2
        return train_main(argv[1], argv[2:])
    except (ValueError, FileNotFoundError) as e:
        print(f"qwen3next {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
