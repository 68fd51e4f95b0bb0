"""The argparse building blocks of the `hf-weightprune` command: the one-line usage error, flags generated from the
config dataclasses' fields, the flag groups several subcommands share, and the per-command log and progress-bar
switches. Standard library only at import time, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
from collections.abc import Iterator, Mapping

LOG_LEVELS = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (not a required option's: it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.required else super()._get_help_string(action)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching: not with `--quiet`, not when stderr is a file or a pipe."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


@contextlib.contextmanager
def hub_bars(enabled: bool) -> Iterator[None]:
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
def command_logging(args: argparse.Namespace) -> Iterator[None]:
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

    class _InFlags(logging.Formatter):
        """Names `PruneConfig` settings as the flags (`--cross_alpha 0.25`, not `cross_alpha=0.25`); only here, so
        other handlers (a caller's, pytest's) keep the library's words."""

        def format(self, record: logging.LogRecord) -> str:
            from ..config import PruneConfig

            return in_flags(super().format(record), PruneConfig, bare=False)

    logger = logging.getLogger("hf_weightprune")
    level = "error" if getattr(args, "quiet", False) else getattr(args, "log_level", "warning")
    saved = logger.level
    handler = _Stderr()
    handler.setFormatter(_InFlags("%(levelname)s %(name)s: %(message)s"))
    logger.setLevel(getattr(logging, level.upper()))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def sparsity_arg(text: str):
    """`0.5` -> 0.5; `'{"mlp.*": 0.6}'` (JSON object) -> per-module targets, each key compiled here."""
    from ..validation import check_regex

    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON: {e}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("a JSON object {regex: float} is expected")
        try:
            for key in value:
                check_regex("key", key)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a float or a JSON object is expected; got {text!r}") from None


