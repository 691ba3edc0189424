"""Recipes: YAML validated by a pydantic schema, loaded by name or path, with --set overrides.

Targets are explicit (``flops_reduction``, ``params_reduction`` or ``keep_ratio``),
never a bare percentage. Every validation error names the file and the dotted key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cascadec.errors import UserError, first_line
from cascadec.names import CRITERIA, DATASETS, DEFAULT_LATENCY_RANKING, LATENCY_BACKENDS, LATENCY_RANKINGS
from cascadec.profile.defaults import DEFAULT_DURATION_S, DEFAULT_MIN_ITERS, DEFAULT_ROUNDS, MIN_WARMUP_S
from cascadec.verify.gates import DEFAULT_ILL_CONDITIONED, DEFAULT_MIN_TOP1_AGREEMENT, DEFAULT_TOLERANCES, PRECISIONS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    name: str = Field(description="registry name: a torchvision classification model or one of ours")
    weights: Optional[str] = Field(None, description="torchvision weights name, .pt/.pth state dict or .safetensors")
    num_classes: Optional[int] = Field(None, ge=1, description="defaults to the data set's")
    in_channels: Optional[int] = Field(None, ge=1, description="defaults to the data set's")
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of a timm/ or file.py:builder model's builder"
    )


# the vocabularies' one home (cascadec/names.py): DATASETS is checked by name so that a typo is a
# recipe error naming the file and the key, with close matches
Criterion = Literal[CRITERIA]  # type: ignore[valid-type]
LatencyBackend = Literal[LATENCY_BACKENDS]  # type: ignore[valid-type]
LatencyRanking = Literal[LATENCY_RANKINGS]  # type: ignore[valid-type]


class DataSection(_Strict):
    name: str = "fashion_mnist"
    root: Optional[str] = None
    image_size: Optional[int] = Field(None, ge=8)
    train_limit: Optional[int] = Field(None, ge=1, description="use a seeded subset of the training set")
    val_limit: Optional[int] = Field(
        None, ge=1, description="evaluate on a seeded subset of the val/test split (fast tests only)"
    )
    selection_size: Optional[int] = Field(
        None,
        ge=1,
        description="training images held out for decisions (promotion, best epoch); default 10 %, at most 5000",
    )
    batch_size: int = Field(128, ge=1)
    workers: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = Field(
        0, description='DataLoader worker processes per training process; "auto" sizes them from the CPU count'
    )
    download: bool = False
    options: dict[str, Any] = Field(
        default_factory=dict, description="data-set specific: synthetic sizes, augment (checked by the data set)"
    )

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            close = difflib.get_close_matches(str(value), DATASETS, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"unknown dataset {str(value)[:60]!r}; {hint}known: {', '.join(DATASETS)}")
        return value

    @field_validator("options")
    @classmethod
    def _no_common_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Keys every data set takes have their own recipe key; a copy here would collide with it."""
        moved = {
            "root": "data.root",
            "image_size": "data.image_size",
            "download": "data.download",
            "seed": "train.seed",
            "train_limit": "data.train_limit",
            "val_limit": "data.val_limit",
            "selection_size": "data.selection_size",
        }
        for key in value:
            if key in moved:
                raise ValueError(f"{key!r} is not a data-set option here; set {moved[key]} instead")
        return value


class TeacherSection(_Strict):
    """How to get a teacher when ``model.weights`` is empty: train one (cached by recipe hash)."""

    train_epochs: int = Field(0, ge=0)
    lr: float = Field(0.05, gt=0)
    cache: bool = True


