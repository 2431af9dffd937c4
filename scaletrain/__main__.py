"""``scaletrain`` command: ``prepare``, ``train-tokenizer``, ``train``, ``convert``, ``estimate`` and ``plot``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The ``scaletrain`` command's parser (``train`` and ``convert`` hand their arguments on unparsed)."""
    from scaletrain.cli import FlagParser

    p = argparse.ArgumentParser(prog="scaletrain")
    sub = p.add_subparsers(dest="command", required=True, parser_class=FlagParser)
    from scaletrain.data.prepare import add_prepare_args
    from scaletrain.data.sources import SUFFIXES_HELP
    from scaletrain.data.text import add_reading_args

    add_prepare_args(sub.add_parser("prepare", help="text -> tokenized WebDataset shards for one domain"))
    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json on a corpus")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=f"files or folders, read as prepare reads them: {SUFFIXES_HELP}")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="path of the tokenizer.json to write")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    add_reading_args(t)
    sub.add_parser("train", help="pre-train (same flags as launch/pretrain.py)", add_help=False)
    sub.add_parser("convert", help="checkpoint -> Hugging Face safetensors (launch/convert.py)", add_help=False)
    sub.add_parser("estimate", help="memory per device of a run (the training flags plus --world-size)",
                   add_help=False)
    sub.add_parser("plot", help="loss, val loss per domain, lr and tokens/s of runs into a PNG", add_help=False)
    p.set_defaults(subcommands=sub.choices)  # the parsers, for an unknown flag's hint from the command's own
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    if argv and argv[0] == "convert":
        from scaletrain.convert import main as convert_main

        convert_main(argv[1:])
        return
    if argv and argv[0] in ("estimate", "plot"):
        import importlib

        importlib.import_module(f"scaletrain.{argv[0]}").main(argv[1:])
        return
    if argv and argv[0] == "train":
        from scaletrain.cli import pretrain_main

        pretrain_main(argv[1:])
    args, extra = p.parse_known_args(argv)
    if extra:  # the subcommand's parser names what was likely meant
        args.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    from scaletrain.errors import run_entry

    def run() -> None:
        if args.command == "prepare":
            from scaletrain.data.prepare import run_prepare

            run_prepare(args)
        else:
            from scaletrain.data.text import reading_options
            from scaletrain.data.tokenizer import train_bpe

            out, size = train_bpe(args.input, args.vocab_size, args.output, args.min_frequency, reading_options(args),
                                  args.overwrite)
            note = "" if size == args.vocab_size else (
                f"; fewer than --vocab-size {args.vocab_size}: the corpus had no more merges seen at least "
                f"--min-frequency {args.min_frequency} times")
            print(f"wrote {out} (vocab {size}{note})")

    run_entry(run)


if __name__ == "__main__":
    main()
