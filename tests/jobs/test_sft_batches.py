"""sft_batches.py: the loss falls on response tokens (EOS included) and nowhere else; padding and
packing change nothing about each example's loss; lm_head on loss positions only gives exactly
the loss of full logits."""

import copy
from itertools import pairwise

import pytest
import torch

from remote.jobs.dataset import format_instruction
from remote.jobs.sft_batches import (
    IGNORE,
    FlattenBatch,
    PadToLongest,
    attention_spans,
    merge_packed,
    rebalance,
    response_loss,
    segment_paths,
    share_prefixes,
    tokenize_examples,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return tok, model


ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say something long.", "input": "", "output": "word " * 30},
]


def features(tok):
    pairs = [format_instruction(r, tok.eos_token) for r in ROWS]
    return pairs, tokenize_examples(tok, pairs, max_length=200)[0]


def test_labels_cover_the_response_and_eos_only(tiny):
    tok, _ = tiny
    pairs, feats = features(tok)
    for (prompt, completion), f in zip(pairs, feats, strict=True):
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert f["labels"][:n_prompt] == [IGNORE] * n_prompt
        response = f["labels"][n_prompt:]
        assert IGNORE not in response and response == f["input_ids"][n_prompt:]
        assert response[-1] == tok.eos_token_id  # the model is taught to stop
        assert tok.decode(response) == completion


def test_overlong_examples_are_cut_and_promptonly_dropped(tiny):
    tok, _ = tiny
    pairs, _ = features(tok)
    feats, dropped = tokenize_examples(tok, pairs, max_length=40)
    assert all(len(f["input_ids"]) <= 40 for f in feats)
    assert dropped == sum(len(tok(p)["input_ids"]) >= 40 for p, _ in pairs) > 0


def test_padded_and_packed_batches_give_each_example_its_own_loss(tiny):
    tok, model = tiny
    _, feats = features(tok)
    with torch.no_grad():
        alone = [response_loss(model, PadToLongest(tok.eos_token_id)([f]), reduction="none")
                 for f in feats]  # fmt: skip
        padded = response_loss(model, PadToLongest(tok.eos_token_id)(feats), reduction="none")
        packed = response_loss(model, FlattenBatch()(feats), reduction="none")
    expected = torch.cat(alone)
    # Any attention across examples (or onto padding) would change these numbers.
    assert torch.allclose(padded, expected, atol=1e-5)
    assert torch.allclose(packed, expected, atol=1e-5)
    assert FlattenBatch()(feats)["position_ids"][0].tolist().count(0) == len(feats)


