"""The job's configuration: one frozen dataclass per concern, assembled into JobConfig.

Stage-specific configs live beside their stage (DecodeConfig in decode.py, RefineConfig in
refine.py, VariantConfig in variants.py, ReadConfig in datasource.py, OutputConfig in
writer.py); this module adds the segmenter's and the job's own settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.datasource import ReadConfig
from pipeline.decode import DecodeConfig
from pipeline.refine import RefineConfig
from pipeline.variants import DEFAULT_VARIANTS, VariantConfig, parse_variant
from pipeline.writer import OutputConfig

SOURCE_PATH_MODES = ("relative", "absolute", "hashed")


@dataclass(frozen=True)
class SegmentConfig:
    weights: str | None = None  # path to a weights file; None = the model shipped in the package
    gpus_per_actor: float | None = None  # GPUs per segmenter actor; None = 1 if the cluster has GPUs now, else 0 (CPU)
    min_actors: int = 1  # smallest segmenter pool
    max_actors: int | None = None  # largest pool; None = one per GPU, or one per 4 CPUs on a CPU-only cluster
    batch_size: int = 32  # images per model call
    cpu_threads: int = 1  # torch threads per CPU actor (also the CPUs it reserves)
    cpu_bf16: bool | None = None  # CPU actors run the model in bf16; None = where the CPU has native bf16 (AVX512-BF16, AMX)


@dataclass(frozen=True)
class JobConfig:
    inputs: tuple[str, ...]  # input roots: local paths or URIs (s3://, gs://, file://)
    output: str  # output folder or URI
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # image variants to write, see pipeline.variants
    source_path_mode: str = "relative"  # how source_path is written: relative to its root, absolute, or a keyed hash
    pseudonym_key: bytes | None = field(default=None, repr=False)  # HMAC key for pseudonymous ids and hashed paths; never written
    resume: bool = False  # continue into an output that holds finished shards
    decode_batch_size: int = 8  # images per decode task batch
    postprocess_batch_size: int = 4  # images per refine/variants task batch
    decode_memory_mb: int = 512  # memory reserved per decode task (MB); the distinct reservation also keeps
    #                              decoding a CPU stage of its own instead of fusing into the segmenter actors
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

    def options(self) -> dict:
        """The settings as plain data for the manifest, without the key."""
        d = asdict(self)
        d.pop("pseudonym_key")
        d["pseudonymized"] = self.pseudonym_key is not None
        return d
