"""Will it fit, and how fast will it talk? Memory budget and decode roofline for a target device.

Memory. Inference memory is four things:

    weights      parameters x bytes per parameter (per component: fp32 4, fp16/bf16 2, int8 1, 4-bit ~0.56)
    KV cache     2 (K and V) x layers x kv_heads x head_dim x context x batch x bytes per value
    activations  the largest set of temporaries alive at once (one layer at a time; prefill is the peak)
    runtime      the process itself: interpreter, libraries, CUDA context, allocator slack

On a Jetson Orin Nano the 8 GB are shared by CPU and GPU, and roughly 5.2 GB remain for a model after the
OS and desktop (a user-reported figure, not a fixed one).

Speed. Generating one token reads every decoder weight once (plus the KV cache so far) but does only ~2
FLOPs per weight, far fewer than the chip could do while waiting for memory. So decode is memory-bound
and its speed limit (the "roofline") is

    tokens/s  ~=  memory bandwidth / bytes read per token

Orin Nano: 68 GB/s (102 GB/s in "Super" mode). Measured speeds land below the limit (caches, kernel
overheads, Python); the benchmark prints the ratio on this machine with the bandwidth measured in the
same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import DecoderConfig, ProjectorConfig, VisionConfig, VLMConfig

GB, MB = 1e9, 2**20

# Bits per weight. Quantised formats carry scales: bitsandbytes NF4 stores one fp32 absmax per 64 weights
# (4 + 32/64 = 4.5 bits; double quantisation brings it to ~4.13); llama.cpp's Q8_0 / Q4_0 store one fp16
# scale per 32 weights (8.5 / 4.5 bits); onnxruntime's per-channel int8 adds one scale per row (~8 bits).
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "q8_0": 8.5, "nf4": 4.5, "q4_0": 4.5, "int4": 4}


def bits_of(dtype) -> float:
    if isinstance(dtype, (int, float)):
        return float(dtype)
    if dtype not in BITS:
        raise ValueError(f"unknown weight format {dtype!r}: use one of {sorted(BITS)} or a number of bits")
    return float(BITS[dtype])


# ----------------------------------------------------------------------------------------------
# Parameter counts straight from the config (the tests check them against the real modules)


def vision_parameters(cfg: VisionConfig) -> int:
    d, i = cfg.hidden_size, cfg.intermediate_size
    patch = cfg.num_channels * cfg.patch_size**2 * d + d
    positions = cfg.num_patches * d
    per_layer = 4 * d + 4 * (d * d + d) + (d * i + i) + (i * d + d)  # 2 LayerNorms, q/k/v/out, fc1/fc2
    return patch + positions + cfg.num_layers * per_layer + 2 * d


def projector_parameters(cfg: ProjectorConfig, vision_width: int, decoder_width: int) -> int:
    fan_in = vision_width * cfg.shuffle_factor**2
    if cfg.kind == "linear":
        return fan_in * decoder_width + (decoder_width if cfg.bias else 0)
    hidden = cfg.mlp_hidden_size or decoder_width
    return fan_in * hidden + hidden + hidden * decoder_width + decoder_width


def decoder_parameters(cfg: DecoderConfig) -> int:
    d, hd = cfg.hidden_size, cfg.head_dim
    attention = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2  # q and o, k and v
    per_layer = 2 * d + attention + 3 * d * cfg.intermediate_size
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    return embeddings + cfg.num_layers * per_layer + d


def kv_bytes_per_token(cfg: DecoderConfig, kv_bits: float = 32) -> float:
    """Keys and values of one token in every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_bits / 8


# ----------------------------------------------------------------------------------------------
# Devices


@dataclass
class DevicePreset:
    name: str
    usable_bytes: float  # what a model may use
    bandwidth_bytes_per_s: float
    total_bytes: float | None = None
    shared_memory: bool = False  # one pool for CPU and GPU (Jetson), so weights are not copied to a GPU
    runtime_overhead_bytes: float = 500 * MB  # default guess for the runtime on this device
    notes: str = ""