def test_packed_attention_keeps_each_example_to_itself(tiny_model_dir, tiny, tmp_path):
    # Per-example SDPA on packed rows (the default batching) gives every example exactly the
    # loss it has alone, as transformers' block-diagonal mask does.
    from transformers import AutoModelForCausalLM

    from remote.jobs.packed_attention import NAME, use_packed_attention

    tok, _ = tiny
    _, feats = features(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        pad = PadToLongest(tok.eos_token_id)
        alone = torch.cat([response_loss(model, pad([f]), reduction="none") for f in feats])
        assert use_packed_attention(model) and model.config._attn_implementation == NAME
        batch = FlattenBatch()(feats)
        bounds = [0, *torch.tensor([len(f["input_ids"]) for f in feats]).cumsum(0).tolist()]
        assert batch["cu_seq_lens_q"].tolist() == bounds
        assert batch["max_length_q"] == max(len(f["input_ids"]) for f in feats)
        packed = response_loss(model, batch, reduction="none")
    assert torch.allclose(packed, alone, atol=1e-5)
    model.save_pretrained(tmp_path)  # the runtime choice is not saved: loads as a plain model
    assert NAME not in (tmp_path / "config.json").read_text()


def test_packed_attention_only_where_the_model_keeps_examples_apart(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, GPTNeoConfig, GPTNeoForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from remote.jobs import packed_attention

    # GPT-Neo keeps its own attention (transformers only warns): no switch, no claim.
    shape = {"vocab_size": 60, "hidden_size": 32, "num_layers": 2, "num_heads": 2}
    neo = GPTNeoForCausalLM(GPTNeoConfig(**shape, attention_types=[[["global"], 2]]))
    before = neo.config._attn_implementation
    assert packed_attention.use_packed_attention(neo) is False
    assert neo.config._attn_implementation == before

    # An attention that ignores the example bounds lets packed examples see each other: the
    # probe catches it and the model is left as it was.
    def leaky(module, q, k, v, mask, dropout=0.0, scaling=None, **kwargs):
        return sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling)

    monkeypatch.setattr(packed_attention, "packed_sdpa_attention", leaky)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert packed_attention.use_packed_attention(model) is False
    assert model.config._attn_implementation != packed_attention.NAME
    monkeypatch.undo()
    packed_attention.register()  # the real function again, for every later model


def test_packed_attention_matches_a_block_diagonal_mask():
    from torch.nn import functional as F

    from remote.jobs.packed_attention import packed_sdpa_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    bounds = torch.tensor([0, 2, 7, 9], dtype=torch.int32)
    seg = torch.repeat_interleave(torch.arange(3), torch.diff(bounds))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
    out, _ = packed_sdpa_attention(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=bounds)
    assert out.shape == (1, 9, 2, 4)
    assert torch.allclose(out, expected, atol=1e-6)


def test_lm_head_on_loss_positions_equals_full_logits_loss(tiny):
    tok, model = tiny
    _, feats = features(tok)
    batch = PadToLongest(tok.eos_token_id)(feats)
    ours = response_loss(model, batch)
    full = model(**batch).loss  # transformers' own: logits everywhere, -100 ignored
    assert torch.allclose(ours, full, atol=1e-6)
    ours.backward()  # and it trains: gradients reach the embeddings through lm_head
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    model.zero_grad()


def _feature(n: int, seed: int) -> dict[str, list[int]]:
    ids = [(seed * 7 + i) % 50 + 1 for i in range(n)]
    return {"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3 :]}


def test_rebalance_keeps_every_example_and_cuts_padding():
    # The trainer's fixed micro-batches of 4: a 300-token example pads three short ones to 300.
    lengths = [31, 43, 47, 56, 61, 67, 72, 73, 81, 95, 108, 119, 136, 159, 183, 302]
    feats = [_feature(n, i) for i, n in enumerate(lengths)]
    order = [15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    before = [PadToLongest(0)([feats[j] for j in order[i : i + 4]]) for i in range(0, 16, 4)]
    after = rebalance(before, pad_id=0)
    assert len(after) == len(before)
    padded = [b["input_ids"].numel() for b in after]
    assert sum(padded) < 0.8 * sum(b["input_ids"].numel() for b in before)
    assert max(padded) <= max(b["input_ids"].numel() for b in before)  # no more memory
    seen = sorted(
        (ids[: int(m.sum())].tolist(), lab[: int(m.sum())].tolist())
        for b in after
        for ids, m, lab in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True)
    )
    assert seen == sorted((f["input_ids"], f["labels"]) for f in feats)
    for b in after:  # still right-padded with IGNORE labels where the mask is 0
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


def _padded(lengths: list[int], cuts: list[int]) -> int:
    bounds = zip([0, *cuts], [*cuts, len(lengths)], strict=True)
    return sum((b - a) * lengths[b - 1] for a, b in bounds)


def test_rebalance_finds_the_least_padding_split():
    # Exhaustive check on small cases: no contiguous split of the sorted lengths does better.
    import itertools
    import random

    from remote.jobs.sft_batches import _least_padding_cuts

    rng = random.Random(0)
    for _ in range(50):
        lengths = sorted(rng.randint(1, 300) for _ in range(rng.randint(3, 9)))
        groups = rng.randint(2, len(lengths))
        splits = itertools.combinations(range(1, len(lengths)), groups - 1)
        best = min(_padded(lengths, list(c)) for c in splits)
        assert _padded(lengths, _least_padding_cuts(lengths, groups, cap=10**9)) == best
    assert _least_padding_cuts([5, 5, 100], 2, cap=50) is None  # nothing fits: caller keeps


def test_rebalanced_step_gives_the_same_gradient(tiny):
    tok, model = tiny
    _, feats = features(tok)
    feats = feats + [_feature(9, 1), _feature(60, 2), _feature(12, 3)]
    before = [PadToLongest(tok.eos_token_id)(feats[i : i + 2]) for i in range(0, 6, 2)]
    after = rebalance(before, tok.eos_token_id)
    assert [b["input_ids"].shape for b in after] != [b["input_ids"].shape for b in before]
    items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in before)

    def grads(batches):
        model.zero_grad()
        for b in batches:
            response_loss(model, b, items).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.allclose(grads(before), grads(after), atol=1e-6)
    model.zero_grad()


def test_rebalance_leaves_packed_and_single_batches_alone():
    feats = [_feature(n, n) for n in (5, 9, 30, 7)]
    packed = [FlattenBatch()(feats[:2]), FlattenBatch()(feats[2:])]
    assert rebalance(packed, 0) is packed
    single = [PadToLongest(0)(feats)]
    assert rebalance(single, 0) is single


def test_merge_packed_joins_a_steps_rows_up_to_the_cap_and_keeps_its_count():
    feats = [_feature(n, n) for n in (5, 9, 30, 7, 4, 6)]
    rows = [FlattenBatch()(feats[i : i + 2]) for i in range(0, 6, 2)]  # 14, 37, 10 tokens
    merged = merge_packed(rows, max_tokens=51)  # 14 + 37 fit; 10 more do not
    assert merged[0] == {} and len(merged) == 3  # the Trainer still counts three micro-batches
    whole = FlattenBatch()(feats[:4])
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(merged[1][key], whole[key]), key
    assert merged[1]["max_length_q"] == whole["max_length_q"] == 30
    assert merged[2] is rows[2]
    assert [b["input_ids"].shape[1] for b in merge_packed(rows, 10**6)[2:]] == [61]
    assert merge_packed(rows, max_tokens=20) is rows  # no two fit: as they came
    padded = [PadToLongest(0)(feats[:2]), PadToLongest(0)(feats[2:4])]
    assert merge_packed(padded, 10**6) is padded


def test_merged_rows_give_the_same_gradient(tiny):
    from remote.jobs.packed_attention import use_packed_attention

    tok, model = tiny
    _, feats = features(tok)
    feats = feats + [_feature(9, 1), _feature(60, 2), _feature(12, 3)]
    before = [FlattenBatch()(feats[i : i + 2]) for i in range(0, 6, 2)]
    after = [b for b in merge_packed(before, 10**6) if b]
    assert len(after) == 1
    items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in before)
    model = copy.deepcopy(model)
    assert use_packed_attention(model)

    def grads(batches):
        model.zero_grad()
        for b in batches:
            response_loss(model, b, items).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.allclose(grads(before), grads(after), atol=1e-6)