def target_budget(
    flops_reduction: float | None = None,
    params_reduction: float | None = None,
    keep_ratio: float | None = None,
    latency_reduction: float | None = None,
    latency_ms: float | None = None,
    base_latency_ms: float | None = None,
) -> tuple[str, float]:
    """The one rule for a pruning target: exactly one of them, as (metric, kept fraction in
    (0, 1]) with metric ``flops``, ``params``, ``units`` or ``latency``. The schema and
    :meth:`cascadec.prune.targets.Budget.from_target` both apply it; ValueError names the problem.
    ``latency_ms`` is absolute: its fraction needs the unpruned network's latency (unknown to the
    schema, which then only counts the targets)."""
    given = [
        (k, v)
        for k, v in (
            ("flops", flops_reduction),
            ("params", params_reduction),
            ("units", keep_ratio),
            ("latency", latency_reduction),
            ("latency_ms", latency_ms),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of flops_reduction, params_reduction, keep_ratio, latency_reduction, latency_ms"
        )
    metric, value = given[0]
    if metric == "latency_ms":
        if base_latency_ms is None:
            return "latency", 1.0
        if value >= base_latency_ms:
            raise ValueError(
                f"latency_ms {value:g}: the unpruned network already takes {base_latency_ms:.3g} ms on this backend"
            )
        return "latency", value / base_latency_ms
    fraction = value if metric == "units" else 1.0 - value
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{metric} value {value} is outside (0, 1)")
    return metric, fraction


class TargetSection(_Strict):
    flops_reduction: Optional[float] = Field(None, gt=0, lt=1)
    params_reduction: Optional[float] = Field(None, gt=0, lt=1)
    keep_ratio: Optional[float] = Field(None, gt=0, le=1)
    latency_reduction: Optional[float] = Field(
        None, gt=0, lt=1, description="0.5 = half the latency (2x faster) on prune.latency's backend, as measured"
    )
    latency_ms: Optional[float] = Field(None, gt=0, description="milliseconds per batch on prune.latency's backend")

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSection:
        target_budget(
            self.flops_reduction, self.params_reduction, self.keep_ratio, self.latency_reduction, self.latency_ms
        )
        return self

    @property
    def is_latency(self) -> bool:
        return self.latency_reduction is not None or self.latency_ms is not None

    def describe(self) -> str:
        if self.latency_reduction is not None:
            return f"{1 / (1 - self.latency_reduction):.3g}x lower latency"
        if self.latency_ms is not None:
            return f"{self.latency_ms:g} ms latency"
        if self.flops_reduction is not None:
            return f"{self.flops_reduction:.0%} fewer FLOPs"
        if self.params_reduction is not None:
            return f"{self.params_reduction:.0%} fewer parameters"
        return f"keep {self.keep_ratio:.0%} of prunable channels"


class LatencySection(_Strict):
    """Where a latency target is measured (the latency table: prune/latency.py) and how strictly
    the profiled student is held to it."""

    backend: LatencyBackend = "onnxruntime"
    batch: int = Field(1, ge=1)
    precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="the precision the student ships in: int8 times the table, the refinement and the gate on "
        "the quantize stage's ONNX Runtime INT8 graphs (needs quantize.precision: int8), so a target such as "
        "latency_reduction 0.67 (3x) counts from the FP32 teacher and prunes only what INT8 does not already give",
    )
    grid_points: int = Field(4, ge=2, le=16, description="widths timed per prunable axis of each layer")
    multiple: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        "auto",
        description="widths the table times, and the rounding a latency target applies when round_to is unset; "
        "auto: the channel block the backend's kernels step by, probed on this machine (16 on an AVX-512 CPU "
        "with ONNX Runtime; 8 where latency is smooth in width)",
    )

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> LatencySection:
        if self.precision == "int8" and self.backend != "onnxruntime":
            raise ValueError(
                f"prune.latency.precision int8 is timed on onnxruntime (x86 VNNI kernels); {self.backend} has no "
                "int8 kernels worth targeting"
            )
        return self

    @property
    def fixed_multiple(self) -> int | None:
        """``multiple`` as the table builder takes it: None to probe."""
        return None if self.multiple == "auto" else int(self.multiple)

    ranking: LatencyRanking = Field(
        DEFAULT_LATENCY_RANKING,
        description="what the solver divides a unit's importance by under a latency budget: per_ms_per_flop, its "
        "milliseconds per FLOP (the FLOPs solver's ranking where time follows FLOPs, and FLOPs that are cheap in "
        "time kept first where it does not); per_ms, its milliseconds (HALP's knapsack ratio); importance, nothing",
    )
    refine: int = Field(
        3,
        ge=0,
        le=10,
        description="measured re-solves: when the student's mask is about to be final, its network is timed "
        "against the unpruned one on the backend and the budget rescaled by the error, up to this many times "
        "(0: trust the table)",
    )
    tolerance: Optional[float] = Field(
        0.1,
        ge=0,
        description="fail the run when the measured speed-up falls short of the target's by more than this "
        "fraction (null: report only)",
    )


