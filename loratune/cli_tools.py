"""The commands around a run: plan it (estimate, sweep) and ship it (serve, export, push). Like cli.py, each parses
its arguments first and imports torch and the rest only after."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .cli_args import config_argument, trust_flag
from .config import ConfigError, load_config, parse_overrides
from .timing import phases


def estimate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loratune estimate", usage="loratune estimate [CONFIG] [--memory SIZE] [--probe [STEPS]] [--KEY=VALUE ...]",
        description="Parameters, memory per GPU (weights, gradients, optimizer, activations), steps and, with --probe, "
                    "time of a training run, from the model's config alone: no weight is loaded (except by --probe).")
    parser.add_argument("--memory", help="also say the largest micro-batch that fits this much, e.g. 24GiB")
    parser.add_argument("--probe", nargs="?", type=int, const=20, default=0, metavar="STEPS",
                        help="train STEPS real steps (default 20) in a scratch folder to estimate the run's time")
    parser.add_argument("--no-data", action="store_true", help="skip reading the data (no step count)")
    config, rest = config_argument(argv)
    args, rest = parser.parse_known_args(rest)
    cfg = load_config(config, parse_overrides(rest))
    with phases("import"):
        from .plan.estimate import parse_memory, run_estimate

    memory = parse_memory(args.memory) if args.memory else None
    if args.probe < 0:
        parser.error("--probe: give a number of steps, 1 or more")
    print(run_estimate(cfg, memory, args.probe, read_data=not args.no_data))
    return 0


def sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loratune sweep", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="loratune sweep [CONFIG] (--grid KEY=V1,V2,... [...] | --search SPACE.yaml --trials N) [--dir DIR] "
              "[--storage URL] [--join] [--KEY=VALUE ...]",
        description="Train one run per trial over a grid or an Optuna search (TPE, median pruning), each an ordinary "
                    "run directory in the sweep folder; resumable, and several workers may share one storage.",
        epilog="SPACE.yaml maps dotted keys to {low: A, high: B} (log: true, step: N optional) or a list of values; "
               "see loratune/plan/space.py.")
    parser.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="every combination of these values")
    parser.add_argument("--search", metavar="SPACE.yaml", help="search these ranges with Optuna's TPE sampler")
    parser.add_argument("--trials", type=int, help="--search: trials in all, over every worker")
    parser.add_argument("--dir", help="the sweep folder (default: the config's output_dir + '-sweep')")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///DIR/sweep.db); a database server "
                                          "lets workers on several machines share the sweep")
    parser.add_argument("--join", action="store_true", help="work on the sweep stored there, with its own settings")
    parser.add_argument("--prune", choices=["on", "off"], help="stop a trial whose held-out loss is above the median "
                                                               "of the others at the same step (default: on for "
                                                               "--search, off for --grid)")
    config, rest = config_argument(argv)
    args, rest = parser.parse_known_args(rest)
    if not args.join and bool(args.grid) == bool(args.search):
        parser.error("give --grid KEY=V1,V2,... or --search SPACE.yaml --trials N (or --join an existing sweep)")
    if args.search and not args.join and (args.trials is None or args.trials < 1):
        parser.error("--search needs --trials N (1 or more): how many trials to run in all")
    if args.join and (args.grid or args.search or config or rest):
        parser.error("--join works on the stored sweep as it is: give only --dir or --storage (and --prune)")
    if args.join and not args.dir:
        parser.error("--join needs the sweep's --dir (its trials' run directories are there)")
    from .plan.space import base_config, parse_grid, parse_space

    space = None
    if not args.join:
        base = base_config(config, parse_overrides(rest))
        if not base["train"]["eval_every"]:
            raise ConfigError("a sweep ranks trials by their held-out loss: set train.eval_every (e.g. "
                              "--train.eval_every=25) and hold out data")
        space = parse_grid(args.grid, base) if args.grid else parse_space(args.search, base, args.trials)
    sweep_dir = Path(args.dir or f"{space.base['output_dir']}-sweep")
    storage = args.storage or f"sqlite:///{sweep_dir.resolve() / 'sweep.db'}"
    with phases("import"):
        from .plan.sweep import run_sweep
        from .plan.sweep_report import table, trial_rows, write_html

    study, space = run_sweep(space, sweep_dir, storage, args.join, None if args.prune is None else args.prune == "on")
    rows = trial_rows(study, sweep_dir)
    text = table(rows)
    print(text)
    print(f"wrote {write_html(sweep_dir, rows, text)}")
    return 0


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loratune serve", description="An OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, "
        "/v1/completions) for one or more runs of one base model, each a model name, plus the base itself. Adapters "
        "stay unmerged: requests for different runs share forward passes.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run or PEFT adapter folder, or NAME=RUN_DIR "
                        "(default name: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LORATUNE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every request (default: $LORATUNE_API_KEY)")
    parser.add_argument("--max-batch", type=int, default=32, help="requests decoded together at most")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting at most; more are answered 503 with Retry-After")
    parser.add_argument("--max-tokens", type=int, default=2048, help="the largest max_tokens a request may ask for")
    parser.add_argument("--device", default="auto")
    trust_flag(parser)
    args = parser.parse_args(argv)
    for flag in ("max_batch", "max_queue", "max_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be 1 or more")
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port}: give a port from 0 to 65535")
    with phases("import"):
        from .serve.main import serve

    return serve(args.runs, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                 max_queue=args.max_queue, max_tokens=args.max_tokens, device=args.device,
                 trust_remote_code=args.trust_remote_code, base=args.base)


def export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune export", description="Write the merged model (or with --lora-only "
                                     "the adapter alone) as a GGUF file for llama.cpp, Ollama, LM Studio, llm.")
    parser.add_argument("run_dir")
    parser.add_argument("out", metavar="OUT.gguf")
    parser.add_argument("--type", default="f16", choices=["f16", "q8_0", "f32"],
                        help="weights of the file (norms and biases stay f32); --lora-only: f16 or f32")
    parser.add_argument("--lora-only", action="store_true",
                        help="the adapter alone, for llama.cpp's --lora on the base model's GGUF file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if loratune exported it earlier")
    trust_flag(parser)
    args = parser.parse_args(argv)
    with phases("import"):
        from .export.gguf import export, gguf_source
        from .export.gguf_lora import export_lora
        from .runs import load_run_config

    write = export_lora if args.lora_only else export
    out = write(args.run_dir, args.out, args.type, args.overwrite, args.trust_remote_code, args.base)
    hint = f"llama-cli -m {out}"
    if args.lora_only:
        base_file = gguf_source(load_run_config(args.run_dir, base=args.base))
        hint = f"llama-cli -m {base_file or 'BASE.gguf (the base converted by llama.cpp convert_hf_to_gguf.py)'} --lora {out}"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); run it with: {hint}")
    return 0


def push(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loratune push", description="Upload a run (adapter, tokenizer, model card, "
                                     "config) to a Hugging Face hub repository, through huggingface_hub.")
    parser.add_argument("run_dir")
    parser.add_argument("repo_id", help="user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    args = parser.parse_args(argv)
    from .export.push import push

    print(f"pushed {args.run_dir} to {push(args.run_dir, args.repo_id, args.private)}")
    return 0
