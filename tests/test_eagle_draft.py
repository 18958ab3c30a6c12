"""examples/eagle: tree bookkeeping against brute force, the draft's two forward forms against each other and against
`quantization.eagle3`, greedy tree speculative decoding against transformers' plain greedy generate (it must match
for ANY draft, so random ones do), the draft vocabulary, and a trained draft's round trip through the loaders."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from helpers import run_cli
from transformers import LlamaConfig, LlamaForCausalLM

from contract.eagle3 import is_eagle3_config
from contract.errors import InputError
from examples.eagle import selfdistill
from examples.eagle.draft_model import draft_logprobs, draft_step, unrolled_forward
from examples.eagle.spec_decode import causal, spec_generate
from examples.eagle.train_draft import continues, draft_config, save_draft
from examples.eagle.training import (
    Sequences,
    TrainOptions,
    choose_draft_vocab,
    collate,
    init_draft,
    target_to_draft,
    train,
)
from examples.eagle.tree import (
    Tree,
    TreeShape,
    build_tree,
    draft_to_target,
    greedy_accept,
    pack_mask,
    select_verify_tree,
    unpack_mask,
)
from quantization import eagle3

VOCAB, HIDDEN, LAYERS = 96, 64, 4
LAYER_IDS = [1, 2, 3]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.1, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_draft(base, draft_vocab: int = 80, seed: int = 1):
    """A random draft whose vocabulary is a random subset of the base's (so d2t offsets are not trivial)."""
    config = draft_config(base.config.to_dict(), draft_vocab, LAYER_IDS)
    rng = torch.Generator().manual_seed(seed)
    ids = torch.randperm(VOCAB, generator=rng)[:draft_vocab].sort().values
    draft = init_draft(config, base, ids - torch.arange(draft_vocab), 3 * HIDDEN, seed)
    with torch.no_grad():
        for p in draft.midlayer.parameters():
            p.add_(torch.randn(p.shape, generator=rng) * 0.05)
    return draft.eval(), ids


# ---------------------------------------------------------------- packed mask and trees


def test_pack_mask_bits_match_brute_force():
    torch.manual_seed(0)
    allowed = torch.rand(2, 70, 70) < 0.5
    packed = pack_mask(allowed)
    assert packed.dtype == torch.int32 and packed.shape == (2, 70, 3)
    for b in range(2):
        for i in range(70):
            for w in range(3):
                word = sum(1 << (j - 32 * w) for j in range(32 * w, min(32 * w + 32, 70)) if allowed[b, i, j])
                assert int(packed[b, i, w]) == (word - (1 << 32) if word >= 1 << 31 else word)
    assert torch.equal(unpack_mask(packed, 70), allowed)


def test_tree_mask_and_positions():
    #        0
    #      1   2
    #     3     4
    #     5
    tree = Tree([10, 11, 12, 13, 14, 15], [-1, 0, 0, 1, 2, 3])
    assert tree.depths == [0, 1, 1, 2, 2, 3]
    assert tree.positions(7).tolist() == [7, 8, 8, 9, 9, 10]
    expected = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 2, 4}, 5: {0, 1, 3, 5}}
    mask = tree.ancestors()
    for i, allowed in expected.items():
        assert {j for j in range(6) if mask[i, j]} == allowed
    packed = pack_mask(mask[None])
    assert packed[0, :, 0].tolist() == [sum(1 << j for j in expected[i]) for i in range(6)]


def test_select_verify_tree_keeps_parents_on_ties():
    tokens = [5, 6, 7, 8, 9]
    parents = [-1, 0, 0, 1, 1]
    scores = [0.0, -1.0, -1.0, -1.0, -3.0]  # node 3 ties with its parent 1 and with node 2
    tree = select_verify_tree(tokens, scores, parents, 3)
    assert tree.tokens == [5, 6, 7] and tree.parents == [-1, 0, 0]
    tree = select_verify_tree(tokens, scores, parents, 4)
    assert tree.tokens == [5, 6, 7, 8] and tree.parents == [-1, 0, 0, 1]


def oracle_logprobs(path: tuple[int, ...], vocab: int) -> torch.Tensor:
    """A deterministic pseudo-draft: log-probs that depend only on the path of draft ids from the root."""
    g = torch.Generator().manual_seed(hash(path) % (2**31))
    return torch.log_softmax(torch.randn(vocab, generator=g) * 2, dim=-1)


