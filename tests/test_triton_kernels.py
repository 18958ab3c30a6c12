"""Triton kernels of both custom ops against their torch references.

Without a GPU the kernels run on the Triton CPU interpreter. Triton chooses interpreter or compiler when a function
is decorated with `@triton.jit`, and that includes Triton's own library functions (`tl.zeros`, `tl.sum`, ...),
decorated when `triton` is first imported. So the interpreter needs `TRITON_INTERPRET=1` before the first
`import triton` of a process. These tests therefore run the kernels in one spawned worker process per module (env
set in its initializer, nothing imported yet) and compare the results here: no environment variable or module state
leaks into the pytest process or other test modules. The `gpu` tests call the compiled kernels directly.

What the interpreter covers: every load, index, mask, norm, RoPE, online softmax, split-K merge and FP8 *load*
(FP8 tensors load exactly). It does not cover fp32 -> fp8 rounding: the interpreter truncates instead of carrying
into the next binade when a value rounds up to a power of two. So the quantizing kernel is compared bit for bit with
torch everywhere except at codes whose mantissa is zero (the only place the carry can land), and the attention
kernels get their FP8 inputs quantized by torch. The `gpu` tests run the compiled kernels end to end, bit-exact.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from contract.errors import InputError
from contract.formats import quantize_fp8_row_block, to_fp8
from plugins.attention.reference import apply_rope, attention_reference, rms_norm
from plugins.attention.schema import AttentionAttrs
from plugins.fp8_gather.reference import fp8_gather_reference

FP8 = torch.float8_e4m3fn
ATTN = "plugins.attention.triton_kernels"
GATHER = "plugins.fp8_gather.triton_kernels"


INTERPRETER_NUMPY = (
    "this Triton's CPU interpreter cannot run loops with run-time bounds under NumPy >= 2.4 (it calls int() on a "
    "1-element array; triton-lang/triton#9171, seen with Triton 3.6): install numpy<2.4 or a Triton with the fix "
    "(3.9 has it). Compiled GPU kernels are not affected."
)


def _interpret_mode() -> None:
    os.environ["TRITON_INTERPRET"] = "1"


def _call(module: str, fn: str, kwargs: dict, returned: tuple[str, ...]):
    """Runs in the worker: `module.fn(**kwargs)` plus the (in-place updated) arguments named in `returned`."""
    result = getattr(importlib.import_module(module), fn)(**kwargs)
    return result, tuple(kwargs[name] for name in returned)


@pytest.fixture(scope="module")
def interp():
    """`interp(module, fn, returned=(), **kwargs)` runs a kernel entry point on the Triton CPU interpreter."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_interpret_mode) as pool:

        def call(module, fn, returned=(), **kwargs):
            try:
                return pool.submit(_call, module, fn, kwargs, tuple(returned)).result()
            except Exception as e:
                if "only 0-dimensional arrays can be converted" not in str(e):
                    raise
            pytest.fail(INTERPRETER_NUMPY, pytrace=False)  # not a kernel bug: say what it is

        yield call


def test_worker_really_interprets(interp):
    env, _ = interp("os", "getenv", key="TRITON_INTERPRET")
    assert env == "1" and os.environ.get("TRITON_INTERPRET") is None


# ---------------------------------------------------------------------------------------------------- helpers


def make_case(b=2, s=8, hq=4, hkv=2, d=64, capacity=32, fp8=False, qk_norm=False, rot=None, starts=(0, 5),
              lengths=(8, 3), device="cpu", seed=0):
    """Random inputs of one attention call, with a cache already filled up to each row's start."""
    g = torch.Generator().manual_seed(seed)
    rot = rot or d
    qkv = (torch.randn(b, s, (hq + 2 * hkv) * d, generator=g) * 2).half()
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    ang = torch.arange(capacity).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1)[None]
    scales = (0.02, 0.03, 0.015) if fp8 else (1.0, 1.0, 1.0)
    cache = torch.randn(b, 2, hkv, capacity, d, generator=g).half()
    if fp8:
        cache = to_fp8(cache.float() * 3, 1.0)
    attrs = AttentionAttrs(
        num_q_heads=hq, num_kv_heads=hkv, head_size=d, attention_scale=1 / math.sqrt(d),
        enable_fp8_kv_cache=fp8, qkv_scales=scales, enable_qk_norm=qk_norm, rms_norm_eps=1e-6,
    )
    q_gamma = (1 + 0.2 * torch.randn(d, generator=g)).half() if qk_norm else None
    k_gamma = (1 + 0.2 * torch.randn(d, generator=g)).half() if qk_norm else None
    ints = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(qkv=on(qkv), past_key_value=on(cache), context_lengths=ints(lengths), rope_cos_sin=on(cos_sin),
                kvcache_start_index=ints(starts), q_norm_gamma=on(q_gamma), k_norm_gamma=on(k_gamma)), attrs


