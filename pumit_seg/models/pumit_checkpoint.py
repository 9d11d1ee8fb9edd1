"""The authors' released PUMIT weights -> our models.

File layouts and the import's steps: docs/weights_format.md, "Importing the authors' checkpoints".

The paper's authors publish PUMIT-B as a PyTorch Lightning checkpoint (``pumit.ckpt``: the MIM
model, i.e. the ViT with its mask token and MIM head) and train their tokenizer
(``SimpleVQTokenizer``) with Lightning Fabric. This module turns such a checkpoint into one of
our models and says what happened to every key:

* ``vit``: our `UniversalViT` (the encoder fine-tuning loads), from the ViT keys of a ViT or
  MIM checkpoint (the MIM extras are skipped and reported);
* ``mim``: our `MIMModel` (encoder + ``mask_token`` + ``mim_head``), to continue MIM;
* ``tokenizer``: our `VisualTokenizer`, the frozen tokenizer of MIM.

Our modules carry the authors' parameter names, so the mapping is by name; what the weights
cannot tell is filled from the authors' configuration and recorded as an assumption: LayerNorm
eps 1e-5 (PyTorch's default, which their ViT and tokenizer use; EVA-02 uses 1e-6), the number
of heads (not stored in any tensor: their B and L use a head dimension of 64), the RoPE bases
(2333 depth, 10000 in-plane). Every source key ends up *used* (copied unchanged, possibly under
a module prefix of ours), *adapted* (renamed beyond that, reshaped or cast, and how) or
*skipped* (with the reason); a key we do not know, a key our model needs but the checkpoint
lacks, a shape that does not fit, or a non-finite value is an error naming the key.

Reading: ``torch.load(weights_only=True)``. A Lightning checkpoint also stores training state
(optimizer, schedulers, loops, hyper-parameters) and may hold pickled Python objects, which
``weights_only`` refuses; `read_checkpoint` then stops with `PickledCheckpointError`, naming
the objects and the ``--trust-pickle`` flag. With ``trust_pickle=True`` the file is unpickled
(which can run code chosen by whoever made it) and classes that do not exist here (the authors'
``luolib`` / ``pumit`` packages) become inert placeholders: only the tensors are used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pumit_seg.weights import (  # the one checkpoint reader, re-exported for this module's users
    TRUST_PICKLE_FLAG,
    CheckpointReadError,
    PickledCheckpointError,
    read_checkpoint,
)

__all__ = [
    "KINDS",
    "AUTHORS_NORM_EPS",
    "AUTHORS_HEAD_DIM",
    "AUTHORS_ROPE_BASE",
    "AUTHORS_ROPE_BASE_DEPTH",
    "TRUST_PICKLE_FLAG",
    "CheckpointReadError",
    "PickledCheckpointError",
    "CheckpointLayoutError",
    "ImportOptions",
    "ImportReport",
    "ImportResult",
    "read_checkpoint",
    "extract_state_dict",
    "prefix_candidates",
    "find_prefix",
    "detect_kind",
    "infer_vit_config",
    "infer_tokenizer_config",
    "import_state_dict",
    "import_checkpoint",
    "input_spec",
    "file_sha256",
    "norm_eps_from_weights",
]

KINDS = ("vit", "mim", "tokenizer")

# What the authors' configuration fixes but no tensor stores.
AUTHORS_NORM_EPS = 1e-5  # nn.LayerNorm's default, used throughout their ViT and tokenizer
AUTHORS_HEAD_DIM = 64  # B: 768 / 12, L: 1024 / 16
AUTHORS_ROPE_BASE = 10000.0  # in-plane (EVA-02's)
AUTHORS_ROPE_BASE_DEPTH = 2333.0
AUTHORS_NUM_GROUPS = 8  # GroupNorm groups of the tokenizer

VIT_ANCHOR = "patch_embed.proj.weight"
TOKENIZER_ANCHORS = ("quantize.embedding.weight", "quantize.embed.weight")
# Top-level entries of a checkpoint that hold the weights, in the order they are looked for:
# Lightning's "state_dict", Fabric's "model" (the authors' tokenizer runs), DeepSpeed / EVA "module".
STATE_DICT_ENTRIES = ("state_dict", "model", "module")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


# --------------------------------------------------------------------------------------
# Errors and the report
# --------------------------------------------------------------------------------------


class CheckpointLayoutError(ValueError):
    """The checkpoint's keys or shapes do not fit the model; every offending key is named."""

    def __init__(
        self,
        source: str,
        kind: str,
        *,
        missing: Mapping[str, str] | None = None,
        mismatched: Mapping[str, str] | None = None,
        unexpected: Mapping[str, str] | None = None,
    ):
        self.missing = dict(missing or {})
        self.mismatched = dict(mismatched or {})
        self.unexpected = dict(unexpected or {})
        lines = [f"{source}: does not fit the authors' {kind} layout (see docs/weights_format.md):"]
        lines += [f"  missing key {key!r}: {why}" for key, why in self.missing.items()]
        lines += [f"  key {key!r}: {why}" for key, why in self.mismatched.items()]
        lines += [f"  unexpected key {key!r}: {why}" for key, why in self.unexpected.items()]
        super().__init__("\n".join(lines))