def brute_force_tree(root: int, shape: TreeShape, vocab: int, d2t: torch.Tensor) -> set[tuple[int, ...]]:
    """The verify tree as a set of base-id paths, built from paths and scores only (no tables, no parents)."""
    def children(path, score):
        lp = oracle_logprobs(path, vocab)
        top = lp.topk(shape.top_k)
        return [(path + (int(i),), score + float(v)) for v, i in zip(top.values, top.indices)]

    table = [((), 0.0)]
    level = children((), 0.0)
    table += level
    for _ in range(shape.steps - 1):
        candidates = [c for path, score in level for c in children(path, score)]
        table += candidates
        level = sorted(candidates, key=lambda c: -c[1])[: shape.top_k]  # Python's sort is stable
    ranked = sorted(range(len(table)), key=lambda i: (-table[i][1], i))[: shape.verify]
    return {(root,) + tuple(int(i + d2t[i]) for i in table[r][0]) for r in ranked}


@pytest.mark.parametrize("shape", ["3/3/10", "2/4/9", "1/5/5", "4/2/17", "5/3/20"])
def test_build_tree_matches_brute_force(shape):
    shape = TreeShape.parse(shape)
    vocab = 12
    d2t = torch.tensor([3, 11, 0, 7, 1, 5, 9, 2, 8, 4, 6, 10]) + 20 - torch.arange(12)  # offsets onto 20..31
    root = 99

    to_draft = {int(i + d2t[i]): i for i in range(vocab)}

    def expand(nodes: Tree, states, level):
        # a node's state is its parent's draft-id path (what its parent's output stands for); its own path adds its id
        paths = [states[i] + (to_draft[nodes.tokens[i]],) for i in level]
        return torch.stack([oracle_logprobs(p, vocab) for p in paths]), paths

    tree = build_tree(oracle_logprobs((), vocab), root, shape, d2t + torch.arange(vocab), (), expand)
    assert len(tree) == shape.verify
    paths = set()
    for i in range(len(tree)):
        path, node = [], i
        while node >= 0:
            path.append(tree.tokens[node])
            node = tree.parents[node]
        paths.add(tuple(reversed(path)))
    assert paths == brute_force_tree(root, shape, vocab, d2t)
    mask = tree.ancestors()
    for i in range(len(tree)):  # node i sees node j exactly when j's path is a prefix of i's
        for j in range(len(tree)):
            pi, pj = [], []
            for node, out in ((i, pi), (j, pj)):
                while node >= 0:
                    out.insert(0, node)
                    node = tree.parents[node]
            assert bool(mask[i, j]) == (pi[: len(pj)] == pj)


def test_greedy_accept_longest_matching_path_and_bonus():
    tree = Tree([50, 7, 8, 9, 4, 6], [-1, 0, 0, 1, 3, 2])  # paths 50-7-9-4 and 50-8-6
    path, emitted = greedy_accept(tree, base_next=[7, 9, 1, 4, 3, 0], eos_token_ids={2})
    assert path == [0, 1, 3, 4] and emitted == [7, 9, 4, 3]
    path, emitted = greedy_accept(tree, base_next=[5, 9, 1, 4, 3, 0], eos_token_ids={2})
    assert path == [0] and emitted == [5]
    path, emitted = greedy_accept(tree, base_next=[7, 2, 1, 4, 3, 0], eos_token_ids={2})
    assert path == [0, 1] and emitted == [7, 2]  # an end-of-sequence bonus ends the walk


def test_tree_shape_sizes():
    assert TreeShape.parse("10/6/60").full_size == 1 + 10 + 5 * 100
    with pytest.raises(ValueError):
        TreeShape(1, 5, 7)  # a 5-deep chain has 6 entries


# ---------------------------------------------------------------- d2t


def test_choose_draft_vocab_offsets_and_mask():
    targets = torch.tensor([5, 5, 5, 9, 9, 1, 6, 6, 6, 6, -1, 3])
    d2t, t2d = choose_draft_vocab(targets, 3, 12)
    assert (torch.arange(3) + d2t).tolist() == [5, 6, 9]  # the 3 most frequent, ascending
    assert t2d.nonzero().flatten().tolist() == [5, 6, 9]
    assert target_to_draft(t2d)[[5, 6, 9, 1]].tolist() == [0, 1, 2, -1]
    assert draft_to_target(d2t, 12).tolist() == [5, 6, 9]


