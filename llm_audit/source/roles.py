"""The role (kind), layer and expert index of a weight matrix, from its tensor name.

Why names: the plan is made from safetensors headers alone, before any weight is read
and without running a line of a model's code, and the open-weight families spell their
roles in a handful of ways (`q_proj` / `query` / `wq`, `gate_proj` / `w1` / `c_fc` /
`dense_h_to_4h`, `experts.7.w2`, `layers.N` / `h.N` / `blocks.N`). One table maps them to
the kinds reports group by; everything it does not know is `linear`, and users can add
their own rules (`kinds:` in the audit config: a regex, a kind, and the regex group that
holds the expert index) without a code change. User rules are tried first, on every
weight (a stack's experts and a kernel's positions take the rule's kind).

Why not transformers' meta-device skeleton: a skeleton names modules as the model holds
them, not as the checkpoint stores them (transformers 5 fuses Mixtral's and Qwen-MoE's
per-expert tensors into stacks in memory and splits them again on save), so it would
still need a name table to reach the tensors; it needs `model_type` to be one
transformers knows, and a transformers import (seconds) on the driver for every plan.
What the skeleton tells that names cannot — that GPT-2's Conv1D stores [in, out], which
is a linear and which an embedding — the tests check against the skeleton instead
(tests/test_families.py, ten families), and GPT-2's Conv1D is a property of its
`model_type`, kept in `CONV1D_MODEL_TYPES`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AuditError
from ..inputs import compile_regex, shown

ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLA_KINDS = ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")
MLP_KINDS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
EXPERT_KINDS = ("expert_gate", "expert_up", "expert_down", "expert_gate_up")
SHARED_KINDS = ("shared_gate", "shared_up", "shared_down", "shared_gate_up")
KINDS = (
    *ATTENTION_KINDS,
    *MLA_KINDS,
    *MLP_KINDS,
    "router",
    *EXPERT_KINDS,
    *SHARED_KINDS,
    "embedding",
    "position_embedding",
    "lm_head",
    "linear",
    "conv",
)
# model_types whose checkpoints store these linear layers as transformers' Conv1D: [in, out].
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt"})
_CONV1D = re.compile(r"\.(?:c_attn|q_attn|c_proj|c_fc)\.weight$")
# Bare projection parameters used as `x @ P`, so stored [in, out], whatever the config:
# OpenAI CLIP's and OpenCLIP's `visual.proj` and `text_projection` (an nn.Linear there is
# `text_projection.weight`, [out, in], as in transformers' CLIP).
_MATMUL_PARAMS = re.compile(r"(?:^|\.)(?:visual\.proj|text_projection)$")

# The layer is the index of a name's first numbered component, when that component is a
# stack of blocks: `model.layers.3.`, `h.3.`, `transformer_blocks.3.` (DiT, Flux); nested
# stages (`stages.1.blocks.3.`, a UNet's `down_blocks.1.`, Swin's `layers.1.blocks.3.`,
# SegFormer's `block.1.3.`) have no single depth.
_FIRST_NUMBERED = re.compile(r"(?:^|\.)(\w+)\.(\d+)\.")
_NESTED = re.compile(r"^\d+\.|(?:^|\.)blocks\.\d+\.")  # after the first stack's index
_LAYER_STACKS = frozenset(
    {"layers", "layer", "h", "block", "blocks", "encoders", "transformer_blocks", "resblocks"}
)
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_W = r"\.weight$"
# an attention module's own projections: `self_attn.`, `attention.self.` (BERT),
# `SelfAttention.` / `EncDecAttention.` (T5), `encoder_attn.` (BART, Whisper), ...
_ATTENTION = (
    r"\.(?:self_attn|attn|attention|self_attention|attention\.self|attention\.output"
    r"|SelfAttention|EncDecAttention|encoder_attn|cross_attn|crossattention)\."
)
_ROLE_TABLE: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        # routed experts (an `experts.N.` component), before the dense MLP names
        (r"\.experts\.\d+\.(?:gate_proj|w1)" + _W, "expert_gate"),
        (r"\.experts\.\d+\.(?:up_proj|w3)" + _W, "expert_up"),
        (r"\.experts\.\d+\.(?:down_proj|w2)" + _W, "expert_down"),
        (r"\.shared_experts?\.(?:gate_proj|w1)" + _W, "shared_gate"),
        (r"\.shared_experts?\.(?:up_proj|w3)" + _W, "shared_up"),
        (r"\.shared_experts?\.(?:down_proj|w2)" + _W, "shared_down"),
        (r"\.shared_mlp\.input_linear" + _W, "shared_gate_up"),  # GraniteMoE-shared, hybrid
        (r"\.shared_mlp\.output_linear" + _W, "shared_down"),
        (
            r"\.(?:mlp|block_sparse_moe|moe|feed_forward|ffn|mixer)\.(?:gate|router)"
            r"(?:\.layer|\.classifier)?" + _W,
            "router",
        ),
        # multi-head latent attention (DeepSeek-V2/V3)
        (r"\.q_a_proj" + _W, "q_a_proj"),
        (r"\.q_b_proj" + _W, "q_b_proj"),
        (r"\.kv_a_proj(?:_with_mqa)?" + _W, "kv_a_proj"),
        (r"\.kv_b_proj" + _W, "kv_b_proj"),
        # attention
        (r"\.(?:qkv_proj|query_key_value|c_attn|qkv|Wqkv|W_pack|attn\.att_proj)" + _W, "qkv_proj"),
        # torch.nn.MultiheadAttention (OpenCLIP, SigLIP's pooling head, nn.Transformer):
        # q|k|v in one [3E, E] `in_proj_weight`, or apart where the key/value widths differ
        (r"\.in_proj_weight$", "qkv_proj"),
        (r"\.q_proj_weight$", "q_proj"),
        (r"\.k_proj_weight$", "k_proj"),
        (r"\.v_proj_weight$", "v_proj"),
        # query/key/value only under an attention module: RWKV's channel mix (an MLP) has
        # feed_forward.key/value; T5 names them q/k/v/o, DistilBERT q_lin/.../out_lin
        (r"\.(?:q_proj|wq|query_proj|q_lin|q_attn)" + _W, "q_proj"),
        (r"\.(?:k_proj|wk|key_proj|k_lin)" + _W, "k_proj"),
        (r"\.(?:v_proj|wv|value_proj|v_lin)" + _W, "v_proj"),
        # diffusers' attention (and its context stream's add_*_proj, to_add_out)
        (r"\.(?:to_q|add_q_proj)" + _W, "q_proj"),
        (r"\.(?:to_k|add_k_proj)" + _W, "k_proj"),
        (r"\.(?:to_v|add_v_proj)" + _W, "v_proj"),
        (r"\.(?:to_out\.0|to_add_out)" + _W, "o_proj"),
        # (FastSpeech2-Conformer's relative-position attention: linear_q/k/v/out)
        (_ATTENTION + r"(?:query|q|linear_q)" + _W, "q_proj"),
        (_ATTENTION + r"(?:key|k|linear_k)" + _W, "k_proj"),
        (_ATTENTION + r"(?:value|v|linear_v)" + _W, "v_proj"),
        (
            _ATTENTION + r"(?:o_proj|out_proj|dense|wo|c_proj|out|o|out_lin|output\.dense|output"
            r"|linear_out"
            r"|projection_layer|proj)" + _W,
            "o_proj",
        ),
        (r"\.o_proj" + _W, "o_proj"),  # under any module name (NemotronH's mixer, ...)
        # any attention module's out_proj (SAM's cross_attn_token_to_image, ...)
        (r"\.\w*(?:attn|attention)\w*\.out_proj" + _W, "o_proj"),
        # dense MLP
        (r"\.gate_up_proj" + _W, "gate_up_proj"),
        (r"\.(?:gate_proj|w1)" + _W, "gate_proj"),
        (r"\.(?:DenseReluDense\.wi_0)" + _W, "gate_proj"),
        (r"\.(?:up_proj|w3|c_fc|dense_h_to_4h|fc1|fc_in|lin1|wi|wi_1)" + _W, "up_proj"),
        (r"\.(?:intermediate\.dense|feed_forward\.key)" + _W, "up_proj"),  # BERT, RWKV
        # wav2vec2's family and SpeechT5, ConvNeXt, SegFormer's Mix-FFN, Bark
        (
            r"\.(?:feed_forward\.intermediate_dense|pwconv1|mlp\.dense1|mlp\.in_proj)" + _W,
            "up_proj",
        ),
        (r"\.(?:feed_forward\.output_dense|pwconv2|mlp\.dense2|mlp\.out_proj)" + _W, "down_proj"),
        (r"\.(?:down_proj|w2|dense_4h_to_h|fc2|fc_out|lin2|DenseReluDense\.wo)" + _W, "down_proj"),
        (r"\.(?:mlp\.c_proj|output\.dense|feed_forward\.value)" + _W, "down_proj"),
        (r"\.ff(?:_context)?\.net\.0\.proj" + _W, "up_proj"),  # diffusers' FeedForward
        (r"\.ff(?:_context)?\.net\.2" + _W, "down_proj"),
        # embeddings and output head
        (
            r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embedding"
            r"|token_embedding|tokens_embed|embeddings|shared|embed_tokens_per_layer"
            r"|input_embeds_layer|queries_embedder|queries_features)" + _W,
            "embedding",
        ),
        # vector-quantizer codebooks (EnCodec's buffer, DAC's nn.Embedding): lookup tables
        (r"\.codebook\.(?:embed|weight)$", "embedding"),
        (
            r"(?:^|\.)(?:wpe|embed_positions|position_embeddings|position_embedding"
            r"|positions_embed|position_embeds_layer|query_position_embeddings"
            r"|rel_attn_embed|rel_embeddings|embed_positions\.pe_k)" + _W,
            "position_embedding",
        ),
        # relative-position tables (Swin, SAM's ViT): nn.Parameters
        (r"(?:^|\.)(?:relative_position_bias_table|rel_pos_h|rel_pos_w)$", "position_embedding"),
        (r"(?:^|\.)positional_embedding$", "position_embedding"),  # CLIP's nn.Parameter
        # Mllama's vision tower: a gated position table (an nn.Parameter) and tile positions
        (
            r"\.gated_positional_embedding\.(?:embedding|tile_embedding\.weight)$",
            "position_embedding",
        ),
        (r"(?:^|\.)(?:lm_head|unembedding|embed_out|shared_head\.head)" + _W, "lm_head"),
        (r"^output" + _W, "lm_head"),
    )
)
_KIND_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


@dataclass(frozen=True)
class Role:
    """What a tensor is: its kind, and the layer and expert its name gives (or None)."""

    kind: str
    layer: int | None
    expert: int | None


@dataclass(frozen=True)
class KindRule:
    """A user rule: names matching `pattern` have `kind`; `expert` names the regex group
    holding the expert index (a group number or name), if any."""

    pattern: re.Pattern[str]
    kind: str
    expert: int | str | None = None


def layer_of(name: str) -> int | None:
    """The block index of a tensor name (`layers.N`, `layer.N`, `h.N`, `block(s).N`, ...:
    `_LAYER_STACKS`), None when its first numbered component is not one of those or a
    stage of nested blocks."""
    match = _FIRST_NUMBERED.search(name)
    if not match or match.group(1) not in _LAYER_STACKS or _NESTED.search(name[match.end() :]):
        return None
    return int(match.group(2))


def config_of(name: str, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config of the model that tensor `name` belongs to: in an encoder-decoder pair
    (transformers' EncoderDecoder, VisionEncoderDecoder, SpeechEncoderDecoder) the
    `encoder.` and `decoder.` tensors follow their own model's config (a GPT-2 decoder's
    Conv1D is stored [in, out] under a `vision-encoder-decoder` model_type)."""
    sub = config.get(name.partition(".")[0]) if name.startswith(("encoder.", "decoder.")) else None
    return sub if isinstance(sub, Mapping) and isinstance(sub.get("model_type"), str) else config