class CompensationSection(_Strict):
    """Pruning compensation and CaP (prune/compensate.py, prune/cap.py)."""

    images: int = Field(1024, ge=1, description="calibration images drawn from the training set (statistics, BN)")
    ridge: float = Field(
        1e-3, gt=0, description="ridge of the least-squares refit, relative to the mean input variance"
    )
    steps: int = Field(16, ge=1, le=256, description="CaP: the budget is reached in this many re-scored steps")


class FbsSection(_Strict):
    """FBS dynamic channel gating (prune/fbs.py)."""

    keep: float = Field(
        0.5,
        gt=0,
        le=1,
        description="d: each gated convolution computes ceil(d x C) of its C output channels per image "
        "(dynamic: no parameter is removed; prune.target is not used)",
    )


class PruneSection(_Strict):
    method: str = Field(
        "cap",  # the measured winner at 50/75/90 % fewer FLOPs, at equal epochs and equal time (docs/benchmarks.md)
        description="a registered pruning method (cascadec.prune.method); cap when a recipe names none. cap: "
        "compensation-aware selection and refit, then KD fine-tuning for joint + student epochs (0 epochs: no "
        "training); cascade: the paper; oneshot: rank once, fine-tune; fbs: dynamic channel gating per image (saves "
        "arithmetic only where a runtime skips channels)",
    )
    prune_stem: bool = Field(
        False,
        description="also prune the first conv's output channels (and whatever is tied to them, such as a "
        "residual stream); the paper and cascadec's default leave them (docs/benchmarks.md measures both)",
    )
    compensate: bool = Field(
        False,
        description="refit the layers that read pruned channels before fine-tuning starts "
        "(oneshot: on the teacher's statistics; cascade: at the start of the student phase)",
    )
    compensation: CompensationSection = Field(default_factory=CompensationSection)
    fbs: FbsSection = Field(default_factory=FbsSection)
    target: TargetSection = Field(default_factory=lambda: TargetSection(flops_reduction=0.5))
    importance: Criterion = Field(
        "taylor",
        description="oneshot criterion; also initialises learned scores (cap: CaP's compensation-aware "
        "selection as a ranking, prune.compensation sets its images and steps)",
    )
    importance_batches: int = Field(8, ge=1)
    round_to: Optional[int] = Field(None, ge=1, description="round kept widths up to a multiple (8/16/32)")
    min_channels: int = Field(1, ge=1)
    allocation: Literal["global", "uniform"] = Field(
        "global",
        description="global: one threshold over all layers (the paper); uniform: the same kept fraction per group",
    )
    latency: LatencySection = Field(default_factory=LatencySection)
    analysis_timeout_s: float = Field(
        120.0,
        gt=0,
        description="seconds the channel analysis (groups and the exactness trial) may take before the model is refused",
    )

    @field_validator("method", mode="before")
    @classmethod
    def _registered(cls, value: object) -> object:
        # the registry is the one list of methods (a plugin registers its own); prune/method.py
        # imports no torch, and names the built-in ones without importing them
        from cascadec.prune.method import known_method_names

        known = known_method_names()
        if value not in known:
            raise ValueError(f"Input should be {', '.join(repr(k) for k in known[:-1])} or {known[-1]!r}")
        return value

    @model_validator(mode="after")
    def _fbs_has_no_static_target(self) -> PruneSection:
        if self.method == "fbs" and (self.target.is_latency or self.compensate):
            raise ValueError(
                "prune.method: fbs removes no channel: its budget is prune.fbs.keep; a latency target or "
                "prune.compensate has nothing to act on"
            )
        return self