def test_draft_to_target_reads_direct_maps_like_the_runtime():
    assert draft_to_target(torch.tensor([5, 7, 9]), 12).tolist() == [5, 7, 9]  # offsets would give 5, 8, 11 ...
    # ... both valid: the reference picks the form with more distinct targets; here offsets collapse, direct does not
    assert draft_to_target(torch.tensor([2, 1, 0]), 12).tolist() == [2, 1, 0]
    assert draft_to_target(torch.tensor([0, 0, 0]), 12).tolist() == [0, 1, 2]
    # the rule's blind spot: offsets [5, 6, 7] (targets 5, 7, 9) are as distinct as a direct map, so read as direct
    assert draft_to_target(torch.tensor([5, 6, 7]), 12).tolist() == [5, 6, 7]
    with pytest.raises(ValueError):
        draft_to_target(torch.tensor([-5, 20, 0]), 12)


# ---------------------------------------------------------------- the draft forward


def test_draft_step_prefill_equals_eagle3_forward():
    base = tiny_base()
    draft, _ = tiny_draft(base)
    torch.manual_seed(3)
    embeds, aux = torch.randn(2, 9, HIDDEN), torch.randn(2, 9, 3 * HIDDEN)
    hidden, kv = draft_step(draft, embeds, draft.fc(aux), torch.arange(9)[None].expand(2, 9), causal(9)[None])
    with torch.no_grad():
        expected = draft(embeds, aux)
    torch.testing.assert_close(draft.lm_head(draft.norm(hidden)), expected)
    assert len(kv) == 9


def test_unrolled_forward_equals_step_by_step_inference():
    """Training-time test step k at position t == the inference pass of a depth-(k+1) chain node below a prefix
    ending at t: cached step-0 KV of positions <= t, then the node's own chain."""
    base = tiny_base()
    draft, _ = tiny_draft(base)
    torch.manual_seed(4)
    s, steps = 7, 3
    aux, embeds = torch.randn(2, s, 3 * HIDDEN), torch.randn(2, s + steps - 1, HIDDEN)
    with torch.no_grad():
        outs = unrolled_forward(draft, embeds, aux, steps)
        prefix, kv = draft_step(draft, embeds[:, :s], draft.fc(aux), torch.arange(s)[None].expand(2, s),
                                causal(s)[None])
        torch.testing.assert_close(outs[0], prefix)
        for t in range(s):
            past = type(kv)(kv.keys[:, :, : t + 1], kv.values[:, :, : t + 1])
            hidden = prefix[:, t : t + 1]
            for k in range(1, steps):
                hidden, new = draft_step(draft, embeds[:, t + k : t + k + 1], hidden,
                                         torch.full((2, 1), t + k), torch.ones(2, 1, len(past) + 1, dtype=torch.bool),
                                         past)
                past = past.cat(new)
                torch.testing.assert_close(hidden[:, 0], outs[k][:, t], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- speculative decoding == plain greedy


def plain_greedy(base, prompt: list[int], n: int) -> list[int]:
    out = base.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, top_k=None, top_p=None,
                        eos_token_id=[2], pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_spec_decoding(base, draft, to_base, shape: str) -> int:
    """Spec-decode a few prompts; assert each equals plain greedy; return the number of accepted draft tokens."""
    rng = random.Random(0)
    accepted_draft_tokens = 0
    for length in (1, 6, 17):
        prompt = [rng.randrange(3, VOCAB) for _ in range(length)]
        result = spec_generate(base, draft, prompt, TreeShape.parse(shape), 40, {2}, LAYER_IDS, to_base)
        assert result.tokens == plain_greedy(base, prompt, 40)
        assert sum(result.accepted) + 1 >= len(result.tokens)  # the prefill's token, then each pass's tokens
        accepted_draft_tokens += sum(result.accepted) - len(result.accepted)
    return accepted_draft_tokens


def test_spec_decoding_with_a_random_draft_is_token_identical_to_greedy():
    base = tiny_base()
    draft, ids = tiny_draft(base)
    check_spec_decoding(base, draft, draft_to_target(ids - torch.arange(len(ids)), VOCAB), "4/3/12")


@pytest.mark.parametrize("shape", ["4/3/12", "1/5/5", "8/4/40"])
def test_spec_decoding_with_a_trained_draft_is_token_identical_to_greedy(trained, shape):
    base, _, draft, d2t, _ = trained
    accepted = check_spec_decoding(base, draft.eval(), draft_to_target(d2t, VOCAB), shape)
    assert accepted > 0  # draft tokens were accepted, so the KV compaction and accept passes ran


# ---------------------------------------------------------------- training and the saved draft


def tiny_data(base, n: int = 6, length: int = 20) -> Sequences:
    """Sequences of the base's own greedy text with its features and targets (as selfdistill stores them)."""
    from examples.eagle.selfdistill import greedy_with_features

    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 6))] for _ in range(n)]
    shard = greedy_with_features(base, prompts, length, LAYER_IDS, {2}, 0)
    for i, p in enumerate(prompts):
        start, n = int(shard["lengths"][:i].sum()), int(shard["lengths"][i])
        seq = shard["tokens"][start : start + n].tolist()
        assert seq[len(p):] == plain_greedy(base, p, length)  # the base's own greedy continuation
        with torch.no_grad():  # features and targets as one unpadded forward of the whole sequence gives them
            out = base(torch.tensor([seq]), output_hidden_states=True)
        features = torch.cat([out.hidden_states[j] for j in LAYER_IDS], dim=-1)[0]
        torch.testing.assert_close(shard["features"][start : start + n].float(), features, atol=2e-2, rtol=1e-2)
        targets = out.logits[0].argmax(-1)
        if seq[-1] == 2:
            targets[-1] = -1
        assert shard["targets"][start : start + n].tolist() == targets.tolist()
    return Sequences.from_shard(shard)


