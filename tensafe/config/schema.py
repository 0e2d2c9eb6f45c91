"""One pydantic model per config group. Field names are the config keys."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from tensafe.hexdigest import Sha256Hex


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Target(_Node):
    """A `_target_` node instantiated with hydra.utils.instantiate."""

    target: str = Field(alias="_target_", min_length=1)
    partial: bool = Field(default=False, alias="_partial_")


class RayLauncherConfig(Target):
    """launcher=ray (launchers/ray.py): task=train as a Ray Train job."""

    address: str | None = None
    num_workers: int = Field(ge=1)
    resources_per_worker: dict[str, float]
    storage_path: str | None = None
    run_name: str | None = None
    max_failures: int = Field(ge=-1)
    checkpoint_num_to_keep: int = Field(ge=1)
    init: dict[str, Any] = Field(default_factory=dict)

    @field_validator("storage_path")
    @classmethod
    def _filesystem_path(cls, path: str | None) -> str | None:
        if path and re.match(r"^[a-z][a-z0-9+.-]*://", path):
            raise ValueError(
                "must be a filesystem path the driver can write (the privacy journal is appended "
                "there); on a cluster, a shared mount"
            )
        return path

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", name):
            raise ValueError("letters, digits, '.', '_' and '-' only")
        return name


def _launcher_kind(data: Any) -> str:
    target = data.get("_target_", "") if isinstance(data, dict) else getattr(data, "target", "")
    return "ray" if str(target).endswith(".RayLauncher") else "target"


LauncherConfig = Annotated[
    Annotated[Target, Tag("target")] | Annotated[RayLauncherConfig, Tag("ray")],
    Discriminator(_launcher_kind),
]


class LoggerConfig(BaseModel):
    """A Lightning logger; keys besides `_target_` are its constructor arguments."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    target: str = Field(alias="_target_", min_length=1)


# --- task --------------------------------------------------------------------------------------


class _Task(_Node):
    runner: Target


class TrainTask(_Task):
    name: Literal["train"]


class EvaluateTask(_Task):
    name: Literal["evaluate"]
    adapter: str = Field(min_length=1)


class ExposureAudit(_Node):
    """Secret Sharer exposure: `canaries` secrets, each inserted `repeats` times, ranked against
    `candidates` random secrets of the same format."""

    canaries: int = Field(ge=1)
    repeats: int = Field(ge=1)
    candidates: int = Field(ge=10)
    digits: int = Field(ge=3, le=12)

    @model_validator(mode="after")
    def _fits_the_space(self) -> ExposureAudit:
        if self.canaries + self.candidates > 10**self.digits:
            raise ValueError(
                f"task.exposure: canaries + candidates must fit the {10**self.digits} secrets of "
                f"task.exposure.digits={self.digits}"
            )
        return self


class OneRunAudit(_Node):
    """Steinke–Nasr–Jagielski one-run audit: `canaries` secrets, each inserted with probability ½."""

    canaries: int = Field(ge=8)
    digits: int = Field(ge=4, le=12)
    confidence: float = Field(gt=0.5, lt=1)

    @model_validator(mode="after")
    def _fits_the_space(self) -> OneRunAudit:
        if self.canaries > 10**self.digits:
            raise ValueError(f"task.one_run.canaries must fit the {10**self.digits} secrets of its digits")
        return self


class PrivacyAuditTask(_Task):
    name: Literal["privacy_audit"]
    exposure: ExposureAudit
    one_run: OneRunAudit


class BenchTask(_Task):
    name: Literal["bench"]


class ReportTask(_Task):
    name: Literal["report"]
    sweep_dir: str = Field(min_length=1)


class ServeTask(_Task):
    name: Literal["serve"]


class HEEvaluatorTask(_Task):
    name: Literal["he_evaluator"]
    adapter: str = Field(min_length=1)
    adapter_name: str | None = Field(default=None, min_length=1)
    modules: list[str] | None = Field(default=None, min_length=1)
    host: str = Field(min_length=1)
    port: int = Field(ge=0, le=65535)
    api_key_sha256: list[Sha256Hex] = Field(default_factory=list)
    api_key_file: str | None = None
    max_sessions: int = Field(ge=1, le=4096)
    body_timeout_s: float = Field(gt=0)  # a request's body arrives whole within this, or it is a 408
    shutdown_timeout_s: float = Field(gt=0)


