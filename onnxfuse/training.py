"""Fine-tuning: labels (cross-entropy; MSE for float regression targets) or distillation from the members'
ensemble, written back into the graph.

The recipe (Zimmer et al., ICLR 2023: short retraining with a learning rate decaying linearly to 0 recovers
as much as long schedules, and its initial value can be chosen adaptively):
- a fixed slice of the training data (`holdout`, default 10%) is never trained on;
- `lr="auto"` (the default) chooses the initial rate on that slice with short probes: every candidate rate
  trains a short probe (the rate held for half of it, then decaying linearly to 0), and the choice is the largest
  rate whose held-out loss is at most (1 + TOLERANCE[optimizer]) x the best probe's (see choose_lr); the probes
  together take PROBE_BUDGET of the steps of the run they serve;
- every epoch is scored on `val` (if given) or on the held-out slice, and the best epoch's weights are
  returned, not the last (epoch 0, the model as given, counts too).
`--schedule constant --lr 0.01 --holdout 0` gives the NT paper's settings.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from .data import Dataset
from .errors import OnnxFuseError
from .graph_index import GraphIndex
from .ops import spec_of
from .options import option


# SGD 0.001 was dropped: chosen in none of 168 runs (benchmarks/results/recipe.md at 955c5ed); the probes of
# the other rates are longer for it
CANDIDATES = {"sgd": (0.1, 0.03, 0.01, 0.003), "adam": (3e-3, 1e-3, 3e-4, 1e-4)}
REFERENCE_BATCH = 64       # CANDIDATES were measured at this batch size; smaller batches scale them (candidate_rates)
PROBE_BUDGET = 0.15        # probes' steps as a fraction of the fine-tuning steps they serve (each probe also
                           # scores the held-out slice: in time they cost about a fifth)
PROBE_SCHEDULE = "hold-decay"
TOLERANCE = {"sgd": 1.5, "adam": 0.15}   # lr auto: the largest rate whose probe loss is at most 1 + TOLERANCE
# times the best probe's. SGD (0.5 until 2026-12-02: chosen on a quick run with 15-epoch members): 1.5 lies in the
# middle of the range 1.2 to 2.0 that gave the same choices on recipe.md's 28 MLP/CNN sets, and was checked on member
# sets not used to choose it (benchmarks/results/recipe_validation.md). Adam (1.5 until 2026-12-02): on the 8 BERT
# sets of recipe.md and recipe_validation.md (3 seeds each), 3e-3 beat 1e-3 wherever its probe loss was within
# 1.08x of the best and lost 12 pp in the one set where it was 1.21-1.24x; 0.15 lies between, and was checked on
# BERT sets of other member seeds (benchmarks/results/recipe_bert_check.md).
HOLDOUT_SPLIT_SEED = 0     # the held-out slice does not depend on --seed (which orders the batches)


class TrainingError(OnnxFuseError):
    """Training diverged or cannot start; nothing is written."""


@dataclass
class TrainOptions:
    """Fine-tuning options; every field with help is also a command-line option (onnxfuse.options.option)."""
    epochs: int = option(3, "Fine-tuning epochs (default 3 when --data is given).", min=0, cli_default=None,
                         needs_data=True)
    lr: float | str | None = option("auto", "Initial learning rate, or 'auto': chosen by short probes on the "
                                            "held-out slice of --data (never --val), 15% of the fine-tuning's "
                                            "steps.", auto=True, needs_data=True)
    batch_size: int = option(64, "Samples per training step.", min=1)
    optimizer: str = option("auto", "SGD (with --momentum), Adam, or auto: Adam for a graph with attention (a "
                                    "MatMul of two computed values), SGD otherwise.",
                            choices=("auto", "sgd", "adam"))
    schedule: str = option("linear", "linear: decay to 0 over the run; constant: the NT paper's setting.",
                           choices=("linear", "constant"))
    momentum: float = option(0.9, "SGD momentum.", min=0, max=1, max_open=True, needs_data=True)
    weight_decay: float = option(0.0, "L2 weight decay (SGD and Adam).", min=0, needs_data=True)
    distill: bool = option(False, "Train on the members' mean logits (KL at --temperature); with labels, mixed "
                                  "with the labels' loss (--distill-weight); needs no labels.", needs_data=True)
    temperature: float = option(1.0, "Distillation temperature.", min=0, min_open=True, needs_data=True)
    distill_weight: float = option(0.5, "With --distill and labels, per sample: loss = w * p * distillation + "
                                        "(1 - w * p) * labels, p the members' probability of the true label "
                                        "where it exceeds the student's, else 0 (1: the members alone).",
                                   min=0, max=1, needs_data=True)
    train_only: str = option("all", "bias-norm: train only biases and normalization parameters (PERP).",
                             choices=("all", "bias-norm"))
    seed: int = option(0, "Shuffling and dropout seed.", min=0, max=2 ** 63 - 1)
    device: str = option("cpu", "Where torch trains.", choices=("cpu", "cuda"))
    target_output: str | None = option(None, "Graph value to train on when the model has several float outputs.",
                                       metavar="NAME", type=str, needs_data=True)
    checkpoint_dir: str | None = option(None, "Save the training state after every epoch (for --resume).",
                                        metavar="DIR", directory=True, needs_data=True)
    resume: bool = option(False, "Continue an interrupted fine-tuning from the checkpoint in --checkpoint-dir.")
    holdout: float = option(0.1, "Fraction of --data never trained on: --lr auto probes on it, and without --val "
                                 "the best epoch is chosen on it (0: no split; needs a numeric --lr).",
                            min=0, max=1, max_open=True)
    threads: int = option(1, "torch and onnxruntime intra-op threads. Results are byte-identical for a given "
                             "thread count; more threads than idle cores slow training down many times.", min=1)
    last_epoch: bool = option(False, "Return the last epoch's weights, not the best epoch's (soup copies do: "
                                     "kept at their best, most copies were the start itself).")
    require_gain: bool = option(False, "Exit with code 3 and write nothing when the fine-tuned result is below the "
                                       "best member on --val (or on the held-out slice of --data).")
    independent: bool = False           # under torchrun: train alone in this process (soup copies), no all-reduce
    task: str = option("auto", "auto: float targets 'y' are regression (MSE), integer labels classification "
                               "(no labels: a 2-D output is class logits).",
                       choices=("auto", "classification", "regression"))

    @property
    def auto_lr(self) -> bool:
        return self.lr is None or self.lr == "auto"


@dataclass
class TrainResult:
    model: onnx.ModelProto
    history: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)


def bias_norm_tensors(model: onnx.ModelProto) -> set[str]:
    """Biases and normalization scales/shifts: the small, expressive subset PERP retrains."""
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                             for o in n.output}
    index = GraphIndex(model)
    names = set()
    for node in index.nodes:
        spec = spec_of(node)
        bias = spec.layout(index, node).bias if spec is not None and spec.layout is not None else None
        if bias is not None and len(node.input) > bias:
            names.add(node.input[bias])
        elif spec is not None and spec.norm_inputs:
            names.update(node.input[i] for i in spec.norm_inputs if i < len(node.input))
        elif node.op_type in ("Add", "Sub"):
            names.update(x for x in node.input if x in constants)
    return names & constants


def require_torch() -> None:
    """Fail early, with the install command, where fine-tuning would need torch and it is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TrainingError("fine-tuning needs torch: pip install 'onnxfuse[train]'") from None