ORIN_NANO_8GB = DevicePreset(
    "Jetson Orin Nano 8GB",
    usable_bytes=5.2 * GB,
    bandwidth_bytes_per_s=68 * GB,
    total_bytes=8 * GB,
    shared_memory=True,
    runtime_overhead_bytes=800 * MB,
    notes="~5.2 GB left after the OS and desktop (user reports); 68 GB/s LPDDR5 shared by CPU and GPU; "
    "runtime overhead guessed as CUDA context + onnxruntime/llama.cpp libraries",
)
ORIN_NANO_SUPER = DevicePreset(
    "Jetson Orin Nano Super",
    usable_bytes=5.2 * GB,
    bandwidth_bytes_per_s=102 * GB,
    total_bytes=8 * GB,
    shared_memory=True,
    runtime_overhead_bytes=800 * MB,
    notes="the same board in the 'Super' power mode (JetPack 6.2): memory clock raised to 102 GB/s",
)
PRESETS = {"orin-nano": ORIN_NANO_8GB, "orin-nano-super": ORIN_NANO_SUPER}


def get_preset(name: str) -> DevicePreset:
    if name == "this-machine":
        return this_machine()
    if name not in PRESETS:
        raise ValueError(f"unknown device {name!r}: choose one of {sorted(PRESETS) + ['this-machine']}")
    return PRESETS[name]


def measure_memory_bandwidth(size_mb: int = 256, repeats: int = 5, kind: str = "copy") -> float:
    """Memory bandwidth of this machine in bytes/s, best of `repeats` (torch uses all its threads).

    kind="copy": dst.copy_(src) moves 2 x size (read + write; the STREAM "copy" convention).
    kind="read": a sum over the buffer reads size bytes, the access pattern of decode (weights are read).
    The buffer (256 MB) is far larger than any cache, so this measures DRAM.
    """
    import torch

    if kind not in ("copy", "read"):
        raise ValueError(f"kind must be 'copy' or 'read', got {kind!r}")
    n = size_mb * MB // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        start = time.perf_counter()
        if kind == "copy":
            dst.copy_(src)
        else:
            src.sum()
        best = min(best, time.perf_counter() - start)
    moved = 2 * n * 4 if kind == "copy" else n * 4
    return moved / best


def this_machine(bandwidth_bytes_per_s: float | None = None) -> DevicePreset:
    """A preset measured now: available RAM and measured copy bandwidth."""
    import psutil

    bandwidth = bandwidth_bytes_per_s or measure_memory_bandwidth()
    memory = psutil.virtual_memory()
    return DevicePreset(
        "this machine",
        usable_bytes=memory.available,
        bandwidth_bytes_per_s=bandwidth,
        total_bytes=memory.total,
        runtime_overhead_bytes=400 * MB,
        notes="measured at run time: available RAM now, torch copy bandwidth",
    )


# ----------------------------------------------------------------------------------------------
# Memory budget


@dataclass
class Fit:
    fits: bool
    needed_bytes: float  # total x (1 + margin)
    usable_bytes: float
    headroom_bytes: float  # usable - needed: negative when it does not fit

    def __str__(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"{verdict}: needs {self.needed_bytes / GB:.2f} GB (with margin) of "
            f"{self.usable_bytes / GB:.2f} GB "
            f"usable; headroom {self.headroom_bytes / GB:+.2f} GB"
        )