TRAIN = TrainOptions(steps=3, epochs=30, batch_tokens=64, lr=3e-3, warmup=5, seed=0, save_every=10, bf16=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A draft trained on the tiny base's own greedy text: (base, data, draft, d2t, history), checkpoint alongside."""
    torch.set_num_threads(1)
    base = tiny_base()
    data = tiny_data(base)
    d2t, t2d = choose_draft_vocab(data.targets, 80, VOCAB)
    draft = init_draft(draft_config(base.config.to_dict(), 80, LAYER_IDS), base, d2t, 3 * HIDDEN, 0)
    idx = list(range(len(data)))
    state = tmp_path_factory.mktemp("train") / "state.pt"
    history = train(draft, data, idx, idx, target_to_draft(t2d), base.get_input_embeddings(), TRAIN, state)
    return base, data, draft, d2t, (history, state, t2d)


def test_training_lowers_the_loss_and_resumes(trained):
    base, data, draft, d2t, (history, state, t2d) = trained
    losses = [h["loss"] for h in history["train"]]
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])  # soft labels: the floor is the base's entropy, not 0
    assert history["eval"][-1]["acc"][0] > history["eval"][0]["acc"][0] + 0.2
    # a finished run resumed from its checkpoint does nothing more and ends with the same weights
    again = init_draft(draft_config(base.config.to_dict(), 80, LAYER_IDS), base, d2t, 3 * HIDDEN, 0)
    idx = list(range(len(data)))
    assert train(again, data, idx, idx, target_to_draft(t2d), base.get_input_embeddings(), TRAIN, state) == history
    for a, b in zip(again.state_dict().values(), draft.state_dict().values()):
        assert torch.equal(a, b)


def test_raising_epochs_continues_a_finished_run(trained, tmp_path):
    base, data, draft, d2t, (history, state, t2d) = trained
    settings = {"epochs": 4, "lr": 1e-3, "text_prompts": 512}
    assert continues(settings, {**settings, "epochs": 8}) and continues(settings, settings)
    assert not continues(settings, {**settings, "epochs": 3}) and not continues(settings, {**settings, "lr": 2e-3})
    copy = tmp_path / "state.pt"
    copy.write_bytes(state.read_bytes())
    more = init_draft(draft_config(base.config.to_dict(), 80, LAYER_IDS), base, d2t, 3 * HIDDEN, 0)
    idx = list(range(len(data)))
    longer = train(more, data, idx, idx, target_to_draft(t2d), base.get_input_embeddings(),
                   dataclasses.replace(TRAIN, epochs=TRAIN.epochs + 2), copy)
    # the earlier steps are kept, two more epochs of steps follow, and the draft moved on from the checkpoint
    assert longer["train"][: len(history["train"])] == history["train"]
    assert len(longer["train"]) == len(history["train"]) * (TRAIN.epochs + 2) // TRAIN.epochs
    assert [e["epoch"] for e in longer["eval"]] == [e["epoch"] for e in history["eval"]] + [TRAIN.epochs, TRAIN.epochs + 1]
    assert any(not torch.equal(a, b) for a, b in zip(more.state_dict().values(), draft.state_dict().values()))