@dataclass
class ImportReport:
    """Where every key of the source checkpoint went (keys as written in the source)."""

    kind: str
    source: str
    entry: str = ""  # where the state dict was found ("state_dict", "model", "" = top level)
    prefix: str = ""  # wrapper prefix stripped from the source keys
    used: dict[str, str] = field(default_factory=dict)  # source key -> our key, tensor unchanged
    adapted: dict[str, str] = field(default_factory=dict)  # source key -> "our key: how"
    skipped: dict[str, str] = field(default_factory=dict)  # source key -> why
    ignored_entries: dict[str, str] = field(default_factory=dict)  # top-level entries besides the weights
    assumptions: dict[str, str] = field(default_factory=dict)  # settings no tensor stores: value and why

    def counts(self) -> dict[str, int]:
        return {"used": len(self.used), "adapted": len(self.adapted), "skipped": len(self.skipped)}

    def summary(self, every_key: bool = True) -> str:
        where = f"entry {self.entry!r}" if self.entry else "top level"
        lines = [
            f"{self.source}: {self.kind} weights from {where}"
            + (f", prefix {self.prefix!r} stripped" if self.prefix else "")
            + f": {len(self.used)} used, {len(self.adapted)} adapted, {len(self.skipped)} skipped"
        ]
        lines += [f"  ignored entry {name!r}: {why}" for name, why in self.ignored_entries.items()]
        lines += [f"  assumed {name} = {what}" for name, what in self.assumptions.items()]
        if every_key:
            lines += [
                f"  used {key}" + (f" -> {target}" if target != key[len(self.prefix) :] else "")
                for key, target in self.used.items()
            ]
        lines += [f"  adapted {key} -> {how}" for key, how in self.adapted.items()]
        lines += [f"  skipped {key}: {why}" for key, why in self.skipped.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "entry": self.entry,
            "prefix": self.prefix,
            "counts": self.counts(),
            "used": dict(self.used),
            "adapted": dict(self.adapted),
            "skipped": dict(self.skipped),
            "ignored_entries": dict(self.ignored_entries),
            "assumptions": dict(self.assumptions),
        }


@dataclass
class ImportOptions:
    """What the weights cannot tell; the defaults are the authors' configuration."""

    num_heads: int | None = None  # None: embed_dim / AUTHORS_HEAD_DIM
    norm_eps: float = AUTHORS_NORM_EPS
    rope_base: float = AUTHORS_ROPE_BASE
    rope_base_depth: float = AUTHORS_ROPE_BASE_DEPTH
    prefix: str | None = None  # None: found from the keys