def stored_transposed(name: str, config: Mapping[str, Any]) -> bool:
    """Whether the 2-D weight `name` is stored [in, out]: a Conv1D of GPT-2's family, or a
    bare projection used as `x @ P` (CLIP's `visual.proj`, `text_projection`)."""
    if _MATMUL_PARAMS.search(name):
        return True
    return config.get("model_type") in CONV1D_MODEL_TYPES and bool(_CONV1D.search(name))


def _rule_expert(rule: KindRule, match: re.Match[str], name: str) -> int | None:
    if rule.expert is None or match.group(rule.expert) is None:
        return None
    text = match.group(rule.expert)
    if not text.isdecimal() or len(text) > 9:
        raise AuditError(
            f"kinds rule {rule.pattern.pattern[:80]!r}: expert group matched {text[:20]!r} "
            f"in {name[:200]!r}, not an expert index"
        )
    return int(text)


def user_kind(name: str, rules: Sequence[KindRule]) -> str | None:
    """The kind of the first user rule matching `name` (any weight: a stack, a kernel)."""
    return next((rule.kind for rule in rules if rule.pattern.search(name)), None)


def role_of(name: str, rules: Sequence[KindRule] = ()) -> Role:
    """The role of the 2-D weight `name`: user rules first, then the naming table (a PEFT
    model's `base_layer` is the module it wraps)."""
    name = name.replace(".base_layer.", ".")
    layer = layer_of(name)
    for rule in rules:
        match = rule.pattern.search(name)
        if match:
            return Role(rule.kind, layer, _rule_expert(rule, match, name))
    for pattern, kind in _ROLE_TABLE:
        if pattern.search(name):
            expert = _EXPERT.search(name) if kind.startswith("expert_") else None
            return Role(kind, layer, int(expert.group(1)) if expert else None)
    return Role("linear", layer, None)


