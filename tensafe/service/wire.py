"""The training service's JSON wire models, shared by the server (tensafe.service) and TenSafe's SDK
(tensafe.client). They follow the Tinker protocol's JSON shapes, so the official `tinker` client
reads every answer; TenSafe's extensions live under /api/v1/tensafe/.

Requests ignore fields they do not know (Tinker clients send more than a training step needs), with
one exception: the DP fields a client may send are typed here, and anything that would weaken the
tenant's policy is refused by the server, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Category = Literal["user", "server", "unknown"]
QueueState = Literal["active", "paused_capacity", "paused_rate_limit"]


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# --- sessions --------------------------------------------------------------------------------


class ClientConfigRequest(_In):
    sdk_version: str | None = None


class ClientConfig(_Out):
    """Feature flags for the tinker SDK: httpx transport, uncompressed protobuf steps."""

    use_pyqwest_transport: bool = False
    proto_compress_fwdbwd: bool = False
    parallel_fwdbwd_chunks: bool = True
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    fwdbwd_max_chunk_len: int = 1024


class CreateSessionRequest(_In):
    sdk_version: str = Field(min_length=1, max_length=64)
    tags: list[str] = Field(default_factory=list)


class CreateSessionResponse(_Out):
    type: Literal["create_session"] = "create_session"
    session_id: str
    info_message: str | None = None


class SessionRef(_In):
    session_id: str = Field(min_length=1, max_length=256)


class HeartbeatResponse(_Out):
    type: Literal["session_heartbeat"] = "session_heartbeat"


# --- models ----------------------------------------------------------------------------------


class LoraSpec(_In):
    rank: int = Field(ge=1, le=256)
    seed: int | None = Field(default=None, ge=0)
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True
    alpha: float | None = Field(
        default=None, gt=0
    )  # TenSafe's: LoRA scale alpha / rank; null: service.lora_alpha


class DPRequest(BaseModel):
    """What a client may ask of the DP policy: only something stricter (server-checked). Sent as
    extra fields of Tinker's `optimizer_config`, or as `dp` by tensafe.client."""

    model_config = ConfigDict(extra="forbid")
    noise_multiplier: float | None = Field(default=None, gt=0, le=1000)
    max_grad_norm: float | None = Field(default=None, gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    max_epsilon: float | None = Field(default=None, gt=0)
    # server-side sampling only: calibrate σ (never below the policy's) to reach this ε after planned_steps
    target_epsilon: float | None = Field(default=None, gt=0, le=1000)
    planned_steps: int | None = Field(default=None, ge=1, le=10_000_000)


class CreateModelRequest(_In):
    session_id: str = Field(min_length=1, max_length=256)
    model_seq_id: int = Field(ge=0, le=1_000_000)
    base_model: str = Field(min_length=1, max_length=256)
    lora_config: LoraSpec | None = None
    optimizer_config: dict[str, Any] | None = None
    dp: DPRequest | None = None  # tensafe.client's way to ask for a stricter policy
    # TenSafe's server-side sampling: the model trains on a registered dataset, Poisson batches at q = B/N
    dataset_id: str | None = Field(default=None, max_length=64)
    batch_size: int | None = Field(default=None, ge=1)


class UntypedFuture(_Out):
    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class CreateModelResult(_Out):
    type: Literal["create_model"] = "create_model"
    model_id: str


class ModelRef(_In):
    model_id: str = Field(min_length=1, max_length=512)


class ModelData(_Out):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(_Out):
    type: Literal["get_info"] = "get_info"
    model_data: ModelData
    model_id: str
    is_lora: bool = True
    lora_rank: int
    model_name: str


# --- training steps --------------------------------------------------------------------------


class Tensor(BaseModel):
    """A dense tensor in Tinker's JSON shape."""

    model_config = ConfigDict(extra="forbid")
    data: list[float] | list[int]
    dtype: Literal["float32", "int64"]
    shape: list[int] | None = None


class Example(BaseModel):
    """One training example (a Tinker Datum of one text chunk), as tensafe.client sends it."""

    model_config = ConfigDict(extra="forbid")
    tokens: list[int] = Field(min_length=1)
    target_tokens: list[int] = Field(min_length=1)
    weights: list[float] | None = None  # null: every position weighs 1


class ForwardBackwardJSON(_In):
    model_id: str = Field(min_length=1, max_length=512)
    seq_id: int | None = Field(default=None, ge=0)
    loss_fn: str
    loss_fn_config: dict[str, Any] | None = None
    forward_only: bool = False
    data: list[Example]


class ForwardBackwardResult(_Out):
    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, Tensor]]
    metrics: dict[str, float]