def modules_arg(text: str):
    """A comma-separated list of suffixes, or a regex (compiled here) when it contains regex characters."""
    from ..validation import check_regex

    if not any(c in text for c in "*^$()[]{}|\\+?"):
        return [t for t in text.split(",") if t]
    try:
        return check_regex("regex", text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def bool_or_auto_arg(text: str) -> bool | None:
    choices = {"auto": None, "true": True, "false": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"auto, true or false; got {text!r}")
    return choices[text.lower()]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the README's promise for every bad input), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def formatter(prog: str) -> argparse.HelpFormatter:
    return HelpFormatter(prog, max_help_position=32)


def count_or_fraction_arg(value: str) -> int | float:
    """`--target_params`: an int count (`90000000`) or a float fraction (`0.7`)."""
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int count or a float fraction, got {value!r}") from None


# How a config field's annotation becomes a flag (annotations are strings: `from __future__ import annotations`).
FLAG_KINDS = {
    "float | dict[str, float] | None": {"type": sparsity_arg},
    "str | list[str] | None": {"type": modules_arg},
    "bool | None": {"type": bool_or_auto_arg, "metavar": "{auto,true,false}"},
    "bool": {"action": "store_true"},
    "float": {"type": float},
    "float | None": {"type": float},
    "int": {"type": int},
    "int | None": {"type": int},
    "str": {},
    "str | None": {},
    "int | float | None": {"type": count_or_fraction_arg},
}


# A flag's own help where its field's help (shared with the Python API) names a value the command line cannot give.
FLAG_HELP = {
    "compensate": "structured: refit (least squares of down_proj / o_proj from sparsegpt Hessians), mean (FLAP: "
                  "removed units' mean output into the bias, from units=True statistics) or refit,mean (both fitted "
                  "together: least squares with an intercept); leave it out for no compensation",
    "cross_alpha": "OBS from an importance with the dense-to-pruned cross term (PruneSchedule(cross_term=True) under "
                   "distillation): solve the asymmetric objective with this share of the correction, a float in [0, "
                   "1] (0.5 as the schedule); leave it out for the symmetric sweep. Prune that run's dense teacher (a "
                   "gradual run's default: the model it started from)",
    "round_to": "structured: keep every width it cuts (intermediate_size, hidden_size) a multiple of this int, e.g. "
                "64 or 128 for tensor cores and group-wise quantization kernels; leave it out for any width the "
                "config accepts",
    "reconstruct": "OBS update of the kept weights (needs sparsegpt importance): auto (whenever it has one), true or "
                   "false",
}


# A Python literal after `field=` in a library message: a quoted string, a number, True, False or None.
_VALUE = r"(?P<value>'[^']*'|\"[^\"]*\"|-?\d+(?:\.\d+)?(?:e-?\d+)?|True|False|None)"
# A field's name as a word of its own: not inside a flag (`--block_size`), a call (`PruneSchedule(cross_term=`), an
# attribute or a file name (`sparsity.json`).
_BEFORE, _AFTER = r"(?<![\w.(-])", r"(?![\w(]|\.\w)"
_QUOTES = "'\""


def in_flags(message: str, cls, *, renamed: Mapping[str, str] | None = None, bare: bool = True) -> str:
    """A library message about a config's fields, in the words of the command line that built the config.

    `field=value` becomes `--field value` (`--reconstruct false`, `--allow_collapse`, `no --cross_alpha`) and `leave
    field None` becomes `omit --field` (`leave --reconstruct auto`). With `bare`, for the messages the config itself
    raises, a field's name alone becomes its flag too, and a leftover `None`, `True` or `False` is spelled `omitted`,
    `true`, `false`; without it (any other message, whose prose may use a field's name as a word) only the two forms
    above change.

    Args:
        message (`str`): the library's message.
        cls: the config dataclass whose fields the flags of [`add_config_flags`] come from.
        renamed (`Mapping[str, str]`, *optional*): a flag other than `--field` that set a field
            (`{"structure": "--search_structures"}`).
        bare (`bool`, *optional*, defaults to `True`): also the bare names and Python constants (see above).

    Returns:
        `str`: the message as a command-line user reads it.
    """
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    flags = {name: (renamed or {}).get(name, f"--{name}") for name in fields}
    words = "|".join(sorted(fields, key=len, reverse=True))

    def setting(m: re.Match) -> str:
        name, value = m.group("name"), m.group("value")
        flag, kind = flags[name], fields[name]
        if kind == "bool":  # a switch: given or not
            return flag if value == "True" else f"no {flag}"
        if value in ("True", "False", "None"):
            if kind == "bool | None":
                return f"{flag} {'auto' if value == 'None' else value.lower()}"
            return f"no {flag}" if value == "None" else f"{flag} {value.lower()}"
        return f"{flag} {value.strip(_QUOTES)}"

    def leave(m: re.Match) -> str:
        flag = flags[m.group("name")]
        return f"leave {flag} auto" if fields[m.group("name")] == "bool | None" else f"omit {flag}"

    message = re.sub(rf"{_BEFORE}(?P<name>{words})={_VALUE}", setting, message)
    message = re.sub(rf"\bleave (?P<name>{words}) None\b", leave, message)
    if not bare:
        return message
    message = re.sub(rf"{_BEFORE}(?P<name>{words}){_AFTER}", lambda m: flags[m.group("name")], message)
    return re.sub(r"(?<![\w=])(None|True|False)\b",
                  lambda m: "omitted" if m.group(1) == "None" else m.group(1).lower(), message)


def config_from_flags(cls, values: Mapping, renamed: Mapping[str, str] | None = None):
    """`cls(**values)`, its refusal in the flags' words ([`in_flags`]): the user typed `--cross_alpha`, not the
    keyword.

    Raises:
        ValueError: the config's own refusal, rephrased.
    """
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(in_flags(str(e), cls, renamed=renamed)) from None


def config_fields(cls, only: tuple[str, ...] | None = None) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if only is None or f.name in only]


def add_config_flags(p: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None) -> None:
    """One `--field` per dataclass field, help from its `metadata["help"]` or `FLAG_HELP` (`HfArgumentParser` cannot
    take a `float | dict` field such as `PruneConfig.sparsity`); the dataclass validates the values."""
    for f in dataclasses.fields(cls):
        if only is None or f.name in only:
            p.add_argument(f"--{f.name}", default=f.default, help=FLAG_HELP.get(f.name, f.metadata["help"]),
                           **FLAG_KINDS[f.type])