@dataclass
class MemoryBudget:
    weights: dict[str, float]  # component -> bytes
    weight_formats: dict[str, str]  # component -> format name (or bits)
    kv_cache: float
    activations: float
    runtime_overhead: float
    context_length: int
    batch: int
    details: dict = field(default_factory=dict)

    @property
    def weight_bytes(self) -> float:
        return sum(self.weights.values())

    @property
    def total(self) -> float:
        return self.weight_bytes + self.kv_cache + self.activations + self.runtime_overhead

    def fits(self, device: DevicePreset | str, margin: float = 0.1) -> Fit:
        """Does total x (1 + margin) fit in the device's usable memory? The margin covers fragmentation and
        estimation error (the benchmark measures the error on this machine)."""
        device = get_preset(device) if isinstance(device, str) else device
        needed = self.total * (1 + margin)
        return Fit(needed <= device.usable_bytes, needed, device.usable_bytes, device.usable_bytes - needed)

    def table(self) -> str:
        rows = [(f"weights: {name} ({self.weight_formats[name]})", b) for name, b in self.weights.items()]
        rows += [
            (f"KV cache ({self.context_length} tokens x batch {self.batch})", self.kv_cache),
            ("activations (peak, prefill)", self.activations),
            ("runtime overhead", self.runtime_overhead),
            ("total", self.total),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {b / MB:9.1f} MB" for name, b in rows)


def estimate_activations(
    config: VLMConfig,
    prefill_tokens: int,
    batch: int,
    images_per_sample: int = 1,
    activation_bits: float = 32,
    full_logits: bool = False,
) -> tuple[float, dict]:
    """The largest set of temporaries alive at once, in bytes, and the candidates it was the max of.

    Layers run one after another and free their temporaries, so the peak is one layer's worth:
    decoder MLP (x, norm(x), gate, up, silu(gate)*up: 2D + 3I per token), decoder attention
    (q, k, v expanded to all heads, output, and the T x T score matrix per head when SDPA takes its
    math path), the vision encoder's equivalents per image, and the logits (one position during
    generation; every position with full_logits, as in a loss computation).
    """
    d, v = config.decoder, config.vision
    act = activation_bits / 8
    tokens = batch * prefill_tokens
    images = batch * images_per_sample
    candidates = {
        "decoder_mlp": tokens * (2 * d.hidden_size + 3 * d.intermediate_size) * act,
        "decoder_attention": (
            tokens * (2 * d.hidden_size + 3 * d.num_heads * d.head_dim) * act
            + batch * d.num_heads * prefill_tokens**2 * act
        ),
        "vision_mlp": images * v.num_patches * (2 * v.hidden_size + 2 * v.intermediate_size) * act,
        "vision_attention": (
            images * v.num_patches * 5 * v.hidden_size * act + images * v.num_heads * v.num_patches**2 * act
        ),
    }
    logits = batch * (prefill_tokens if full_logits else 1) * d.vocab_size * 4  # logits are float32
    peak = max(candidates.values()) + logits
    return peak, dict(candidates, logits=logits)


def estimate_memory(
    config: VLMConfig,
    weights: dict | str = "fp32",
    kv_bits: float | str = "fp16",
    context_length: int = 1024,
    batch: int = 1,
    runtime_overhead: float | None = None,
    device: DevicePreset | str | None = None,
    images_per_sample: int = 1,
    activation_bits: float | str = "fp32",
    prefill_tokens: int | None = None,
    full_logits: bool = False,
) -> MemoryBudget:
    """Memory needed to run `config` for inference.

    weights: one format for every component, or {"vision": ..., "projector": ..., "decoder": ...}
             (formats: fp32, fp16, bf16, int8, q8_0, nf4, q4_0, int4, or a number of bits).
    kv_bits: format of the KV cache (fp16 on a GPU; our CPU runs keep it in fp32).
    context_length: tokens in the cache at the end (prompt with its image tokens + answer).
    runtime_overhead: bytes for the runtime itself; default: the device preset's guess, else 500 MB.
    prefill_tokens: tokens processed in one forward (default: the whole context, the worst case).
    """
    formats = (
        weights
        if isinstance(weights, dict)
        else {"vision": weights, "projector": weights, "decoder": weights}
    )
    unknown = set(formats) - {"vision", "projector", "decoder"}
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}: use vision, projector, decoder")
    formats = {name: formats.get(name, "fp32") for name in ("vision", "projector", "decoder")}
    params = {
        "vision": vision_parameters(config.vision),
        "projector": projector_parameters(
            config.projector, config.vision.hidden_size, config.decoder.hidden_size
        ),
        "decoder": decoder_parameters(config.decoder),
    }
    weight_bytes = {name: params[name] * bits_of(formats[name]) / 8 for name in params}
    kv = kv_bytes_per_token(config.decoder, bits_of(kv_bits)) * context_length * batch
    activations, candidates = estimate_activations(
        config,
        prefill_tokens or context_length,
        batch,
        images_per_sample,
        bits_of(activation_bits),
        full_logits,
    )
    if runtime_overhead is None:
        preset = get_preset(device) if isinstance(device, str) else device
        runtime_overhead = preset.runtime_overhead_bytes if preset else 500 * MB
    return MemoryBudget(
        weight_bytes,
        {k: str(v) for k, v in formats.items()},
        kv,
        activations,
        runtime_overhead,
        context_length,
        batch,
        details={"parameters": params, "activation_candidates": candidates},
    )


# ----------------------------------------------------------------------------------------------
# Decode roofline


