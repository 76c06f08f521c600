"""The configuration's schema: one typed dataclass per section, the size presets, and `Config`.

Every setting is written once: the dataclass field (with its comment) is the YAML key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jat.config.safe_yaml import cut as _cut


class ConfigError(ValueError):
    """A configuration problem, with the key path and the source named in the message."""


@dataclass
class ModelConfig:
    """The DiT (docs/design.md section 3). Defaults are the V2 model on DAC latents."""

    preset: str | None = None  # size preset this section started from (v1, v2, small, tiny); informational
    in_channels: int = field(default_factory=lambda: _latent_dim("dac"))  # codec latent channels C (DAC's)
    patch_size: int = 4  # latent frames per token (p)
    hidden_size: int = 1024
    depth: int = 16
    num_heads: int = 16  # query heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention); = num_heads for plain MHA
    mlp_ratio: float = 4.0
    bottleneck_dim: int = 512  # BottleneckPatchEmbed inner width
    time_freq_dim: int = 512  # sinusoidal timestep features before the time MLP
    pos_embed: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    max_tokens: int = 2048  # length of the learned position table (pos_embed=learned only)
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory
    envelope_bands: int = 0  # extra output channels: a per-frame log-envelope (flow.precondition=band)
    envelope_hidden: int = 128  # width of the envelope head's temporal convolutions
    # dilation of each kernel-5 temporal convolution of the envelope head; its receptive field is
    # 1 + 4 * sum(dilations) latent frames (11.6 ms each): [1, 1] sees 9 frames, [1, 2, 4, 8] 61 (0.7 s)
    envelope_dilations: list[int] = field(default_factory=lambda: [1, 1])
    # the envelope head also sees the condition's top K input bands counted down from its band edge, and
    # where that edge is: a view that is the same at every cutoff (0: absolute bands only)
    envelope_aligned: int = 0
    # the envelope head also predicts the spread of each band's log-level (E more output channels); set
    # by flow.envelope_target: lognormal, which is the one thing that trains them (not set by hand)
    envelope_spread: bool = False


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "v2": {},
    "v1": dict(hidden_size=768, depth=12, num_heads=12, num_kv_heads=12, bottleneck_dim=128,
               pos_embed="learned"),
    "small": dict(hidden_size=384, depth=6, num_heads=6, num_kv_heads=2, bottleneck_dim=256),
    "tiny": dict(hidden_size=64, depth=2, num_heads=4, num_kv_heads=2, bottleneck_dim=64, time_freq_dim=64),
}


@dataclass
class FlowConfig:
    """Flow matching (docs/design.md section 4). Time convention: t = 0 is noise, t = 1 is data."""

    timesteps: Literal["u_shaped", "uniform", "logit_normal"] = "u_shaped"
    u_shape_a: float = 4.0  # density proportional to cosh(a (t - 1/2))
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    t_eps: float = 0.05  # clamp of (1 - t) when turning x-prediction into velocity
    cond_dropout: float = 0.1  # probability of replacing the condition by the null latent
    solver: Literal["euler", "heun"] = "heun"
    steps: int = 32
    cfg_scale: float = 1.0  # classifier-free guidance; 1.0 is off
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [lo, hi]
    precondition: Literal["none", "band"] = "none"  # output parametrisation (flow.py docstring)
    band_threshold: float = 0.1  # "band": condition RMS below this: channel absent; above 3x: carried
    sigma_min: float = 0.05  # "band": residual scale of the channels the condition carries
    # "band": expected level of an empty channel: "average", the training set's average in that channel;
    # "smooth", that average smoothed across neighbouring channels (a tone in a few training files no
    # longer draws a line across every output; frequency-ordered latents: mdct); "condition", the
    # condition's top octave (docs/quality.md)
    band_level: Literal["average", "smooth", "condition"] = "average"
    # "band": what the skip carries from z_t: "posterior", the prior's posterior mean (a denoiser's target),
    # or "straight", the end of the straight path from the noise through z_t under the prior (a few-step
    # student's target: configs/distill.yaml; docs/design.md "Few-step distillation")
    band_skip: Literal["posterior", "straight"] = "posterior"
    envelope_loss: float = 1.0  # "band": weight of the envelope likelihood (flow.envelope_error); 0: none
    # "band": what the envelope aims at per frame and band: "power", the likelihood of the band power (its
    # mean under uncertainty), or "log", a squared error of log σ against half the log band power (its
    # typical, geometric-mean level: what log-spectral errors reward; docs/quality.md "Envelope target"), or
    # "lognormal", a Gaussian likelihood of the log level with a predicted spread, sampled at envelope_aim
    envelope_target: Literal["power", "log", "lognormal"] = "power"
    # "lognormal": where the generated band's level sits between the band's typical level (0, as "log")
    # and its mean power under the predicted spread (1, as "power"), in the loss and, unless sample_aim
    # is set, in sampling
    envelope_aim: float = 1.0
    # "lognormal": the aim sampling uses, when it is not envelope_aim (a DiT trained under the mean power
    # and sampled nearer the typical level scored best: docs/quality.md); infer.py --envelope-aim sets it
    sample_aim: float | None = None


@dataclass
class CodecConfig:
    """The latent codec (docs/design.md section 2)."""

    name: Literal["mdct", "dac"] = "dac"
    dac_weights: str | None = None  # local .pth of DAC 44 kHz; None: the library's download cache
    dac_model_type: str = "44khz"
    dac_model_bitrate: str = "8kbps"
    chunk_seconds: float = 30.0  # long audio is encoded/decoded in chunks of this length
    # DAC's encoder and decoder in their fast form (jat/codecs/dac_fast.py): the same function up to float
    # rounding, about 2x faster on CPU; false: the library's modules as they are
    dac_fast: bool = True
    # the fast form's convolution precision: bf16 is about 2x faster on CPUs with AVX512-BF16 (and on GPUs)
    # but about 1e-2 relative from fp32 (docs/benchmarks.md "DAC codec")
    dac_dtype: Literal["fp32", "bf16"] = "fp32"
    mdct_compression: float = 0.5  # amplitude compression exponent of the mdct codec (1.0 = none)


@dataclass
class DataConfig:
    """Training data (docs/design.md section 5)."""

    train: str | None = None  # audio folder (recursive) or manifest .txt of audio paths
    val: str | None = None  # audio folder or manifest for validation; None: no validation
    latents: str | None = None  # pre-encoded latent shards (fast path); used instead of `train`
    segment_seconds: float = 6.0
    cutoff_min: float = 2000.0  # Hz, low-pass cutoff range of the LR simulation
    cutoff_max: float = 16000.0
    filters: list[str] = field(default_factory=lambda: list(_filter_families()))  # all of them
    order_min: int = 2
    order_max: int = 10
    # real-input stages after the low-pass (docs/design.md section 5), each drawn with its probability;
    # all 0 by default: the clean low-pass only, as before these settings existed
    noise_prob: float = 0.0  # probability of added white noise (band-limited like the LR)
    noise_snr_min: float = 20.0  # dB, in-band SNR range of that noise (uniform)
    noise_snr_max: float = 50.0
    codec_prob: float = 0.0  # probability of a lossy codec round trip, drawn uniformly from `codecs`
    codecs: list[str] = field(default_factory=lambda: ["mp3-64", "mp3-96", "mp3-128", "mp3-192", "vorbis-q2"])
    holes_prob: float = 0.0  # probability of spectral holes (zeroed time-frequency rectangles)
    holes_max: int = 8  # 1 to this many holes when there are any
    versions: int = 4  # degraded LR versions per clip when pre-encoding
    num_workers: int = 0  # DataLoader worker processes; one loader serves the whole run
    pin_memory: bool = True  # page-locked batches for faster copies to a CUDA device (ignored without one)
    persistent_workers: bool = True  # workers outlive an iteration over the loader (with num_workers > 0)
    strict: bool = False  # fail on the first bad file instead of skipping it
    val_clips: int = 4  # validation clips sampled and scored every val_every steps
    val_cutoff: float = 8000.0  # Hz, cutoff used to degrade validation clips


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01  # applied to matrices only
    eps: float = 1e-8
    warmup_steps: int = 1000
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0
    fused: bool | None = None  # fused AdamW kernel; None: on (CUDA and CPU)


@dataclass
class TrainConfig:
    """The training loop."""

    output_dir: str = "runs/v2"
    max_steps: int = 400_000
    batch_size: int = 16  # per process
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 50
    val_every: int = 5000
    val_steps: int = 16  # sampler steps during validation (a distillation student uses its flow.steps)
    ckpt_every: int = 5000
    keep_last: int = 3  # newest checkpoints kept, besides the best by validation LSD
    compile: bool = False  # torch.compile the model
    init_from: str | None = None  # start weights from this checkpoint (fine-tuning, QLoRA)
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    # how several processes share the work: ddp replicates the model on every process; fsdp shards
    # parameters, gradients, optimizer state and EMA over them (FSDP2, docs/scaling.md)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # experiment trackers accelerate drives (tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive,
    # swanlab, trackio); tensorboard writes output_dir/logs and also takes validation's audio and images
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class LoraConfig:
    """LoRA / QLoRA fine-tuning (docs/design.md section 6)."""

    mode: Literal["none", "lora", "qlora"] = "none"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "out", "fc1", "fc2"])
    dora: bool = False  # DoRA: LoRA plus a trainable magnitude per output row (weight-decomposed)
    # adapt only the top fraction (per kind, e.g. attn.q) of the targets by the SNR of their weights'
    # spectra (Spectrum); None: all targets. Adapter files record the chosen names
    select_fraction: float | None = None
    temporal_adapter: bool = False
    temporal_dim: int = 64  # bottleneck width of the temporal adapter
    temporal_kernel: int = 3


@dataclass
class DistillConfig:
    """Few-step distillation (docs/design.md "Few-step distillation", jat/train/distill.py): the run trains a
    student that samples in `flow.steps` Euler steps, on straight paths from noise to its teacher's sample."""

    # the teacher's checkpoint; None: ordinary training. The student starts from it unless train.init_from
    # names another start
    teacher: str | None = None
    teacher_steps: int = 8  # the teacher's sampler steps from noise to data, per training example
    teacher_solver: Literal["euler", "heun"] = "heun"
    # the network-evaluation budgets the student is trained for: t is drawn from their Euler grids
    evaluations: list[int] = field(default_factory=lambda: [1, 2, 4])