class ServiceTask(_Task):
    name: Literal["service"]


class PackageTask(_Task):
    name: Literal["package"]
    run_dir: str = Field(min_length=1)
    out: str | None = None


TaskConfig = Annotated[
    TrainTask
    | EvaluateTask
    | PrivacyAuditTask
    | BenchTask
    | ReportTask
    | ServeTask
    | HEEvaluatorTask
    | ServiceTask
    | PackageTask,
    Field(discriminator="name"),
]


# --- model -------------------------------------------------------------------------------------


class LoraConfig(_Node):
    r: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)


class Architecture(_Node):
    hidden_size: int = Field(ge=8)
    intermediate_size: int = Field(ge=8)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    initializer_range: float = Field(default=0.02, gt=0, le=2)


class ModelConfig(_Node):
    name: str
    source: Literal["embedded", "hub", "random_init"]
    hf_id: str
    gguf_package: str | None = None
    gguf_file: str | None = None
    architecture: Architecture | None = None
    tokenizer: Literal["model", "trained_bpe"] = "model"
    tokenizer_vocab_size: int | None = Field(default=None, ge=300, le=65536)
    max_seq_len: int = Field(ge=8, le=32768)
    lora: LoraConfig

    @model_validator(mode="after")
    def _source_needs(self) -> ModelConfig:
        if self.source == "random_init" and self.architecture is None:
            raise ValueError("source=random_init needs model.architecture")
        if (self.source == "embedded" or self.tokenizer == "model" and self.source != "hub") and not (
            self.gguf_package and self.gguf_file
        ):
            raise ValueError("the embedded model or tokenizer needs model.gguf_package and model.gguf_file")
        if self.tokenizer == "trained_bpe" and self.tokenizer_vocab_size is None:
            raise ValueError("tokenizer=trained_bpe needs model.tokenizer_vocab_size")
        return self


# --- data --------------------------------------------------------------------------------------


class DataConfig(_Node):
    name: str
    path: str | None = None
    eval_path: str | None = None
    eval_fraction: float = Field(gt=0, lt=1)
    max_examples: int | None = Field(default=None, ge=2)
    duplicates: Literal["refuse", "drop"] = "refuse"


# --- privacy -----------------------------------------------------------------------------------


class NoPrivacy(_Node):
    mechanism: Literal["none"]

    @property
    def differentially_private(self) -> bool:
        return False


class DistributedDPConfig(_Node):
    """How a distributed job's workers turn their clipped sums into one noisy gradient."""

    noise_placement: Literal["rank0", "workers"] = "rank0"  # without secure aggregation
    modulus_bits: int = Field(default=32, ge=16, le=62)  # secure aggregation sums mod 2^k
    rounding_overhead: float = Field(default=0.01, gt=0, le=1)  # √d / (γC): rounding's share of Δ₂
    tolerated_colluders: int = Field(default=0, ge=0)  # workers that may subtract their own noise share
    neighbours: int | None = Field(default=None, ge=2)  # SecAgg+ degree; null: 2⌈log₂ n⌉
    threads: int | None = Field(default=None, ge=1)  # chunks aggregated at once; null: the CPUs usable


class DPSGD(_Node):
    mechanism: Literal["dp_sgd"]

    @property
    def differentially_private(self) -> bool:
        return True
    target_epsilon: float | None = Field(default=None, gt=0, le=1000)
    noise_multiplier: float | None = Field(default=None, gt=0, le=1000)
    delta: float | None = Field(default=None, gt=0, lt=1)
    max_grad_norm: float = Field(gt=0)
    accountant: Literal["prv", "rdp"]
    grad_sample_mode: Literal["hooks", "functorch"]
    secure_mode: bool
    max_epsilon: float | None = Field(default=None, gt=0)
    secure_aggregation: bool = False  # Skellam noise in shares, masked sums (launcher=ray)
    distributed: DistributedDPConfig = Field(default_factory=DistributedDPConfig)

    @model_validator(mode="after")
    def _sigma_or_target(self) -> DPSGD:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("set privacy.noise_multiplier or privacy.target_epsilon")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError(
                f"privacy.noise_multiplier={self.noise_multiplier} and privacy.target_epsilon="
                f"{self.target_epsilon} are both set; give one: noise_multiplier uses σ as given and "
                "reports ε, target_epsilon calibrates σ to reach it"
            )
        return self


