"""EAGLE3 speculative decoding (contracts.md sections 1.1, 4.1 and 5): engine roles, the draft's vocabulary map
(`d2t.safetensors` and its one reader; llm_loader/eagle3_draft.py writes it), tree sizes, and how a draft names the
base layers it reads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from contract.errors import InputError
from contract.fields import is_int, positive_int

if TYPE_CHECKING:
    import torch

SPEC_NONE, SPEC_EAGLE3 = "none", "eagle3"  # config.json `spec_decode_type`
ROLE_LLM, ROLE_BASE, ROLE_DRAFT = "llm", "base", "draft"  # config.json `engine_role`
ENGINE_ROLES = (ROLE_LLM, ROLE_BASE, ROLE_DRAFT)
D2T_FILE, D2T_TENSOR = "d2t.safetensors", "d2t"  # the draft's draft-vocab -> base-vocab map (int32 [draft_vocab])
# safetensors metadata `form` of d2t.safetensors: how a draft id maps to a base id (the reference writes no metadata
# and stores the checkpoint's offsets, so a file without it is read as "offset")
D2T_OFFSET, D2T_DIRECT = "offset", "direct"
DEFAULT_TREE_SIZE = 60  # --maxVerifyTreeSize / --maxDraftTreeSize: tree tokens per call in the generation profile


def _layer_ids(value, num_layers: int | None) -> bool:
    """A list of hidden-state indices of a model of `num_layers` layers (HF `output_hidden_states`: 0..N); None:
    of a model whose depth is not known here (a draft names its base's layers)."""
    return isinstance(value, list) and all(is_int(i) and 0 <= i
                                           and (num_layers is None or i <= num_layers) for i in value)


def check_spec_config(config: dict, where: str) -> None:
    """The EAGLE3 fields of a runtime config.json (section 1.1) by type, for its `engine_role`: a base names the
    layers its hidden_states output concatenates, a draft its vocabulary, the width of the base hidden states it
    reads and (optionally) their layers."""
    role = config.get("engine_role", ROLE_LLM)
    if role not in ENGINE_ROLES:
        raise InputError(f"{where}: engine_role: expected one of {list(ENGINE_ROLES)}, found {role!r:.60}")
    layers = config["num_hidden_layers"]
    if role == ROLE_BASE and not _layer_ids(config.get("eagle_hidden_state_layers"), layers):
        raise InputError(f"{where}: eagle_hidden_state_layers: expected a list of layer indices in [0, {layers}], "
                         f"found {config.get('eagle_hidden_state_layers')!r:.60}")
    if role == ROLE_DRAFT:
        positive_int(config, "draft_vocab_size", where)
        positive_int(config, "base_model_hidden_size", where)
        eagle3 = config.get("eagle3_config", {})
        ids = eagle3.get("target_layer_ids") if isinstance(eagle3, dict) else None
        if not isinstance(eagle3, dict) or not (ids is None or _layer_ids(ids, None)):
            raise InputError(f"{where}: eagle3_config: expected an object whose target_layer_ids (if any) is a list "
                             f"of layer indices, found {eagle3!r:.60}")


def is_eagle3_config(config: dict) -> bool:
    """An EAGLE3 draft checkpoint, by the reference's rule: an "Eagle3" architecture, `ttt_length` or
    `draft_vocab_size` in its config.json."""
    archs = config.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]  # a hand-edited config may hold one name, or anything
    return any("Eagle3" in str(a) for a in archs) or "ttt_length" in config or "draft_vocab_size" in config


def default_eagle_layers(num_layers: int) -> list[int]:
    """The base hidden states an EAGLE3 draft reads when it names none (reference 0.10): inputs of decoder layers
    2, N // 2 and N - 4, i.e. HF `output_hidden_states[i]`."""
    return [2, num_layers // 2, num_layers - 4]


def draft_target_layers(config: dict) -> list[int] | None:
    """The target layers a draft's config.json names (`eagle_config.eagle_aux_hidden_state_layer_ids` or
    `target_layer_ids`), None when it names none (then it reads its base's defaults). Whatever it names comes back
    as a list, unchecked: the caller checks the ids against the model it knows."""
    eagle = config.get("eagle_config")
    ids = (eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None) \
        or config.get("target_layer_ids")
    if not ids:
        return None
    return list(ids) if isinstance(ids, list) else [ids]


def check_d2t(d2t: torch.Tensor, draft_vocab_size: int, where) -> None:
    """A `d2t` tensor (a draft checkpoint's, or d2t.safetensors') is int32/int64 `[draft_vocab_size]`."""
    import torch  # here, not at module level: llm-build --help imports this module

    if d2t.dtype not in (torch.int32, torch.int64) or tuple(d2t.shape) != (draft_vocab_size,):
        raise InputError(f"{where}: tensor d2t: expected int32/int64 [{draft_vocab_size}] (draft_vocab_size), found "
                         f"{d2t.dtype} {list(d2t.shape)}")


def read_d2t_targets(path: Path, vocab_size: int, draft_vocab_size: int) -> torch.Tensor:
    """The base id of every draft id (int64 `[draft_vocab_size]`) from `d2t.safetensors` (contracts.md 4.1): the
    metadata's form; without metadata the reading that stays in the base vocabulary, and when both do, the one with
    more distinct targets (a real map is one to one), the offset form on a tie."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if D2T_TENSOR not in f.keys():
                raise InputError(f"{path}: expected a tensor {D2T_TENSOR!r}, found {sorted(f.keys())}")
            d2t, form = f.get_tensor(D2T_TENSOR), (f.metadata() or {}).get("form")
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise InputError(f"{path}: expected a safetensors file, found an unreadable one ({e})") from e
    check_d2t(d2t, draft_vocab_size, path)
    if form not in (None, D2T_OFFSET, D2T_DIRECT):
        raise InputError(f"{path}: metadata form: expected {D2T_OFFSET!r} or {D2T_DIRECT!r}, found {form!r}")
    readings = {D2T_OFFSET: torch.arange(draft_vocab_size) + d2t.long(), D2T_DIRECT: d2t.long()}
    inside = {k: bool(((v >= 0) & (v < vocab_size)).all()) for k, v in readings.items()}
    if form is None:
        distinct = {k: len(torch.unique(v)) if inside[k] else -1 for k, v in readings.items()}
        form = D2T_DIRECT if distinct[D2T_DIRECT] > distinct[D2T_OFFSET] else D2T_OFFSET
    if not inside[form]:
        raise InputError(f"{path}: tensor d2t ({form} form): expected base ids in [0, {vocab_size}), found "
                         f"{int(readings[form].min())}..{int(readings[form].max())}")
    return readings[form]