@dataclass
class Config:
    """The whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Config:
        from jat.config.loading import _apply_presets, _build
        from jat.config.rules import validate

        cfg = _build(cls, _apply_presets(data, source), "", source)
        validate(cfg, source)
        if cfg.flow.envelope_target == "lognormal":  # the head's spread channels follow from the target
            cfg.model.envelope_spread = True
        if cfg.distill.teacher and not cfg.train.init_from:  # a student starts as its teacher
            cfg.train.init_from = cfg.distill.teacher
        object.__setattr__(cfg, "source", source)  # where it came from, for later error messages
        return cfg

    def check_paths(self, need_data: bool = True) -> None:
        """Fail before any work when a path the run needs does not exist, naming the key and the file."""
        source = getattr(self, "source", "config")
        keys = [("data.val", self.data.val), ("train.init_from", self.train.init_from),
                ("codec.dac_weights", self.codec.dac_weights), ("distill.teacher", self.distill.teacher)]
        if need_data:
            if not (self.data.latents or self.data.train):
                raise ConfigError(f"{source}: data.latents or data.train must name the training data")
            keys.insert(0, ("data.latents", self.data.latents) if self.data.latents
                        else ("data.train", self.data.train))
        for key, value in keys:
            remote = key == "data.latents" and "://" in str(value)  # an fsspec URL (jat/data/shards.py)
            if value and not remote and not Path(value).exists():
                raise ConfigError(f"{source}: {key}: path not found: {_cut(value, 300)}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Config:
        from jat.config.loading import apply_override, load_yaml_tree

        path = Path(path)
        data = load_yaml_tree(path)
        source = str(path)
        for item in overrides or []:
            apply_override(data, item)
        if overrides:
            source += " (with command-line overrides)"
        return cls.from_dict(data, source)


def _latent_dim(codec: str) -> int:
    """Latent channels of a codec backend, from their home (`jat.codecs.LATENT_DIMS`)."""
    from jat.codecs import LATENT_DIMS

    return LATENT_DIMS[codec]


def _filter_families() -> tuple[str, ...]:
    """The LR simulation's filter families, from their home (`jat.data.degrade.FAMILIES`)."""
    from jat.data.degrade import FAMILIES

    return FAMILIES



def _parse_codec(name: str) -> tuple[str, float]:
    """A lossy codec name checked where the codecs live (`jat.data.lossy.parse_codec`)."""
    from jat.data.lossy import parse_codec

    return parse_codec(name)