def _device(requested: str, rank: int = 0):
    import torch
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but torch sees no CUDA device here")
    if requested == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device(requested)


def split_holdout(train: Dataset, fraction: float) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part): the held-out part is a fixed random `fraction` of the samples."""
    if not 0 <= fraction < 1:
        raise TrainingError(f"--holdout must be in [0, 1), got {fraction}")
    count = int(round(len(train) * fraction))
    if count == 0 or fraction == 0:
        return train, None
    if count >= len(train):
        raise TrainingError(f"--holdout {fraction} leaves no training data out of {len(train)} samples")
    order = np.random.default_rng(HOLDOUT_SPLIT_SEED).permutation(len(train))
    keep, held = np.sort(order[count:]), np.sort(order[:count])
    return (train.subset(keep, train.source),
            train.subset(held, f"held-out {fraction:g} of {train.source} ({count} samples)"))


def finetune(model: onnx.ModelProto, train: Dataset, options: TrainOptions, val: Dataset | None = None,
             teacher_logits: np.ndarray | None = None, progress: bool = False) -> TrainResult:
    """Train a copy of `model` and return it with the tuned initializers (the best epoch's, see the module
    docstring). `teacher_logits` are the members' mean outputs, needed for distillation: one row per training
    sample, or a function of a Dataset that returns them (then `val` is scored against the teacher too)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return _finetune(model, train, options, val, teacher_logits, progress)
    finally:
        torch.set_num_threads(previous)