PrivacyConfig = Annotated[NoPrivacy | DPSGD, Field(discriminator="mechanism")]


# --- hardware, optimizer, training ---------------------------------------------------------------


class HardwareConfig(_Node):
    name: str
    accelerator: Literal["cpu", "cuda"]
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"]
    gradient_checkpointing: bool
    compile: bool
    micro_batch_size: int = Field(ge=1)
    liger_kernels: bool
    num_threads: int | None = Field(default=None, ge=1)


class OptimConfig(_Node):
    name: Literal["adamw", "sgd"]
    lr: float = Field(gt=0, lt=10)
    weight_decay: float = Field(ge=0)


class TrainConfig(_Node):
    batch_size: int = Field(ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    checkpoint_every_n_steps: int = Field(ge=0)
    resume_from: str | None = None
    eval_max_examples: int = Field(ge=1)
    log_every_n_steps: int = Field(ge=1)
    progress_bar: bool
    package: bool = False

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs (the other null)")
        return self


# --- HE-LoRA -----------------------------------------------------------------------------------


class HEConfig(_Node):
    backend: Literal["off", "ckks_numpy", "ckks_cupy", "openfhe"]
    params: str = "auto"
    max_tokens: int = Field(default=2048, ge=1, le=32768)
    precision_bits: int = Field(default=18, ge=8, le=36)
    value_bits: int = Field(default=8, ge=1, le=20)
    allow_insecure: bool = False
    max_message_bytes: int = Field(default=1 << 31, ge=1024)
    packing: Literal["slots", "coefficients", "auto"] = "slots"
    coefficient_ring_degree: Literal[2048, 4096, 8192, 16384] = 2048
    coefficient_rounds: Literal[1, 2] = 2  # 2: X·A then U·s·B; 1: X·W with W = s·A·B (half the round trips)
    circuit_private: bool = False  # coefficients: re-randomise, flood and extract results (N ≥ 4096)

    @model_validator(mode="after")
    def _known_params(self) -> HEConfig:
        from tensafe.he.params import PRESETS

        if self.params != "auto" and self.params not in PRESETS:
            raise ValueError(f"he.params={self.params!r}: choose auto or one of {sorted(PRESETS)}")
        if self.params.startswith("insecure") and not self.allow_insecure:
            raise ValueError(
                f"he.params={self.params!r} is below 128-bit security; tests set he.allow_insecure=true"
            )
        from tensafe.he.coefficient import COEFFICIENT_BACKENDS

        if self.packing != "slots" and self.backend not in ("off", *COEFFICIENT_BACKENDS):
            raise ValueError(
                f"he.packing={self.packing} runs on TenSafe's NumPy kernels only; he={self.backend} "
                "implements slot packing: set he.packing=slots, or he=ckks_numpy"
            )
        if self.circuit_private and self.packing == "slots":
            raise ValueError("he.circuit_private=true is an option of coefficient packing: set "
                             "he.packing=coefficients (or auto)")
        if self.circuit_private and self.coefficient_ring_degree < 4096:
            raise ValueError("he.circuit_private=true needs two primes, which the HE Standard allows from "
                             "N = 4096: set he.coefficient_ring_degree=4096")
        return self


# --- serving -----------------------------------------------------------------------------------

IN_PROCESS_EVALUATOR = "in_process_protects_nothing"


class HEAdapterOptions(_Node):
    """HE-LoRA for one served adapter: the engine is the key holder, `evaluator` computes the deltas."""

    enabled: bool = False
    evaluator: str = Field(min_length=1)  # an evaluator service's URL, or in_process_protects_nothing
    api_key_env: str = "TENSAFE_HE_EVALUATOR_KEY"  # the environment variable holding its bearer key
    modules: list[str] | None = None  # module names or glob patterns (e.g. "*.layers.0.*"); null: all

    @model_validator(mode="after")
    def _evaluator(self) -> HEAdapterOptions:
        if self.evaluator != IN_PROCESS_EVALUATOR and not self.evaluator.startswith(("http://", "https://")):
            raise ValueError(
                f"he.evaluator={self.evaluator!r}: give the evaluator service's URL (http://host:port) "
                f"or {IN_PROCESS_EVALUATOR} (tests and benchmarks only)"
            )
        return self


class AdapterSpec(_Node):
    path: str = Field(min_length=1)
    he: HEAdapterOptions | None = None


class VLLMOptions(_Node):
    """`serving.vllm`: the vLLM engine's own settings (serving=vllm)."""

    model_path: str | None = Field(default=None, min_length=1)  # null: model.hf_id
    max_loras: int = Field(default=4, ge=1, le=256)  # distinct adapters in one batch
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 64  # the ranks vLLM takes
    max_cpu_loras: int | None = Field(default=None, ge=1, le=4096)  # null: max_loras
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=16, le=1 << 20)  # null: model.max_seq_len
    enforce_eager: bool = False

    @model_validator(mode="after")
    def _cpu_cache_holds_a_batch(self) -> VLLMOptions:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"serving.vllm.max_cpu_loras={self.max_cpu_loras} is under "
                             f"serving.vllm.max_loras={self.max_loras}; set it >= max_loras or null")
        return self


