"""The `loratune` command: main() and the commands of a run itself (train, eval, chat, generate, merge, report, doctor,
prepare); those around a run are in cli_tools.py."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from .cli_args import config_argument, trust_flag
from .cli_tools import estimate, export, push, serve, sweep
from .config import Config, ConfigError, field_docs, load_config, parse_overrides
from .timing import phases, seconds_since_process_start

# The commands import torch, transformers and peft themselves, and only once their arguments parsed: `--help`
# and bad arguments answer in a fraction of a second.


def config_reference(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per config key with its default and docstring: the CLI help and the README table."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines += config_reference(hints[f.name], key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            lines += config_reference(type(default[0]), key + "[].")
            continue
        lines.append(f"  --{key}={default!r}\n      {docs.get(f.name, '')}")
    return lines


def write_readme_reference(readme: str = "README.md") -> None:
    """Regenerate the config reference block of the README from the dataclasses (`make docs`)."""
    import re
    from pathlib import Path

    path = Path(readme)
    block = "```\n" + "\n".join(config_reference()) + "\n```"
    text = re.sub(r"(<!-- config-reference:[^\n]*-->\n)```.*?```", lambda m: m.group(1) + block, path.read_text(), flags=re.S)
    path.write_text(text)


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loratune train", allow_abbrev=False, usage="loratune train [CONFIG] [--overwrite] [--resume RUN_DIR] [--nproc N] "
        "[--KEY=VALUE ...]", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LoRA adapter. With no CONFIG, uses the shipped default (embedded model + demo data).",
        epilog="config keys (set in YAML or as --key=value):\n" + "\n".join(config_reference()))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue RUN_DIR's newest checkpoint, with its config.yaml unless CONFIG is given")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train with N processes on this machine (one per GPU): the same as torchrun "
                             "--standalone --nproc_per_node N -m loratune train ...")
    config_arg, argv_rest = config_argument(argv)
    args, rest = parser.parse_known_args(argv_rest)
    args.config = config_arg
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc}: the number of processes must be 1 or more")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .training.distributed import launch

        return launch(args.nproc, [a for i, a in enumerate(argv) if not _is_nproc_arg(argv, i)])
    overrides = parse_overrides(rest)
    config = args.config
    if args.resume:
        overrides.append(("output_dir", args.resume))
        config = config or _resumed_config(Path(args.resume))
    cfg = load_config(config, overrides)
    with phases("import"):
        from .plan.estimate import check_fits
        from .training.recipe import train

    if os.environ.get("RANK", "0") == "0":
        with phases("estimate"):
            check_fits(cfg)

    # The user's own config file is protected from --overwrite; a resumed run's config.yaml is the run's.
    run_dir, final = train(cfg, overwrite=args.overwrite, resume=True if args.resume else None,
                           protect=[args.config] if args.config else [])
    if final.get("interrupted") or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks
        return 0
    print(f"run saved to {run_dir}  (final loss {final['train_loss']:.4f}, {final['steps']} steps)")
    print(f"next: loratune eval {run_dir}   |   loratune chat {run_dir}")
    return 0


def _resumed_config(run_dir: Path) -> Path:
    """--resume RUN_DIR without CONFIG: the run's own config.yaml, or an error that says what RUN_DIR is."""
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such directory; pass the output_dir of an earlier `loratune train`")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: not a loratune run (no config.yaml there); pass the output_dir of an "
                          "earlier `loratune train`")
    return run_dir / "config.yaml"