def _finetune(model, train, options, val, teacher_logits, progress) -> TrainResult:
    import torch

    from .torch_bridge import OnnxModule

    if options.distill and teacher_logits is None:
        raise TrainingError("distillation needs a teacher: pass the members (--teacher a.onnx b.onnx ...)")
    if not options.distill and train.y is None:
        raise TrainingError(f"{train.source} has no labels 'y': fine-tune with --distill (needs no labels)")
    if options.epochs < 0 or options.batch_size < 1:
        raise TrainingError("--epochs must be >= 0 and --batch-size >= 1")
    if not 0 <= options.distill_weight <= 1:
        raise TrainingError(f"the distillation weight must be between 0 and 1, got {options.distill_weight}")
    if options.threads < 1:
        raise TrainingError(f"--threads must be >= 1, got {options.threads}")
    if options.optimizer == "auto":
        name, why = choose_optimizer(model)
        options, optimizer_choice = replace(options, optimizer=name), {"how": "auto", "why": why}
    else:
        optimizer_choice = {"how": "given (--optimizer)"}
    if options.optimizer not in CANDIDATES:
        raise TrainingError(f"unknown optimizer '{options.optimizer}' (auto, sgd or adam)")
    if options.schedule not in ("linear", "constant"):
        raise TrainingError(f"unknown schedule '{options.schedule}' (linear or constant)")
    if not options.auto_lr and not (isinstance(options.lr, (int, float)) and options.lr > 0):
        raise TrainingError(f"--lr must be a positive number or 'auto', got {options.lr!r}")
    if callable(teacher_logits):
        teach, teacher_logits = teacher_logits, teacher_logits(train)
        if options.distill and val is not None:
            val = replace(val, teacher=teach(val))
    if options.distill and teacher_logits is not None:
        train = replace(train, teacher=np.asarray(teacher_logits))
    train, holdout = split_holdout(train, options.holdout)
    if options.auto_lr and holdout is None:
        raise TrainingError("--lr auto chooses the rate on a held-out slice of the training data: give "
                            "--holdout > 0 (or a rate with --lr)")
    torch.manual_seed(options.seed)
    rank, world = start_distributed(options.device)
    device = _device(options.device, rank)
    if options.independent:            # one soup copy per process: this process trains alone
        rank, world = 0, 1
    from .runtime import logits_output      # onnxruntime is imported only where it is used
    target = logits_output(model, options.target_output)
    module = OnnxModule(model, [target]).to(device)
    step_module = module
    if world > 1:      # gradients all-reduced every step; buffers (BatchNorm statistics) follow rank 0
        step_module = torch.nn.parallel.DistributedDataParallel(module)
    trainable = bias_norm_tensors(model) if options.train_only == "bias-norm" else None
    params = [p for key, p in module.params.items() if trainable is None or module.onnx_names[key] in trainable]
    for key, p in module.params.items():
        p.requires_grad_(trainable is None or module.onnx_names[key] in trainable)
    if not params:
        raise TrainingError(f"no parameters to train with --train-only {options.train_only}")
    shard = len(train) // world          # every rank takes the same number of steps
    if shard == 0:
        raise TrainingError(f"{len(train)} samples cannot be shared among {world} processes")
    steps_per_epoch = math.ceil(shard / options.batch_size)
    total = max(1, options.epochs * steps_per_epoch)
    loop = _Loop(module, step_module, params, train, options, device, rank, world, shard)
    select_on = val if val is not None else holdout

    history = []
    checkpoints = Checkpoints(options, model, len(train), rank == 0) if options.checkpoint_dir else None
    state = checkpoints.load() if checkpoints is not None and options.resume else None
    if state is not None:
        lr, choice = state["lr"], state["lr_choice"]
    elif options.auto_lr:
        clock = time.process_time()
        lr, choice = choose_lr(loop, holdout, total)
        choice["cpu_seconds"] = round(time.process_time() - clock, 3)
        torch.manual_seed(options.seed)        # the run itself is the same as with --lr <chosen rate>
    else:
        lr, choice = float(options.lr), {"how": "given (--lr)"}
    opt, sched = loop.optimizer(lr, total, options.schedule)
    clock = time.process_time()
    generator = torch.Generator().manual_seed(options.seed)
    first, best = 1, None
    if state is not None:
        first, history, best = checkpoints.restore(state, module, opt, sched, generator)
    elif select_on is not None:
        history.append({"epoch": 0, **_evaluate(module, select_on, device, loop)})
        best = _Best(0, history[-1], module)
    bar = _progress(progress and rank == 0, options.epochs, steps_per_epoch)
    for epoch in range(first, options.epochs + 1):
        module.train()
        running, seen = 0.0, 0
        for step, idx in enumerate(loop.epoch(generator, steps_per_epoch)):
            loss = loop.step(opt, sched, idx, f"at epoch {epoch}, step {step + 1}", lr)
            running += loss * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{running / seen:.4f}")
        row = {"epoch": epoch, "train_loss": _mean_over_ranks(running, seen, world)}
        if select_on is not None:
            row.update(_evaluate(module, select_on, device, loop))
            if _merit(row) > _merit(best.score):
                best = _Best(epoch, row, module)
        history.append(row)
        if checkpoints is not None:
            checkpoints.save(epoch, module, opt, sched, generator, history, lr, choice, best)
        if bar is not None and select_on is not None:
            bar.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}, {_figure(row)} on "
                      f"{'--val' if val is not None else 'the held-out slice'}")
    if bar is not None:
        bar.close()
    if best is not None and not options.last_epoch:
        module.load_state_dict(best.state)
    module.eval()
    seconds = round(time.process_time() - clock, 3)
    run = {**asdict(options), "optimizer_choice": optimizer_choice, "lr": lr, "lr_choice": choice, "processes": world,
           "task": "regression" if loop.regression else "classification",
           "trained_on": len(train), "held_out": 0 if holdout is None else len(holdout),
           "selected_on": None if select_on is None else ("val" if val is not None else "holdout"),
           "selected_epoch": options.epochs if best is None or options.last_epoch else best.epoch,
           "run_cpu_seconds": seconds}
    if world > 1:
        run["ranks_agree"] = _ranks_agree(module)
        if not run["ranks_agree"]:
            raise TrainingError("the data-parallel processes ended with different weights")
    return TrainResult(module.to("cpu").write_back(), history, run)


