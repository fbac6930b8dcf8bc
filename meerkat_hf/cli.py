"""`meerkat-hf` command line: one function per subcommand, argparse only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings

from .masks.calibration import PYTHON_DOCS, SELF_GENERATED
from .masks.config import DEFAULT_EXCLUDE, METHODS, SCOPES, TARGETS, SparseMaskConfig
from .federated.__main__ import add_federate_arguments, federate
from .hub.loading import check_model_source, load_model_and_tokenizer, model_display_name
from .masks.mask import SparseMask
from .masks.cache import get_or_compute_mask

logger = logging.getLogger("meerkat_hf")


_SPEC_FIELDS = {f.name: f for f in dataclasses.fields(SparseMaskConfig)}
_SPEC_FLAGS: set[str] = set()  # the fields `mask compute` has flags for


def _spec_argument(parser, flag: str, name: str, **kwargs) -> None:
    """A flag for the `SparseMaskConfig` field `name`, with the field's default and help."""
    f = _SPEC_FIELDS[name]
    kwargs.setdefault("default", f.default)
    kwargs.setdefault("help", f.metadata.get("help"))
    if kwargs.get("action") != "store_true":
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument(flag, dest=name, **kwargs)
    _SPEC_FLAGS.add(name)


def _add_mask_commands(sub) -> None:
    mask = sub.add_parser("mask", help="compute, inspect and publish sparse masks").add_subparsers(dest="mask_cmd", required=True)

    compute = mask.add_parser("compute", help="compute a mask on calibration text (one backprop pass)")
    compute.add_argument("--model", required=True, help="Hub id, local directory, or 'smollm2' (embedded default)")
    compute.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load (dequantized)")
    compute.add_argument("--revision", default=None)
    compute.add_argument("--calibration", required=True,
                         help="a .txt/.jsonl file or directory, 'python_docs' (CPython's docstrings, offline) "
                              "or 'self' (text sampled from the model)")
    compute.add_argument("--text-column", default="text")
    # The spec's flags come from SparseMaskConfig: its defaults, choices and help.
    _spec_argument(compute, "--density", "density", type=float)
    _spec_argument(compute, "--method", "method", choices=METHODS)
    _spec_argument(compute, "--scope", "scope", choices=SCOPES)
    _spec_argument(compute, "--target", "target", choices=TARGETS)
    _spec_argument(compute, "--num-sequences", "calibration_num_sequences", type=int)
    _spec_argument(compute, "--seq-len", "calibration_seq_len", type=int)
    _spec_argument(compute, "--batch-size", "calibration_batch_size", type=int)
    _spec_argument(compute, "--seed", "seed", type=int)
    _spec_argument(compute, "--exclude", "exclude_patterns", action="append", default=None,
                   help="regex of parameter names never selected (repeatable; default: embeddings, lm_head)")
    _spec_argument(compute, "--include", "include_patterns", action="append", default=None,
                   help="regex of parameter names that may be selected (repeatable)")
    compute.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    compute.add_argument("--gradient-checkpointing", action="store_true")
    compute.add_argument("--cache", action="store_true",
                         help="reuse a mask computed earlier for the same weights, spec and calibration file "
                              "(and cache this one): see meerkat_hf.masks.cache")
    compute.add_argument("--out", required=True, help="output directory")
    compute.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    compute.set_defaults(func=cmd_mask_compute)

    info = mask.add_parser("info", help="print a saved mask's statistics")
    info.add_argument("path", help="mask directory or Hub repo id")
    info.add_argument("--revision", default=None)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_mask_info)