@dataclass
class ImportResult:
    model: nn.Module
    report: ImportReport


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def extract_state_dict(checkpoint, source: str) -> tuple[dict[str, Tensor], str, dict[str, str]]:
    """(state dict, the entry it came from, the other top-level entries and why they are not used)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointLayoutError(
            source, "checkpoint", unexpected={"<top level>": f"a {type(checkpoint).__name__}, not a dict"}
        )
    entry = next((name for name in STATE_DICT_ENTRIES if isinstance(checkpoint.get(name), Mapping)), "")
    state_dict = checkpoint[entry] if entry else checkpoint
    ignored = {}
    if entry:
        for name in checkpoint:
            if name != entry:
                ignored[str(name)] = "not model weights (training state / metadata)"
    if entry == "model" and isinstance(checkpoint.get("discriminator"), Mapping):
        ignored["discriminator"] = "the tokenizer's GAN discriminator: only used to train it"
    return dict(state_dict), entry, ignored


def prefix_candidates(keys, anchors: tuple[str, ...]) -> list[str]:
    """Every wrapper prefix ("", "model.", "module.", "model.tokenizer.", ...) found in front of an anchor key."""
    return sorted(
        {
            key[: -len(anchor)]
            for key in keys
            for anchor in anchors
            if key.endswith(anchor) and (len(key) == len(anchor) or key[-len(anchor) - 1] == ".")
        }
    )


def find_prefix(keys, anchors: tuple[str, ...], source: str = "checkpoint") -> str | None:
    """The one wrapper prefix in front of an anchor key; None when there is none; several are an error."""
    candidates = prefix_candidates(keys, anchors)
    if len(candidates) > 1:
        raise ValueError(
            f"{source}: several models in one checkpoint (key prefixes {', '.join(map(repr, candidates))}): "
            "choose one with --prefix"
        )
    return candidates[0] if candidates else None


def detect_kind(keys, source: str = "checkpoint") -> str:
    """The kind of checkpoint: "mim" (ViT keys + mask token / MIM head), "vit" (ViT keys), "tokenizer"."""
    keys = list(keys)
    vit_prefixes = prefix_candidates(keys, (VIT_ANCHOR,))
    if vit_prefixes:
        names = [key[len(p) :] for p in vit_prefixes for key in keys if key.startswith(p)]
        return "mim" if any(n == "mask_token" or n.startswith("mim_head.") for n in names) else "vit"
    if prefix_candidates(keys, TOKENIZER_ANCHORS):
        return "tokenizer"
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    raise ValueError(
        f"{source}: cannot tell the kind of checkpoint: no key ends in {VIT_ANCHOR!r} (ViT / MIM) or in "
        f"{' / '.join(map(repr, TOKENIZER_ANCHORS))} (tokenizer); its keys: {shown or 'none'}"
    )


def file_sha256(path: str | Path, chunk_size: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Architectures from the weights
# --------------------------------------------------------------------------------------


def _need(state_dict: Mapping[str, Tensor], key: str, source: str, kind: str, what: str) -> Tensor:
    if key not in state_dict:
        raise CheckpointLayoutError(source, kind, missing={key: what})
    return state_dict[key]


def infer_vit_config(
    state_dict: Mapping[str, Tensor],
    prefix: str,
    options: ImportOptions,
    source: str = "checkpoint",
    kind="vit",
) -> tuple[dict, dict[str, str]]:
    """`UniversalViT` constructor arguments from the weights, and the assumptions made."""
    patch = _need(state_dict, prefix + VIT_ANCHOR, source, kind, "the patch embedding kernel")
    if patch.dim() != 5 or not patch.shape[2] == patch.shape[3] == patch.shape[4]:
        raise CheckpointLayoutError(
            source,
            kind,
            mismatched={
                prefix
                + VIT_ANCHOR: f"shape {tuple(patch.shape)}, expected a cubic 3D kernel (C, C_in, P, P, P)"
            },
        )
    embed_dim, in_channels, patch_size = (int(s) for s in patch.shape[:3])
    blocks = {
        int(match.group(1))
        for key in state_dict
        if key.startswith(prefix) and (match := _BLOCK_INDEX.match(key[len(prefix) :]))
    }
    if not blocks:
        raise CheckpointLayoutError(source, kind, missing={prefix + "blocks.0.*": "no transformer block"})
    w1 = _need(state_dict, prefix + "blocks.0.mlp.w1.weight", source, kind, "the SwiGLU gate of block 0")
    pos = _need(state_dict, prefix + "pos_embed", source, kind, "the position embedding grid")
    if pos.dim() != 5 or pos.shape[:2] != (1, embed_dim):
        raise CheckpointLayoutError(
            source,
            kind,
            mismatched={
                prefix + "pos_embed": f"shape {tuple(pos.shape)}, expected a grid (1, {embed_dim}, d, h, w)"
            },
        )
    assumptions = {}
    if options.num_heads is None:
        if embed_dim % AUTHORS_HEAD_DIM:
            raise ValueError(
                f"{source}: width {embed_dim} is not a multiple of the authors' head dimension "
                f"{AUTHORS_HEAD_DIM}: give the number of heads (--num-heads)"
            )
        num_heads = embed_dim // AUTHORS_HEAD_DIM
        assumptions["num_heads"] = (
            f"{num_heads} (not stored in the weights; head dimension {AUTHORS_HEAD_DIM} as in the authors' "
            "B and L; --num-heads to change)"
        )
    else:
        num_heads = int(options.num_heads)
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"--num-heads {num_heads} does not divide the width {embed_dim}")
        assumptions["num_heads"] = f"{num_heads} (given)"
    assumptions["norm_eps"] = (
        f"{options.norm_eps:g} (LayerNorm eps: the authors use nn.LayerNorm's default 1e-5)"
    )
    assumptions["rope_base"] = (
        f"{options.rope_base:g} in-plane, {options.rope_base_depth:g} depth (the authors')"
    )
    config = {
        "in_channels": in_channels,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": max(blocks) + 1,
        "num_heads": num_heads,
        "mlp_hidden_dim": int(w1.shape[0]),
        "pos_grid_shape": [int(s) for s in pos.shape[2:]],
        "rope_base": float(options.rope_base),
        "rope_base_depth": float(options.rope_base_depth),
        "norm_eps": float(options.norm_eps),
    }
    return config, assumptions


def infer_tokenizer_config(
    state_dict: Mapping[str, Tensor], prefix: str, options: ImportOptions, source: str = "checkpoint"
) -> tuple[dict, dict[str, str]]:
    """`VisualTokenizer` constructor arguments from the weights of a `SimpleVQTokenizer`.

    The authors' encoder is an nn.Sequential of [conv, channel LayerNorm, GELU] per downsampling
    (the LayerNorm wrapped at index 1: ``encoder.{3i+1}.1``), then two [conv, GroupNorm, LeakyReLU];
    the decoder two [conv, GroupNorm, LeakyReLU], one upsampling block per level
    (``transposed_conv``, ``conv.0``), and a last transposed conv.
    """
    kind = "tokenizer"
    vit_only = {
        "--num-heads": options.num_heads is not None,
        "--norm-eps": options.norm_eps != AUTHORS_NORM_EPS,
        "--rope-base": options.rope_base != AUTHORS_ROPE_BASE,
        "--rope-base-depth": options.rope_base_depth != AUTHORS_ROPE_BASE_DEPTH,
    }
    if any(vit_only.values()):
        given = ", ".join(flag for flag, set_ in vit_only.items() if set_)
        raise ValueError(f"{given}: ViT options, not used by the tokenizer (its norms are fixed at eps 1e-5)")

    def numbered(pattern: str) -> list[int]:
        regex = re.compile(pattern)
        return sorted(
            {
                int(m.group(1))
                for key in state_dict
                if key.startswith(prefix) and (m := regex.match(key[len(prefix) :]))
            }
        )

    norms = numbered(r"^encoder\.(\d+)\.1\.weight$")
    if not norms or norms != [3 * i + 1 for i in range(len(norms))]:
        raise CheckpointLayoutError(
            source,
            kind,
            missing={
                prefix + "encoder.1.1.weight": "the channel LayerNorms at encoder.1.1, encoder.4.1, ..."
            },
        )
    down_weights = [
        _need(state_dict, f"{prefix}encoder.{index - 1}.weight", source, kind, "a downsampling conv")
        for index in norms
    ]
    first = down_weights[0]
    if first.dim() != 5 or not first.shape[2] == first.shape[3] == first.shape[4]:
        raise CheckpointLayoutError(
            source,
            kind,
            mismatched={
                prefix + "encoder.0.weight": f"shape {tuple(first.shape)}, expected a cubic 3D kernel"
            },
        )
    embedding_key = next(
        (prefix + anchor for anchor in TOKENIZER_ANCHORS if prefix + anchor in state_dict),
        prefix + TOKENIZER_ANCHORS[0],
    )
    codebook = _need(state_dict, embedding_key, source, kind, "the codebook")
    blocks = numbered(r"^decoder\.(\d+)\.transposed_conv\.weight$")
    up_outputs = [
        int(_need(state_dict, f"{prefix}decoder.{index}.transposed_conv.weight", source, kind, "").shape[1])
        for index in blocks
    ]
    top = _need(state_dict, prefix + "decoder.0.weight", source, kind, "the decoder's first conv")
    last_index = (blocks[-1] + 1) if blocks else 6
    last = _need(
        state_dict, f"{prefix}decoder.{last_index}.weight", source, kind, "the decoder's output conv"
    )
    quantizer = "soft" if prefix + "quantize.proj.weight" in state_dict else "hard"
    config = {
        "in_channels": int(first.shape[1]),
        "start_stride": int(first.shape[2]),
        "down_channels": [int(w.shape[0]) for w in down_weights],
        "up_channels": [*reversed(up_outputs), int(top.shape[0])],
        "num_codes": int(codebook.shape[0]),
        "code_dim": int(codebook.shape[1]),
        "quantizer": quantizer,
        "num_groups": AUTHORS_NUM_GROUPS,
    }
    output_stride = config["start_stride"] << (len(down_weights) - 1) >> len(blocks)
    if last.dim() != 5 or tuple(last.shape[2:]) != (output_stride,) * 3:
        raise CheckpointLayoutError(
            source,
            kind,
            mismatched={
                f"{prefix}decoder.{last_index}.weight": f"shape {tuple(last.shape)}, expected a transposed conv with "
                f"kernel = stride = {output_stride} (the encoder's stride over the decoder's upsamplings)"
            },
        )
    assumptions = {
        "quantizer": f"{quantizer} ("
        + (
            "logits projection present: the authors' soft tokens"
            if quantizer == "soft"
            else "no logits projection"
        )
        + ")",
        "num_groups": f"{AUTHORS_NUM_GROUPS} (GroupNorm groups are not stored in the weights; the authors' value)",
        "norm_eps": "1e-05 (channel LayerNorm and GroupNorm: PyTorch's defaults, as the authors')",
    }
    return config, assumptions


# --------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """Where one source key goes: `target` (our key) with an optional `transform`, or `skip` (why)."""

    target: str | None = None
    skip: str | None = None
    transform: Callable[[Tensor], Tensor] | None = None
    how: str | None = None  # what `transform` (or a rename) does, for the report


def _is_rope_buffer(name: str) -> bool:
    return "rope" in name.split(".")


def _vit_rule(name: str, kind: str, encoder_prefix: str) -> _Rule | None:
    """The ViT / MIM rules: everything is ours by name, under ``encoder.`` in the MIM model."""
    if _is_rope_buffer(name):
        return _Rule(skip="RoPE table: a buffer derived from the token grid, recomputed at run time")
    if name.startswith("tokenizer."):
        return _Rule(skip="the MIM model's frozen tokenizer: import it with --kind tokenizer")
    if name in ("input_norm_mean", "input_norm_std"):
        return _Rule(
            skip="input normalisation constants (ImageNet mean / std): recorded in the file's header"
        )
    if name == "mask_token" or name.startswith("mim_head."):
        if kind == "mim":
            return _Rule(target=name)
        return _Rule(skip="MIM pre-training extra, not part of the encoder (--kind mim keeps it)")
    return _Rule(target=encoder_prefix + name)


def _tokenizer_rule(name: str) -> _Rule | None:
    """The tokenizer's rules: ours by name, plus the two renames the authors' own loader accepts."""
    if name.startswith(("loss.", "discriminator.", "perceptual.", "lpips.")):
        return _Rule(
            skip="training-loss module (discriminator / perceptual network): not part of the tokenizer"
        )
    if name == "quantize.embed.weight":  # VQGAN naming, renamed by the authors' VectorQuantizer loader
        return _Rule(target="quantize.embedding.weight", how="renamed from VQGAN's quantize.embed.weight")
    if name == "quantize.proj.weight":
        return _Rule(target=name, transform=_squeeze_1x1, how=None)
    return _Rule(target=name)


def _squeeze_1x1(weight: Tensor) -> Tensor:
    # A 1x1 conv (VQGAN / Gumbel layout) is the same map as the Linear logits projection.
    return weight.flatten(1) if weight.dim() > 2 and math.prod(weight.shape[2:]) == 1 else weight


def _fill(
    model: nn.Module,
    state_dict: Mapping,
    prefix: str,
    rule_for: Callable[[str], _Rule | None],
    report: ImportReport,
    source_name_of: Callable[[str], str],
) -> None:
    """Map every source key by its rule, check shapes and values, load strictly; errors name the keys."""
    target = model.state_dict()
    filled: dict[str, Tensor] = {}
    filled_from: dict[str, str] = {}
    mismatched: dict[str, str] = {}
    unexpected: dict[str, str] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            report.skipped[key] = f"outside the model's prefix {prefix!r}"
            continue
        name = key[len(prefix) :]
        rule = rule_for(name)
        if rule is not None and rule.skip is not None:
            report.skipped[key] = rule.skip
            continue
        if rule is None or rule.target not in target:
            unexpected[key] = (
                f"no such parameter in our {type(model).__name__}: the checkpoint's architecture differs "
                "(e.g. fused qkv, layer scale, other options) and dropping it would change the outputs"
            )
            continue
        if not isinstance(value, Tensor):
            mismatched[key] = f"holds a {type(value).__name__}, not a tensor"
            continue
        tensor, steps = value, []
        if rule.transform is not None:
            transformed = rule.transform(tensor)
            if transformed.shape != tensor.shape:
                steps.append(f"reshaped {tuple(tensor.shape)} -> {tuple(transformed.shape)}")
            tensor = transformed
        if rule.how:
            steps.append(rule.how)
        expected = target[rule.target]
        if tuple(tensor.shape) != tuple(expected.shape):
            mismatched[key] = (
                f"shape {tuple(tensor.shape)}, but our {rule.target} needs {tuple(expected.shape)}"
            )
            continue
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            mismatched[key] = "holds NaN or infinite values"
            continue
        if tensor.dtype != expected.dtype:
            steps.append(
                f"cast {str(tensor.dtype).removeprefix('torch.')} -> {str(expected.dtype).removeprefix('torch.')}"
            )
            tensor = tensor.to(expected.dtype)
        if rule.target in filled:
            mismatched[key] = f"our {rule.target} was already filled from {filled_from[rule.target]!r}"
            continue
        filled[rule.target] = tensor
        filled_from[rule.target] = key
        if steps:
            report.adapted[key] = f"{rule.target}: {'; '.join(steps)}"
        else:
            report.used[key] = rule.target
    missing = {
        prefix + source_name_of(name): f"needed for our {name} {tuple(tensor.shape)}"
        for name, tensor in target.items()
        if name not in filled
    }
    if missing or mismatched or unexpected:
        raise CheckpointLayoutError(
            report.source, report.kind, missing=missing, mismatched=mismatched, unexpected=unexpected
        )
    model.load_state_dict(filled, strict=True)


def import_state_dict(
    state_dict: Mapping,
    kind: str | None = None,
    options: ImportOptions | None = None,
    *,
    source: str = "checkpoint",
    entry: str = "",
    ignored_entries: Mapping[str, str] | None = None,
) -> ImportResult:
    """Build our model of `kind` (detected when None) from an authors' state dict; report every key."""
    options = options or ImportOptions()
    keys = list(state_dict)
    if kind is None:
        kind = detect_kind(keys, source)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    anchors = TOKENIZER_ANCHORS if kind == "tokenizer" else (VIT_ANCHOR,)
    prefix = options.prefix if options.prefix is not None else find_prefix(keys, anchors, source)
    if prefix is None:
        raise CheckpointLayoutError(
            source,
            kind,
            missing={"*" + anchors[0]: f"no key ends in it: not a {kind} checkpoint (try another --kind)"},
        )
    report = ImportReport(kind, source, entry, prefix, ignored_entries=dict(ignored_entries or {}))

    if kind in ("vit", "mim"):
        from pumit_seg.models.vit import UniversalViT

        config, report.assumptions = infer_vit_config(state_dict, prefix, options, source, kind)
        if kind == "vit":
            model = UniversalViT(**config)
            encoder_prefix = ""
        else:
            from pumit_seg.models.mim import MIMModel

            head = _need(
                state_dict, prefix + "mim_head.2.weight", source, kind, "the MIM head's output layer"
            )
            # the authors' masking rule (L - int(0.45 L) masked); only used if this model is trained further
            model = MIMModel(encoder=config, codebook_size=int(head.shape[0]), mask_count_rule="reference")
            report.assumptions["mask_count_rule"] = "reference (the authors' count of masked tokens)"
            encoder_prefix = "encoder."
        _fill(
            model,
            state_dict,
            prefix,
            lambda name: _vit_rule(name, kind, encoder_prefix),
            report,
            lambda ours: ours.removeprefix(encoder_prefix) if encoder_prefix else ours,
        )
    else:
        from pumit_seg.models.tokenizer import VisualTokenizer

        config, report.assumptions = infer_tokenizer_config(state_dict, prefix, options, source)
        model = VisualTokenizer(**config)
        _fill(model, state_dict, prefix, _tokenizer_rule, report, lambda ours: ours)
    model.eval()
    return ImportResult(model, report)