@dataclass
class Roofline:
    weight_bytes: float  # decoder weights read per step
    kv_bytes: float  # KV cache read per step (all sequences of the batch)
    bandwidth_bytes_per_s: float
    batch: int

    @property
    def bytes_per_step(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def tokens_per_s(self) -> float:
        """Upper bound: one step yields `batch` tokens and cannot be faster than reading its bytes once."""
        return self.batch * self.bandwidth_bytes_per_s / self.bytes_per_step

    @property
    def ms_per_token(self) -> float:
        return 1e3 / self.tokens_per_s


def decode_roofline(
    config: VLMConfig | DecoderConfig,
    bandwidth: DevicePreset | str | float,
    weights="fp16",
    kv_bits="fp16",
    context_length: int = 512,
    batch: int = 1,
) -> Roofline:
    """tokens/s ~ bandwidth / (decoder weight bytes + KV-cache bytes) for one decode step.

    Every weight matrix is read once per step, the output head included (for a tied head that is the
    embedding matrix; the embedding lookup itself reads a single row, so an untied table is not counted).
    Attention reads the cache of all `context_length` tokens so far, for every sequence of the batch.
    """
    d = config.decoder if isinstance(config, VLMConfig) else config
    if isinstance(bandwidth, str):
        bandwidth = get_preset(bandwidth)
    bandwidth = bandwidth.bandwidth_bytes_per_s if isinstance(bandwidth, DevicePreset) else float(bandwidth)
    read_params = decoder_parameters(d) - (0 if d.tie_word_embeddings else d.vocab_size * d.hidden_size)
    weight_bytes = read_params * bits_of(weights) / 8
    kv = kv_bytes_per_token(d, bits_of(kv_bits)) * context_length * batch
    return Roofline(weight_bytes, kv, bandwidth, batch)


def deployment_table(
    config: VLMConfig,
    variants: dict[str, tuple],
    context_length: int = 1024,
    batch: int = 1,
    devices=(ORIN_NANO_8GB, ORIN_NANO_SUPER),
    margin: float = 0.1,
) -> str:
    """A plain-text table for a README: memory and decode roofline of each way of running the model.

    variants: name -> (weight formats, KV-cache format), e.g. {"run.py fp32": ("fp32", "fp32")}; the
    weight formats may be one name or a per-component dict. Fits and headroom are for the first device.
    """
    first = devices[0]
    header = (
        f"{'variant':38s} {'weights':>8s} {'KV':>7s} {'activ.':>7s} {'runtime':>8s} {'total':>8s}  "
        f"{'fits ' + first.name:>30s}  "
        + "  ".join(f"{d.bandwidth_bytes_per_s / GB:.0f} GB/s" for d in devices)
    )
    lines = [header, "-" * len(header)]
    for name, (weights, kv_bits) in variants.items():
        budget = estimate_memory(config, weights, kv_bits, context_length, batch, device=first)
        fit = budget.fits(first, margin)
        decoder_format = weights if not isinstance(weights, dict) else weights.get("decoder", "fp32")
        speeds = [
            decode_roofline(config, d, decoder_format, kv_bits, context_length, batch).tokens_per_s
            for d in devices
        ]
        verdict = f"{'yes' if fit.fits else 'NO'}, headroom {fit.headroom_bytes / GB:+.2f} GB"
        lines.append(
            f"{name:38s} {budget.weight_bytes / MB:7.0f}M {budget.kv_cache / MB:6.0f}M "
            f"{budget.activations / MB:6.0f}M {budget.runtime_overhead / MB:7.0f}M "
            f"{budget.total / MB:7.0f}M  "
            f"{verdict:>30s}  " + "  ".join(f"{v:5.0f} tok/s" for v in speeds)
        )
    lines.append(
        f"(M = MiB; context {context_length} tokens, batch {batch}; fits = total x {1 + margin:.1f} <= "
        f"{first.usable_bytes / GB:.1f} GB usable; tok/s = decode roofline, an upper bound)"
    )
    return "\n".join(lines)


def device_report(
    config: VLMConfig,
    device: DevicePreset | str,
    weights="fp16",
    kv_bits="fp16",
    context_length: int = 1024,
    batch: int = 1,
    margin: float = 0.1,
) -> str:
    """A few lines for a README: memory table, fit verdict and decode roofline on one device."""
    device = get_preset(device) if isinstance(device, str) else device
    budget = estimate_memory(config, weights, kv_bits, context_length, batch, device=device)
    roof = decode_roofline(
        config,
        device,
        weights if isinstance(weights, str) else weights.get("decoder", "fp32"),
        kv_bits,
        context_length,
        batch,
    )
    return (
        f"{device.name} ({device.usable_bytes / GB:.1f} GB usable, "
        f"{device.bandwidth_bytes_per_s / GB:.0f} GB/s)"
        f"\n{budget.table()}\n{budget.fits(device, margin)}\n"
        f"decode roofline at {context_length} tokens of context: {roof.tokens_per_s:.0f} tokens/s "
        f"({roof.bytes_per_step / MB:.0f} MB read per token)"
    )
