"""Fine-tuning: labels (cross-entropy) or distillation from the members' ensemble, written back into the graph.

Defaults follow the retraining literature rather than the NT paper: SGD with momentum 0.9 and a learning
rate decaying linearly to 0 over the run (Zimmer et al., ICLR 2023). `--schedule constant --lr 0.01` gives
the paper's settings.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .data import Dataset
from .errors import OnnxFuseError

NORM_OPS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization"}


class TrainingError(OnnxFuseError):
    """Training diverged or cannot start; nothing is written."""


@dataclass
class TrainOptions:
    epochs: int = 3
    lr: float | None = None            # default: 0.05 for SGD, 1e-3 for Adam
    batch_size: int = 64
    optimizer: str = "sgd"
    schedule: str = "linear"
    momentum: float = 0.9
    weight_decay: float = 0.0
    distill: bool = False
    temperature: float = 2.0
    train_only: str = "all"
    seed: int = 0
    device: str = "cpu"
    target_output: str | None = None
    checkpoint_dir: str | None = None   # save the training state after every epoch
    resume: bool = False                # continue from the last checkpoint in checkpoint_dir

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.05 if self.optimizer == "sgd" else 1e-3)


@dataclass
class TrainResult:
    model: onnx.ModelProto
    history: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)


def bias_norm_tensors(model: onnx.ModelProto) -> set[str]:
    """Biases and normalization scales/shifts: the small, expressive subset PERP retrains."""
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                             for o in n.output}
    names = set()
    for node in model.graph.node:
        if node.op_type in ("Gemm", "Conv") and len(node.input) > 2:
            names.add(node.input[2])
        elif node.op_type in NORM_OPS:
            names.update(node.input[1:3])
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


def finetune(model: onnx.ModelProto, train: Dataset, options: TrainOptions, val: Dataset | None = None,
             teacher_logits: np.ndarray | None = None, progress: bool = False) -> TrainResult:
    """Train a copy of `model` and return it with the tuned initializers. `teacher_logits` (one row per
    training sample) are the members' mean logits, needed for distillation."""
    import torch
    import torch.nn.functional as F

    from .torch_bridge import OnnxModule

    if options.distill and teacher_logits is None:
        raise TrainingError("distillation needs a teacher: pass the members (--teacher a.onnx b.onnx ...)")
    if not options.distill and train.y is None:
        raise TrainingError(f"{train.source} has no labels 'y': fine-tune with --distill (needs no labels)")
    if options.epochs < 0 or options.batch_size < 1:
        raise TrainingError("--epochs must be >= 0 and --batch-size >= 1")
    torch.manual_seed(options.seed)
    rank, world = start_distributed(options.device)
    device = _device(options.device, rank)
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
    lr = options.learning_rate()
    if options.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=options.momentum, weight_decay=options.weight_decay)
    elif options.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=options.weight_decay)
    else:
        raise TrainingError(f"unknown optimizer '{options.optimizer}' (sgd or adam)")
    shard = len(train) // world          # every rank takes the same number of steps
    if shard == 0:
        raise TrainingError(f"{len(train)} samples cannot be shared among {world} processes")
    steps_per_epoch = math.ceil(shard / options.batch_size)
    total = max(1, options.epochs * steps_per_epoch)
    if options.schedule not in ("linear", "constant"):
        raise TrainingError(f"unknown schedule '{options.schedule}' (linear or constant)")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda step: max(0.0, 1 - step / total)) if options.schedule == "linear" else (lambda step: 1.0))

    names = list(train.inputs)
    xs = [torch.from_numpy(np.ascontiguousarray(train.inputs[k])).to(device) for k in names]
    ys = torch.from_numpy(train.y).to(device) if train.y is not None else None
    teacher = torch.from_numpy(teacher_logits.astype(np.float32)).to(device) if options.distill else None
    if ys is not None:
        _check_labels(module, xs, ys, train.source)
    generator = torch.Generator().manual_seed(options.seed)
    history = []
    checkpoints = Checkpoints(options, model, len(train), rank == 0) if options.checkpoint_dir else None
    first = 1
    if checkpoints is not None and options.resume:
        first, history = checkpoints.restore(module, opt, sched, generator)
    elif val is not None:
        history.append({"epoch": 0, **_evaluate(module, val, device)})
    bar = _progress(progress and rank == 0, options.epochs, steps_per_epoch)
    T = options.temperature
    for epoch in range(first, options.epochs + 1):
        module.train()
        order = torch.randperm(len(train), generator=generator)[rank:world * shard:world].to(device)
        running, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * options.batch_size:(step + 1) * options.batch_size]
            out = step_module(*[x[idx] for x in xs])
            if options.distill:
                loss = F.kl_div(F.log_softmax(out / T, 1), F.log_softmax(teacher[idx] / T, 1), reduction="batchmean",
                                log_target=True) * T * T
            else:
                loss = F.cross_entropy(out, ys[idx])
            if not torch.isfinite(loss) or loss.item() > 1e6:
                raise TrainingError(f"the loss diverged ({loss.item():.3g}) at epoch {epoch}, step {step + 1}; "
                                    f"nothing was written: try a lower --lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{running / seen:.4f}")
        row = {"epoch": epoch, "train_loss": _mean_over_ranks(running, seen, world)}
        if val is not None:
            row.update(_evaluate(module, val, device))
        history.append(row)
        if checkpoints is not None:
            checkpoints.save(epoch, module, opt, sched, generator, history)
        if bar is not None and val is not None:
            bar.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val accuracy {row['accuracy']:.4f}")
    if bar is not None:
        bar.close()
    module.eval()
    run = {**asdict(options), "lr": lr, "processes": world}
    if world > 1:
        run["ranks_agree"] = _ranks_agree(module)
        if not run["ranks_agree"]:
            raise TrainingError("the data-parallel processes ended with different weights")
    return TrainResult(module.to("cpu").write_back(), history, run)


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
    interrupted fine-tuning resumes where it stopped and ends with the same weights as an uninterrupted one."""

    SAME_RUN = ("epochs", "lr", "batch_size", "optimizer", "schedule", "momentum", "weight_decay", "distill",
                "temperature", "train_only", "seed", "target_output")

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

    def save(self, epoch, module, opt, sched, generator, history) -> None:
        import torch
        if not self.writer:
            return
        state = {"fingerprint": self.fingerprint, "epoch": epoch, "module": module.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history}
        tmp = self._path().with_suffix(".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self._path())
        except OSError as exc:
            raise TrainingError(f"--checkpoint-dir {self.folder}: cannot write the checkpoint ({exc.strerror})") \
                from None

    def restore(self, module, opt, sched, generator) -> tuple[int, list]:
        """Load the checkpoint with torch's weights-only unpickler (tensors and plain values: it cannot run
        code), check that it belongs to this run before using any of it, then restore every state."""
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
        try:
            module.load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            return int(state["epoch"]) + 1, list(state["history"])
        except Exception as exc:
            raise TrainingError(f"--resume: {self._path()} is damaged ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _check_labels(module, xs, ys, source):
    import torch
    with torch.no_grad():
        module.eval()
        classes = module(*[x[:1] for x in xs]).shape[-1]
    if int(ys.min()) < 0 or int(ys.max()) >= classes:
        raise TrainingError(f"{source}: labels range over [{int(ys.min())}, {int(ys.max())}] but the model "
                            f"has {classes} outputs")


def _evaluate(module, data: Dataset, device) -> dict:
    import torch
    module.eval()
    with torch.no_grad():
        xs = [torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in data.inputs.values()]
        logits = torch.cat([module(*[x[i:i + 2048] for x in xs]) for i in range(0, len(data), 2048)])
    from .runtime import scores
    return scores(logits.double().cpu().numpy(), data.y)


def _progress(enabled: bool, epochs: int, steps: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=epochs * steps, unit="step", desc="fine-tuning", leave=False)