def cmd_mask_compute(args) -> int:
    # every input is checked before the model loads: a bad value is one line, at once
    spec = {name: getattr(args, name) for name in _SPEC_FLAGS}
    if spec["exclude_patterns"] is None:
        spec["exclude_patterns"] = list(DEFAULT_EXCLUDE)
    config = SparseMaskConfig(**spec, base_model_name_or_path=model_display_name(args.model), revision=args.revision)
    if args.calibration not in (PYTHON_DOCS, SELF_GENERATED) and not os.path.exists(args.calibration):
        raise FileNotFoundError(f"calibration source {args.calibration} does not exist "
                                f"(a .txt/.jsonl file or directory, {PYTHON_DOCS!r} or {SELF_GENERATED!r})")
    check_model_source(args.model, args.gguf_file, args.revision)
    model, tokenizer = load_model_and_tokenizer(args.model, args.gguf_file, args.dtype, args.revision)
    mask = get_or_compute_mask(model, config, args.calibration, tokenizer, cache=args.cache, text_column=args.text_column,
                               gradient_checkpointing=args.gradient_checkpointing)
    mask.save_pretrained(args.out, repo_id=args.push_to_hub)
    print(format_mask_info(mask))
    print(f"saved to {args.out}")
    if args.push_to_hub:
        print(f"pushed: {mask.push_to_hub(args.push_to_hub)}")
    return 0


def format_mask_info(mask) -> str:
    cfg, st = mask.config, mask.statistics
    lines = [
        f"base model        : {cfg.base_model_name_or_path}",
        f"method / scope    : {cfg.method} / {cfg.scope}",
        f"density           : {cfg.density:g}",
        f"selected k        : {mask.num_selected:,} of {st.get('num_selectable', 0):,} selectable "
        f"({st.get('num_parameters', 0):,} parameters)",
        f"calibration       : {cfg.calibration_source} ({cfg.calibration_num_sequences} x {cfg.calibration_seq_len} tokens, seed {cfg.seed})",
        f"checksum          : {mask.checksum}",
    ]
    for key, label in (("mass_share", "grad-mass share  "), ("top_0.1%_mass_share", "top-0.1% mass    "),
                       ("concentration_ratio", "concentration    ")):
        if st.get(key) is not None:
            lines.append(f"{label} : {st[key]:.4g}" + ("x (top 0.1% / 0.1-1% tier)" if key == "concentration_ratio" else ""))
    k = max(1, mask.num_selected)
    if st.get("per_module_type"):
        lines.append("per module type   :")
        lines += [f"  {t:<28} {c:>10,}  {100 * c / k:6.2f}%" for t, c in st["per_module_type"].items()]
    if st.get("per_layer"):
        lines.append("per layer         : " + ", ".join(f"{l}:{c}" for l, c in st["per_layer"].items()))
    return "\n".join(lines)


def cmd_mask_info(args) -> int:
    mask = SparseMask.from_pretrained(args.path, revision=args.revision)
    if args.json:
        print(json.dumps({"config": mask.config.to_dict(), "num_selected": mask.num_selected,
                          "checksum": mask.checksum, "statistics": mask.statistics}, indent=2))
    else:
        print(format_mask_info(mask))
    return 0


def _add_federate_command(sub) -> None:
    fed = sub.add_parser("federate", help="run a federated Meerkat simulation from a YAML config "
                         "(under `accelerate launch` clients are split across ranks)")
    add_federate_arguments(fed)
    fed.set_defaults(func=cmd_federate)


def cmd_federate(args) -> int:
    if args.model:  # a missing directory or an unreachable Hub id: one line, before anything else starts
        check_model_source(args.model, args.gguf_file)
    return federate(args)


