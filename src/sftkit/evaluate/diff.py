"""What fine-tuning changed in the weights: relative change per layer and the share of weights moved.

    sftkit diff models/base runs/sft/final                 # a full fine-tune (or any checkpoints/step-N/)
    sftkit diff models/base runs/lora/final                # a LoRA adapter, merged onto BASE in memory (PEFT)
    sftkit diff models/base runs/sft/final --png diff.png --per-tensor --threshold 0.01

For every weight tensor in both models, with W the base's and dW = W_tuned - W:

    relative change = ||dW|| / ||W||                        (Frobenius norms)
    moved           = share of elements with |dW| > threshold * rms(W)   (threshold 0.01 by default:
                      a weight moved by more than 1% of its tensor's typical magnitude)

Tensors are grouped per decoder layer (`layers.N.`, `h.N.`, `blocks.N.`), the others by module
(embeddings, final norm, output head); a group's relative change is sqrt(sum ||dW||^2) / sqrt(sum ||W||^2)
and its moved share counts elements. Full models are read tensor by tensor with safetensors (no
model class); an adapter is merged onto the base with PEFT, which needs the model class. Embeddings
grown for new tokens (the control tokens of a chat template) are compared on the rows both have; the
added rows have no "before" and are reported apart.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from sftkit.lora import is_adapter_dir
from sftkit.model import ModelError, check_local_dir

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class TensorDelta:
    """One weight tensor: squared norms of the change and of the base, element counts."""

    name: str
    delta_sq: float
    base_sq: float
    numel: int
    moved: int
    added_rows: int = 0

    @property
    def relative(self) -> float:
        return math.sqrt(self.delta_sq / self.base_sq) if self.base_sq else (0.0 if not self.delta_sq else math.inf)


@dataclass
class GroupDelta:
    """A decoder layer (or a module outside the layers) and its tensors."""

    name: str
    tensors: list[TensorDelta]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def relative(self) -> float:
        base = sum(t.base_sq for t in self.tensors)
        change = sum(t.delta_sq for t in self.tensors)
        return math.sqrt(change / base) if base else (0.0 if not change else math.inf)

    @property
    def moved(self) -> float:
        return sum(t.moved for t in self.tensors) / max(self.numel, 1)

    @property
    def is_layer(self) -> bool:
        return self.name.startswith("layer ")


@dataclass
class WeightDiff:
    """The whole comparison; `table()`, `plot()` and `summary()` present it."""

    base: str
    tuned: str
    threshold: float
    tensors: list[TensorDelta]
    only_base: list[str] = field(default_factory=list)
    only_tuned: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)

    def groups(self) -> list[GroupDelta]:
        """Groups in model order (the order the tensors first appear)."""
        out: dict[str, list[TensorDelta]] = {}
        for tensor in self.tensors:
            out.setdefault(group_of(tensor.name), []).append(tensor)
        return [GroupDelta(name, tensors) for name, tensors in out.items()]

    def summary(self) -> dict[str, float | int | str | None]:
        """Median and max relative change over the decoder layers, the overall figures, added rows."""
        layers = [g for g in self.groups() if g.is_layer] or self.groups()
        changes = [g.relative for g in layers]
        worst = max(layers, key=lambda g: g.relative) if layers else None
        whole = GroupDelta("all", self.tensors)
        return {
            "layers": len(layers), "median_relative": statistics.median(changes) if changes else None,
            "max_relative": worst.relative if worst else None, "max_layer": worst.name if worst else None,
            "overall_relative": whole.relative, "overall_moved": whole.moved, "threshold": self.threshold,
            "compared_parameters": whole.numel, "added_rows": sum(t.added_rows for t in self.tensors),
        }

    def table(self, per_tensor: bool = False) -> str:
        """The terminal table: one row per layer (or per tensor), then the summary and what was left out."""
        rows = [(t.name, 1, t.numel, t.relative, t.moved / max(t.numel, 1)) for t in self.tensors] if per_tensor \
            else [(g.name, len(g.tensors), g.numel, g.relative, g.moved) for g in self.groups()]
        width = max([len("tensor" if per_tensor else "layer")] + [len(r[0]) for r in rows])
        lines = [f"{self.base}  ->  {self.tuned}",
                 f"{'tensor' if per_tensor else 'layer':<{width}}  {'tensors':>7}  {'params':>12}  "
                 f"{'|dW|/|W|':>10}  {'moved':>7}"]
        for name, count, numel, relative, moved in rows:
            lines.append(f"{name:<{width}}  {count:>7}  {numel:>12,}  {relative:>10.3e}  {moved:>7.1%}")
        s = self.summary()
        if s["median_relative"] is not None:
            lines.append(f"decoder layers: median |dW|/|W| {s['median_relative']:.3e}, max {s['max_relative']:.3e} "
                         f"({s['max_layer']}); all {s['compared_parameters']:,} compared weights: "
                         f"{s['overall_relative']:.3e}, {s['overall_moved']:.1%} moved")
        lines.append(f"moved = |dW| > {self.threshold:g} x rms(W) of its tensor")
        for t in self.tensors:
            if t.added_rows:
                lines.append(f"{t.name}: {t.added_rows} rows added (new tokens), not in the base: left out")
        for label, names in (("only in the base", self.only_base), ("only in the tuned model", self.only_tuned),
                             ("shape changed, not compared", self.reshaped)):
            if names:
                lines.append(f"{label}: {', '.join(names)}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A bar per layer (and per module outside the layers) of ||dW|| / ||W||."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = self.groups()
        values = [g.relative for g in groups]
        finite = [v for v in values if v > 0 and math.isfinite(v)]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(groups) + 2), 4))
        ax.bar(range(len(groups)), [v if math.isfinite(v) else 0 for v in values],
               color=["tab:blue" if g.is_layer else "tab:orange" for g in groups])
        ax.set_xticks(range(len(groups)), [g.name for g in groups], rotation=60, ha="right", fontsize=8)
        if finite and max(finite) / min(finite) > 50:
            ax.set_yscale("log")
        ax.set_ylabel("||dW|| / ||W||")
        short = ["/".join(Path(p).parts[-2:]) for p in (self.tuned, self.base)]
        ax.set_title(f"weight change: {short[0]} vs {short[1]}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def to_json(self) -> str:
        groups = [{"name": g.name, "params": g.numel, "relative": g.relative, "moved": g.moved} for g in self.groups()]
        return json.dumps({"summary": self.summary(), "groups": groups}, indent=1)


def group_of(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `layer 3`; `model.embed_tokens.weight` -> `model.embed_tokens`."""
    match = LAYER.search(name)
    if match:
        return f"layer {int(match.group(1))}"
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