def _example(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def test_shared_prefixes_store_each_prompt_beginning_once():
    feats = [
        _example([1, 2, 3, 4, 9], [50, 51]),
        _example([1, 2, 3, 5, 9], [52]),
        _example([1, 2, 3, 4, 8, 7], [53, 54, 55]),
        _example([6, 2], [56]),  # shares nothing
    ]
    row = FlattenBatch()(feats)
    shared = share_prefixes(row)
    bounds = shared["cu_seq_lens_q"].tolist()
    segments = [shared["input_ids"][0, a:b].tolist() for a, b in pairwise(bounds)]
    # [1, 2, 3] under all three; [4] under the first and third; then each example's rest, which
    # keeps its last prompt token: the position whose next token is the answer's first.
    assert segments == [[1, 2, 3], [4], [9, 50, 51], [5, 9, 52], [8, 7, 53, 54, 55], [6, 2, 56]]
    assert shared["segment_parents"].tolist() == [-1, 0, 1, 0, 1, -1]
    assert shared["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 4, 5, 6, 7, 8,
                                                  0, 1, 2]  # fmt: skip
    labels = shared["labels"][0].tolist()
    assert labels[:4] == [IGNORE] * 4  # no loss on a shared segment
    assert sorted(x for x in labels if x != IGNORE) == [50, 51, 52, 53, 54, 55, 56]
    # The loss lands on the same next tokens: the targets, in order of each example's rest.
    from remote.jobs.sft_batches import loss_positions

    assert loss_positions(shared["labels"])[1].tolist() == [50, 51, 52, 53, 54, 55, 56]
    assert attention_spans(shared) == [(3, 3), (1, 4), (3, 7), (3, 6), (5, 9), (3, 3)]
    assert attention_spans(row) == [(7, 7), (6, 6), (9, 9), (3, 3)]
    lonely = FlattenBatch()([_example([1, 2], [3]), _example([4, 5], [6])])
    assert share_prefixes(lonely) is lonely  # nothing shared: the row as it came
    assert share_prefixes(shared) is shared  # already a tree
    padded = PadToLongest(0)(feats)
    assert share_prefixes(padded) is padded


def test_merge_packed_counts_the_tokens_left_after_sharing():
    # Two micro-batches of 2 examples of 11 tokens, all starting with the same 8 prompt
    # tokens: 44 tokens joined, 8 + 4 x 3 = 20 once that start is stored once. A cap of 24
    # joins them only when it counts the shared row: what is computed, and what the memory
    # plan is about.
    start = list(range(1, 9))
    examples = [_example(start + [20 + i], [40 + i, 41]) for i in range(4)]
    rows = [FlattenBatch()(examples[:2]), FlattenBatch()(examples[2:])]
    assert [r["input_ids"].shape[1] for r in rows] == [22, 22]
    assert merge_packed(rows, max_tokens=24) is rows  # raw: 44 > 24
    merged = merge_packed(rows, max_tokens=24, shape=share_prefixes)
    assert merged[0] == {} and len(merged) == 2
    whole = share_prefixes(FlattenBatch()(examples))
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "segment_parents"):
        assert torch.equal(merged[1][key], whole[key]), key  # shaped, as the caller computes it
    assert whole["input_ids"].shape[1] == 20
    apart = merge_packed(rows, max_tokens=15, shape=share_prefixes)  # 20 > 15: each alone
    assert [r["input_ids"].shape[1] for r in apart] == [14, 14]
    assert all("segment_parents" in r for r in apart)