def parse_kind_rules(value: Any, where: str) -> tuple[KindRule, ...]:
    """Validate the `kinds:` config value: a list of {pattern, kind[, expert]} mappings.

    `expert` is the number or name of the regex group holding the expert index; it must
    exist in the pattern (and match digits, checked when a name matches). Errors name
    `where` and the rule.
    """
    if not isinstance(value, list):
        raise AuditError(f"{where}: kinds must be a list of {{pattern, kind, expert}} rules")
    rules = []
    for i, item in enumerate(value):
        at = f"{where}: kinds[{i}]"
        if not isinstance(item, Mapping) or not {"pattern", "kind"} <= set(item):
            raise AuditError(f"{at} must be a mapping with 'pattern' and 'kind'")
        unknown = sorted(set(item) - {"pattern", "kind", "expert"}, key=str)
        if unknown:
            raise AuditError(f"{at}: unknown key(s) {shown(', '.join(map(str, unknown)))}")
        pattern, kind, expert = item["pattern"], item["kind"], item.get("expert")
        if not isinstance(pattern, str):
            raise AuditError(f"{at}: pattern must be a string")
        compiled = compile_regex(pattern, at)
        if not isinstance(kind, str) or not _KIND_NAME.fullmatch(kind):
            raise AuditError(f"{at}: kind must be lower_snake_case, at most 40 characters")
        if expert is not None:
            if isinstance(expert, bool) or not isinstance(expert, int | str):
                raise AuditError(f"{at}: expert must be a regex group number or name")
            known = isinstance(expert, int) and 0 < expert <= compiled.groups
            if not known and expert not in compiled.groupindex:
                raise AuditError(f"{at}: pattern has no group {expert!r} for the expert index")
        rules.append(KindRule(compiled, kind, expert))
    return tuple(rules)