def _is_nproc_arg(argv: list[str], i: int) -> bool:
    """`--nproc N`, `--nproc=N`: the launcher's own option, not passed on to the processes it starts."""
    return argv[i] == "--nproc" or argv[i].startswith("--nproc=") or (i > 0 and argv[i - 1] == "--nproc")


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune eval",
                                     description="The base model and one or more runs side by side, per dataset and overall.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs of the same base model")
    parser.add_argument("--file", help="evaluate on every record of this file instead of the first run's held-out split")
    parser.add_argument("--format", choices=["chat", "completion", "text"], help="the file's format (default: read it like the run's first dataset)")
    parser.add_argument("--max_length", type=int, help="sliding-window perplexity: tokens per window")
    parser.add_argument("--stride", type=int, help="sliding-window perplexity: tokens between window starts")
    parser.add_argument("--out", help="JSON results (default RUN_DIR/eval.json, or eval-FILE.json with --file)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=3, help="before/after examples to print")
    trust_flag(parser)
    args = parser.parse_args(argv)
    with phases("import"):
        from .evaluation.compare import evaluate

    evaluate(args.run_dirs, device=args.device, samples=args.samples, file=args.file, file_format=args.format,
             max_length=args.max_length, stride=args.stride, out=args.out, trust_remote_code=args.trust_remote_code,
             base=args.base)
    return 0


def _chat(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune chat", description="Chat with a trained adapter (reads stdin without a TTY).")
    parser.add_argument("run_dir")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--device", default="auto")
    trust_flag(parser, with_template=True)
    args = parser.parse_args(argv)
    with phases("import"):
        from .inference.chat import chat_loop
        from .inference.load import load

    with phases("model"):
        model, tok = load(args.run_dir, args.device, merge_adapter=True, trust_remote_code=args.trust_remote_code,
                          base=args.base, template=args.template)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {}
    chat_loop(model, tok, system=args.system, max_new_tokens=args.max_new_tokens, **sampling)
    return 0


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune generate", description="Batch generation from a run, resumable.")
    parser.add_argument("run_dir")
    parser.add_argument("--input", required=True, help=".txt (one chat prompt per line) or .jsonl (messages or prompt)")
    parser.add_argument("--output", required=True, help=".txt (one result per line) or .jsonl (input record + output)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="prompts per batch (default: as many as half the free GPU memory holds; 32 on the CPU)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=1, help="beam search when > 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", default=None, help="system prompt for chat prompts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output file that holds other outputs")
    trust_flag(parser, with_template=True)
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size}: give 1 or more, or leave it out to fit the free GPU memory")
    with phases("import"):
        from .inference.batch import generate_file, plan
        from .inference.load import load

    settings = {"run_dir": str(Path(args.run_dir).resolve()), "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "top_p": args.top_p, "num_beams": args.num_beams, "seed": args.seed,
                "system": args.system, "template": args.template}
    sampling = args.temperature > 0
    job = plan(args.input, args.output, settings, overwrite=args.overwrite, sampling=sampling)  # before the model loads
    if job.done == len(job.prompts):
        print(f"nothing to do: {args.output} already holds all {job.done} outputs")
        return 0
    with phases("model"):
        model, tok = load(args.run_dir, args.device, merge_adapter=True, trust_remote_code=args.trust_remote_code,
                          base=args.base, template=args.template)
    options = {"num_beams": args.num_beams} if args.num_beams > 1 else {}
    if sampling:
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    with phases("generate"):
        n = generate_file(model, tok, job, args.max_new_tokens, args.batch_size, args.system, args.seed, **options)
    print(f"generated {n} outputs into {args.output}")
    return 0


def _merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune merge", description="Write base + adapter as one plain model.")
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights of the merged model (auto: the base's own dtype)")
    trust_flag(parser)
    args = parser.parse_args(argv)
    with phases("import"):
        from .inference.merge import merge

    print(f"merged model written to {merge(args.run_dir, args.out_dir, args.trust_remote_code, args.dtype, args.base)} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune report", description="Write RUN_DIR/report.html: curves, metrics, samples.")
    parser.add_argument("run_dir")
    parser.add_argument("--samples", type=int, default=8, help="sample generations to show")
    args = parser.parse_args(argv)
    from .evaluation.report import write_report

    print(f"wrote {write_report(args.run_dir, args.samples)}")
    return 0


def _doctor(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune doctor", usage="loratune doctor [CONFIG] [--KEY=VALUE ...]",
                                     description="Check a config's data before training (default config: the shipped "
                                                 "one).")
    config, rest = config_argument(argv)
    parser.parse_known_args(rest)  # --help
    from .data.doctor import doctor

    return doctor(load_config(config, parse_overrides(rest)))


def _prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune prepare", description="Turn raw lines into QA training records.")
    parser.add_argument("raw", help="a text file, one raw line per example")
    parser.add_argument("out", help="the .jsonl file to write")
    parser.add_argument("--rules", required=True, help="YAML rules (see loratune/data/prepare.py: PrepareRules)")
    args = parser.parse_args(argv)
    from .data.prepare import load_rules, prepare

    counts = prepare(args.raw, args.out, load_rules(args.rules))
    for source, n in counts.most_common():
        print(f"{n:6d}  {source}{'  (skipped)' if source == 'unmatched' else ''}")
    print(f"wrote {sum(n for s, n in counts.items() if s != 'unmatched')} records to {args.out}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "chat": _chat, "generate": _generate, "merge": _merge,
            "report": _report, "doctor": _doctor, "prepare": _prepare, "push": push, "serve": serve,
            "estimate": estimate, "export": export, "sweep": sweep}


TIMED = ("train", "eval", "generate", "merge", "chat", "export", "sweep")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"loratune {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: loratune {{{','.join(COMMANDS)}}} ...  (loratune COMMAND --help for details; loratune --version)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=os.environ.get("LORATUNE_LOG", "INFO"), format="%(message)s")
    for name in ("transformers", "peft", "absl", "gguf"):  # their info logs drown ours; warnings still show
        logging.getLogger(name).setLevel(logging.WARNING)
    phases.reset()
    phases.add("import", seconds_since_process_start())
    try:
        code = COMMANDS[argv[0]](argv[1:])
        if code == 0 and argv[0] in TIMED and os.environ.get("RANK", "0") == "0":
            print(f"time: {phases.summary(seconds_since_process_start())}", file=sys.stderr)  # where the wait went, for every long command
        return code
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1
