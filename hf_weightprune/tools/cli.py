"""`hf-weightprune` command line: prune, inspect, sweep, push. Thin: parsing, then library calls.

Options use the transformers spelling (`--output_dir`, `--push_to_hub`); the older hyphenated spellings
(`--output`, `--push-to-hub`, ...) still work. Nothing heavy is imported until a subcommand runs, so `--help`
and `--version` never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator

from .._version import __version__

# The one-shot baselines `sweep` knows (`oneshot.ONESHOT_CRITERIA`, which imports torch; a test keeps them equal).
_ONESHOT_CRITERIA = ("magnitude", "wanda")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (not a required option's: it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.required else super()._get_help_string(action)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching: not with `--quiet`, not when stderr is a file or a pipe."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


@contextlib.contextmanager
def _hub_bars(enabled: bool) -> Iterator[None]:
    """Turn off huggingface_hub's and transformers' own bars (downloads, uploads, weight loading) for one command,
    and restore them after: `main` is also called in-process (tests, scripts)."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_was_disabled = are_progress_bars_disabled()
    tf = sys.modules.get("transformers.utils.logging")
    tf_was_enabled = tf.is_progress_bar_enabled() if tf is not None else None
    disable_progress_bars()
    if tf is not None:
        tf.disable_progress_bar()
    try:
        yield
    finally:
        if not hub_was_disabled:
            enable_progress_bars()
        tf = sys.modules.get("transformers.utils.logging")  # maybe first imported by the command
        if tf is not None and (tf_was_enabled or (tf_was_enabled is None and not hub_was_disabled)):
            tf.enable_progress_bar()


@contextlib.contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    """`--log_level` for this library's logger (`--quiet`: errors only), printed to stderr, for one command; the
    logger is restored after it, as `main` is also called in-process (tests, scripts)."""
    import logging  # here, not at the top: `--help` never needs it

    class _Stderr(logging.StreamHandler):
        """Writes to the current `sys.stderr` (which a caller may have replaced), not the one at creation."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("hf_weightprune")
    level = "error" if getattr(args, "quiet", False) else getattr(args, "log_level", "warning")
    saved = logger.level
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.setLevel(getattr(logging, level.upper()))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


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


def _looks_local(path: str) -> bool:
    """A path the user meant as a local folder (a Hub id is `name` or `namespace/name`)."""
    if path.startswith(("/", ".", "~")) or os.sep in path.replace("/", "") or path.count("/") > 1:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])  # `out/modle`: a typo below a local folder


def _check_model_dir(path: str, flag: str) -> None:
    """Refuse a model folder that does not exist before anything is loaded (transformers' error is 30+ lines)."""
    if not os.path.exists(path) and _looks_local(path):
        raise FileNotFoundError(f"{flag} {path}: no such folder; pass a model folder (config.json and weights) or a "
                                "Hub repo id")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path} is a file; pass the model folder that holds it")