def _figure(row: dict) -> str:
    if row.get("accuracy") is not None:
        return f"accuracy {row['accuracy']:.4f}"
    if row.get("loss") is not None:
        return f"loss {row['loss']:.4g}"
    return f"distillation loss {row.get('distill_loss', float('nan')):.4g}"


class _Best:
    """The best epoch so far: its number, score and a copy of its weights."""

    def __init__(self, epoch: int, score: dict, module):
        self.epoch, self.score = epoch, score
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Loop:
    """One training step and the batch order, shared by the probes and the run."""

    def __init__(self, module, step_module, params, train, options, device, rank, world, shard):
        import torch
        self.module, self.step_module, self.params, self.options = module, step_module, params, options
        self.device, self.rank, self.world, self.shard, self.n = device, rank, world, shard, len(train)
        self.xs = [torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in train.inputs.values()]
        self.ys = torch.from_numpy(train.y).to(device) if train.y is not None else None
        self.teacher = (torch.from_numpy(train.teacher.astype(np.float32)).to(device)
                        if options.distill else None)
        if options.task not in ("auto", "classification", "regression"):
            raise TrainingError(f"unknown task '{options.task}' (auto, classification or regression)")
        if options.task != "auto":
            self.regression = options.task == "regression"
        elif train.y is not None:
            self.regression = train.regression
        else:
            self.regression = not _looks_like_classes(module, self.xs)
        if self.ys is not None and self.regression != train.regression:
            raise TrainingError(f"{train.source}: --task {options.task} needs "
                                f"{'float targets' if self.regression else 'integer labels'} 'y', got {train.y.dtype}")
        if self.ys is not None and (not options.distill or options.distill_weight < 1):
            _check_labels(module, self.xs, self.ys, train.source)

    def optimizer(self, lr: float, total: int, schedule: str):
        import torch
        o = self.options
        if o.optimizer == "sgd":
            opt = torch.optim.SGD(self.params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.Adam(self.params, lr=lr, weight_decay=o.weight_decay)
        shapes = {"linear": lambda step: max(0.0, 1 - step / total), "constant": lambda step: 1.0,
                  # probes: the full rate for the first half, then linear decay to 0
                  "hold-decay": lambda step: min(1.0, max(0.0, 2 - 2 * step / total))}
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, shapes[schedule])

    def epoch(self, generator, steps: int):
        import torch
        b = self.options.batch_size
        order = torch.randperm(self.n, generator=generator)[self.rank:self.world * self.shard:self.world]
        order = order.to(self.device)
        return [order[i * b:(i + 1) * b] for i in range(steps)]

    def step(self, opt, sched, idx, where: str, lr: float, check: bool = True) -> float:
        """One optimizer step; the loss. `check`: a loss that diverged is an error (probes judge afterwards, on
        the held-out slice, which every data-parallel rank sees alike)."""
        out = self.step_module(*[x[idx] for x in self.xs])
        if not self.options.distill:
            loss = self.label_loss(out, self.ys[idx])
        elif self.ys is not None and self.options.distill_weight < 1:
            loss = self.mixed_loss(out, self.teacher[idx], self.ys[idx])
        else:
            loss = self.distill_loss(out, self.teacher[idx])
        value = loss.item()
        if check and (not math.isfinite(value) or value > 1e6):
            raise TrainingError(f"the loss diverged ({value:.3g}) {where}; nothing was written: try a lower "
                                f"--lr (now {lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return value


    @property
    def by_teacher(self) -> bool:
        """Judged by the distillation loss (no labels, or distill_weight 1), else by the labels' loss."""
        return self.options.distill and (self.ys is None or self.options.distill_weight == 1)

    def label_loss(self, out, y):
        import torch.nn.functional as F
        return F.mse_loss(out, y) if self.regression else F.cross_entropy(out, y)

    def mixed_loss(self, out, teacher, y):
        """Distillation with labels. Regression: w * MSE to the teacher + (1 - w) * MSE to the targets. Classes:
        per sample, w * p * distillation + (1 - w * p) * cross-entropy, where p is the teacher's probability of
        the true class where it exceeds the student's, else 0: the members teach a sample as far as they get it
        right and only where they know it better than the student; the labels teach the rest. A plain mix let
        weak members (an ensemble far below what the labels teach) pull the student down by up to 10 pp
        (benchmarks/results/recipe.md at 955c5ed)."""
        import torch.nn.functional as F
        w = self.options.distill_weight
        if self.regression:
            return w * self.distill_loss(out, teacher) + (1 - w) * self.label_loss(out, y)
        known = _label_probability(teacher, y)
        trust = w * known * (known > _label_probability(out.detach(), y))
        return (trust * self.distill_loss(out, teacher, per_sample=True) +
                (1 - trust) * F.cross_entropy(out, y, reduction="none")).mean()

    def distill_loss(self, out, teacher, per_sample: bool = False):
        """KL(softmax(t/T) || softmax(s/T)) * T^2 for classes (the batch mean, or one per sample); MSE to the
        teacher's mean output for regression."""
        import torch.nn.functional as F
        if self.regression:
            return F.mse_loss(out, teacher)
        T = self.options.temperature
        kl = F.kl_div(F.log_softmax(out / T, 1), F.log_softmax(teacher / T, 1),
                      reduction="none" if per_sample else "batchmean", log_target=True)
        return (kl.sum(1) if per_sample else kl) * T * T


def _label_probability(logits, y):
    """softmax(logits)[i, y[i]] for every sample i."""
    import torch.nn.functional as F
    return F.softmax(logits, 1).gather(1, y[:, None])[:, 0]


def _looks_like_classes(module, xs) -> bool:
    """Without labels: a 2-D output with several columns is taken as class logits, anything else as regression."""
    import torch
    with torch.no_grad():
        module.eval()
        out = module(*[x[:1] for x in xs])
    return out.dim() == 2 and out.shape[-1] > 1


def _merit(row: dict) -> tuple:
    """Larger is better: by the labels when the set has them (accuracy, or MSE), else by the distillation loss."""
    from .runtime import merit
    return merit(row) or ((-row["distill_loss"],) if row.get("distill_loss") is not None else ())


def _probe_loss(row: dict, distill: bool):
    return row.get("distill_loss") if distill else row.get("loss")


ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


def choose_optimizer(model: onnx.ModelProto) -> tuple[str, str]:
    """--optimizer auto: Adam for a graph with attention, SGD otherwise, and why. Attention shows as a product
    of two computed values (queries by keys, weights by values), where a layer multiplies a value by weights:
    a MatMul/Einsum with no input that is an initializer or computed from initializers alone (a transposed or
    dequantized weight), or one of onnxruntime's fused attention ops. Measured (benchmarks/results/recipe.md):
    SGD's probes cannot tell its rates apart on a transplanted BERT (every probe ends near chance, and the
    largest rate collapsed the run to 10% where Adam reached 88%); on the MLPs and CNNs SGD chose well."""
    graph = model.graph
    static = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer} | {""}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(x in static for x in node.input)):
            static.update(node.output)
        if node.op_type in ATTENTION_OPS:
            return "adam", f"adam: the graph has attention ({node.op_type} '{node.name}'); SGD otherwise"
        if node.op_type in ("MatMul", "Einsum") and not any(x in static for x in node.input):
            return "adam", (f"adam: the graph has attention ({node.op_type} '{node.name}' multiplies two computed "
                            f"values); SGD otherwise")
    return "sgd", "sgd: the graph has no attention (no product of two computed values); Adam with attention"


