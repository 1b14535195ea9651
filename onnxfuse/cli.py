"""Command line: click commands that parse options, call the API and print. Nothing else lives here."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys

import click

from . import __version__, api
from .errors import OnnxFuseError
from .methods import METHODS, merge_methods
from .options import FuseOptions, cli_fields
from .training import TrainOptions


def _reports_errors(fn):
    """OnnxFuseError -> one line on stderr and exit 2; Ctrl-C -> exit 130 (outputs are written atomically)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _interrupt)      # a kill or a closed terminal cleans up like Ctrl-C
        signal.signal(signal.SIGHUP, _interrupt)
        try:
            return fn(*args, **kwargs)
        except OnnxFuseError as exc:
            _fail(str(exc))
        except click.ClickException:                   # usage errors: one line, from _OneLineErrors
            raise
        except ModuleNotFoundError as exc:
            needed = _EXTRAS.get((exc.name or "").split(".")[0])
            if needed is None:
                raise
            _fail(needed)
        except KeyboardInterrupt:
            click.echo("onnxfuse: interrupted; nothing was written (with --checkpoint-dir, --resume continues "
                       "the fine-tuning)", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("ONNXFUSE_DEBUG"):
                raise
            click.echo(f"onnxfuse: internal error: {type(exc).__name__}: {exc} "
                       f"(set ONNXFUSE_DEBUG=1 for a traceback, and please report it)", err=True)
            sys.exit(1)
    return wrapper


_EXTRAS = {   # optional dependencies, and the install command that brings each
    "torch": "fine-tuning needs torch: pip install 'onnxfuse[train]'",
    "onnxruntime": "this needs onnxruntime: pip install 'onnxfuse[cpu]' (or 'onnxfuse[gpu]' for CUDA; never both)",
}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _fail(message: str):
    click.echo(f"onnxfuse: error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(2)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _OneLineErrors(click.Group):
    """Click's own errors (unknown option, missing argument, bad value) as one `onnxfuse: error:` line and
    exit 2, like every other error, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _NO_ARGS_IS_HELP as exc:                 # `onnxfuse` alone: its help, as with --help
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click.UsageError) and ctx else ""
            _fail(exc.format_message().replace("\n", " ") + hint)
        except click.Abort:
            click.echo("onnxfuse: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def _number(low, high=None, low_open=True, high_open=False):
    """A callback for a float option: finite (no nan, inf, 1e400), above `low` (or at it) and below `high` (or
    at it)."""
    def check(ctx, param, value):
        if value is None:
            return value
        if not math.isfinite(value) or value < low or (low_open and value == low) or \
                (high is not None and (value > high or (high_open and value == high))):
            bounds = f"{'>' if low_open else '>='} {low:g}" + \
                (f" and {'<' if high_open else '<='} {high:g}" if high is not None else "")
            raise click.BadParameter(f"expected a finite number {bounds}, got {value}")
        return value
    return check


def _common(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON summary.")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")(fn)
    return fn


def _output_options(fn):
    fn = click.option("--force", "-f", is_flag=True, help="Overwrite OUTPUT if it exists.")(fn)
    fn = click.option("-o", "--output", required=True, metavar="OUTPUT",
                      help="Where to write the model (written atomically).")(fn)
    return fn


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxfuse")
def main():
    """Fuse several trained ONNX models of one architecture into one model of the original size.

    \b
    Neuron Transplantation: the members are concatenated into a wide model (exactly their
    ensemble), the highest-magnitude neurons of every layer are kept, and the result is
    written as an ONNX model of one member's size and latency.

    \b
    Typical use:
      onnxfuse inspect a.onnx b.onnx           # what will be fused, and can it be
      onnxfuse merge a.onnx b.onnx -o fused.onnx --data train.npz --val val.npz
      onnxfuse eval a.onnx b.onnx fused.onnx --data val.npz --ensemble
      onnxfuse bench fused.onnx --ensemble a.onnx b.onnx   # latency: fused vs ensemble
      onnxfuse concat a.onnx b.onnx -o wide.onnx   # the ensemble as one graph
      onnxfuse prune model.onnx --keep 0.5 -o small.onnx
      onnxfuse finetune model.onnx --data train.npz -o tuned.onnx
    """


def _generated(cls, exclude=()):
    """The click options of the fields of an options dataclass that carry help (onnxfuse.options.option), in
    field order: a new field is a new flag, with its help."""
    def decorate(fn):
        for f in reversed(cli_fields(cls)):
            if f.name not in exclude:
                fn = _option(f)(fn)
        return fn
    return decorate


def _option(f):
    """`--field-name` for one field: its type, range, choices and help from the field and its metadata."""
    meta, name = f.metadata, "--" + f.name.replace("_", "-")
    if isinstance(f.default, bool):
        return click.option(name, is_flag=True, help=meta["help"])
    default = meta.get("cli_default", f.default)
    kind, callback, low, high = meta.get("type", type(f.default)), None, meta.get("min"), meta.get("max")
    if "choices" in meta:
        choices = meta["choices"]
        kind = click.Choice(list(choices() if callable(choices) else choices))
    elif meta.get("auto"):
        kind, callback = str, _learning_rate
    elif meta.get("directory"):
        kind = click.Path(file_okay=False)
    elif meta.get("multiple"):
        kind = str
    elif kind is int and (low is not None or high is not None):
        kind = click.IntRange(low, high, min_open=meta.get("min_open", False), max_open=meta.get("max_open", False))
    elif kind is float and low is not None:
        callback = _number(low, high, meta.get("min_open", False), meta.get("max_open", False))
    return click.option(name, type=kind, default=default, callback=callback, metavar=meta.get("metavar"),
                        multiple=meta.get("multiple", False), help=meta["help"],
                        show_default=default is not None and not meta.get("multiple"))


def _data_options(fn):
    """--data and --val of `merge` and `finetune`."""
    fn = click.option("--val", type=str, default=None, metavar="VAL.npz",
                      help="Validation data: accuracy of members, ensemble and result is reported.")(fn)
    return click.option("--data", type=str, default=None, metavar="TRAIN.npz",
                        help="Training data: .npz with 'x' (or one array per graph input) and labels 'y'.")(fn)


def _learning_rate(ctx, param, value: str):
    if value == "auto":
        return value
    try:
        rate = float(value)
    except ValueError:
        rate = -1.0
    if not rate > 0 or rate != rate or rate == float("inf"):
        raise click.BadParameter(f"expected 'auto' or a positive number, got '{value}'")
    return rate


def _training(kw: dict, data) -> dict:
    """The TrainOptions fields among the parsed options (taken out of `kw`), checked: a fine-tuning option set
    to something that would act needs --data."""
    training = {f.name: kw.pop(f.name) for f in cli_fields(TrainOptions) if f.name in kw}
    if training["resume"] and not training["checkpoint_dir"]:
        raise click.UsageError("--resume needs --checkpoint-dir")
    if not data:
        for f in cli_fields(TrainOptions):
            value = training.get(f.name)
            if f.metadata.get("needs_data") and value not in (None, False, 0, "auto", f.metadata.get(
                    "cli_default", f.default)):
                raise click.UsageError(f"--{f.name.replace('_', '-')} applies to fine-tuning, which needs --data "
                                       f"TRAIN.npz")
    if training["epochs"] is None:
        training["epochs"] = 3 if data else 0
    return training


class _MethodChoice(click.Choice):
    """merge --method: auto and the registered methods that fuse several members, read from the registry when
    used, so that a method registered after this module was imported is offered too."""

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        return ("auto", *merge_methods())

    @choices.setter
    def choices(self, value):           # click.Choice.__init__ sets them; the registry is their source
        pass


class _MethodOption(click.Option):
    """merge --method: its help lists the registered methods when it is shown."""

    def get_help_record(self, ctx):
        self.help = " ".join([
            "auto (the default with --data): measure how alike the members are on the held-out slice of --data and "
            "choose: average for fine-tunes of one checkpoint, nt for independently trained members when "
            "fine-tuning follows, else the best averaging method on that slice.",
            *(f"{name}{' (the default without --data)' if name == 'nt' else ''}: {METHODS[name].help}."
              for name in merge_methods())])
        return super().get_help_record(ctx)


@main.command(short_help="Fuse 2+ models into one of the original size (Neuron Transplantation).")
@click.argument("models", nargs=-1, required=True)
@_output_options
@click.option("--method", cls=_MethodOption, type=_MethodChoice(), default=None)
@_generated(FuseOptions)
@click.option("--fp16", is_flag=True, help="Same as --quantize fp16.")
@_data_options
@_generated(TrainOptions)
@_common
@_reports_errors
def merge(models, output, method, fp16, force, quiet, as_json, data, val, **kw):
    """Fuse MODELS (2 or more, same architecture) by Neuron Transplantation (or, with --method, by
    averaging their aligned weights).

    The result has the members' inputs, outputs and (by default) layer widths. Without
    fine-tuning it is usually worse than the members: give --data to fine-tune it
    (3 epochs by default), and --val to see whether it beats the best member.

    \b
    Example:
      onnxfuse merge a.onnx b.onnx -o fused.onnx --data train.npz --val val.npz
    """
    options = {f.name: kw.pop(f.name) for f in cli_fields(FuseOptions)}
    training = _training(kw, data)
    if fp16 and options["quantize"] not in (None, "fp16"):
        raise click.UsageError("--fp16 and --quantize int8 exclude each other")
    options["quantize"] = "fp16" if fp16 else options["quantize"]
    options = FuseOptions(method or ("auto" if data else "nt"), output=output, force=force, data=data, val=val,
                          training=training, progress=_show_progress(quiet, as_json), **options)
    try:
        result = api.fuse(models, options)
    except api.NoGainError as exc:
        if as_json and api.is_main_process():
            click.echo(json.dumps(exc.summary, indent=2))
        click.echo(f"onnxfuse: {exc}", err=True)
        sys.exit(exc.exit_code)
    _finish(result, quiet, as_json)


@main.command(short_help="Fine-tune any model; same graph, tuned weights.")
@click.argument("model")
@_output_options
@click.option("--teacher", "teachers", multiple=True, metavar="MODEL.onnx",
              help="A teacher model; repeat for an ensemble (mean of logits). Used with --distill.")
@_data_options
@_generated(TrainOptions, exclude=("require_gain",))
@_common
@_reports_errors
def finetune(model, output, teachers, force, quiet, as_json, data, val, **kw):
    """Fine-tune any ONNX MODEL on --data and write it with the same graph, tuned weights."""
    if not data:
        raise click.UsageError("--data is required")
    if kw["epochs"] == 0:
        raise click.UsageError("finetune --epochs must be at least 1")
    if teachers and not kw["distill"]:
        raise click.UsageError("--teacher is used only with --distill (training on the teachers' logits)")
    training = _training(kw, data)
    _finish(api.finetune_with_report(model, data, output, list(teachers) or None, val, force,
                                     _show_progress(quiet, as_json), **training), quiet, as_json)


@main.command(name="eval", short_help="Accuracy and loss of models (and their ensemble) on data.")
@click.argument("models", nargs=-1, required=True)
@click.option("--data", required=True, metavar="DATA.npz", help=".npz with 'x' (or arrays by input name) and 'y'.")
@click.option("--ensemble", is_flag=True, help="Also score the ensemble of MODELS (mean of logits).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider (cuda needs onnxfuse[gpu]).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@_reports_errors
def evaluate(models, data, ensemble, provider, threads, as_json):
    """Accuracy and cross-entropy of each of MODELS (and their ensemble) on DATA, with onnxruntime.
    With float targets 'y' (regression): MSE and MAE."""
    rows = api.evaluate(list(models), data, ensemble, provider, threads)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["model"]) for r in rows)
    if "mse" in rows[0]:
        click.echo(f"{'model':<{width}}  {'MSE':>10}  {'MAE':>10}")
        for r in rows:
            click.echo(f"{r['model']:<{width}}  {r['mse']:>10.5g}  {r['mae']:>10.5g}")
        return
    click.echo(f"{'model':<{width}}  accuracy      loss")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        click.echo(f"{r['model']:<{width}}  {acc:>8}  {loss:>8}")


class _TakesFileLists(click.Command):
    """`--ensemble a.onnx b.onnx ...`: the option takes every argument up to the next option."""

    def parse_args(self, ctx, args):
        out, taking, took = [], False, False
        for arg in args:
            if arg == "--ensemble":
                if taking and not took:
                    out.append(arg)
                taking, took = True, False
            elif taking and not arg.startswith("-"):
                out += ["--ensemble", arg]
                took = True
            else:
                if taking and not took:
                    out.append("--ensemble")   # let click say that it needs a value
                taking = False
                out.append(arg)
        if taking and not took:
            out.append("--ensemble")
        return super().parse_args(ctx, out)


def _batch_sizes(ctx, param, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,32, got '{value}'") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected positive batch sizes such as 1,32, got '{value}'")
    return sizes


@main.command(cls=_TakesFileLists, short_help="onnxruntime latency, throughput and memory of models.")
@click.argument("models", nargs=-1)
@click.option("--ensemble", multiple=True, metavar="A.onnx B.onnx ...",
              help="Also time these models as an ensemble: N sessions run one after the other per request, "
                   "and their wide graph (onnxfuse concat) if they can be concatenated. Takes the files up "
                   "to the next option.")
@click.option("--batch-size", "batch_sizes", default="1,32", show_default=True, callback=_batch_sizes,
              metavar="N[,N...]", help="Batch sizes (symbolic input dimensions are set to it).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider; the provider actually used is reported.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Intra-op threads per session (inter-op: 1).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed runs per model and batch size.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Timed seconds per model and batch size (interleaved with the other models).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement (one fresh process per "
                                                "model and batch size).")
@click.option("--data", default=None, metavar="VAL.npz",
              help="Also score every model (and the ensemble) on this labelled data, to compare float, int8 "
                   "and fp16 versions side by side.")
@click.option("--plot", default=None, metavar="PLOT.png",
              help="Write a plot of accuracy against latency (needs --data and matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@_reports_errors
def bench(models, ensemble, batch_sizes, provider, threads, warmup, seconds, no_memory, data, plot, as_json):
    """Latency (p50/p90/p99), throughput, file size and peak memory of MODELS with onnxruntime.

    Inputs are random (symbolic dimensions = batch size); the models' timing rounds are
    interleaved so that machine noise hits all alike. 'x first' is the p50 latency relative
    to the first row of the same batch size.

    \b
    Example (the fused model should cost about one member, the ensemble about N):
      onnxfuse bench a.onnx fused.onnx --ensemble a.onnx b.onnx --batch-size 1,32

    \b
    Edge versions side by side (accuracy, size, latency, memory) and their plot:
      onnxfuse bench a.onnx fused.onnx fused.int8.onnx fused.fp16.onnx --data val.npz --plot edge.png
    """
    from .bench import benchmark, plot_accuracy_latency
    if plot is not None and data is None:
        raise OnnxFuseError("--plot needs --data (accuracy against latency)")
    log = (lambda m: click.echo(f"onnxfuse: {m}", err=True)) if not as_json and sys.stderr.isatty() else None
    rows = benchmark(list(models), list(ensemble), batch_sizes, provider, threads, warmup, seconds,
                     memory=not no_memory, log=log, data=data)
    if plot is not None:
        plot_accuracy_latency(rows, plot)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    used = sorted({p for r in rows for p in (r["providers"] or [])[:1]})
    click.echo(f"provider: {', '.join(used)} (asked for: {provider}); {threads} intra-op thread"
               f"{'s' if threads > 1 else ''} per session; {seconds:g} s per model and batch size, interleaved")
    width = max(len(r["name"]) for r in rows)
    scored = data is not None
    click.echo(f"{'batch':>5}  {'model':<{width}}  {'p50 ms':>9}  {'p90 ms':>9}  {'p99 ms':>9}  "
               f"{'samples/s':>10}  {'x first':>7}  {'file':>9}  {'peak mem':>9}" + ("  accuracy" if scored else ""))
    for r in rows:
        if r.get("skipped"):
            continue
        acc = "" if not scored else "  " + ("-" if r.get("accuracy") is None else f"{r['accuracy']:>8.4f}")
        click.echo(f"{r['batch_size']:>5}  {r['name']:<{width}}  {r['p50_ms']:>9.4f}  {r['p90_ms']:>9.4f}  "
                   f"{r['p99_ms']:>9.4f}  {r['throughput']:>10,.0f}  {r['p50_vs_first']:>7.2f}  "
                   f"{_size(r['file_bytes']):>9}  {_size(r['peak_memory_bytes']):>9}{acc}")
    if plot is not None:
        click.echo(f"plot: {plot}")
    for note in dict.fromkeys(f"{r['name']}: {r['note']}" for r in rows if r["note"]):
        click.echo(f"note: {note}")


def _size(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _show_progress(quiet: bool, as_json: bool) -> bool:
    return not quiet and not as_json and sys.stderr.isatty()


@main.command(short_help="Write the wide model (the ensemble as one graph).")
@click.argument("models", nargs=-1, required=True)
@_output_options
@click.option("--data", default=None, metavar="DATA.npz",
              help="Inputs on which to measure how far a non-exact wide model is from the ensemble "
                   "(default: random inputs).")
@_common
@_reports_errors
def concat(models, output, data, force, quiet, as_json):
    """Write the wide model: MODELS side by side in one graph.

    Its output is the mean of the members' outputs (logit averaging) wherever the report says
    'exact'; it costs as much to run as the whole ensemble.
    """
    _finish(api.fuse(models, "concat", None, output, force, data=data), quiet, as_json)


@main.command(short_help="int8 or fp16 version of a model, for edge devices.")
@click.argument("model")
@_output_options
@click.option("--calibrate", default=None, metavar="CALIB.npz",
              help="Inputs (as for --data; labels unused) on which activations are calibrated: static int8 "
                   "quantization. Without it, int8 is dynamic, which only MatMul/Gemm-only graphs allow.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=512, show_default=True,
              help="How many samples of --calibrate to use (a fixed random subset if it has more).")
@click.option("--fp16", is_flag=True, help="float16 weights and compute instead of int8 (float32 inputs and "
                                           "outputs kept).")
@click.option("--exclude", "exclude", multiple=True, metavar="NODE",
              help="A node to keep in float (int8 only; repeat for several), e.g. the last layer.")
@click.option("--activations", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="Static int8: the activations' type. uint8 (with int8 weights) is onnxruntime's fast path on "
                   "x86 CPUs; int8 suits hardware where int8 x int8 is (many ARM CPUs).")
@_common
@_reports_errors
def quantize(model, output, calibrate, calib_samples, fp16, exclude, activations, force, quiet, as_json):
    """Write the int8 (default) or fp16 version of MODEL with onnxruntime's quantization tools.

    int8 is static QDQ quantization (per-channel int8 weights, uint8 activations calibrated on
    --calibrate) or, without --calibrate, dynamic quantization of MatMul/Gemm weights. The result
    is run once in onnxruntime before it is written. Compare it with `onnxfuse eval` (accuracy)
    and `onnxfuse bench` (size, latency, memory).

    \b
    Example:
      onnxfuse quantize fused.onnx -o fused.int8.onnx --calibrate train.npz
      onnxfuse eval fused.onnx fused.int8.onnx --data val.npz
    """
    _finish(api.quantize_with_report(model, output, "fp16" if fp16 else "int8", calibrate, exclude, calib_samples,
                                     force, activations), quiet, as_json)


@main.command(short_help="Average models that share one graph (a model soup).")
@click.argument("models", nargs=-1, required=True)
@_output_options
@click.option("--mode", type=click.Choice(["uniform", "greedy"]), default="uniform", show_default=True,
              help="uniform: the mean of all MODELS; greedy: MODELS in order of --val accuracy, each kept "
                   "only if the soup's --val accuracy does not drop.")
@click.option("--val", default=None, metavar="VAL.npz",
              help="Labelled held-out data: every model's and the soup's accuracy are reported (greedy needs it).")
@_common
@_reports_errors
def soup(models, output, mode, val, force, quiet, as_json):
    """Average the weights of MODELS, which must share one graph (same ops, wiring and tensor shapes).

    Made for models fine-tuned from one starting point, e.g. copies of one fused model
    fine-tuned with different seeds (`merge --soup K` does that in one step). Independently
    trained networks do not share their neurons' order: average them with `merge --method`
    instead. Models that do not share one graph are refused, naming the first difference.

    \b
    Example:
      onnxfuse soup tuned_0.onnx tuned_1.onnx tuned_2.onnx -o soup.onnx --val val.npz --mode greedy
    """
    _finish(api.soup_with_report(list(models), output, mode, val, force), quiet, as_json)


@main.command(short_help="Structured magnitude pruning of one model.")
@click.argument("model")
@_output_options
@click.option("--keep", type=float, required=True, metavar="FRACTION", callback=_number(0, 1),
              help="Fraction of every layer's neurons to keep, e.g. 0.5.")
@_common
@_reports_errors
def prune(model, output, keep, force, quiet, as_json):
    """Structured magnitude pruning of one MODEL: keep the top neurons of every layer."""
    _finish(api.fuse([model], "prune", keep, output, force), quiet, as_json)


@main.command(short_help="Channel groups of models, and whether they can be fused.")
@click.argument("models", nargs=-1, required=True)
@click.option("--data", default=None, metavar="DATA.npz",
              help="Labelled data on which to measure the loss barrier between the members (how alike they are) "
                   "and the deviation of a non-exact wide model.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_reports_errors
def inspect(models, data, as_json):
    """Show the channel groups of MODELS and whether they can be fused together.

    Given several models, also how alike they are: the share of identical tensors, the
    distance of their weights and, with --data, the loss along the straight line between
    them. One line says which regime that is: fine-tunes of one checkpoint (one basin:
    weight averaging works), independently trained (averaging fails; use nt), or identical.
    """
    report = api.inspect(models, data)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        if not report.get("compatible", True):
            _fail(f"the models cannot be fused together: {report['incompatibility']}")
        return
    click.echo(f"{report['models'][0]}: {len(report['groups'])} channel groups")
    for g in report["groups"]:
        state = "prunable" if g["prunable"] else "fixed: " + "; ".join(g["why_fixed"])
        click.echo(f"  group {g['id']:<3} width {g['width']:<6} {state}")
        click.echo(f"            layers: {', '.join(g['layers'])}")
    for problem in report["problems"]:
        click.echo(f"  unsupported: {problem}")
    if "compatible" in report:
        click.echo("members: " + ("compatible" if report["compatible"] else
                                  f"NOT compatible: {report['incompatibility']}"))
        for name, verdict in report.get("outputs", {}).items():
            click.echo(f"  wide output '{name}': {verdict}")
        _echo_deviation(report.get("deviation"))
    if "similarity" in report:
        for p in report["similarity"]["pairs"]:
            line = (f"  {p['member']} vs member 0: {p['shared_tensors']} of {p['tensors']} tensors identical, "
                    f"relative weight distance {p['relative_distance']:.3f}")
            if "path" in p:
                line += (f", loss along the line {' '.join(f'{v:.3f}' for v in p['path']['loss'])} "
                         f"(barrier {p['barrier']:.3f})")
            click.echo(line)
        click.echo(f"regime: {report['similarity']['regime']} ({report['similarity']['why']})")
    click.echo("can be fused: " + ("yes" if report["fusable"] else "no"))
    if not report.get("compatible", True):
        _fail(f"the models cannot be fused together: {report['incompatibility']}")


def _finish(result: api.Fusion, quiet: bool, as_json: bool) -> None:
    s = result.summary
    if not api.is_main_process():      # under torchrun, rank 0 speaks for all
        return
    if s.get("beats_best_member") is False:       # never silently worse, even with --quiet or --json
        v = s["versus_best_member"]
        click.echo(f"onnxfuse: warning: the fused model is below the best member {v['best_member']} on {v['on']} "
                   f"({v['metric']} {v['result']:.4g} vs {v['best_member_score']:.4g})"
                   + (f"; {v['caveat']}" if "caveat" in v else ""), err=True)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    if quiet:
        return
    what = METHODS[s["method"]].verb if s["method"] in METHODS else \
        {"finetune": "fine-tuned", "quantize": "quantized", "soup": "averaged (soup)"}[s["method"]]
    click.echo(f"{what}: {', '.join(s['members'])} -> {s.get('output', '(not written)')}")
    for g in s.get("groups", []):
        if "moved_per_member" in g:
            per = ", ".join(f"m{i}: {k}" for i, k in enumerate(g["moved_per_member"]) if i)
            click.echo(f"  group {g['id']:<3} width {g['width']:<6} channels moved ({per})  {', '.join(g['layers'])}")
            continue
        per = ", ".join(f"m{i}: {k}" for i, k in enumerate(g["kept_per_member"]))
        click.echo(f"  group {g['id']:<3} kept {g['kept']:>5} of {g['width'] * len(s['members']):<6} ({per})"
                   f"  {', '.join(g['layers'])}")
    for g in s.get("fixed_groups", []):
        click.echo(f"  group {g['id']:<3} fixed at width {g['width']}: {'; '.join(g['why'])}")
    for name, verdict in s.get("outputs", {}).items():
        click.echo(f"  output '{name}': {verdict}")
    _echo_deviation(s.get("deviation"))
    if "reconstruction" in s:
        r = s["reconstruction"]
        click.echo(f"  reconstructed {len(r['layers'])} layers on {r['samples']} calibration samples "
                   f"({r['seconds']:.2f} s); relative error of each layer's output vs the wide model, "
                   f"transplanted -> refitted:")
        for layer in r["layers"]:
            click.echo(f"    {layer['op']:<6} {layer['layer']:<24} {layer['relative_error_before']:.4f} -> "
                       f"{layer['relative_error_after']:.4f}")
        for why in r["skipped"]:
            click.echo(f"    not refitted: {why}")
    if "training" in s:
        o = s["training"]["options"]
        click.echo(f"  fine-tuned {o['epochs']} epochs ({'distillation' if o['distill'] else 'labels'}, "
                   f"{o['optimizer']}, {o['schedule']} lr from {o['lr']:g}; {o['threads']} thread"
                   f"{'s' if o['threads'] > 1 else ''})")
        if o["lr_choice"]["how"] == "auto":
            click.echo(f"  lr auto: {o['lr_choice']['why']}")
        if o["selected_on"]:
            click.echo(f"  kept epoch {o['selected_epoch']} of {o['epochs']}, the best on "
                       f"{'--val' if o['selected_on'] == 'val' else 'the held-out slice of --data'}")
    if "auto" in s:
        click.echo(f"  --method auto chose {s['auto']['method']}: {s['auto']['why']}")
    if "soup" in s:
        r = s["soup"]
        click.echo(f"  {r['mode']} soup of {len(r['kept'])} of {len(r['ingredients'])} models "
                   f"(kept: {', '.join(str(i) for i in r['kept'])})")
        for i, value in enumerate(r.get("ingredient_scores", [])):
            click.echo(f"    model {i} {r['ingredients'][i]}: held-out accuracy {value:.4f}")
        if "soup_score" in r:
            click.echo(f"    soup: held-out accuracy {r['soup_score']:.4f}")
    if "quantization" in s:
        q = s["quantization"]
        how = q.get("kind") or q.get("io")
        extra = f", calibrated on {q['calibration_samples']} samples" if "calibration_samples" in q else ""
        kept = f"; kept in float: {', '.join(q['excluded'])}" if q.get("excluded") else ""
        click.echo(f"  quantized to {q['mode']} ({how}{extra}{kept})")
    if "accuracy" in s:
        # the JSON keeps its keys; the text does not say "before fine-tuning" when nothing was fine-tuned
        shown = {("result" if k == "result before fine-tuning" and "training" not in s else k): v
                 for k, v in s["accuracy"].items()}
        width = max(len(k) for k in shown)
        for name, sc in shown.items():
            if sc.get("mse") is not None:
                click.echo(f"  {name:<{width}}  val MSE {sc['mse']:.5g}  MAE {sc['mae']:.5g}")
            else:
                click.echo(f"  {name:<{width}}  val accuracy {sc['accuracy']:.4f}  loss {sc['loss']:.4f}"
                           if sc["accuracy"] is not None else f"  {name:<{width}}  (no labels)")
    if s.get("beats_best_member") is not None:
        v = s["versus_best_member"]
        click.echo(f"  {'at least as good as' if s['beats_best_member'] else 'BELOW'} the best member "
                   f"{v['best_member']} on {v['on']}: {v['metric']} {v['result']:.4g} vs {v['best_member_score']:.4g}")
    if "parameters" in s:
        p = s["parameters"]
        click.echo(f"  parameters: {p['output']:,} (one member: {p['member']:,})")
    phases = ", ".join(f"{k} {v:.2f}" for k, v in s.get("phases", {}).items())
    click.echo(f"  {s['seconds']:.2f} s" + (f" ({phases})" if phases else ""))


def _echo_deviation(dev) -> None:
    if not dev:
        return
    if dev.get("on") is None:
        click.echo(f"  deviation from the ensemble: {dev['note']}")
    else:
        click.echo(f"  deviation from the ensemble on {dev['on']}: max abs {dev['max_abs']:.3g} "
                   f"(relative {dev['max_relative']:.3g})")