def _load_model(model_dir: str, dtype: str = "auto", flag: str = "model_dir"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_model_dir(model_dir, flag)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except OSError as e:  # transformers' multi-line "not a local folder and not a valid model identifier"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OSError(f"{flag} {model_dir} could not be loaded as a model: {first}") from None
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
        ValueError: `--output_dir` is refused by the output rule ([`export.check_output_dir`]), checked before any
            loading, or other bad input.
        FileExistsError: `--output_dir` is not empty and `--overwrite` is not given (checked before any loading).
        FileNotFoundError, ImportanceFileError: a missing model or importance folder, printed by [`main`] as one
            line.
    """
    from ..config import PruneConfig
    from ..files.state import ImportanceFileError, load_importance, resolve_importance_dir
    from ..prune.pruner import prune_
    from ..publish.export import check_output_dir, save_pruned

    config = PruneConfig(sparsity=args.sparsity, structure=args.structure, scope=args.scope,
                         allow_collapse=args.allow_collapse,
                         target_modules=_modules(args.target_modules), exclude_modules=_modules(args.exclude_modules))
    _check_model_dir(args.model_dir, "model_dir")
    importance_dir = None
    if os.path.isdir(args.importance):
        try:
            importance_dir = resolve_importance_dir(args.importance, args.importance_name)
        except ImportanceFileError:
            importance_dir = None  # load_importance below says what is missing
    check_output_dir(args.output_dir, input_dirs=[args.model_dir], importance_dirs=[importance_dir],
                     overwrite=args.overwrite, arg="--output_dir", overwrite_hint="--overwrite")
    importance = load_importance(args.importance, name=args.importance_name)
    from ..files.safetensors_io import find_weights_file

    progress = _progress(args)
    safetensors_dir = os.path.isdir(args.model_dir) and find_weights_file(args.model_dir) is not None
    if not args.eval_data and args.dtype == "auto" and config.kind not in ("neurons", "heads") and safetensors_dir:
        # Nothing needs the model in memory: prune the safetensors files shard by shard (faster, less memory).
        from ..publish.export import prune_checkpoint

        report = prune_checkpoint(args.model_dir, importance, config, args.output_dir, base_model=args.base_model,
                                  overwrite=args.overwrite, progress=progress)
        return _saved(report, args)
    model, tokenizer = _load_model(args.model_dir, args.dtype)
    eval_results = None
    if args.eval_data:
        # The same windows before and after pruning, no training between: `tokens` says so (the card compares them).
        dense = _eval(model, tokenizer, args)
        eval_results = {"dataset": args.eval_data, "dense_loss": dense["loss"], "tokens": dense["tokens"]}
    report = prune_(model, importance, config, progress=progress)
    if args.eval_data:
        pruned = _eval(model, tokenizer, args)
        eval_results.update(pruned_loss=pruned["loss"], pruned_tokens=pruned["tokens"])
    save_pruned(model, args.output_dir, report=report, tokenizer=tokenizer, overwrite=args.overwrite,
                eval_results=eval_results, base_model=args.base_model)
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
    from ..files.state import load_importance
    from ..scorers import get_scorer
    from .plotting import layer_stats

    if args.model:
        _check_model_dir(args.model, "--model")  # before the importance is read
    imp = load_importance(args.importance_dir, name=args.importance_name)
    if args.model:
        model, _ = _load_model(args.model, flag="--model")
        imp.bind(model)
    stats = layer_stats(imp)
    raw = imp.criterion in ("wanda", "sparsegpt") and imp.weights is None  # no weights: the statistics themselves
    if raw and imp.criterion == "wanda":
        what, label = "activation sum of squares (pass --model for scores)", "activation sum of squares, sum_t x_j^2"
    elif raw:
        what, label = "input Hessian entries (pass --model for scores)", "input Hessian, sum_tokens x x^T"
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
        ValueError, FileNotFoundError, PermissionError: bad input or refused token, printed by [`main`] as one line
            (exit 2).
        ConnectionError: `HF_HUB_OFFLINE=1` or no network, printed as one line (exit 1).
    """
    from ..publish.hub import push_pruned_to_hub

    try:
        url = push_pruned_to_hub(args.folder, repo_id=args.repo_id, private=args.private or None,
                                 revision=args.revision, include_importance=args.include_importance,
                                 commit_message=args.commit_message)
    except FileNotFoundError as e:  # the library names its argument; here the user typed the flag
        raise FileNotFoundError(str(e).replace("include_importance=True", "--include_importance")) from None
    print(url)
    return 0


def _add(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs) -> argparse.Action:
    """Add `--name` (transformers spelling) with its old spellings as hidden aliases: `--a_b` also takes `--a-b`."""
    old = [f"--{name.replace('_', '-')}"] if "_" in name else []
    names = [f"--{name}", *old, *aliases]
    _ALIASES.update(names[1:])
    return parser.add_argument(*names, **kwargs)


_ALIASES: set[str] = set()


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _HelpFormatter(prog, max_help_position=32)


def _invocation(self, action: argparse.Action) -> str:
    # Help lists the current spelling only; the old ones keep working.
    shown = [o for o in action.option_strings if o not in _ALIASES]
    if not shown or not action.option_strings:
        return argparse.ArgumentDefaultsHelpFormatter._format_action_invocation(self, action)
    saved = action.option_strings
    action.option_strings = shown
    try:
        return argparse.ArgumentDefaultsHelpFormatter._format_action_invocation(self, action)
    finally:
        action.option_strings = saved


_HelpFormatter._format_action_invocation = _invocation


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`-q/--quiet` and `--log_level`, accepted before and after the subcommand (the subcommand's copy only sets a
    value when given, so it never resets one given before it)."""
    # A SUPPRESS default is not shown by the formatter: the subcommand's copy states it.
    parser.add_argument("-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="no progress bars and only errors in the log" + ("" if top else " (default: False)"))
    _add(parser, "log_level", choices=_LOG_LEVELS, default="warning" if top else argparse.SUPPRESS,
         help="level of this library's log messages on stderr" + ("" if top else " (default: warning)"))


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-weightprune sweep` to an argparse subparsers object.

    Args:
        subparsers: what `ArgumentParser.add_subparsers()` returned.

    Returns:
        `argparse.ArgumentParser`: the `sweep` subparser (its `func` default is [`run_sweep_cli`]).
    """
    p = subparsers.add_parser("sweep", help="loss and perplexity vs sparsity for several criteria, with a plot",
                              description="Loss and perplexity vs sparsity for several criteria, with a plot.",
                              formatter_class=_formatter)
    p.add_argument("model_dir", help="trained dense model folder (with its tokenizer)")
    p.add_argument("--importance", nargs="*", default=[], metavar="[LABEL=]DIR",
                   help="importance / checkpoint folders (or Hub repos) to compare, optionally labelled")
    _add_importance_name(p)
    p.add_argument("--data", required=True, help="evaluation text: .txt, .json, .jsonl or a saved dataset folder")
    p.add_argument("--sparsities", default="0,0.1,...,0.9", help="comma list; '...' continues the step")
    p.add_argument("--criteria", default="magnitude",
                   help=f"one-shot baselines, comma-separated from {','.join(_ONESHOT_CRITERIA)} ('' for none)")
    p.add_argument("--calibration", default=None, help="text for one-shot wanda (None: --data)")
    _add(p, "calibration_windows", type=int, default=16, help="windows of --calibration for one-shot wanda")
    p.add_argument("--structure", default="unstructured", help="unstructured | N:M (e.g. 2:4)")
    p.add_argument("--scope", default=None, help="global | layer | row (None: the criterion's default: row for wanda, "
                   "taylor, fisher; layer for the others)")
    _add(p, "seq_len", type=int, default=256, help="tokens per evaluation window")
    _add(p, "max_windows", type=int, default=64, help="evaluation windows at most")
    _add(p, "batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in")
    _add(p, "output_dir", "--output", required=True,
         help="folder for sweep.csv, sweep.json and sweep.png: a new folder (e.g. out/sweep) or a pruned model's "
         "folder (its card then shows the sweep); never the model folder itself")
    _add_common(p, top=False)
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
    from ..files.pruned_files import SWEEP_CSV, SWEEP_JSON, SWEEP_PNG
    from ..publish.export import check_output_dir
    from .sweep import format_table, parse_sparsities, sweep

    # The library checks it too, naming `output_dir`; here first, so the message names the flag.
    check_output_dir(args.output_dir, input_dirs=[args.model_dir], require_empty=False, arg="--output_dir")
    baselines = [c.strip() for c in args.criteria.split(",") if c.strip()]
    rows = sweep(args.model_dir, args.importance, args.data, sparsities=parse_sparsities(args.sparsities),
                 structure=args.structure, scope=args.scope, baselines=baselines, calibration_data=args.calibration,
                 calibration_windows=args.calibration_windows, seq_len=args.seq_len, max_windows=args.max_windows,
                 batch_size=args.batch_size, output_dir=args.output_dir, dtype=args.dtype, progress=_progress(args),
                 importance_name=args.importance_name)
    print(format_table(rows))
    print(f"Wrote {SWEEP_CSV}, {SWEEP_JSON} and {SWEEP_PNG} to {args.output_dir}")
    return 0


def _add_importance_name(p: argparse.ArgumentParser) -> None:
    """`prune`, `inspect` and `sweep` read importance folders: this picks a named one in each (several callbacks on
    one Trainer)."""
    p.add_argument("--importance_name", default=None, metavar="NAME",
                   help="the ImportanceConfig(name=...) of one of several callbacks: reads importance-NAME/")


def build_parser() -> argparse.ArgumentParser:
    """The `hf-weightprune` parser with every subcommand: `prune`, `inspect`, `push` and `sweep`.

    Imports nothing beyond the standard library: `--help` and `--version` stay fast.

    Returns:
        `argparse.ArgumentParser`: each subcommand sets `func`, the function that runs it.
    """
    parser = argparse.ArgumentParser(prog="hf-weightprune", description=__doc__, formatter_class=_formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model from saved importance and save an HF checkpoint",
                       description="Prune a model from saved importance and save an HF checkpoint (with "
                       "sparsity.json and a model card).", formatter_class=_formatter)
    p.add_argument("model_dir", help="dense model folder (or Hub id); never modified")
    p.add_argument("--importance", required=True, help="importance folder, checkpoint folder, or Hub repo id")
    _add_importance_name(p)
    p.add_argument("--sparsity", type=_floats_or_float, default=None,
                   help="fraction in [0,1) or JSON {regex: float} (None: 0.5; N:M sets its own)")
    p.add_argument("--structure", default="unstructured", help="unstructured | N:M (e.g. 2:4) | neurons | heads")
    p.add_argument("--scope", default=None, help="global | layer | row (None: the criterion's default: row for wanda, "
                   "taylor, fisher; layer for the others)")
    _add(p, "allow_collapse", action="store_true", default=False,
         help="let a global threshold prune a whole tensor (refused otherwise)")
    _add(p, "target_modules", default=None,
         help="modules to prune: comma-separated name suffixes, or a regex (None: every tracked weight)")
    _add(p, "exclude_modules", default=None, help="modules to leave dense, as --target_modules (None: none)")
    _add(p, "output_dir", "--output", required=True,
         help="a new or empty folder, e.g. out/pruned; never the model or importance folder or a checkpoint-N")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype the model is loaded and saved in (auto: prune the files without loading the model)")
    _add(p, "base_model", default=None, help="Hub id of the dense model, for the card")
    _add(p, "eval_data", default=None, help="text/JSON file: measure loss before/after for the card")
    _add(p, "seq_len", type=int, default=256, help="tokens per --eval_data window")
    _add(p, "max_windows", type=int, default=64, help="--eval_data windows at most")
    _add(p, "batch_size", type=int, default=8, help="windows per forward pass for --eval_data")
    _add(p, "push_to_hub", default=None, metavar="REPO_ID", help="also upload the result to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the --push_to_hub repo as private")
    _add_common(p, top=False)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("inspect", help="per-tensor importance statistics (and a per-layer plot)",
                       description="Per-tensor importance statistics (and a per-layer plot).",
                       formatter_class=_formatter)
    p.add_argument("importance_dir", help="importance folder, checkpoint folder or training output_dir")
    _add_importance_name(p)
    p.add_argument("--model", default=None, help="model folder, for wanda and sparsegpt scores when the importance "
                   "is not inside a checkpoint beside its weights")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write a per-layer plot to this PNG file")
    _add_common(p, top=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("push", help="upload a pruned checkpoint (with its card) to the Hub",
                       description="Upload a pruned checkpoint folder (with its card) to the Hub.",
                       formatter_class=_formatter)
    p.add_argument("folder", metavar="FOLDER", help="the pruned folder to upload (written by prune or save_pruned)")
    _add(p, "repo_id", required=True, help="target Hub repo, e.g. username/model-pruned-50")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to push to (None: main)")
    _add(p, "include_importance", action="store_true", help="also upload the importance folder to importance/")
    _add(p, "commit_message", default=None, help="commit message (None: a summary of the pruning)")
    _add_common(p, top=False)
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
        with _logging(args), _hub_bars(_progress(args)):
            return args.func(args)
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        # One line, no traceback: the message says what to fix.
        lines = str(e).strip().splitlines()
        print(f"hf-weightprune {args.command}: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