def candidate_rates(optimizer: str, batch_size: int) -> tuple[float, ...]:
    """CANDIDATES[optimizer]; for SGD below REFERENCE_BATCH times sqrt(batch_size / REFERENCE_BATCH) (the
    square-root scaling rule: a smaller batch takes noisier steps at the same rate). Measured on 8 member sets
    (benchmarks/results/recipe_batch.md): at batch 8 the unscaled SGD grid let the probes choose 0.1, which
    collapsed later in the run (a probe is too short to show it: 30 pp lost on MNIST-1D, 29% accuracy on the
    sample CNNs); linear scaling lost more than square-root; scaling up above 64 chose rates that collapsed (up
    to 61 pp lost at batch 256); Adam's grid did best unscaled at batch 8."""
    scale = math.sqrt(batch_size / REFERENCE_BATCH) if optimizer == "sgd" and batch_size < REFERENCE_BATCH else 1.0
    return tuple(float(f"{lr * scale:.3g}") for lr in CANDIDATES[optimizer])


def choose_lr(loop: _Loop, holdout: Dataset, total: int) -> tuple[float, dict]:
    """Probe every rate of candidate_rates: train `length` steps from the starting weights (PROBE_SCHEDULE: the rate
    held for half the probe, so that a rate that kills the network early shows, then decaying linearly to 0
    so that transient damage can settle; PROBE_BUDGET * `total` steps in all) and take the loss on the
    held-out slice. The choice is the largest rate whose probe loss is at most (1 + TOLERANCE[optimizer]) x the
    best's: a probe much shorter than the run favours low rates (a high rate first disturbs the transplanted weights and
    recovers later in the run), so it is trusted to rule out rates that do lasting damage or diverge, not to
    rank the others. Deterministic, and the same on every data-parallel rank."""
    import torch
    # the batch of one step: under torchrun every rank's gradients are averaged
    candidates = candidate_rates(loop.options.optimizer, loop.options.batch_size * loop.world)
    length = max(1, int(PROBE_BUDGET * total / len(candidates)))
    start = {k: v.detach().clone() for k, v in loop.module.state_dict().items()}
    probes = []
    for lr in candidates:
        loop.module.load_state_dict(start)
        loop.module.train()
        opt, sched = loop.optimizer(lr, length, PROBE_SCHEDULE)
        generator = torch.Generator().manual_seed(loop.options.seed + 1)
        taken = 0
        while taken < length:
            for idx in loop.epoch(generator, math.ceil(loop.shard / loop.options.batch_size))[:length - taken]:
                loop.step(opt, sched, idx, "", lr, check=False)
                taken += 1
        row = _evaluate(loop.module, holdout, loop.device, loop)
        loss = _probe_loss(row, loop.by_teacher)
        if loss is not None and not (math.isfinite(loss) and loss < 1e6):
            loss = None                                  # diverged: out
        probes.append({"lr": lr, "steps": taken, "holdout_loss": loss, "holdout_accuracy": row.get("accuracy")})
    loop.module.load_state_dict(start)
    finite = [p for p in probes if p["holdout_loss"] is not None and math.isfinite(p["holdout_loss"])]
    if not finite:
        raise TrainingError(f"every candidate learning rate diverged ({', '.join(map(str, candidates))}): "
                            f"give one with --lr")
    best = min(p["holdout_loss"] for p in finite)
    tolerance = TOLERANCE[loop.options.optimizer]
    chosen = max(p["lr"] for p in finite if p["holdout_loss"] <= best * (1 + tolerance))
    steps = sum(p["steps"] for p in probes)
    why = (f"{chosen:g}, the largest of {len(candidates)} rates whose held-out loss after a {length}-step probe is at most "
           f"{1 + tolerance:g} x the best ({best:.4g}); {len(holdout)} held-out samples; probes took {steps} steps, "
           f"{steps / total:.0%} of the {total} fine-tuning steps")
    return chosen, {"how": "auto", "why": why, "probe_steps": steps, "run_steps": total, "probes": probes}