def _add_predict_command(sub) -> None:
    pred = sub.add_parser(
        "predict", help="classify or continue text with a trained delta (loads its recorded base model)",
        description="Classify TEXT with the task the delta was trained on (its prompt and label words), or "
                    "continue TEXT for a language-modelling delta or with --generate. The base model recorded "
                    "in the delta is loaded (the embedded SmolLM2 GGUF offline).")
    pred.add_argument("run_or_delta", metavar="RUN_OR_DELTA",
                      help="a run folder (runs/NAME, uses its final/), a delta folder, or a Hub repo id")
    pred.add_argument("texts", nargs="+", metavar="TEXT",
                      help="input text(s); for a task with several text columns a JSON object of them")
    pred.add_argument("--task", default=None, help="task name from meerkat_hf.tasks (default: the run's own task)")
    pred.add_argument("--generate", action="store_true", help="continue the text instead of classifying it")
    pred.add_argument("--max-new-tokens", type=int, default=32)
    pred.add_argument("--max-length", type=int, default=None, help="prompt length limit in tokens (default: the run's)")
    pred.add_argument("--base", default=None, metavar="MODEL",
                      help="load this base instead of the recorded one (Hub id, local directory or 'smollm2')")
    pred.add_argument("--json", action="store_true", help="one JSON object per text")
    pred.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from .predict import predict_texts

    predictions, template = predict_texts(
        args.run_or_delta, args.texts, task=args.task, force_generate=args.generate, base_model=args.base,
        max_new_tokens=args.max_new_tokens, max_length=args.max_length)
    if args.json:
        for p in predictions:
            print(json.dumps(p.to_dict(), ensure_ascii=False))
        return 0
    if template is not None:
        print(f"task {template.name}: labels {', '.join(template.label_names)}")
        for p in predictions:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in p.scores.items())
            print(f"{p.label}\t({scores})\t{p.text}")
    else:
        for p in predictions:
            print(f"{p.text}{p.generated}")
    return 0


def _add_export_command(sub) -> None:
    exp = sub.add_parser(
        "export", help="write a trained delta in another library's format (--peft: a PEFT SHiRA adapter)",
        description="Export RUN_OR_DELTA so that plain PEFT loads it: PeftModel.from_pretrained(base, OUT) gives the "
                    "outputs of the Meerkat model, with no meerkat-hf installed.")
    exp.add_argument("run_or_delta", metavar="RUN_OR_DELTA", help="a run folder (uses its final/), a delta folder or a Hub id")
    exp.add_argument("out", metavar="OUT", help="the adapter folder to write")
    exp.add_argument("--peft", action="store_true", required=True, help="write a PEFT SHiRA adapter (the only format)")
    exp.add_argument("--max-padding", type=float, default=8.0,
                     help="refuse when SHiRA's one-rank-for-all padding stores more than this many entries per trained "
                          "weight (default 8)")
    exp.add_argument("--force", action="store_true", help="write it whatever the padding")
    exp.add_argument("--base", default=None, metavar="MODEL", help="load this base instead of the recorded one")
    exp.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .modeling.model import MeerkatModel
    from .predict import locate_delta

    if not args.max_padding > 1:
        raise ValueError(f"--max-padding must be > 1 (got {args.max_padding})")
    location = locate_delta(args.run_or_delta)
    model = MeerkatModel.from_pretrained(location.delta, base_model=args.base)
    plan = model.export_peft(args.out, max_padding=args.max_padding, force=args.force)
    print(f"wrote a PEFT SHiRA adapter to {args.out}: {plan.describe()}")
    print(f"load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), {args.out!r})")
    return 0


def _version() -> str:
    from .versions import versions_line

    return versions_line()


class _VersionAction(argparse.Action):
    """`--version`, computed only when asked (reading package metadata costs a little)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meerkat-hf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of meerkat-hf and its core libraries")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_mask_commands(sub)
    _add_federate_command(sub)
    _add_predict_command(sub)
    _add_export_command(sub)
    return parser


def _one_line_deprecation(show):
    """A deprecated setting name on the command line is one `meerkat-hf: warning:` line, not a source excerpt."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FutureWarning) and str(message).startswith("federation config:"):
            print(f"meerkat-hf: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_deprecation(warnings.showwarning)
            return args.func(args)
    except (ValueError, FileNotFoundError, OSError, KeyError, TypeError, FloatingPointError) as err:
        print(f"meerkat-hf: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