class ServingConfig(_Node):
    engine: Literal["embedded", "vllm"]
    host: str = Field(min_length=1)
    port: int = Field(ge=0, le=65535)
    api_key_sha256: list[Sha256Hex] = Field(default_factory=list)
    api_key_file: str | None = None
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)  # name: folder, or {path, he}
    admin_key_sha256: list[Sha256Hex] = Field(default_factory=list)  # keys of /v1/admin; none: admin API off
    allow_unsigned: bool = True  # false: only .tssp packages that verify are served, never bare folders
    admin_keys_may_serve: bool = False  # true: a key may be both a user key and an admin key
    metrics: Literal["key", "public", "off"] = "key"  # /metrics on the API port: behind a key, open, or not
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # also serve metrics here, on `host`
    docs: bool = False  # serve /docs, /redoc and /openapi.json (the admin routes are never listed)
    build: Target
    max_running: int = Field(ge=1, le=1024)
    prefill_chunk: int | None = Field(default=None, ge=1)  # the embedded engine's; vLLM chunks itself
    speculative_tokens: int = Field(default=0, ge=0, le=16)  # drafts per sequence and step; 0: off
    speculative_drafter: Literal["ngram", "base_model"] = "ngram"  # prompt lookup, or the model, adapters off
    speculative_ngram: int = Field(default=3, ge=1, le=8)  # the longest n-gram the lookup matches
    speculative_ngram_min: int = Field(default=2, ge=1, le=8)  # and the shortest

    @model_validator(mode="after")
    def _ngram_range(self) -> ServingConfig:
        if self.speculative_ngram_min > self.speculative_ngram:
            raise ValueError(f"serving.speculative_ngram_min={self.speculative_ngram_min} exceeds "
                             f"serving.speculative_ngram={self.speculative_ngram}; lower the one or raise "
                             "the other")
        return self
    max_prompt_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    max_body_bytes: int = Field(ge=1024)  # enforced on the bytes read (chunked bodies too)
    max_sequences_per_request: int = Field(ge=1)  # prompts × n in one request
    max_sequences_per_key: int = Field(ge=1)  # sequences in flight for one API key (then 429)
    request_timeout_s: float = Field(gt=0)  # no request outlives this; it ends with an error
    timeout_keep_alive_s: float = Field(gt=0)  # idle keep-alive connections are closed after this
    header_timeout_s: float = Field(gt=0)  # a request's headers arrive whole within this, or a 408
    body_timeout_s: float = Field(gt=0)  # and its body within this after them, or a 408
    max_connections: int = Field(ge=1)  # uvicorn answers 503 beyond this many at once
    shutdown_timeout_s: float = Field(gt=0)
    vllm: VLLMOptions | None = None  # serving=vllm only

    @field_validator("adapters", mode="before")
    @classmethod
    def _folder_is_a_spec(cls, adapters):
        if isinstance(adapters, dict):
            return {name: {"path": s} if isinstance(s, str) else s for name, s in adapters.items()}
        return adapters

    @model_validator(mode="after")
    def _engine_options(self) -> ServingConfig:
        if self.engine == "embedded" and self.prefill_chunk is None:
            raise ValueError("serving.prefill_chunk: the embedded engine needs it (prompt tokens per prefill "
                             "forward)")
        return self