def test_collate_aligns_features_tokens_and_targets():
    base = tiny_base()
    data = tiny_data(base, n=2, length=8)
    d2t, t2d = choose_draft_vocab(data.targets, 80, VOCAB)
    to_draft = target_to_draft(t2d)
    batch = collate(data, [0, 1], 3, to_draft, base.get_input_embeddings())
    for row in range(2):
        start, n = data.starts[row], data.lengths[row]
        for t in range(n - 1):  # entry t: features h[t], token x[t+1], target = base's token after x[t+1]
            torch.testing.assert_close(batch.aux[row, t], data.features[start + t].float())
            torch.testing.assert_close(batch.embeds[row, t], base.get_input_embeddings().weight[data.tokens[start + t + 1]])
            target = int(data.targets[start + t + 1])
            assert int(batch.targets[row, t]) == (int(to_draft[target]) if target >= 0 else -2)
        assert (batch.targets[row, n - 1 :] == -2).all()


def test_saved_draft_round_trips_through_quantization_eagle3(tmp_path):
    base = tiny_base()
    draft, ids = tiny_draft(base)
    config = draft_config(base.config.to_dict(), len(ids), LAYER_IDS)
    d2t = ids - torch.arange(len(ids))
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[ids] = True
    save_draft(draft, config, d2t, t2d, {"note": "test"}, tmp_path / "draft")
    loaded_config = eagle3.read_draft_config(tmp_path / "draft")
    assert is_eagle3_config(loaded_config)
    assert eagle3.target_layer_ids(loaded_config, LAYERS) == LAYER_IDS
    tensors = eagle3.read_draft_tensors(tmp_path / "draft")
    assert torch.equal(tensors["d2t"], d2t) and torch.equal(tensors["t2d"], t2d)
    loaded = eagle3.build_draft(loaded_config, tensors, HIDDEN, 3, tmp_path / "draft")
    for name, value in draft.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float())
    torch.manual_seed(5)
    embeds, aux = torch.randn(1, 5, HIDDEN), torch.randn(1, 5, 3 * HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(embeds, aux), draft(embeds, aux), atol=2e-2, rtol=2e-2)
    assert draft_logprobs(loaded, torch.zeros(1, HIDDEN)).shape == (1, len(ids))


def test_prose_prompts_are_distinct_and_bounded(smollm2_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    text = "The falcon and the harbour. Castle walls, river banks. " * 3
    words = ["falcon", "harbour", "castle", "walls", "river", "banks"]
    every = {t.format(word=w, Word=w.capitalize()) for w in words for t in selfdistill.PROSE_OPENINGS}
    prompts = selfdistill.prose_prompts(text, tokenizer, len(every), random.Random(0))
    assert sorted(tokenizer.decode(p, skip_special_tokens=True) for p in prompts) == sorted(every)
    too_many = len(every) + 1
    with pytest.raises(InputError, match=rf"--prose_prompts {too_many}: expected at most {len(every)} \(the distinct"):
        selfdistill.prose_prompts(text, tokenizer, too_many, random.Random(0))


def test_train_draft_refuses_too_many_prose_prompts_before_touching_anything(smollm2_checkpoint, tmp_path):
    from contract.cli import run_cli as run_command
    from examples.eagle.train_draft import main

    result = run_cli(lambda argv: run_command(main, argv), "--base_model_dir", smollm2_checkpoint,
                     "--output_dir", tmp_path / "draft", "--prose_prompts", 10**6)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --prose_prompts 1000000: expected at most ")
    assert list(tmp_path.iterdir()) == []  # neither the draft nor its work dir