def import_checkpoint(
    path: str | Path,
    kind: str | None = None,
    options: ImportOptions | None = None,
    *,
    trust_pickle: bool = False,
) -> ImportResult:
    """`read_checkpoint` + `extract_state_dict` + `import_state_dict`."""
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    state_dict, entry, ignored = extract_state_dict(checkpoint, str(path))
    return import_state_dict(
        state_dict, kind, options, source=str(path), entry=entry, ignored_entries=ignored
    )


def input_spec(kind: str, model: nn.Module) -> dict:
    """What the weights expect at run time, for the file's header."""
    config = model.config.get("encoder", model.config)
    in_channels = int(config["in_channels"])
    spec = {"channels": in_channels, "grey": f"replicated to {in_channels} channels"}
    if kind == "tokenizer":
        return {**spec, "value_range": [-1.0, 1.0], "from_unit_range": "2 x - 1 on [0, 1] images"}
    from pumit_seg.models.mim import IMAGENET_MEAN, IMAGENET_STD

    spec["value_range"] = [0.0, 1.0]
    if in_channels == len(IMAGENET_MEAN):
        spec.update(normalization="imagenet", mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return spec


def norm_eps_from_weights(path: str) -> tuple[float | None, str]:
    """(LayerNorm eps the weights were trained with, how it was found), or (None, why not).

    Our safetensors files carry it in their header; a safetensors file without one is recognised by its
    key layout (EVA-02 in timm / official layout: 1e-6; the authors' PUMIT layout: 1e-5).
    """
    path = str(path)
    if not path.endswith(".safetensors"):
        return None, "not a safetensors file: the eps cannot be read without unpickling it"
    from safetensors import SafetensorError, safe_open

    from pumit_seg.models.vit import EVA02_NORM_EPS
    from pumit_seg.weights import HEADER_KEY

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"pretrained weights {path}: not a readable safetensors file ({error})") from error
    if HEADER_KEY in metadata:
        found = []

        def search(obj):
            if isinstance(obj, dict):
                for key, value in obj.items():
                    if key == "norm_eps" and isinstance(value, int | float):
                        found.append(float(value))
                    else:
                        search(value)

        search(json.loads(metadata[HEADER_KEY]).get("config", {}))
        if found:
            return found[0], "the weights file's architecture header"
    if any(".fc1_g." in k or ".attn.qkv." in k or "fc_norm." in k or ".mlp.w12." in k for k in keys):
        return EVA02_NORM_EPS, "EVA-02 key layout"
    if any(k.endswith("mlp.w1.weight") for k in keys):
        return AUTHORS_NORM_EPS, "the authors' PUMIT key layout"
    return None, "no header and no known key layout"
