"""`hf-weightprune` command line: prune, inspect, sweep, push. Thin: parsing, then library calls."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _floats_or_float(text: str):
    """`0.5` -> 0.5; `'{"mlp.*": 0.6}'` (JSON object) -> per-module targets."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--sparsity JSON is invalid: {e}") from None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity must be a float or a JSON object; got {text!r}") from None


def _modules(text: str | None):
    """A comma-separated list of suffixes, or a regex when it contains regex characters."""
    if text is None:
        return None
    return text if any(c in text for c in "*^$()[]|\\+?") else [t for t in text.split(",") if t]


def _load_model(model_dir: str, dtype: str = "auto"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, ImportError):  # no tokenizer files (older transformers: ImportError)
        tokenizer = None
    return model, tokenizer


def cmd_prune(args: argparse.Namespace) -> int:
    """`hf-weightprune prune`: prune a model with saved importance and save it (file to file when nothing needs the
    model in memory), then optionally push it.

    Args:
        args (`argparse.Namespace`): parsed by the `prune` subparser of [`build_parser`].

    Returns:
        `int`: 0.

    Raises:
        FileExistsError: `--output` is not empty and `--overwrite` is not given (checked before any loading).
        ValueError, FileNotFoundError, ImportanceFileError: bad input, printed by [`main`] as one line.
    """
    from .config import PruneConfig
    from .export import save_pruned
    from .pruner import prune_
    from .state import load_importance

    config = PruneConfig(sparsity=args.sparsity, structure=args.structure, scope=args.scope,
                         target_modules=_modules(args.target_modules), exclude_modules=_modules(args.exclude_modules))
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} exists and is not empty; pass --overwrite to replace it")
    importance = load_importance(args.importance)
    from .safetensors_io import find_weights_file

    safetensors_dir = os.path.isdir(args.model_dir) and find_weights_file(args.model_dir) is not None
    if not args.eval_data and args.dtype == "auto" and config.kind not in ("neurons", "heads") and safetensors_dir:
        # Nothing needs the model in memory: prune the safetensors files shard by shard (faster, less memory).
        from .export import prune_checkpoint

        report = prune_checkpoint(args.model_dir, importance, args.output, config, base_model=args.base_model,
                                  overwrite=args.overwrite)
        return _saved(report, args)
    model, tokenizer = _load_model(args.model_dir, args.dtype)
    eval_results = None
    if args.eval_data:
        eval_results = {"dataset": args.eval_data, "dense_loss": _eval(model, tokenizer, args)}
    report = prune_(model, importance, config)
    if args.eval_data:
        eval_results["pruned_loss"] = _eval(model, tokenizer, args)
    save_pruned(model, args.output, report=report, tokenizer=tokenizer, overwrite=args.overwrite,
                eval_results=eval_results, base_model=args.base_model)
    return _saved(report, args)


def _saved(report, args) -> int:
    print(f"{report.summary()}\nSaved to {args.output}")
    if args.push_to_hub:
        from .hub import push_pruned_to_hub

        url = push_pruned_to_hub(args.output, repo_id=args.push_to_hub, private=args.private or None)
        print(f"Pushed: {url}")
    return 0


def _eval(model, tokenizer, args) -> float:
    from .data import evaluate_loss, load_texts, make_windows

    if tokenizer is None:
        raise ValueError(f"--eval-data needs a tokenizer in {args.model_dir}")
    windows = make_windows(tokenizer, load_texts(args.eval_data), seq_len=args.seq_len, max_windows=args.max_windows)
    return evaluate_loss(model, windows, batch_size=args.batch_size)["loss"]