# -- reading weights ----------------------------------------------------------------------------
Weights = dict[str, Callable[[], torch.Tensor]]


def safetensors_weights(directory: str | Path) -> Weights:
    """name -> loader of that tensor, over every *.safetensors file of `directory` (read lazily)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{directory}: no *.safetensors weights to compare")
    weights: Weights = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
        for name in names:
            weights[name] = lambda path=path, name=name: _read(path, name)
    return weights


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


def merged_adapter_weights(adapter_dir: str | Path, base_dir: str | Path) -> Weights:
    """The adapter merged onto `base_dir` in memory (LoRA, DoRA, modules_to_save), tied aliases dropped."""
    from sftkit.lora import load_adapter

    model, _ = load_adapter(adapter_dir, base=base_dir)
    merged = model.merge_and_unload()
    seen: set[int] = set()
    weights: Weights = {}
    for name, tensor in merged.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied output head: the same tensor as the embeddings
            continue
        seen.add(tensor.data_ptr())
        weights[name] = lambda tensor=tensor: tensor.detach()
    return weights


def open_weights(path: str | Path, base_dir: str | Path) -> Weights:
    """A model directory's weights; an adapter directory's merged onto `base_dir`."""
    if is_adapter_dir(path):
        return merged_adapter_weights(path, base_dir)
    return safetensors_weights(check_local_dir(path, "TUNED"))


# -- comparing ----------------------------------------------------------------------------------
def tensor_delta(name: str, base: torch.Tensor, tuned: torch.Tensor, threshold: float) -> TensorDelta:
    """The change of one tensor; extra leading rows of `tuned` (new tokens) are counted, not compared."""
    added = 0
    if base.ndim and tuned.shape[0] > base.shape[0] and tuned.shape[1:] == base.shape[1:]:
        added = tuned.shape[0] - base.shape[0]
        tuned = tuned[: base.shape[0]]
    base32, delta = base.float(), tuned.float() - base.float()
    base_sq = float(torch.linalg.vector_norm(base32, dtype=torch.float64) ** 2)
    delta_sq = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    rms = math.sqrt(base_sq / max(base.numel(), 1))
    moved = int((delta.abs() > threshold * rms).sum())
    return TensorDelta(name, delta_sq, base_sq, base.numel(), moved, added)


def weight_diff(base: str | Path, tuned: str | Path, threshold: float = 0.01) -> WeightDiff:
    """Compare every weight tensor the two models share (see the module docstring)."""
    if threshold < 0:
        raise ValueError(f"--threshold: {threshold} must be >= 0")
    base_weights = safetensors_weights(check_local_dir(base, "BASE"))
    tuned_weights = open_weights(tuned, base)
    report = WeightDiff(str(base), str(tuned), threshold, [])
    report.only_base = [n for n in base_weights if n not in tuned_weights]
    report.only_tuned = [n for n in tuned_weights if n not in base_weights]
    for name in (n for n in base_weights if n in tuned_weights):
        a, b = base_weights[name](), tuned_weights[name]()
        if not a.is_floating_point():
            continue
        if a.shape != b.shape and not (a.ndim and b.shape[0] > a.shape[0] and a.shape[1:] == b.shape[1:]):
            report.reshaped.append(f"{name} {tuple(a.shape)} -> {tuple(b.shape)}")
            continue
        report.tensors.append(tensor_delta(name, a, b, threshold))
    if not report.tensors:
        raise ModelError(f"{base} and {tuned} share no weight tensor: are they the same architecture?")
    return report


def iter_layers(report: WeightDiff) -> Iterator[tuple[str, float]]:
    """(layer name, relative change) of the decoder layers, in order."""
    for group in report.groups():
        if group.is_layer:
            yield group.name, group.relative