class CascadeSection(_Strict):
    num_tas: int = Field(3, ge=0, description="0 = learned scores distilled straight from the teacher")
    ta_ratios: Optional[list[float]] = Field(None, description="keep fractions of the TAs, ascending, last 1.0")
    cascade_update: bool = Field(True, description="Eq. 5: a model's scores learn from its teacher's Taylor term")
    score_optimizer: Literal["sgd", "rmsprop"] = "sgd"
    score_lr: float = Field(
        0.01,
        gt=0,
        description="alpha of Eq. 5, relative to the initial Taylor scale (taylor_magnitude: "
        "the weight of each step in the running average, at most 1)",
    )
    score_signal: Literal["taylor", "taylor_magnitude"] = Field(
        "taylor_magnitude",
        description="taylor: the paper's signed Eq. 5 step; taylor_magnitude: running average of |Taylor term|",
    )
    freeze_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="last fraction of the joint phase trained on fixed masks (score step annealed to 0 before)",
    )
    promote_teacher: bool = True
    ladder_check: Literal["warn", "stop", "off"] = Field(
        "warn",
        description="a TA less accurate than the model below it at the end of the joint phase: warn, stop the run, or nothing",
    )
    track_accuracy: bool = Field(True, description="evaluate every model on the selection split after each joint epoch")

    @model_validator(mode="after")
    def _ratios_match(self) -> CascadeSection:
        if self.ta_ratios is not None:
            if len(self.ta_ratios) != self.num_tas:
                raise ValueError(f"ta_ratios has {len(self.ta_ratios)} entries but num_tas is {self.num_tas}")
            if any(not 0 < r <= 1 for r in self.ta_ratios) or any(
                b <= a for a, b in zip(self.ta_ratios, self.ta_ratios[1:])
            ):
                raise ValueError("ta_ratios must increase, each in (0, 1]")
            if self.ta_ratios and self.ta_ratios[-1] != 1.0:
                raise ValueError("ta_ratios must end with 1.0 (the unpruned shared model)")
        return self