@dataclass(frozen=True)
class FusedSplit:
    """How a fused qkv weight splits: in each group of `period` rows of the (out, in)
    matrix, rows `start:stop` belong to each part's kind; `transposed` when stored [in, out]."""

    parts: tuple[tuple[str, int, int], ...]
    period: int
    transposed: bool = False
    periodic: bool = False  # the groups repeat down the rows (else one group: all rows)


def _config_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AuditError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def _head_dim(config: Mapping[str, Any]) -> int:
    heads = _config_int(config, "num_attention_heads")
    default = _config_int(config, "hidden_size") // heads if "hidden_size" in config else None
    return _config_int(config, "head_dim", default)


def _qkv_parts(q_rows: int, kv_rows: int) -> tuple[tuple[str, int, int], ...]:
    return (
        ("q_proj", 0, q_rows),
        ("k_proj", q_rows, q_rows + kv_rows),
        ("v_proj", q_rows + kv_rows, q_rows + 2 * kv_rows),
    )


def _row_blocks(config: Mapping[str, Any]) -> FusedSplit:
    """[q; k; v] row blocks from the config's heads (openai's original/ layout, Phi-3)."""
    head_dim = _head_dim(config)
    q_rows = _config_int(config, "num_attention_heads") * head_dim
    kv_rows = _config_int(config, "num_key_value_heads", config.get("num_attention_heads"))
    return FusedSplit(_qkv_parts(q_rows, kv_rows * head_dim), q_rows + 2 * kv_rows * head_dim)