class BenchmarkConfig(BaseModel):
    """A benchmark: its runner plus its own parameters (checked by the runner's signature)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str
    runner: Target


class SecurityConfig(_Node):
    keystore: str | None = None
    audit_db: str | None = None
    tenant: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    signing_key: str | None = None
    recipient_key: str | None = None
    package_recipients: list[str] = Field(default_factory=list)
    package_version: int | None = Field(default=None, ge=0)  # null: the build time (seconds since the epoch)
    package_valid_days: float | None = Field(default=None, gt=0)  # null: packages do not expire


# --- the remote training service -----------------------------------------------------------------


class ServicePolicy(_Node):
    """A tenant's DP-SGD policy on the training service (docs/service.md): a client may ask for
    something stricter (more noise, a smaller clip norm, δ or budget), never for less."""

    noise_multiplier: float = Field(gt=0, le=1000)
    max_grad_norm: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)  # client-batch steps: no dataset size to derive δ from
    max_epsilon: float | None = Field(default=None, gt=0)  # a model's steps stop before ε would pass it
    accountant: Literal["prv", "rdp"]


class ServiceTenant(_Node):
    api_key_sha256: list[Sha256Hex] = Field(default_factory=list)
    api_key_file: str | None = None
    policy: ServicePolicy | None = None  # null: service.policy


class ServiceConfig(_Node):
    host: str = Field(min_length=1)
    port: int = Field(ge=0, le=65535)
    state_dir: str | None = None  # null: $TENSAFE_SERVICE_DIR or ~/.tensafe/service
    data_key_file: str | None = None  # null: <state_dir>/data.key, created on first start
    sdk_versions: list[str] = Field(min_length=1)  # tinker SDK versions (fnmatch patterns) accepted
    tenants: dict[str, ServiceTenant] | None = None
    policy: ServicePolicy
    max_models: int = Field(ge=1, le=1024)  # training models in memory at once, across tenants
    memory_budget_mb: float = Field(gt=0)  # their estimated parameter and optimizer memory
    capacity_wait_s: float = Field(gt=0)  # a model waits this long for a slot, then its creation fails
    poll_hold_s: float = Field(gt=0, le=40)  # retrieve_future holds a poll this long before try_again
    seq_gap_timeout_s: float = Field(gt=0)  # a missing seq_id is skipped after this long
    max_datums_per_step: int = Field(ge=1)
    max_samples_per_request: int = Field(ge=1)
    max_sample_tokens: int = Field(ge=1)
    max_body_bytes: int = Field(ge=1024)
    micro_batch_size: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    max_samplers: int = Field(ge=1)  # sampler weights kept loaded (least recently used evicted)
    header_timeout_s: float = Field(gt=0)  # a request's headers arrive whole within this, or a 408
    timeout_keep_alive_s: float = Field(gt=0)
    max_connections: int = Field(ge=1)  # uvicorn answers 503 beyond this many at once
    shutdown_timeout_s: float = Field(gt=0)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, ServiceTenant] | None) -> dict[str, ServiceTenant] | None:
        for name in tenants or {}:
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", name):
                raise ValueError(f"service.tenants: {name!r} is not a tenant name (letters, digits, . _ -)")
        return tenants


class TenSafeConfig(_Node):
    seed: int = Field(ge=0)
    task: TaskConfig
    model: ModelConfig
    data: DataConfig
    privacy: PrivacyConfig
    hardware: HardwareConfig
    he: HEConfig
    serving: ServingConfig
    launcher: LauncherConfig
    logger: LoggerConfig
    benchmark: BenchmarkConfig | None = None
    optim: OptimConfig
    train: TrainConfig
    security: SecurityConfig
    service: ServiceConfig
