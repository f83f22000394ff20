"""The job's configuration: one frozen dataclass per concern, assembled into JobConfig. No Ray here.

Stage-specific configs live beside their stage (ReadConfig in read.py, DecodeConfig in decode.py,
RefineConfig in refine.py, VariantConfig in variants.py, OutputConfig in writer.py); this module adds
the segmenter's and the job's own settings. Every value is checked when the config is built, so a bad
option is refused in one line before Ray starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.decode import DecodeConfig
from pipeline.read import ReadConfig
from pipeline.refine import RefineConfig
from pipeline.variants import DEFAULT_VARIANTS, VariantConfig, parse_variant
from pipeline.writer import OutputConfig

SOURCE_PATH_MODES = ("relative", "absolute", "hashed")
POOL_BATCH = 16  # images per call to a (GPU) segmenter pool: the GPU works on big batches, and a call has overhead
WORKER_BATCH = 2  # images per model call inside a CPU worker: small batches stay in cache (one thread,
#                   bf16: 35 ms per image at 2, 48 at 16; benchmarks/bench_pipeline.py)


@dataclass(frozen=True)
class SegmentConfig:
    weights: str | None = None  # path to a weights file; None = the model shipped in the package
    orientation_weights: str | None = None  # path to an orientation classifier file; None = the packaged one
    fix_orientation: bool = False  # turn an image found rotated or mirrored upright before segmenting
    mirror_view: bool = True  # also segment the mirror image, a signal of quality_score (twice the model's cost on a CPU)
    gpus_per_actor: float | None = None  # GPUs per segmenter actor; None = 1 if the cluster has GPUs now;
    #                                      0 = no segmenter pool: every CPU worker runs the model itself
    actors: int | None = None  # size of the GPU segmenter pool; None = one per GPU / gpus_per_actor
    pool: bool | None = None  # a segmenter pool of its own; None = exactly when it has GPUs. True without
    #                           GPUs runs the GPU-node layout on CPU actors (tests, the free-model benchmark)
    batch_size: int | None = None  # images per model call, and decoded at a time by a worker; None = POOL_BATCH
    #                                with a segmenter pool, WORKER_BATCH when the model runs in the CPU workers
    cpu_bf16: bool | None = None  # CPU workers run the model in bf16; None = where the CPU has native bf16 (AVX512-BF16, AMX)
    start_timeout_s: float = 900.0  # seconds the segmenter pool may take to start (an autoscaler adding GPU nodes)

    def __post_init__(self) -> None:
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"segment GPUs per actor must be >= 0, got {self.gpus_per_actor}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"segment actors must be >= 1, got {self.actors}")
        if self.start_timeout_s <= 0:
            raise ValueError(f"segment start timeout must be > 0 s, got {self.start_timeout_s}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"segment batch must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class JobConfig:
    inputs: tuple[str, ...]  # input roots: local paths or URIs (s3://, gs://, file://)
    output: str  # output folder or URI
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # image variants to write, see pipeline.variants
    source_path_mode: str = "relative"  # how source_path is written: relative to its root, absolute, or a keyed hash
    pseudonym_key: bytes | None = field(default=None, repr=False)  # HMAC key for pseudonymous ids and hashed paths; never written
    resume: bool = False  # continue into an output that holds finished shards
    workers: int | None = None  # CPU worker actors (one CPU each); None = every CPU the cluster has at start
    task_files: int = 64  # at most this many inputs per worker call
    task_bytes: int = 64 * 1024**2  # ... and about this many input bytes (by the listing), so big images come in small calls
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)
    out: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        for name in self.variants:
            parse_variant(name)  # raises ValueError naming the valid choices
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct, got {list(self.variants)}")
        if self.source_path_mode not in SOURCE_PATH_MODES:
            raise ValueError(f"source_path_mode must be one of {SOURCE_PATH_MODES}, got {self.source_path_mode!r}")
        if self.source_path_mode == "hashed" and not self.pseudonym_key:
            raise ValueError("source_path_mode 'hashed' needs a pseudonym key")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.task_files < 1 or self.task_bytes < 1:
            raise ValueError(f"task_files and task_bytes must be >= 1, got {self.task_files} and {self.task_bytes}")

    def options(self) -> dict:
        """The settings as plain data for the manifest, without the key."""
        d = asdict(self)
        d.pop("pseudonym_key")
        d["pseudonymized"] = self.pseudonym_key is not None
        return d