def add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`-q/--quiet` and `--log_level`, accepted before and after the subcommand (the subcommand's copy only sets a
    value when given, so it never resets one given before it)."""
    # A SUPPRESS default is not shown by the formatter: the subcommand's copy states it.
    parser.add_argument("-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="no progress bars and only errors in the log" + ("" if top else " (default: False)"))
    parser.add_argument("--log_level", choices=LOG_LEVELS, default="warning" if top else argparse.SUPPRESS,
                        help="level of this library's log messages on stderr" + ("" if top else " (default: warning)"))


def add_eval(p: argparse.ArgumentParser, what: str) -> None:
    """The evaluation-window flags `prune --eval_data` and `sweep` share."""
    p.add_argument("--seq_len", type=int, default=256, help=f"tokens per {what} window")
    p.add_argument("--max_windows", type=int, default=64, help=f"{what} windows at most")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in" + (" and saved in (auto: prune the files without loading the "
                                                          "model)" if what == "--eval_data" else ""))


def add_importance_name(p: argparse.ArgumentParser) -> None:
    """`prune`, `inspect` and `sweep` read importance folders: this picks a named one in each (several callbacks on
    one Trainer)."""
    p.add_argument("--importance_name", default=None, metavar="NAME",
                   help="the ImportanceConfig(name=...) of one of several callbacks: reads importance-NAME/")


def add_structured_sweep(p: argparse.ArgumentParser) -> None:
    """`sweep`'s structured flags: the sizes, and the candidates compared at each size."""
    p.add_argument("--sizes", default=None, help="structured: shares of the model's parameters to remove (all of them, "
                   "embeddings included), comma list; '...' continues the step (None: 0.2,0.35,0.5)")
    p.add_argument("--structures", nargs="+", default=None, metavar="STRUCTURE",
                   help="structured: several structures to compare, e.g. 'neurons layers,neurons heads,neurons' "
                   "(replaces --structure)")
    p.add_argument("--unit_statistics", nargs="+", default=None, metavar="STATISTIC",
                   help="structured: unit statistics to compare: activation activation_l2 taylor (importance with "
                   "units=True; None: activation)")
    p.add_argument("--compensations", nargs="+", default=None, metavar="COMPENSATION",
                   help="structured: compensations to compare: none refit mean refit,mean (each given to the structures "
                   "that remove MLP neurons or KV groups; None: none)")


def add_search(p: argparse.ArgumentParser) -> None:
    """`prune --search_structures`: the candidate shapes, and the training text that scores them."""
    p.add_argument("--search_structures", nargs="+", default=None, metavar="STRUCTURE",
                   help="candidate structures of one --target_params budget, e.g. 'layers,neurons neurons hidden,"
                   "neurons': each prunes a copy, the lowest loss on --calibration windows wins (replaces --structure)")
    p.add_argument("--calibration", default=None,
                   help="training text (.txt, .json, .jsonl or a saved dataset) for --search_structures' windows; "
                   "never the evaluation set")
    p.add_argument("--search_windows", type=int, default=16, help="--calibration windows of --seq_len tokens per "
                   "candidate")


def search_candidates(args: argparse.Namespace, config_cls) -> tuple:
    """`prune`'s config from its flags, and with `--search_structures` one config per candidate structure (the other
    flags shared), checked before any loading.

    Returns:
        `tuple`: `(config, candidates)`: without `--search_structures` the flags' config and `None`; with it, the
        first candidate and the list of all (`--round_to` only for those that cut a width, `--compensate` only for
        those that remove MLP neurons or KV groups, as `candidate_configs`).

    Raises:
        ValueError: a config the flags make is refused, `--structure` given beside `--search_structures`, no
            `--calibration`, `--search_windows` below 1 (one line each).
        FileNotFoundError: `--calibration` does not exist.
    """
    import os

    flags = {name: getattr(args, name) for name in config_fields(config_cls)}
    if not args.search_structures:
        return config_from_flags(config_cls, flags), None
    if args.structure != "unstructured":
        raise ValueError("--search_structures replaces --structure: give the candidates to --search_structures only")
    if not args.calibration:
        raise ValueError("--search_structures scores each candidate on windows of training text: pass --calibration "
                         "FILE (never the evaluation set)")
    if not os.path.exists(args.calibration):
        raise FileNotFoundError(f"--calibration {args.calibration}: no such file or folder")
    if args.search_windows < 1:
        raise ValueError(f"--search_windows must be >= 1; got {args.search_windows}")
    from ..config import COMPENSATED_AXES, WIDTH_AXES  # not at import time: --help stays fast
    from ..validation import structure_parts

    def cut_widths(s: str) -> bool:  # --round_to rounds the candidates that cut a width; "layers", "heads" have none
        return bool(set(structure_parts(s) or ()) & set(WIDTH_AXES))

    def serves(s: str) -> bool:  # --compensate makes up for removed neurons / KV groups, not hidden channels or layers
        return bool(set(structure_parts(s) or ()) & set(COMPENSATED_AXES))

    candidates = [config_from_flags(config_cls, {**flags, "structure": s,
                                                 "round_to": flags.get("round_to") if cut_widths(s) else None,
                                                 "compensate": flags.get("compensate") if serves(s) else None},
                                    renamed={"structure": "--search_structures"})
                  for s in args.search_structures]
    return candidates[0], candidates