class DistillSection(_Strict):
    kd: bool = True
    kd_weight: float = Field(0.4, ge=0)
    temperature: float = Field(15.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    hints: Literal["none", "stages", "paper"] = Field(
        "none",
        description="stages: every stage of a pruned model supervised by the unpruned network's (stage-wise "
        "supervision, through adapters dropped at export); paper: the paper's L2 hints on the last 3 blocks, "
        "each model against the model it distils from (its ablation found them harmful)",
    )
    hint_weight: Optional[float] = Field(
        None, ge=0, description="weight of the hint loss (default: stages 1.0, paper 0.001 = the paper's lambda_H)"
    )
    method: Literal["kl", "hsakd"] = Field(
        "kl",
        description="kl: Hinton KD on the outputs (the paper's); hsakd: every batch in 4 rotations, auxiliary "
        "(class x rotation) heads on every stage matched to the teacher's, output KL over the rotations "
        "(HSAKD; about 4x the compute per step; heads dropped at export)",
    )
    aux_weight: float = Field(1.0, ge=0, description="hsakd: weight of the stage-wise auxiliary KL terms")
    aux_epochs: int = Field(1, ge=1, description="hsakd: epochs that train the teacher's heads (cached)")
    aux_lr: float = Field(0.1, gt=0, description="hsakd: learning rate of the teacher's heads")

    @model_validator(mode="after")
    def _hints_need_a_kind(self) -> DistillSection:
        if self.hints == "none" and self.hint_weight:
            raise ValueError("hint_weight > 0 needs distill.hints: stages or paper")
        if self.hints == "paper" and not self.kd:
            raise ValueError("distill.hints: paper compares each model with the one it distils from; it needs kd: true")
        if self.method == "hsakd" and not self.kd:
            raise ValueError("distill.method: hsakd distils from a teacher; it needs kd: true")
        if self.method == "hsakd" and self.hints != "none":
            raise ValueError("distill.method: hsakd brings its own stage-wise terms; use it with hints: none")
        return self


class TrainSection(_Strict):
    joint_epochs: int = Field(1, ge=0, description="cascade joint phase; oneshot fine-tunes joint+student epochs")
    student_epochs: int = Field(1, ge=0)
    lr: float = Field(0.008, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(4e-4, ge=0)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap for smoke runs")
    seed: int = 0
    bn_recalibration_batches: int = Field(
        20, ge=0, description="training batches that re-estimate BatchNorm statistics when masks freeze (0: off)"
    )
    select_best: bool = Field(True, description="ship the student phase's best epoch on the selection split")
    shrunk_student: bool = Field(
        True,
        description="the student phase trains the physically shrunk network (the same function as the masked "
        "one, less compute); false: the masked full-width network. Masked anyway with distill.hints or hsakd",
    )
    cache_teacher_logits: bool = Field(
        True,
        description="KD epochs read each teacher's logits from a table computed once, where the training images "
        "are not augmented (Fashion-MNIST, digits, synthetic); the teacher runs every step otherwise, and with "
        "distill.hints or hsakd. false: always online",
    )
    checkpoint_every_steps: Optional[int] = Field(
        None, ge=1, description="also checkpoint every N steps (a checkpoint is always written at each epoch end)"
    )
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="mixed precision on CUDA (fp16 uses a GradScaler)")
    channels_last: bool = Field(False, description="NHWC memory format on CUDA (faster convs with Tensor Cores)")
    grad_sync: Literal["overlap", "after-backward"] = Field(
        "overlap",
        description="several ranks: average gradients in buckets while the backward pass runs (DDP's way), "
        "or in one piece after it",
    )
    grad_bucket_mb: float = Field(25.0, gt=0, description="bucket size for grad_sync: overlap (DDP's bucket_cap_mb)")


class ToleranceSection(_Strict):
    """One precision's parity thresholds. Polygraphy's element-wise rule: an element fails when
    |diff| > atol and |diff|/|reference| > rtol. The task-level keys, when set, replace the
    verify section's for backends of this precision."""

    atol: Optional[float] = Field(None, ge=0)
    rtol: Optional[float] = Field(None, ge=0)
    min_top1_agreement: Optional[float] = Field(None, ge=0, le=1)
    min_top5_agreement: Optional[float] = Field(None, ge=0, le=1)
    max_accuracy_drop: Optional[float] = Field(None, ge=0, le=1)


Precision = Literal[PRECISIONS]  # type: ignore[valid-type]  # the gates' list is the one home


class VerifySection(_Strict):
    """Parity gates (cascadec.verify). ``tolerances`` are merged key by key onto the defaults,
    so ``--set verify.tolerances.fp16.atol=0.05`` changes one number and keeps the rest."""

    samples: int = Field(512, ge=1)
    tolerances: dict[Precision, ToleranceSection] = Field(default_factory=dict, validate_default=True)
    min_top1_agreement: Optional[float] = Field(DEFAULT_MIN_TOP1_AGREEMENT, ge=0, le=1)
    min_top5_agreement: Optional[float] = Field(None, ge=0, le=1)
    max_accuracy_drop: Optional[float] = Field(None, ge=0, le=1, description="torch accuracy minus backend accuracy")
    max_abs_diff: Optional[float] = Field(None, gt=0, description="legacy: hard cap on max |diff| of fp32 backends")
    ill_conditioned: Literal["float64", "fail"] = Field(
        DEFAULT_ILL_CONDITIONED,
        description="a network whose PyTorch float32 output is itself further from float64 than the tolerance: "
        "float64 judges each backend against PyTorch float64 (it passes where it is no worse than PyTorch float32); "
        "fail: the gate against PyTorch float32 stands",
    )

    @field_validator("tolerances", mode="before")
    @classmethod
    def _merge_default_tolerances(cls, value: Any) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            return value  # pydantic reports the wrong type
        merged: dict[Any, Any] = {p: asdict(t) for p, t in DEFAULT_TOLERANCES.items()}
        for precision, given in value.items():
            if isinstance(given, ToleranceSection):
                given = given.model_dump(exclude_unset=True)
            if isinstance(given, dict) and precision in merged:
                merged[precision] = {**merged[precision], **given}
            else:
                merged[precision] = given  # unknown precision or wrong type: validation names it
        return merged


class ProfileSection(_Strict):
    """The latency protocol (trtexec's defaults): warm-up (a value below 0.2 s is raised to
    0.2 s, and the report says so), then at least ``duration_s`` and ``min_iters`` runs.
    Teacher and student take turns ``rounds`` times (each round a share of the duration and
    runs, after its own warm-up) so that machine drift cannot masquerade as a speed-up."""

    batches: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 8, 32], min_length=1)
    warmup_s: float = Field(MIN_WARMUP_S, ge=0)
    duration_s: float = Field(DEFAULT_DURATION_S, gt=0)
    min_iters: int = Field(DEFAULT_MIN_ITERS, ge=1)
    threads: Optional[int] = Field(None, ge=1)
    cuda_graph: bool = False  # torch-cuda only: replay a captured CUDA graph
    rounds: int = Field(DEFAULT_ROUNDS, ge=1)


