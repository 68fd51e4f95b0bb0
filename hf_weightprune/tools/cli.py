"""`hf-weightprune` command line: prune, inspect, sweep, push. Thin: parsing, then library calls.

Options use the transformers spelling (`--output_dir`, `--push_to_hub`); the `PruneConfig` flags and their help
come from its fields. Every bad input is refused in one line, exit status 2, before any work. Nothing heavy is
imported until a subcommand runs, so `--help` and `--version` never import torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from .cli_args import (
    Parser,
    add_common,
    add_config_flags,
    add_eval,
    add_importance_name,
    add_search,
    add_structured_sweep,
    command_logging,
    config_from_flags,
    formatter,
    hub_bars,
    in_flags,
    search_candidates,
    show_progress,
)
from .model_io import check_model_dir, importance_for_checkpoint, load_model

# The one-shot baselines `sweep` knows (`oneshot.ONESHOT_CRITERIA`, which imports torch; a test keeps them equal).
_ONESHOT_CRITERIA = ("magnitude", "wanda")


def cmd_prune(args: argparse.Namespace) -> int:
    """`hf-weightprune prune`: prune a model with saved importance and save it (file to file when nothing needs the
    model in memory), then optionally push it.

    Args:
        args (`argparse.Namespace`): parsed by the `prune` subparser of [`build_parser`].

    Returns:
        `int`: 0.

    Raises:
        ValueError: `--output_dir` is refused by the output rule ([`export.check_output_dir`]), checked before any
            loading, `--measure_speed` with a `model_dir` that is not a local folder, or other bad input.
        FileExistsError: `--output_dir` is not empty and `--overwrite` is not given (checked before any loading).
        FileNotFoundError, ImportanceFileError: a missing model or importance folder, printed by [`main`] as one
            line.
    """
    import os

    from ..config import PruneConfig
    from ..files.importance_files import load_importance, resolve_importance_dir
    from ..files.pruned_files import TOKENIZER_VOCAB_FILES, has_tokenizer
    from ..files.safetensors_io import ImportanceFileError
    from ..prune.pruner import prune_
    from ..publish.export import check_output_dir, save_pruned, warn_cross_input
    from ..validation import check_local_path
    from .log_once import warnings_once
    from .search import search_for_cli

    config, candidates = search_candidates(args, PruneConfig)  # --search_structures: the candidates' configs
    check_model_dir(args.model_dir, "model_dir")
    check_local_path("--importance", args.importance, "an importance, checkpoint or training output folder")
    if args.measure_speed and not os.path.isdir(args.model_dir):
        raise ValueError(f"--measure_speed measures beside the input checkpoint: model_dir {args.model_dir} must be "
                         "a local folder (download the Hub model first)")
    if args.eval_data and not os.path.exists(args.eval_data):
        raise FileNotFoundError(f"--eval_data {args.eval_data}: no such file; pass a .txt, .json or .jsonl file")
    for flag, used in (("--eval_data", args.eval_data), ("--search_structures", candidates)):
        if used and os.path.isdir(args.model_dir) and not has_tokenizer(args.model_dir):
            raise ValueError(f"{flag} tokenizes text with the model's tokenizer, and {args.model_dir} holds none "
                             f"(no {', '.join(TOKENIZER_VOCAB_FILES[:3])}, ...)")
    importance_dir = None
    if os.path.isdir(args.importance):
        try:
            importance_dir = resolve_importance_dir(args.importance, args.importance_name)
        except ImportanceFileError:
            importance_dir = None  # load_importance below says what is missing
    check_output_dir(args.output_dir, input_dirs=[args.model_dir], importance_dirs=[importance_dir],
                     overwrite=args.overwrite, arg="--output_dir", overwrite_hint="--overwrite")
    importance = importance_for_checkpoint(load_importance(args.importance, name=args.importance_name),
                                           args.model_dir)
    from ..files.safetensors_io import find_weights_file, weight_map
    from ..moe import experts_stored_fused

    progress = show_progress(args)
    safetensors_dir = os.path.isdir(args.model_dir) and find_weights_file(args.model_dir) is not None
    fused = safetensors_dir and experts_stored_fused(importance.names, weight_map(args.model_dir))
    in_memory = args.eval_data or args.measure_speed or args.dtype != "auto" or config.shrinks or fused  # gpt-oss
    if not in_memory and safetensors_dir:
        # Nothing needs the model in memory: prune the safetensors files shard by shard (faster, less memory).
        from ..publish.export import prune_checkpoint

        report = prune_checkpoint(args.model_dir, importance, config, args.output_dir, base_model=args.base_model,
                                  overwrite=args.overwrite, progress=progress)
        return _saved(report, args)
    warn_cross_input(args.model_dir, config)  # prune_checkpoint warns on the path above
    model, tokenizer = load_model(args.model_dir, args.dtype)
    with warnings_once():  # the winner's prune says nothing its scoring in the search did not
        config, search = search_for_cli(args, model, tokenizer, importance, candidates, config)
        eval_results = None
        if args.eval_data:
            # The same windows before and after pruning, no training between: `tokens` says so (the card compares).
            from ..prune.report import measure_input

            dense = _eval(model, tokenizer, args)  # the input as loaded: dense, or a pruned folder (its zeros measured)
            eval_results = {"dataset": args.eval_data, "dense_loss": dense["loss"], "tokens": dense["tokens"],
                            "input_sparsity": measure_input(model)}
        report = prune_(model, importance, config, progress=progress)
    report.search = search
    if args.eval_data:
        pruned = _eval(model, tokenizer, args)
        eval_results.update(pruned_loss=pruned["loss"], pruned_tokens=pruned["tokens"])
    save_pruned(model, args.output_dir, report=report, tokenizer=tokenizer, overwrite=args.overwrite,
                eval_results=eval_results, base_model=args.base_model, measure_speed=args.measure_speed,
                # the dense folder's weight files are recorded beside the pruned ones, as `prune_checkpoint` does
                baseline=args.model_dir if args.measure_speed or safetensors_dir else None)
    return _saved(report, args)


def _saved(report, args) -> int:
    print(f"{report.summary()}\nSaved to {args.output_dir}")
    if args.push_to_hub:
        from ..publish.hub import push_pruned_to_hub

        url = push_pruned_to_hub(args.output_dir, repo_id=args.push_to_hub, private=args.private or None)
        print(f"Pushed: {url}")
    return 0


def _eval(model, tokenizer, args) -> dict:
    from .data import evaluate_loss, load_texts, make_windows

    if tokenizer is None:
        raise ValueError(f"--eval_data needs a tokenizer in {args.model_dir}")
    windows = make_windows(tokenizer, load_texts(args.eval_data), seq_len=args.seq_len, max_windows=args.max_windows)
    return evaluate_loss(model, windows, batch_size=args.batch_size)


def cmd_inspect(args: argparse.Namespace) -> int:
    """`hf-weightprune inspect`: print per-tensor importance statistics, and plot them per layer with `--plot`.

    Args:
        args (`argparse.Namespace`): parsed by the `inspect` subparser of [`build_parser`].

    Returns:
        `int`: 0.

    Raises:
        ValueError, FileNotFoundError, ImportanceFileError: bad input, printed by [`main`] as one line.
    """
    from ..collect.summary import is_raw, layer_stats
    from ..files.importance_files import load_importance
    from ..validation import check_local_path

    check_local_path("importance_dir", args.importance_dir, "an importance, checkpoint or training output folder")
    if args.model:
        check_model_dir(args.model, "--model")  # before the importance is read
    imp = load_importance(args.importance_dir, name=args.importance_name)
    if args.model:
        model, _ = load_model(args.model, flag="--model")
        imp.bind(model)
    stats = layer_stats(imp)
    raw = is_raw(imp)  # scores need the weights: without --model, the statistics themselves
    if raw:
        what, label = f"{imp.scorer.raw_label} (pass --model for scores)", f"{imp.criterion} {imp.scorer.raw_label}"
    else:
        what, label = "score", f"{imp.criterion} score, {imp.scorer.formula}"
    print(f"{imp!r}\n{what} per tracked weight (<median: % of its values below the median of all tracked values):")
    width = max(len(s["name"]) for s in stats)
    print(f"{'name':<{width}}  {'shape':>12}  {'mean':>11}  {'std':>11}  {'min':>11}  {'max':>11}  {'<median':>7}")
    for s in stats:
        print(f"{s['name']:<{width}}  {s['shape']:>12}  {s['mean']:11.4g}  {s['std']:11.4g}  {s['min']:11.4g}  "
              f"{s['max']:11.4g}  {100 * s['below_median']:6.1f}%")
    if imp.has_cross:  # what `--cross_alpha` needs, and which model it is for
        print(f"cross term: {len(imp.cross_terms())} of the {len(imp.names)} tracked weights hold the dense-to-pruned "
              "cross term of a PruneSchedule(cross_term=True) run; prune that run's dense teacher with "
              "--cross_alpha 0.25 for the asymmetric OBS sweep")
    _print_router(imp.sections.get("router"))
    if args.plot:
        from .plotting import plot_layer_stats

        # Without scores, the share below the median says nothing about pruning: show the spread instead.
        plot_layer_stats(stats, args.plot, title=f"{imp.criterion} importance, step {imp.step}", value_label=label,
                         panels=["mean", "std"] if raw else None)
        print(f"Plot: {args.plot}")
    return 0


def _print_router(section: dict | None) -> None:
    """An MoE model's router statistics: per layer, the real tokens it saw and each expert's share of the routed
    tokens (what `structure="experts"` removes by, fewest first) and of the gate-weight mass."""
    if not section:
        return
    print("router statistics per MoE layer (real tokens seen; per expert: tokens routed, share, gate-weight mass):")
    for block, stats in section.items():
        routed = max(sum(stats["tokens"]), 1)
        experts = "  ".join(f"{e}: {n} ({100 * n / routed:.1f}%, {m:.4g})"
                            for e, (n, m) in enumerate(zip(stats["tokens"], stats["gate_mass"])))
        print(f"{block}  seen {stats['seen']}  {experts}")


def cmd_push(args: argparse.Namespace) -> int:
    """`hf-weightprune push`: upload a pruned folder with [`push_pruned_to_hub`] and print the commit URL.

    Args:
        args (`argparse.Namespace`): parsed by the `push` subparser of [`build_parser`].

    Returns:
        `int`: 0.

    Raises:
        ValueError, FileNotFoundError, PermissionError: bad input or refused token, printed by [`main`] as one line
            (exit 2).
        ConnectionError: `HF_HUB_OFFLINE=1` or no network, printed as one line (exit 1).
    """
    import os

    from ..publish.hub import push_pruned_to_hub

    if not os.path.isdir(args.folder):  # a pruned folder is always local: never guess a Hub id here
        raise FileNotFoundError(f"FOLDER {args.folder}: no such folder; pass the folder prune or save_pruned wrote")
    try:
        url = push_pruned_to_hub(args.folder, repo_id=args.repo_id, private=args.private or None,
                                 revision=args.revision, include_importance=args.include_importance,
                                 commit_message=args.commit_message)
    except FileNotFoundError as e:  # the library names its argument; here the user typed the flag
        raise FileNotFoundError(str(e).replace("include_importance=True", "--include_importance")) from None
    print(url)
    return 0


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-weightprune sweep` to an argparse subparsers object.

    Args:
        subparsers: what `ArgumentParser.add_subparsers()` returned.

    Returns:
        `argparse.ArgumentParser`: the `sweep` subparser (its `func` default is [`run_sweep_cli`]).
    """
    from ..config import PruneConfig

    p = subparsers.add_parser("sweep", help="loss and perplexity vs sparsity (or size) for several criteria, with a plot",
                              description="Loss and perplexity vs sparsity for several criteria, or vs the share of "
                              "parameters removed for several structures (--structure neurons --sizes 0.2,0.35,0.5), "
                              "with a plot.",
                              formatter_class=formatter)
    p.add_argument("model_dir", help="trained model folder (with its tokenizer): dense, or a pruned folder, whose first "
                   "row is then 'input' with its share of zeros (sparsities below it are skipped)")
    p.add_argument("--importance", nargs="*", default=[], metavar="[LABEL=]DIR",
                   help="importance / checkpoint folders (or Hub repos) to compare, optionally labelled")
    add_importance_name(p)
    p.add_argument("--data", required=True, help="evaluation text: .txt, .json, .jsonl or a saved dataset folder")
    p.add_argument("--sparsities", default=None, help="unstructured: comma list; '...' continues the step (None: "
                   "0,0.1,...,0.9)")
    p.add_argument("--criteria", default="magnitude",
                   help=f"one-shot baselines, comma-separated from {','.join(_ONESHOT_CRITERIA)} ('' for none)")
    p.add_argument("--calibration", default=None, help="text for one-shot wanda (None: --data)")
    p.add_argument("--calibration_windows", type=int, default=16, help="windows of --calibration for one-shot wanda")
    add_config_flags(p, PruneConfig, only=("structure", "scope", "round_to"))
    add_structured_sweep(p)
    add_eval(p, "evaluation")
    p.add_argument("--output_dir", required=True,
                   help="folder for sweep.csv, sweep.json and sweep.png: a new folder (e.g. out/sweep) or a pruned "
                   "model's folder (its card then shows the sweep); never the model folder itself")
    add_common(p, top=False)
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
    from ..config import PruneConfig
    from ..files.pruned_files import SWEEP_CSV, SWEEP_JSON, SWEEP_PNG
    from ..publish.export import check_output_dir
    from ..validation import check_local_path, structure_parts
    from .sweep import format_table, parse_sparsities, sweep

    # The library checks them too, in its keywords; here first, so the message names the flags (a structured sweep's
    # configs are checked by the library, with the sizes it sets).
    if args.structures is None and not structure_parts(args.structure):
        config_from_flags(PruneConfig, {"structure": args.structure, "scope": args.scope})
    check_model_dir(args.model_dir, "model_dir")
    for item in args.importance:
        check_local_path("--importance", item.split("=", 1)[-1], "importance or checkpoint folders")
    # The library checks it too, naming `output_dir`; here first, so the message names the flag.
    check_output_dir(args.output_dir, input_dirs=[args.model_dir], require_empty=False, arg="--output_dir")
    baselines = [c.strip() for c in args.criteria.split(",") if c.strip()]

    def points(text):
        return None if text is None else parse_sparsities(text)

    rows = sweep(args.model_dir, args.importance, args.data, sparsities=points(args.sparsities), sizes=points(args.sizes),
                 structure=args.structure, structures=args.structures, unit_statistics=args.unit_statistics,
                 compensations=args.compensations, round_to=args.round_to, scope=args.scope, baselines=baselines,
                 calibration_data=args.calibration, calibration_windows=args.calibration_windows, seq_len=args.seq_len, max_windows=args.max_windows,
                 batch_size=args.batch_size, output_dir=args.output_dir, dtype=args.dtype, progress=show_progress(args),
                 importance_name=args.importance_name)
    print(format_table(rows))
    drawn = os.path.isfile(os.path.join(args.output_dir, SWEEP_PNG))  # no chart where every perplexity overflows
    print(f"Wrote {SWEEP_CSV}, {SWEEP_JSON}" + (f" and {SWEEP_PNG}" if drawn else "") + f" to {args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `hf-weightprune` parser with every subcommand: `prune`, `inspect`, `push` and `sweep`.

    Imports nothing heavy (the config dataclasses only): `--help` and `--version` stay fast.

    Returns:
        `argparse.ArgumentParser`: each subcommand sets `func`, the function that runs it.
    """
    from ..config import PruneConfig

    parser = Parser(prog="hf-weightprune", description=__doc__, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model from saved importance and save an HF checkpoint",
                       description="Prune a model from saved importance and save an HF checkpoint (with "
                       "sparsity.json and a model card).", formatter_class=formatter)
    p.add_argument("model_dir", help="dense model folder (or Hub id); never modified")
    p.add_argument("--importance", required=True, help="importance folder, checkpoint folder, or Hub repo id")
    add_importance_name(p)
    add_config_flags(p, PruneConfig)
    p.add_argument("--output_dir", required=True,
                   help="a new or empty folder, e.g. out/pruned; never the model or importance folder or a checkpoint-N")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument("--base_model", default=None, help="Hub id of the dense model, for the card")
    p.add_argument("--eval_data", default=None, help="text/JSON file: measure loss before/after for the card")
    add_eval(p, "--eval_data")
    add_search(p)
    p.add_argument("--measure_speed", action="store_true",
                   help="measure the pruned checkpoint's prefill/decode tokens/s and peak memory beside model_dir on "
                        "this machine, for sparsity.json and the card")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="also upload the result to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the --push_to_hub repo as private")
    add_common(p, top=False)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("inspect", help="per-tensor importance statistics (and a per-layer plot)",
                       description="Per-tensor importance statistics (and a per-layer plot).",
                       formatter_class=formatter)
    p.add_argument("importance_dir", help="importance folder, checkpoint folder or training output_dir")
    add_importance_name(p)
    p.add_argument("--model", default=None, help="model folder, for wanda and sparsegpt scores when the importance "
                   "is not inside a checkpoint beside its weights")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write a per-layer plot to this PNG file")
    add_common(p, top=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("push", help="upload a pruned checkpoint (with its card) to the Hub",
                       description="Upload a pruned checkpoint folder (with its card) to the Hub.",
                       formatter_class=formatter)
    p.add_argument("folder", metavar="FOLDER", help="the pruned folder to upload (written by prune or save_pruned)")
    p.add_argument("--repo_id", required=True, help="target Hub repo, e.g. username/model-pruned-50")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to push to (None: main)")
    p.add_argument("--include_importance", action="store_true", help="also upload the importance folder to importance/")
    p.add_argument("--commit_message", default=None, help="commit message (None: a summary of the pruning)")
    add_common(p, top=False)
    p.set_defaults(func=cmd_push)

    add_sweep_parser(sub)
    return parser


def _exit_code(error: BaseException) -> int | None:
    """2 for input the user can fix (arguments, files, token), 1 for the environment (network, Hub, disk), `None` for
    a bug (the traceback is then worth seeing)."""
    # Not TypeError: the CLI passes the library the right types, so one is a bug.
    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                          PermissionError)):
        return 2  # ImportanceFileError is a ValueError
    if isinstance(error, OSError):
        return 1  # ConnectionError, OfflineModeIsEnabled, a full disk
    from ..publish.hub import _is_network_error

    names = {c.__name__ for c in type(error).__mro__}
    if _is_network_error(error) or "HfHubHTTPError" in names:
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-weightprune` command.

    Args:
        argv (`list[str]`, *optional*): the arguments; defaults to `sys.argv[1:]`.

    Returns:
        `int`: the exit status: 0 on success, 2 on bad input (a missing folder, a refused output folder or token), 1
        when the environment fails (no network, `HF_HUB_OFFLINE=1`, a Hub error); then one line on stderr,
        `hf-weightprune COMMAND: error: ...`, and no traceback.

    Raises:
        SystemExit: from argparse on unknown options, `--help` or `--version`.
    """
    args = build_parser().parse_args(argv)
    try:
        with command_logging(args), hub_bars(show_progress(args)):
            return args.func(args)
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        from ..config import PruneConfig

        # One line, no traceback: the message says what to fix, with the flags the user typed (`--cross_alpha 0.25`).
        lines = str(e).strip().splitlines()
        line = in_flags(lines[0], PruneConfig, bare=False) if lines else type(e).__name__
        print(f"hf-weightprune {args.command}: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