def start_distributed(device: str) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: gloo on the CPU, nccl on
    CUDA. A plain run is rank 0 of 1."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _mean_over_ranks(total: float, count: int, world: int) -> float:
    if world == 1:
        return total / count
    import torch
    import torch.distributed as dist
    both = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(both)
    return float(both[0] / both[1])


def _ranks_agree(module) -> bool:
    import torch
    import torch.distributed as dist
    digest = hashlib.sha256()
    for value in list(module.state_dict().values()):
        digest.update(value.detach().cpu().numpy().tobytes())
    mine = torch.tensor(list(digest.digest()[:8]), dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return all(torch.equal(mine, other) for other in everyone)


class Checkpoints:
    """The training state after each epoch in `checkpoint_dir` (written atomically, latest only), so that an
    interrupted fine-tuning resumes where it stopped and ends with the same weights as an uninterrupted one.
    It holds the chosen learning rate (the probes are not rerun) and the best epoch's weights."""

    SAME_RUN = ("epochs", "lr", "batch_size", "optimizer", "schedule", "momentum", "weight_decay", "distill",
                "temperature", "distill_weight", "last_epoch", "train_only", "seed", "target_output", "holdout",
                "threads")

    def __init__(self, options: TrainOptions, model: onnx.ModelProto, samples: int, writer: bool = True):
        import json
        from pathlib import Path
        self.folder = Path(options.checkpoint_dir)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"--checkpoint-dir {self.folder}: cannot be used as a folder ({exc.strerror})") \
                from None
        run = {k: getattr(options, k) for k in self.SAME_RUN}
        run["samples"] = samples
        weights = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
        self.fingerprint = hashlib.sha256((json.dumps(run, sort_keys=True) + weights).encode()).hexdigest()
        self.writer = writer

    def _path(self):
        return self.folder / "onnxfuse-finetune.pt"

    def save(self, epoch, module, opt, sched, generator, history, lr, choice, best) -> None:
        import torch
        if not self.writer:
            return
        state = {"fingerprint": self.fingerprint, "epoch": epoch, "module": module.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                 "lr": lr, "lr_choice": choice,
                 "best": None if best is None else {"epoch": best.epoch, "score": best.score, "state": best.state}}
        tmp = self._path().with_suffix(".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self._path())
        except OSError as exc:
            raise TrainingError(f"--checkpoint-dir {self.folder}: cannot write the checkpoint ({exc.strerror})") \
                from None

    def load(self) -> dict:
        """Load the checkpoint with torch's weights-only unpickler (tensors and plain values: it cannot run
        code) and check that it belongs to this run before any of it is used."""
        import torch
        if not self._path().is_file():
            raise TrainingError(f"--resume: no checkpoint in {self.folder}")
        try:
            state = torch.load(self._path(), weights_only=True, map_location="cpu")
        except Exception as exc:
            raise TrainingError(f"--resume: {self._path()} is not a readable onnxfuse checkpoint "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") \
                from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"--resume: the checkpoint in {self.folder} belongs to another run (other model, "
                                f"data or training options)")
        return state

    def restore(self, state, module, opt, sched, generator):
        """Restore every state from a loaded checkpoint; a damaged one is a clean error."""
        import torch
        try:
            module.load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            best = None
            if state["best"] is not None:
                best = _Best.__new__(_Best)
                best.epoch, best.score, best.state = (state["best"]["epoch"], state["best"]["score"],
                                                      state["best"]["state"])
            return int(state["epoch"]) + 1, list(state["history"]), best
        except Exception as exc:
            raise TrainingError(f"--resume: {self._path()} is damaged ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _check_labels(module, xs, ys, source):
    import torch
    with torch.no_grad():
        module.eval()
        out = module(*[x[:1] for x in xs])
    if torch.is_floating_point(ys):
        if list(ys.shape[1:]) != list(out.shape[1:]):
            raise TrainingError(f"{source}: regression targets 'y' have shape {['batch', *ys.shape[1:]]}, but the "
                                f"model's output has shape {['batch', *out.shape[1:]]}")
        return
    classes = out.shape[-1]
    if int(ys.min()) < 0 or int(ys.max()) >= classes:
        raise TrainingError(f"{source}: labels range over [{int(ys.min())}, {int(ys.max())}] but the model "
                            f"has {classes} outputs")


def _evaluate(module, data: Dataset, device, loop=None) -> dict:
    """Scores on `data` (its labels), and the distillation loss if `data` carries the teacher's outputs."""
    import torch
    module.eval()
    with torch.no_grad():
        xs = [torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in data.inputs.values()]
        logits = torch.cat([module(*[x[i:i + 2048] for x in xs]) for i in range(0, len(data), 2048)])
        from .runtime import scores     # onnxruntime is imported only where it is used
        row = scores(logits.double().cpu().numpy(), data.y)
        if loop is not None and loop.options.distill and data.teacher is not None:
            t = torch.from_numpy(data.teacher.astype(np.float32)).to(device)
            row["distill_loss"] = float(loop.distill_loss(logits, t))
    return row


def _progress(enabled: bool, epochs: int, steps: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=epochs * steps, unit="step", desc="fine-tuning", leave=False)