def _layout_of_fused_qkv(name: str, config: Mapping[str, Any], rows: int) -> FusedSplit | None:
    model_type = config.get("model_type")
    if model_type == "phi3" and name.endswith(".qkv_proj.weight"):
        return _row_blocks(config)
    if name.endswith(".in_proj_weight") and not rows % 3:  # nn.MultiheadAttention: [q; k; v]
        return FusedSplit(_qkv_parts(rows // 3, rows // 3), rows)
    # Phi-4-multimodal's language model keeps Phi-3's [q; k; v] rows; its vision and
    # audio towers have heads of their own, so like openai's `attn.qkv` below.
    phi4 = model_type == "phi4_multimodal" and name.endswith(".qkv_proj.weight")
    if phi4 or name.endswith(".attn.qkv.weight"):
        # openai's original/ layout, known by the name alone; but timm ViTs and the vision
        # towers of multimodal models (Qwen2-VL, ...) use the name too, with heads that
        # config.json does not give (or gives for the text model): where the config's
        # heads do not describe this tensor, it is not split.
        try:
            split = _row_blocks(config)
        except AuditError:
            return None
        return split if split.period == rows else None
    if model_type in CONV1D_MODEL_TYPES and name.endswith(".crossattention.c_attn.weight"):
        width = _config_int(config, "n_embd")  # Conv1D [in, k|v]; q is q_attn's
        parts = (("k_proj", 0, width), ("v_proj", width, 2 * width))
        return FusedSplit(parts, 2 * width, transposed=True)
    if model_type in CONV1D_MODEL_TYPES and name.endswith(".c_attn.weight"):  # Conv1D [in, q|k|v]
        width = _config_int(config, "n_embd")
        return FusedSplit(_qkv_parts(width, width), 3 * width, transposed=True)
    if model_type == "falcon" and name.endswith(".query_key_value.weight"):
        heads = _config_int(config, "num_attention_heads")
        head_dim = _config_int(config, "hidden_size") // heads
        if config.get("new_decoder_architecture"):  # per kv group: its q heads, k, v
            per_group = heads // _config_int(config, "num_kv_heads", heads)
            q_rows = per_group * head_dim
            return FusedSplit(_qkv_parts(q_rows, head_dim), q_rows + 2 * head_dim, periodic=True)
        if config.get("multi_query", True):  # all q heads, then one k and one v head
            # (else, below: q, k, v per head)
            return FusedSplit(_qkv_parts(heads * head_dim, head_dim), (heads + 2) * head_dim)
        return FusedSplit(_qkv_parts(head_dim, head_dim), 3 * head_dim, periodic=True)
    return None


def fused_qkv_split(name: str, config: Mapping[str, Any], rows: int) -> FusedSplit | None:
    """The q/k/v layout of the fused qkv weight `name` with `rows` output rows, where the
    architecture (config.json's `model_type`) fixes it; None where it is not known (the
    weight is then audited whole, kind `qkv_proj`).

    Raises `AuditError` when the architecture fixes the layout but the config does not
    add up to `rows`.
    """
    try:
        split = _layout_of_fused_qkv(name, config, rows)
    except AuditError as err:
        raise AuditError(f"cannot split fused qkv {name[:200]!r}: {err}") from None
    if split is not None and (rows % split.period if split.periodic else rows != split.period):
        raise AuditError(
            f"cannot split fused qkv {name[:200]!r} of {rows} rows: config.json gives "
            f"groups of {split.period} rows"
        )
    return split