def cmd_inspect(args: argparse.Namespace) -> int:
    """`hf-weightprune inspect`: print per-tensor importance statistics, and plot them per layer with `--plot`.

    Args:
        args (`argparse.Namespace`): parsed by the `inspect` subparser of [`build_parser`].

    Returns:
        `int`: 0.

    Raises:
        ValueError, FileNotFoundError, ImportanceFileError: bad input, printed by [`main`] as one line.
    """
    from .plotting import layer_stats
    from .scorers import get_scorer
    from .state import load_importance

    imp = load_importance(args.importance_dir)
    if args.model:
        model, _ = _load_model(args.model)
        imp.bind(model)
    stats = layer_stats(imp)
    raw = imp.criterion == "wanda" and imp.weights is None
    if raw:
        what, label = "activation sum of squares (pass --model for scores)", "activation sum of squares, sum_t x_j^2"
    else:
        what, label = "score", f"{imp.criterion} score, {get_scorer(imp.criterion).formula}"
    print(f"{imp!r}\n{what} per tracked weight (<median: % of its values below the median of all tracked values):")
    width = max(len(s["name"]) for s in stats)
    print(f"{'name':<{width}}  {'shape':>12}  {'mean':>11}  {'std':>11}  {'min':>11}  {'max':>11}  {'<median':>7}")
    for s in stats:
        print(f"{s['name']:<{width}}  {s['shape']:>12}  {s['mean']:11.4g}  {s['std']:11.4g}  {s['min']:11.4g}  "
              f"{s['max']:11.4g}  {100 * s['below_median']:6.1f}%")
    if args.plot:
        from .plotting import plot_layer_stats

        # Without scores, the share below the median says nothing about pruning: show the spread instead.
        plot_layer_stats(stats, args.plot, title=f"{imp.criterion} importance, step {imp.step}", value_label=label,
                         panels=["mean", "std"] if raw else None)
        print(f"Plot: {args.plot}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """`hf-weightprune push`: upload a pruned folder with [`push_pruned_to_hub`] and print the commit URL.

    Args:
        args (`argparse.Namespace`): parsed by the `push` subparser of [`build_parser`].

    Returns:
        `int`: 0.

    Raises:
        ValueError, FileNotFoundError, PermissionError: bad input or refused token, printed by [`main`] as one line.
    """
    from .hub import push_pruned_to_hub

    url = push_pruned_to_hub(args.output_dir, repo_id=args.repo_id, private=args.private or None,
                             revision=args.revision, include_importance=args.include_importance,
                             commit_message=args.commit_message)
    print(url)
    return 0


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-weightprune sweep` to an argparse subparsers object.

    Args:
        subparsers: what `ArgumentParser.add_subparsers()` returned.

    Returns:
        `argparse.ArgumentParser`: the `sweep` subparser (its `func` default is [`run_sweep_cli`]).
    """
    from .oneshot import ONESHOT_CRITERIA

    p = subparsers.add_parser("sweep", help="loss and perplexity vs sparsity for several criteria, with a plot")
    p.add_argument("model_dir", help="trained dense model folder (with its tokenizer)")
    p.add_argument("--importance", nargs="*", default=[], metavar="[LABEL=]DIR",
                   help="importance / checkpoint folders to compare, optionally labelled")
    p.add_argument("--data", required=True, help="evaluation text: .txt, .json, .jsonl or a saved dataset folder")
    p.add_argument("--sparsities", default="0,0.1,...,0.9", help="comma list; '...' continues the step")
    p.add_argument("--criteria", default="magnitude",
                   help=f"one-shot baselines, comma-separated from {','.join(ONESHOT_CRITERIA)} ('' for none)")
    p.add_argument("--calibration", default=None, help="text for one-shot wanda (defaults to --data)")
    p.add_argument("--calibration-windows", type=int, default=16)
    p.add_argument("--structure", default="unstructured", help="unstructured | N:M (e.g. 2:4)")
    p.add_argument("--scope", default=None, help="global | layer | row")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--output", required=True, help="folder for sweep.csv, sweep.json and sweep.png")
    p.set_defaults(func=run_sweep_cli)
    return p


def run_sweep_cli(args: argparse.Namespace) -> int:
    """Run the `sweep` subcommand from parsed arguments and print a perplexity table.

    Args:
        args (`argparse.Namespace`): parsed by the parser [`add_sweep_parser`] adds.

    Returns:
        `int`: 0.

    Raises:
        ValueError: bad input (see [`sweep`]); `main` prints it as one line.
    """
    from .sweep import SWEEP_CSV, SWEEP_JSON, SWEEP_PNG, format_table, parse_sparsities, sweep

    baselines = [c.strip() for c in args.criteria.split(",") if c.strip()]
    rows = sweep(args.model_dir, args.importance, args.data, sparsities=parse_sparsities(args.sparsities),
                 structure=args.structure, scope=args.scope, baselines=baselines, calibration_data=args.calibration,
                 calibration_windows=args.calibration_windows, seq_len=args.seq_len, max_windows=args.max_windows,
                 batch_size=args.batch_size, output_dir=args.output, dtype=args.dtype)
    print(format_table(rows))
    print(f"Wrote {SWEEP_CSV}, {SWEEP_JSON} and {SWEEP_PNG} to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `hf-weightprune` parser with every subcommand: `prune`, `inspect`, `push` and `sweep`.

    Returns:
        `argparse.ArgumentParser`: each subcommand sets `func`, the function that runs it.
    """
    parser = argparse.ArgumentParser(prog="hf-weightprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model from saved importance and save an HF checkpoint")
    p.add_argument("model_dir", help="dense model folder (or Hub id)")
    p.add_argument("--importance", required=True, help="importance folder, checkpoint folder, or Hub repo id")
    p.add_argument("--sparsity", type=_floats_or_float, default=None, help="fraction in [0,1) or JSON {regex: float}")
    p.add_argument("--structure", default="unstructured", help="unstructured | N:M (e.g. 2:4) | neurons | heads")
    p.add_argument("--scope", default=None, help="global | layer | row")
    p.add_argument("--target-modules", default=None)
    p.add_argument("--exclude-modules", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--base-model", default=None, help="Hub id of the dense model, for the card")
    p.add_argument("--eval-data", default=None, help="text/JSON file: measure loss before/after for the card")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("inspect", help="per-tensor importance statistics (and a per-layer plot)")
    p.add_argument("importance_dir")
    p.add_argument("--model", default=None, help="model folder, needed for wanda scores")
    p.add_argument("--plot", default=None, help="write a PNG")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("push", help="upload a pruned checkpoint (with its card) to the Hub")
    p.add_argument("output_dir")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--include-importance", action="store_true")
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=cmd_push)

    add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-weightprune` command.

    Args:
        argv (`list[str]`, *optional*): the arguments; defaults to `sys.argv[1:]`.

    Returns:
        `int`: the exit status: 0 on success, 2 on bad input (one line on stderr, no traceback).

    Raises:
        SystemExit: from argparse on unknown options or `--help`.
    """
    args = build_parser().parse_args(argv)
    from .state import ImportanceFileError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportanceFileError) as e:
        # One line, no traceback: bad input is the user's to fix, and the message says how.
        print(f"hf-weightprune {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