def torch_qkv(case, attrs):
    """Q and K after split, norm and RoPE, and V, in torch (the reference's own helper functions)."""
    qkv, starts = case["qkv"].cpu(), case["kvcache_start_index"].cpu().long()
    b, s, _ = qkv.shape
    hq, hkv, d = attrs.num_q_heads, attrs.num_kv_heads, attrs.head_size
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.reshape(b, s, hq, d), k.reshape(b, s, hkv, d), v.reshape(b, s, hkv, d)
    if attrs.enable_qk_norm:
        q = rms_norm(q, case["q_norm_gamma"].cpu(), attrs.rms_norm_eps)
        k = rms_norm(k, case["k_norm_gamma"].cpu(), attrs.rms_norm_eps)
    table = case["rope_cos_sin"].cpu()
    pos = (starts[:, None] + torch.arange(s)[None]).clamp(max=table.shape[1] - 1)
    cos, sin = table[0, pos].chunk(2, dim=-1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def torch_q(case, attrs):
    return torch_qkv(case, attrs)[0]


def valid_rows(case):
    s = case["qkv"].shape[1]
    return torch.arange(s)[None, :] < case["context_lengths"].cpu().long()[:, None]  # [B,S]


def interpreter_sound(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Where the interpreter's fp32 -> fp8 rounding of `x / scale` agrees with round-to-nearest-even: everywhere
    except at exact ties and at values that round up to a power of two (the carry into the next binade)."""
    v = (x.float() / scale).clamp(-448, 448)
    codes = v.to(FP8)
    down = torch.nextafter(v, torch.tensor(float("-inf"))).to(FP8)
    up = torch.nextafter(v, torch.tensor(float("inf"))).to(FP8)
    tie = down.view(torch.uint8) != up.view(torch.uint8)
    power_of_two = (codes.view(torch.uint8) & 0x7) == 0
    return ~tie & ~power_of_two


# ---------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("qk_norm,rot", [(False, None), (True, None), (False, 32)])
def test_rope_kv_write_fp16_matches_reference(interp, qk_norm, rot):
    case, attrs = make_case(qk_norm=qk_norm, rot=rot)
    _, want_present = attention_reference(**case, attrs=attrs)
    q, (cache,) = interp(ATTN, "rope_kv_write", ["past_key_value"], **case, attrs=attrs)
    torch.testing.assert_close(cache, want_present, atol=2e-3, rtol=1e-3)
    valid = valid_rows(case)
    want_q = torch_q(case, attrs)
    torch.testing.assert_close(q[valid], want_q[valid], atol=2e-3, rtol=1e-3)
    assert torch.count_nonzero(q[~valid]) == 0


def test_rope_kv_write_leaves_other_slots_alone(interp):
    case, attrs = make_case(starts=(3, 20), lengths=(5, 2))
    past = case["past_key_value"].clone()  # tensors reach the worker through shared memory: keep a copy
    _, (cache,) = interp(ATTN, "rope_kv_write", ["past_key_value"], **case, attrs=attrs)
    for row, (start, n) in enumerate([(3, 5), (20, 2)]):
        untouched = torch.ones(cache.shape[3], dtype=torch.bool)
        untouched[start : start + n] = False
        assert torch.equal(cache[row][:, :, untouched], past[row][:, :, untouched])
        assert not torch.equal(cache[row][:, :, ~untouched], past[row][:, :, ~untouched])


def assert_codes_match(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    """FP8 codes equal; after an RMSNorm (whose fp32 sum order differs from torch's, so its fp16 result may differ
    by one ulp) a code may sit next to torch's, at most one step away, in under 1% of the elements."""
    if exact:
        assert torch.equal(got, want)
        return
    step = (got.view(FP8).float() - want.view(FP8).float()).abs()
    next_code = (want.view(FP8).float().abs() / 8).clamp(min=2.0**-9)  # one E4M3 step: 2^(e-3), or subnormal
    assert bool((step <= next_code * 1.01).all())
    assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_kv_write_fp8_codes(interp, qk_norm):
    """FP8 codes of K, V and Q equal torch's `to_fp8` bit for bit wherever the interpreter's rounding is sound."""
    case, attrs = make_case(fp8=True, qk_norm=qk_norm)
    q_scale, k_scale, v_scale = attrs.qkv_scales
    _, want_present = attention_reference(**case, attrs=attrs)
    q, (cache,) = interp(ATTN, "rope_kv_write", ["past_key_value"], **case, attrs=attrs)
    want_q, k, v = torch_qkv(case, attrs)
    valid = valid_rows(case)
    for row, (start, n) in enumerate(zip(case["kvcache_start_index"].tolist(), case["context_lengths"].tolist())):
        for index, x, scale in ((0, k, k_scale), (1, v, v_scale)):
            new = x[row, :n].transpose(0, 1)  # [Hkv, n, D]
            sound = interpreter_sound(new, scale)
            assert sound.float().mean() > 0.8
            got = cache[row, index, :, start : start + n].view(torch.uint8)
            want = want_present[row, index, :, start : start + n].view(torch.uint8)
            assert_codes_match(got[sound], want[sound], exact=index == 1 or not qk_norm)
    sound_q = interpreter_sound(want_q, q_scale) & valid[:, :, None, None]
    want_codes = to_fp8(want_q, q_scale).view(torch.uint8)
    assert_codes_match(q.view(torch.uint8)[sound_q], want_codes[sound_q], exact=not qk_norm)
    assert torch.count_nonzero(q.view(torch.uint8)[~valid]) == 0


def reference_attention_from(q, cache, case, attrs):
    """softmax(q k^T scale) v over the cache with plain torch, from an already-rotated Q and a filled cache."""
    scales = attrs.qkv_scales if attrs.enable_fp8_kv_cache else (1.0, 1.0, 1.0)
    qf = q.float() * scales[0]
    keys, values = cache[:, 0].float() * scales[1], cache[:, 1].float() * scales[2]
    g = attrs.num_q_heads // attrs.num_kv_heads
    keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    s = q.shape[1]
    pos = case["kvcache_start_index"].long()[:, None] + torch.arange(s)[None]
    scores = torch.einsum("bshd,bhtd->bhst", qf, keys) * attrs.attention_scale
    visible = torch.arange(cache.shape[3])[None, None] <= pos[:, :, None]
    out = torch.einsum("bhst,bhtd->bshd", scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1), values)
    return torch.where(valid_rows(case)[:, :, None, None], out, 0.0)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("d,starts,lengths", [(64, (0, 5), (8, 3)), (128, (7, 0), (16, 16))])
def test_prefill_attention(interp, fp8, d, starts, lengths):
    case, attrs = make_case(d=d, s=16, fp8=fp8, starts=starts, lengths=lengths, capacity=48)
    q = torch_q(case, attrs)
    q = to_fp8(q, attrs.qkv_scales[0]) if fp8 else q
    q = torch.where(valid_rows(case)[:, :, None, None], q.float(), 0.0).to(q.dtype)
    got, _ = interp(ATTN, "prefill_attention", q=q, cache=case["past_key_value"], context_lengths=case["context_lengths"],
                    kvcache_start_index=case["kvcache_start_index"], attrs=attrs)
    want = reference_attention_from(q, case["past_key_value"], case, attrs)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention(interp, fp8, num_splits):
    case, attrs = make_case(s=1, hq=8, hkv=2, fp8=fp8, starts=(40, 17), lengths=(1, 1), capacity=64)
    q = torch_q(case, attrs)
    q = to_fp8(q, attrs.qkv_scales[0]) if fp8 else q
    got, _ = interp(ATTN, "decode_attention", q=q, cache=case["past_key_value"], context_lengths=case["context_lengths"],
                    kvcache_start_index=case["kvcache_start_index"], attrs=attrs, num_splits=num_splits)
    want = reference_attention_from(q, case["past_key_value"], case, attrs)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_decode_padding_row_outputs_zeros(interp):
    case, attrs = make_case(s=1, starts=(9, 4), lengths=(1, 0))
    (attn, present), _ = interp(ATTN, "attention_forward", **case, attrs=attrs)
    want_attn, want_present = attention_reference(**case, attrs=attrs)
    assert torch.count_nonzero(attn[1]) == 0
    torch.testing.assert_close(attn, want_attn, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(present, want_present, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("s,starts,lengths", [(8, (0, 0), (8, 5)), (1, (11, 3), (1, 1)), (4, (6, 2), (4, 2))])
def test_attention_forward_fp16_matches_reference(interp, family, s, starts, lengths):
    """The whole op: prefill, decode and a prefill that continues a cache, present updated in place."""
    case, attrs = make_case(s=s, starts=starts, lengths=lengths, qk_norm=family == "qwen3")
    want_attn, want_present = attention_reference(**case, attrs=attrs)
    (attn, present), (cache,) = interp(ATTN, "attention_forward", ["past_key_value"], **case, attrs=attrs)
    assert torch.equal(present, cache)  # present is the past binding, updated in place
    torch.testing.assert_close(attn, want_attn, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(present, want_present, atol=2e-3, rtol=1e-3)


def tree_case(s, starts, parents_per_row, fp8=False, qk_norm=False, d=64, capacity=64, seed=3):
    """A tree call: each row's tree (right-padded to s), its packed mask and its positions start + depth."""
    import numpy as np

    from plugins.attention.tree_mask import ancestors_mask, pack_tree_mask

    lengths = [len(p) for p in parents_per_row]
    case, attrs = make_case(s=s, d=d, fp8=fp8, qk_norm=qk_norm, starts=starts, lengths=lengths, capacity=capacity,
                            seed=seed)
    visible, pos = np.zeros((len(lengths), s, s), bool), np.zeros((len(lengths), s), np.int32)
    for row, parents in enumerate(parents_per_row):
        visible[row, : len(parents), : len(parents)] = ancestors_mask(parents)
        for i, p in enumerate(parents):
            pos[row, i] = starts[row] if p < 0 else pos[row, p] + 1
    case.update(attention_mask=torch.from_numpy(pack_tree_mask(visible)), attention_pos_id=torch.from_numpy(pos))
    return case, dataclasses.replace(attrs, enable_tree_attention=True)


def random_tree(size: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [-1] + [int(torch.randint(max(0, i - 6), i, (1,), generator=g)) for i in range(1, size)]


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("shape", ["small", "wide", "single"])
def test_tree_attention_forward_matches_reference(interp, qk_norm, shape):
    """Tree calls (EAGLE3 verification / draft proposals) against the torch reference: RoPE at attention_pos_id,
    K/V at the next slots, keys filtered by the packed mask; "wide" spans two mask words, "single" is one token.
    (FP8 end to end is not comparable on the interpreter, see the module doc; the next test covers its loads.)"""
    trees = {"small": ([-1, 0, 0, 1, 1, 2], [-1, 0, 1, 0]), "wide": (random_tree(40, 1), random_tree(35, 2)),
             "single": ([-1], [-1])}[shape]
    s = max(len(t) for t in trees)
    case, attrs = tree_case(s, (9, 3), trees, qk_norm=qk_norm)
    want_attn, want_present = attention_reference(**case, attrs=attrs)
    (attn, present), _ = interp(ATTN, "attention_forward", **case, attrs=attrs)
    valid = valid_rows(case)
    torch.testing.assert_close(attn, want_attn, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(present, want_present, atol=2e-3, rtol=1e-3)
    assert torch.count_nonzero(attn[~valid]) == 0


@pytest.mark.parametrize("fp8", [False, True])
def test_tree_prefill_attention(interp, fp8):
    """The attention kernel alone on a rotated Q and a filled cache (FP8: quantized by torch), against plain torch
    over the reference's visible slots: the mask logic and the FP8 loads."""
    from plugins.attention.reference import visible_slots

    trees = (random_tree(40, 3), random_tree(21, 4))
    case, attrs = tree_case(40, (5, 17), trees, fp8=fp8)
    _, present = attention_reference(**case, attrs=attrs)  # the tree call's K/V written at their slots
    q = torch_q(case, attrs)  # torch_q rotates at start + i; the kernel takes Q as given, so any Q will do
    q = to_fp8(q, attrs.qkv_scales[0]) if fp8 else q
    q = torch.where(valid_rows(case)[:, :, None, None], q.float(), 0.0).to(q.dtype)
    got, _ = interp(ATTN, "prefill_attention", q=q, cache=present, context_lengths=case["context_lengths"],
                    kvcache_start_index=case["kvcache_start_index"], attrs=attrs, attention_mask=case["attention_mask"])
    visible = visible_slots(case["kvcache_start_index"].long(), 40, present.shape[3], case["attention_mask"])
    scales = attrs.qkv_scales if fp8 else (1.0, 1.0, 1.0)
    keys, values = present[:, 0].float() * scales[1], present[:, 1].float() * scales[2]
    g = attrs.num_q_heads // attrs.num_kv_heads
    keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    scores = torch.einsum("bshd,bhtd->bhst", q.float() * scales[0], keys) * attrs.attention_scale
    want = torch.einsum("bhst,bhtd->bshd", scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1), values)
    valid = valid_rows(case)
    torch.testing.assert_close(got[valid].float(), want[valid], atol=2e-3, rtol=2e-3)
    assert torch.count_nonzero(got[~valid]) == 0


def test_tree_inputs_are_checked(interp):
    case, attrs = tree_case(6, (9, 3), ([-1, 0, 0, 1, 1, 2], [-1, 0, 1, 0]))
    with pytest.raises(InputError, match="attention_mask: expected int32"):
        interp(ATTN, "attention_forward", **{**case, "attention_mask": case["attention_mask"].long()}, attrs=attrs)
    with pytest.raises(InputError, match="attention_pos_id"):
        interp(ATTN, "attention_forward", **{**case, "attention_pos_id": None}, attrs=attrs)


def test_attention_forward_rejects_wrong_cache_dtype(interp):
    case, attrs = make_case(fp8=True)
    with pytest.raises(InputError, match="past_key_value"):
        interp(ATTN, "attention_forward", **{**case, "past_key_value": case["past_key_value"].half()}, attrs=attrs)


# ---------------------------------------------------------------------------------------------------- fp8 gather


@pytest.mark.parametrize("hidden", [64, 256, 320])
def test_fp8_gather_matches_reference(interp, hidden):
    torch.manual_seed(0)
    table, scale = quantize_fp8_row_block(torch.randn(50, hidden) * 0.1)
    ids = torch.randint(0, 50, (2, 5), dtype=torch.int32)
    got, _ = interp(GATHER, "fp8_gather", table_fp8=table, scale=scale, input_ids=ids)
    assert got.dtype == torch.float16 and got.shape == (2, 5, hidden)
    assert torch.equal(got, fp8_gather_reference(table, scale, ids))


def test_fp8_gather_out_of_range(interp):
    # rows 1..10 of a 12-row table: ids -1 and 10 (= V) would read real, nonzero rows if the kernel's bound were off
    # by one, rather than whatever memory lies past a buffer
    full_table, full_scale = quantize_fp8_row_block(torch.randn(12, 200) + 3)
    table, scale = full_table[1:11], full_scale[1:11]
    ids = torch.tensor([[1, 2, 10, -1]], dtype=torch.int32)
    with pytest.raises(InputError, match="found 10"):
        interp(GATHER, "fp8_gather", table_fp8=table, scale=scale, input_ids=ids)
    unchecked, _ = interp(GATHER, "fp8_gather", table_fp8=table, scale=scale, input_ids=ids, check=False)
    assert torch.count_nonzero(unchecked[0, 2:]) == 0
    assert torch.equal(unchecked[0, :2], fp8_gather_reference(table, scale, ids[0, :2]))


# ---------------------------------------------------------------------------------------------------- Hopper build


def test_kernels_compile_for_hopper_without_spills():
    """No GPU needed: Triton lowers every kernel to sm_90, at the launch's tiles and warp counts, without spilling a
    register; both prefill variants run on Hopper's wgmma tensor cores, FP8 on the e4m3 ones (the interpreter never
    runs the compiler, so this catches what it cannot). benchmarks/kernel_resources.py prints the numbers."""
    from benchmarks.kernel_resources import (
        compile_for_hopper,
        hopper_kernels,
        registers_and_stack,
        tensor_core_instructions,
    )

    for label, fn, signature, constexprs, options in hopper_kernels():
        kernel = compile_for_hopper(fn, signature, constexprs, options)
        registers, stack = registers_and_stack(kernel.asm["cubin"])
        assert stack == 0 and registers <= 255, (label, registers, stack)
        if label.startswith("prefill"):
            wanted = "e4m3.e4m3" if label.startswith("prefill fp8") else "f16.f16"
            found = tensor_core_instructions(kernel.asm["ptx"])
            assert any(i.startswith("wgmma") and i.endswith(wanted) for i in found), (label, found)


# ---------------------------------------------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = "cuda"  # the gpu tests' device; their logic (less the FP8 code checks) was run once on the interpreter with "cpu"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 128), (32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("s,starts,lengths", [(300, (0, 0), (300, 177)), (1, (4000, 1234), (1, 1)), (64, (100, 0), (64, 30))])
def test_gpu_attention_forward(fp8, hq, hkv, d, s, starts, lengths):
    from plugins.attention.triton_kernels import attention_forward, rope_kv_write

    case, attrs = make_case(b=2, s=s, hq=hq, hkv=hkv, d=d, capacity=4096 + 128, fp8=fp8, qk_norm=True,
                            starts=starts, lengths=lengths, device=GPU)
    cpu = {k: None if v is None else v.cpu() for k, v in case.items()}
    want_attn, want_present = attention_reference(**cpu, attrs=attrs)
    attn, present = attention_forward(**{**case, "past_key_value": case["past_key_value"].clone()}, attrs=attrs)
    if not fp8:
        torch.testing.assert_close(present.cpu(), want_present, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(attn.cpu(), want_attn, atol=4e-3, rtol=4e-3)
        return
    # Compiled, the quantizing step rounds like torch: V codes bit-exact; K and Q codes may sit one FP8 step away
    # where the RMSNorm's fp16 result differs by an ulp (< 1 %). One such step moves the output of a row that sees
    # few keys by about 1 %, so the attention is checked against fp32 torch over the kernel's own codes.
    got, want = present.cpu().view(torch.uint8), want_present.view(torch.uint8)
    assert torch.equal(got[:, 1], want[:, 1])
    assert_codes_match(got[:, 0].reshape(-1), want[:, 0].reshape(-1), exact=False)
    q8 = rope_kv_write(**{**case, "past_key_value": case["past_key_value"].clone()}, attrs=attrs).cpu()
    valid = valid_rows(cpu)
    want_q8 = to_fp8(torch_q(cpu, attrs), attrs.qkv_scales[0])
    assert_codes_match(q8.view(torch.uint8)[valid].reshape(-1), want_q8.view(torch.uint8)[valid].reshape(-1),
                       exact=False)
    torch.testing.assert_close(attn.cpu().float(), reference_attention_from(q8, present.cpu(), cpu, attrs),
                               atol=4e-3, rtol=4e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_decode_long_context(fp8):
    """Flash-decoding at the benchmark's longest cache (32768): many splits, and a row whose keys end mid-chunk."""
    from plugins.attention.triton_kernels import decode_attention

    case, attrs = make_case(b=2, s=1, hq=32, hkv=8, d=128, capacity=32768, fp8=fp8, starts=(32767, 20001),
                            lengths=(1, 1))
    q = torch_q(case, attrs)
    q = to_fp8(q, attrs.qkv_scales[0]) if fp8 else q
    on = {k: case[k].to(GPU) for k in ("past_key_value", "context_lengths", "kvcache_start_index")}
    got = decode_attention(q.to(GPU), on["past_key_value"], on["context_lengths"], on["kvcache_start_index"], attrs)
    want = reference_attention_from(q, case["past_key_value"], case, attrs)
    torch.testing.assert_close(got.cpu().float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hidden", [576, 4096])  # SmolLM2 (a short last block) and Qwen3-8B
def test_gpu_fp8_gather(hidden):
    from plugins.fp8_gather.triton_kernels import fp8_gather

    table, scale = quantize_fp8_row_block(torch.randn(32768, hidden) * 0.05)
    ids = torch.randint(0, 32768, (4, 2048), dtype=torch.int32)
    got = fp8_gather(table.to(GPU), scale.to(GPU), ids.to(GPU))
    assert torch.equal(got.cpu(), fp8_gather_reference(table, scale, ids))
    bad = torch.tensor([[5, 32768, -1]], dtype=torch.int32, device=GPU)
    with pytest.raises(InputError, match="found 32768"):
        fp8_gather(table.to(GPU), scale.to(GPU), bad)
    unchecked = fp8_gather(table.to(GPU), scale.to(GPU), bad, check=False).cpu()
    assert torch.count_nonzero(unchecked[0, 1:]) == 0
    assert torch.equal(unchecked[0, 0], fp8_gather_reference(table, scale, bad[:, :1].cpu())[0, 0])


def test_every_launch_states_fp_fusion():
    """Triton 3.9 warns (at a kernel's first compile, so on every GPU run) when a launch leaves FMA contraction to its
    default, which 3.10 changes: each launch of the project's kernels says which it wants."""
    import ast

    paths = sorted((Path(__file__).resolve().parents[1] / "plugins").glob("*/triton_kernels.py"))
    assert len(paths) == 2
    for path in paths:
        launches = [node for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)]  # kernel[grid](...)
        assert launches, path
        for call in launches:
            assert "enable_fp_fusion" in {k.arg for k in call.keywords}, (path.name, ast.unparse(call.func))