class AdamStep(BaseModel):
    """Tinker's AdamParams. grad_clip_norm clips the noisy step globally; it is post-processing of
    the DP gradient and never replaces per-example clipping."""

    model_config = ConfigDict(extra="forbid")
    learning_rate: float = Field(default=1e-4, gt=0, lt=10)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, lt=10)
    grad_clip_norm: float = Field(default=0.0, ge=0)


class OptimStepRequest(_In):
    model_id: str = Field(min_length=1, max_length=512)
    seq_id: int | None = Field(default=None, ge=0)
    adam_params: AdamStep | None = None
    optim_params: AdamStep | None = None
    optimizer_params: dict[str, Any] | None = None


class OptimStepResult(_Out):
    metrics: dict[str, float]


class SaveWeightsRequest(_In):
    model_id: str = Field(min_length=1, max_length=512)
    path: str | None = Field(default=None, max_length=128)
    seq_id: int | None = Field(default=None, ge=0)
    overwrite: bool = False
    sampling_session_seq_id: int | None = Field(default=None, ge=0)


class SaveWeightsResult(_Out):
    type: Literal["save_weights"] = "save_weights"
    path: str


class SaveForSamplerResult(_Out):
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"
    path: str
    sampling_session_id: str | None = None


class LoadWeightsRequest(_In):
    path: str = Field(min_length=1, max_length=1024)
    optimizer: bool = False
    session_id: str | None = Field(default=None, max_length=256)
    model_seq_id: int | None = Field(default=None, ge=0, le=1_000_000)
    model_id: str | None = Field(default=None, max_length=512)
    seq_id: int | None = Field(default=None, ge=0)
    base_model: str | None = None


class LoadWeightsResult(_Out):
    type: Literal["load_weights"] = "load_weights"
    path: str
    model_id: str


# --- futures ---------------------------------------------------------------------------------


class RetrieveFutureRequest(_In):
    request_id: str = Field(min_length=1, max_length=256)


class TryAgain(_Out):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: QueueState
    queue_state_reason: str | None = None


class RequestFailed(_Out):
    error: str
    category: Category
    code: str | None = None  # TenSafe's: what kind of refusal (e.g. privacy_budget_exhausted)


# --- sampling --------------------------------------------------------------------------------


class CreateSamplingSessionRequest(_In):
    session_id: str = Field(min_length=1, max_length=256)
    sampling_session_seq_id: int = Field(ge=0, le=1_000_000)
    base_model: str | None = Field(default=None, max_length=256)
    model_path: str | None = Field(default=None, max_length=1024)


class CreateSamplingSessionResponse(_Out):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class SamplerInfo(_Out):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class TextChunk(_In):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]


class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chunks: list[dict[str, Any]] = Field(min_length=1)


class SamplingParams(_In):
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0, le=100)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)


class SampleRequest(_In):
    sampling_session_id: str | None = Field(default=None, max_length=512)
    seq_id: int | None = Field(default=None, ge=0)
    base_model: str | None = Field(default=None, max_length=256)
    model_path: str | None = Field(default=None, max_length=1024)
    num_samples: int = Field(default=1, ge=1)
    prompt: Prompt
    sampling_params: SamplingParams
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int | None = None


class SampledSequence(_Out):
    stop_reason: Literal["stop", "length"]
    tokens: list[int]
    logprobs: list[float]


class SampleResult(_Out):
    type: Literal["sample"] = "sample"
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


# --- TenSafe's extensions --------------------------------------------------------------------


class CreateDatasetRequest(_In):
    name: str = Field(min_length=1, max_length=128)
    records: list[Example] = Field(min_length=1)


class DatasetInfo(_Out):
    dataset_id: str
    name: str
    size: int
    digest: str  # HMAC-SHA256 under the dataset's own key (tensafe.data.digest): names it, reveals nothing


class PackageRequest(_In):
    path: str = Field(min_length=1, max_length=1024)  # a tinker:// path save_state returned


class TrainStepRequest(_In):
    """One DP-SGD step on the model's dataset, its batch drawn by the server (Poisson, q = B/N)."""

    model_id: str = Field(min_length=1, max_length=512)
    seq_id: int | None = Field(default=None, ge=0)
    adam_params: AdamStep = Field(default_factory=AdamStep)


class TrainStepResult(_Out):
    metrics: dict[str, float]


class DPMetrics(_Out):
    """A training model's privacy state: what TenSafe's SDK reports as get_dp_metrics()."""

    model_id: str
    sampling: Literal["client_batches", "poisson"]
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    max_epsilon: float | None
    budget_remaining: float | None
    accountant: str


class ErrorBody(_Out):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(_Out):
    error: ErrorBody