class ExportSection(_Strict):
    opset: int = Field(18, ge=11)
    slim: bool = True


# the quantized ONNX flavours cascadec.quantize.flavours builds (tests/test_architecture.py keeps
# the two in step): one per consumer, since no single INT8 graph is fast on both
QUANT_FLAVOURS: tuple[str, ...] = ("onnxruntime", "tensorrt")


class CalibrationSection(_Strict):
    """Where INT8 ranges come from: training images (never the test split)."""

    images: int = Field(512, ge=1, description="training images the activation ranges are calibrated on")
    method: Literal["max", "entropy", "percentile"] = Field(
        "max", description="max: min/max of each tensor; entropy: KL-optimal clipping; percentile: clip at `percentile`"
    )
    percentile: float = Field(99.999, gt=90, le=100, description="method percentile: the kept share of |values|")


class QuantizeSection(_Strict):
    """The quantize stage (cascadec/quantize/): reduced-precision ONNX of the pruned student,
    calibrated on training images, verified against the FP32 student and timed beside it."""

    precision: Literal["none", "int8", "fp16"] = Field(
        "none", description="int8: Q/DQ ONNX per flavour (and an FP16 ONNX); fp16: the FP16 ONNX alone; none: off"
    )
    flavours: list[Literal["onnxruntime", "tensorrt"]] = Field(
        default_factory=lambda: list(QUANT_FLAVOURS),
        min_length=1,
        description="int8 graphs to build: onnxruntime (U8S8, fast VNNI kernels on x86), tensorrt (S8S8, zero "
        "points 0, Q/DQ on Conv/Gemm inputs and residual adds, what a strongly typed engine wants)",
    )
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    exclude: list[str] = Field(
        default_factory=list,
        description="layers kept in float: PyTorch module names (layer1.0.conv1) or ONNX node names",
    )
    reduce_range: Union[Literal["auto"], bool] = Field(
        "auto",
        description="7-bit weights in the onnxruntime flavour: auto takes them on an x86 CPU without VNNI (whose "
        "int8 kernels saturate in int16 with 8-bit weights) and not elsewhere; the tensorrt flavour never does",
    )
    tensorrt_float: Literal["fp16", "fp32"] = Field(
        "fp16",
        description="the tensorrt flavour's float parts (between its Q/DQ pairs, layers kept out of INT8, biases, "
        "scales): fp16 (Model Optimizer's high_precision_dtype; TensorRT runs those layers in FP16) or fp32",
    )
    max_accuracy_drop: float = Field(
        0.005,
        ge=0,
        le=1,
        description="INT8 accuracy may fall this far below the FP32 student's on the selection split; past it, "
        "the most sensitive layers are kept in float until it holds",
    )
    max_float_layers: int = Field(
        8, ge=0, description="at most this many layers the sensitivity pass keeps in float (0: no sensitivity pass)"
    )
    selection_images: int = Field(
        2000, ge=1, description="selection-split images the accuracy budget and the sensitivity pass are judged on"
    )
    qat: Literal["auto", "always", "off"] = Field(
        "auto",
        description="quantization-aware fine-tuning with KD: auto, when INT8 still misses max_accuracy_drop after "
        "the sensitivity pass; always; off. The INT8 file that scores best on the selection split ships",
    )
    qat_epochs: int = Field(1, ge=1, description="epochs of QAT + KD over the training split")
    qat_lr: float = Field(1e-3, gt=0, description="QAT learning rate (cosine to 0), SGD with train.momentum")

    @field_validator("flavours")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("qat", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare ``off`` (in a recipe or ``--set quantize.qat=off``) as false
        return "off" if value is False else value


class Recipe(_Strict):
    name: str = Field(description="names the default run directory: letters, digits, '.', '_', '-', '+'")
    description: str = ""
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    prune: PruneSection = Field(default_factory=PruneSection)
    cascade: CascadeSection = Field(default_factory=CascadeSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    train: TrainSection = Field(default_factory=TrainSection)
    export: ExportSection = Field(default_factory=ExportSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    profile: ProfileSection = Field(default_factory=ProfileSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return safe_name(value, "recipe name")

    @model_validator(mode="after")
    def _int8_target_ships_int8(self) -> Recipe:
        lat = self.prune.latency
        if self.prune.target.is_latency and lat.precision == "int8" and self.quantize.precision != "int8":
            raise ValueError(
                "prune.latency.precision int8 holds the INT8 student to the target: set quantize.precision: int8 "
                "so the run builds it"
            )
        return self


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def safe_name(value: str, what: str) -> str:
    """A name that becomes part of a path (the default run directory, a Triton model) must not
    leave the directory it is put in: no separators, no '..', no leading dot, 128 characters."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {str(value)[:60]!r} may hold only letters, digits, '.', '_', '-' and '+' "
            "(at most 128, no '..', not starting with a dot): it names a directory"
        )
    return value


# ---------------------------------------------------------------- loading


def recipes_dir() -> Path:
    """Shipped recipes: the ``cascadec.recipes`` package (``recipes/`` in the repository)."""
    try:
        return Path(str(resources.files("cascadec.recipes")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        return path
    shipped = recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(name_or_path, list_recipes(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped recipes: {', '.join(list_recipes())}"
    raise UserError(f"unknown recipe {name_or_path!r}{hint}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read recipe ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f": line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise UserError(f"{path}{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.sub=value``; the value is parsed as YAML, so ``0.5``, ``true``, ``[1, 8]`` work."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise UserError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except RecursionError:
        raise UserError(f"override {key.strip()[:60]!r}: value nested too deeply") from None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set key.sub=value`` strings applied to a recipe's data (before validation)."""
    for text in overrides:
        parts, value = parse_override(text)
        _assign(data, parts, value, text)
    return data


def _assign(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """The one way a value lands in a recipe's data, from ``--set`` or a command's option."""
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {text!r}: {p!r} is not a section")
        node = child
    if parts[-1] == "target" and isinstance(value, dict):
        node[parts[-1]] = value
    elif len(parts) >= 2 and parts[-2] == "target" and parts[0] == "prune":
        # a new target replaces the old one: they are mutually exclusive
        node.clear()
        node[parts[-1]] = value
    else:
        node[parts[-1]] = value


def with_values(recipe: Recipe, values: dict[str, Any], source: str) -> Recipe:
    """``recipe`` with dotted keys set (a command's options, such as ``profile.duration_s`` from
    ``--duration``; None keeps the recipe's value), validated by the schema as ``--set`` is, so
    a bad option is refused as a bad recipe value would be. Unchanged: ``recipe`` itself."""
    changed = {k: v for k, v in values.items() if v is not None}
    if not changed:
        return recipe
    data = recipe.model_dump(mode="json")
    for key, value in changed.items():
        _assign(data, key.split("."), value, f"{key}={value}")
    return validate_recipe(data, source)


def _printable(part: object) -> str:
    """Keys come from user files: keep the one-line error one line whatever they contain."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _format_error(source: str, exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(_printable(p) for p in first["loc"]) or "(top level)"
    msg = _printable(first["msg"].removeprefix("Value error, "))
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_error(source, exc)) from None


def load_recipe(name_or_path: str, overrides: list[str] | None = None, *, model: str | None = None) -> Recipe:
    """Load a shipped recipe by name or a YAML file, apply ``--set`` overrides, validate."""
    path = resolve_recipe_path(name_or_path)
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    if model is not None:
        section = data.setdefault("model", {})
        if not isinstance(section, dict):
            raise UserError(f"{path}: model: must be a mapping")
        if section.get("name") not in (None, model):
            # the recipe's weights belong to its own model, not the one on the command line
            section.pop("weights", None)
        section["name"] = model
    apply_overrides(data, overrides or [])
    return validate_recipe(data, str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