def test_shared_prefix_rows_give_the_same_losses_and_gradient(tiny):
    from remote.jobs.models import set_dropout
    from remote.jobs.packed_attention import can_share_prefixes, use_packed_attention
    from remote.jobs.sft_batches import loss_positions

    tok, model = tiny
    _, feats = features(tok)
    more = [
        {"instruction": "Name a colour of the sky.", "input": "", "output": "Grey."},
        {"instruction": "Add the numbers.", "input": "7 and 8", "output": "15."},
        {"instruction": "Name a fruit.", "input": "", "output": "A pear."},
    ]
    feats += tokenize_examples(tok, [format_instruction(r, tok.eos_token) for r in more], 200)[0]
    row = FlattenBatch()(feats)
    shared = share_prefixes(row)
    assert shared["input_ids"].shape[1] < row["input_ids"].shape[1] - 20  # the preambles, once
    assert torch.equal(loss_positions(row["labels"])[1], loss_positions(shared["labels"])[1])
    model = copy.deepcopy(model)
    assert use_packed_attention(model) and not can_share_prefixes(model)  # GPT-2's dropout
    set_dropout(model, 0.0)  # finetune's default
    assert can_share_prefixes(model)
    items = int((row["labels"][:, 1:] != IGNORE).sum())

    def run(batch):
        model.zero_grad()
        losses = response_loss(model, batch, reduction="none")
        (losses.sum() / items).backward()
        return losses.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (loss_a, grad_a), (loss_b, grad_b) = run(row), run(shared)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert torch.allclose(grad_a, grad_b, atol=1e-6)


def test_segment_attention_matches_autograd_through_slices():
    """The CPU path's own backward: the same outputs and q/k/v gradients as autograd through
    per-segment SDPA, with a shared-prefix tree and without one, on the strided (transposed)
    views a model hands over."""
    from remote.jobs import packed_attention

    bounds = torch.tensor([0, 5, 9, 15, 22, 30, 40], dtype=torch.int32)
    parents = torch.tensor([-1, 0, 1, 0, -1, 4])
    for tree in (None, parents):
        torch.manual_seed(0)
        leaves = [torch.randn(1, 40, 3, 8, requires_grad=True) for _ in range(3)]
        q, k, v = (x.transpose(1, 2) for x in leaves)
        extra = {} if tree is None else {"segment_parents": tree}
        out, _ = packed_attention.packed_sdpa_attention(
            torch.nn.Module(), q, k, v, None, cu_seq_lens_q=bounds, **extra
        )
        assert out.grad_fn.name() == "SegmentAttentionBackward"  # the CPU path, not slices
        weights = torch.randn_like(out)
        grads = torch.autograd.grad((out * weights).sum(), leaves)
        paths = segment_paths(bounds.tolist(), None if tree is None else tree.tolist())
        plain = packed_attention._autograd_attention(q, k, v, paths, tree is not None, 0.0, None)
        expected = torch.autograd.grad((plain * weights).sum(), leaves)
        assert torch.allclose(out, plain, atol=1e-6)
        for got, want in zip(grads, expected, strict=True):
            assert torch.allclose(got, want, atol=1e-6)
