"""Text rewards against independent computations; composition, safety wrapper, RCfD demo cache."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

import rewards
from losses.rcfd import calibrated_reward, squared_gaps
from rewards import RewardError, call_reward


@pytest.fixture(autouse=True)
def restore_registry():
    """Tests register throwaway rewards; leave the registry as they found it."""
    saved = dict(rewards.REGISTRY)
    yield
    rewards.REGISTRY.clear()
    rewards.REGISTRY.update(saved)


# -- registry -----------------------------------------------------------------------------------


def test_registry_names_and_option_errors():
    expected = {"entailment", "reward_model", "sentiment", "length", "regex", "contains", "rouge"}
    assert expected <= set(rewards.REGISTRY)
    with pytest.raises(ValueError, match="unknown name 'sentimnt'"):
        rewards.build("sentimnt")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['targt'\].*'target'"):
        rewards.build("length", targt=3)
    with pytest.raises(ValueError, match=r"missing required option\(s\) \['target'\]"):
        rewards.build("length")
    assert rewards.options("rouge")["reference_column"] == "reference"


# -- the simple rewards -------------------------------------------------------------------------


def test_sentiment_is_vader_compound():
    reward = rewards.build("sentiment")
    lex = reward.analyzer.lexicon
    # plain lexicon words, no negation/intensifiers/punctuation: compound = s / sqrt(s² + 15)
    for text, words in [("good", ["good"]), ("good great", ["good", "great"]), ("awful", ["awful"])]:
        s = sum(lex[w] for w in words)
        assert reward([""], [text]) == pytest.approx([s / math.sqrt(s * s + 15)], abs=1e-4)
    assert reward(["x"], [""]) == [0.0]
    scores = reward(["", ""], ["I love this wonderful film", "a terrible, boring mess"])
    assert scores[0] > 0.5 and scores[1] < -0.5 and all(-1 <= s <= 1 for s in scores)
    pos = rewards.build("sentiment", field="pos")(["", ""], ["good", "the table"])
    assert pos == [1.0, 0.0]
    with_prompt = rewards.build("sentiment", include_prompt=True)(["great "], [""])
    assert with_prompt[0] > 0


def test_length_shapes_and_units():
    completions = ["one two three", "one two three four five six", "", "abcdefghij"]
    words = rewards.build("length", target=4)
    assert words([""] * 4, completions) == [-1.0, -2.0, -4.0, -3.0]
    sq = rewards.build("length", target=4, shape="squared", scale=0.5)
    assert sq([""] * 4, completions) == [-0.5, -2.0, -8.0, -4.5]
    chars = rewards.build("length", target=10, unit="chars", tolerance=2)
    assert chars([""] * 4, completions) == [-1.0, -(len(completions[1]) - 12.0), -8.0, 0.0]


def test_regex_and_contains():
    texts = ["The answer is 42.", "no number here", "", "ANSWER: 7"]
    reg = rewards.build("regex", pattern=r"answer\W+(is )?\d+", ignore_case=True, match_reward=2.0, miss_reward=-1.0)
    assert reg([""] * 4, texts) == [2.0, -1.0, -1.0, 2.0]
    full = rewards.build("regex", pattern=r"\d+", mode="fullmatch")
    assert full([""] * 3, ["123", "a123", ""]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="invalid pattern"):
        rewards.build("regex", pattern="(")

    texts = ["Good food and great service", "goodbye", "GREAT", ""]
    any_ = rewards.build("contains", keywords=["good", "great"])
    assert any_([""] * 4, texts) == [1.0, 0.0, 1.0, 0.0]  # whole words: "goodbye" has no "good"
    all_ = rewards.build("contains", keywords=["good", "great"], mode="all")
    assert all_([""] * 4, texts) == [1.0, 0.0, 0.0, 0.0]
    frac = rewards.build("contains", keywords=["good", "great"], mode="fraction", whole_word=False)
    assert frac([""] * 4, texts) == [1.0, 0.5, 0.5, 0.0]
    case = rewards.build("contains", keywords=["GREAT"], case_sensitive=True)
    assert case([""] * 4, texts) == [0.0, 0.0, 1.0, 0.0]


def test_rouge_against_hand_counts():
    ref, cand = "the cat sat on the mat", "the cat lay on the mat"
    r1 = rewards.build("rouge", rouge_type="rouge1")
    r2 = rewards.build("rouge", rouge_type="rouge2")
    rl = rewards.build("rouge", rouge_type="rougeL", reference_column="summary")
    assert r1([""], [cand], reference=[ref]) == pytest.approx([5 / 6])  # 5 shared unigrams of 6
    assert r2([""], [cand], reference=[ref]) == pytest.approx([3 / 5])  # the cat, on the, the mat
    assert rl([""], [cand], summary=[ref]) == pytest.approx([5 / 6])  # LCS "the cat on the mat"
    recall = rewards.build("rouge", rouge_type="rouge1", measure="recall")
    assert recall([""], ["the cat"], reference=[ref]) == pytest.approx([2 / 6])  # 2 of the 6 reference words
    assert r1(["", ""], ["", cand], reference=[ref, ["dogs bark", ref]]) == pytest.approx([0.0, 5 / 6])
    with pytest.raises(KeyError, match="needs column 'reference'"):
        r1([""], [cand])


# -- the safety wrapper -------------------------------------------------------------------------


def test_call_reward_names_the_failing_reward():
    def boom(prompts, completions, **kw):
        raise ZeroDivisionError("division by zero")

    with pytest.raises(RewardError, match=r"reward 'boom' raised ZeroDivisionError: division by zero"):
        call_reward("boom", boom, ["a"], ["b"])
    with pytest.raises(RewardError, match=r"reward 'short' returned 3 scores for 4 completions"):
        call_reward("short", lambda prompts, completions, **kw: [0.0] * 3, ["p"] * 4, ["c"] * 4)
    with pytest.raises(RewardError, match=r"reward 'nan' returned a non-finite score nan for completion 1"):
        call_reward("nan", lambda prompts, completions, **kw: [0.0, float("nan")], ["p"] * 2, ["c"] * 2)
    with pytest.raises(RewardError, match=r"reward 'inf' returned a non-finite score inf"):
        call_reward("inf", lambda prompts, completions, **kw: np.array([np.inf]), ["p"], ["c"])
    with pytest.raises(RewardError, match=r"reward 'text' returned a non-numeric score 'high'"):
        call_reward("text", lambda prompts, completions, **kw: ["high"], ["p"], ["c"])
    with pytest.raises(RewardError, match=r"reward 'scalar' returned float"):
        call_reward("scalar", lambda prompts, completions, **kw: 1.0, ["p"], ["c"])
    with pytest.raises(RewardError, match=r"reward 'cols': column 'ref' has 1 values for 2 completions"):
        call_reward("cols", lambda prompts, completions, **kw: [0.0, 0.0], ["p"] * 2, ["c"] * 2, ref=["r"])
    # tensors, arrays and numpy scalars are accepted and come back as floats
    assert call_reward("t", lambda prompts, completions, **kw: torch.tensor([1.5, 2.0]), ["p"] * 2, ["c"] * 2) == [
        1.5,
        2.0,
    ]
    assert call_reward("n", lambda prompts, completions, **kw: [np.float32(0.5), True], ["p"] * 2, ["c"] * 2) == [
        0.5,
        1.0,
    ]


def test_composite_wraps_each_component():
    def flaky(prompts, completions, **kw):
        return [1.0] * (len(completions) - 1)

    reward = rewards.build_combined(["sentiment", flaky])
    with pytest.raises(RewardError, match=r"reward 'flaky' returned 3 scores for 4 completions"):
        reward(["p"] * 4, ["good", "bad", "ok", "fine"])


# -- composition --------------------------------------------------------------------------------


def const(values):
    """A reward returning fixed values (cycled to the batch size)."""

    def fn(prompts, completions, **kw):
        return [values[i % len(values)] for i in range(len(completions))]

    return fn


def test_weighted_sum_unique_names_and_last_components():
    reward = rewards.build_combined(
        [
            {"name": "length", "target": 2, "weight": 0.5},
            {"name": "length", "options": {"target": 4, "unit": "chars"}, "weight": -2.0},
            "sentiment",
            {"name": "regex", "pattern": "cat", "label": "has_cat"},
        ]
    )
    assert reward.names == ["length", "length_2", "sentiment", "has_cat"]
    prompts, completions = ["", ""], ["a good cat", "dog"]
    total = reward(prompts, completions)
    parts = reward.last_components
    assert parts["length"] == [-1.0, -1.0] and parts["length_2"] == [-6.0, -1.0] and parts["has_cat"] == [1.0, 0.0]
    expected = [
        0.5 * parts["length"][i] - 2.0 * parts["length_2"][i] + parts["sentiment"][i] + parts["has_cat"][i]
        for i in range(2)
    ]
    assert total == pytest.approx(expected)
    assert reward.score_components(prompts, completions) == parts


def test_running_whitening_clipping_and_state_dict():
    """Each batch is whitened with the moments of the batches *before* it (the first passes
    through raw), then absorbed: no sample's reward depends on the others of its own batch."""
    batch1, batch2, batch3 = [1.0, 2.0, 3.0, 10.0], [4.0, -2.0, 0.5, 7.0], [0.0, 1.0, -1.0, 2.0]
    spec = [
        {"name": "a", "normalize": True, "weight": 2.0},
        {"name": "b", "clip": [-1.0, 1.0], "weight": 0.5},
    ]
    rewards.register(lambda: const(batch1), name="a")
    rewards.register(lambda: const([-3.0, 0.2, 5.0, 1.0]), name="b")
    reward = rewards.build_combined(spec, clip=[-100.0, 3.0])
    out1 = reward(["p"] * 4, ["c"] * 4)
    b = np.clip([-3.0, 0.2, 5.0, 1.0], -1, 1)
    assert out1 == pytest.approx(np.clip(2 * np.array(batch1) + 0.5 * b, -100, 3).tolist())
    assert max(out1) == 3.0  # the total is clipped

    # the second batch is whitened with the first batch's statistics only
    comps = {"a": batch2, "b": [0.0] * 4}
    state = json.loads(json.dumps(reward.state_dict()))  # checkpoints hold plain JSON
    out2 = reward.combine(comps)
    z2 = (np.array(batch2) - np.mean(batch1)) / np.sqrt(np.var(batch1) + 1e-8)
    assert out2 == pytest.approx(np.clip(2 * z2, -100, 3).tolist())
    # ... and the third with both
    out3 = reward.combine({"a": batch3, "b": [0.0] * 4})
    seen = np.array(batch1 + batch2)
    z3 = (np.array(batch3) - seen.mean()) / np.sqrt(seen.var() + 1e-8)
    assert out3 == pytest.approx(np.clip(2 * z3, -100, 3).tolist())

    # a restored reward normalises exactly like the one that kept running
    fresh = rewards.build_combined(spec, clip=[-100.0, 3.0])
    fresh.load_state_dict(state)
    assert fresh.combine(comps) == pytest.approx(out2)
    # update=False leaves the statistics alone
    before = reward.state_dict()
    reward.combine(comps, update=False)
    assert reward.state_dict() == before
    with pytest.raises(ValueError, match="normalises"):
        rewards.build_combined(["a"]).load_state_dict(state)


def test_whitening_moments_absorb_every_process_scores():
    """With ``gather`` (every rank's scores), each rank's moments are those of the global batch."""
    spec = [{"name": "a", "normalize": True}]
    rewards.register(lambda: const([0.0]), name="a")
    rank0, rank1, single = (rewards.build_combined(spec) for _ in range(3))
    local = {0: [1.0, 2.0], 1: [3.0, 10.0]}
    everyone = lambda values: local[0] + local[1]  # noqa: E731 -- what gather_object returns
    rank0.combine({"a": local[0]}, gather=everyone)
    rank1.combine({"a": local[1]}, gather=everyone)
    single.combine({"a": local[0] + local[1]})
    assert rank0.state_dict() == rank1.state_dict() == single.state_dict()


def test_running_moments_merge_equals_full_statistics():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=1000)
    m = rewards.RunningMoments()
    for chunk in np.array_split(data, 7):
        m.update(chunk.tolist())
    assert m.count == 1000
    assert m.mean == pytest.approx(data.mean()) and m.var == pytest.approx(data.var())


def test_device_goes_to_rewards_that_take_one():
    seen = {}

    def with_device(device: str = "cpu"):
        seen["device"] = device
        return const([0.0])

    rewards.register(with_device, name="with_device")
    rewards.build_combined(["with_device", "sentiment"], device="cuda:7")
    assert seen["device"] == "cuda:7"
    rewards.build_combined([{"name": "with_device", "device": "cpu"}], device="cuda:7")
    assert seen["device"] == "cpu"


# -- RCfD demonstrations ------------------------------------------------------------------------


class Counting:
    """Reward that counts how many completions it scored: score = number of words."""

    def __init__(self, offset: float = 0.0):
        self.seen: list[str] = []
        self.offset = offset

    def __call__(self, prompts, completions, **kw):
        self.seen += completions
        return [len(c.split()) + self.offset for c in completions]


def test_demo_cache_scores_each_unique_demonstration_once(tmp_path):
    words, chars = Counting(), Counting(offset=0.5)
    rewards.register(lambda: words, name="count_words")
    rewards.register(lambda: chars, name="count_chars")
    combined = rewards.build_combined(["count_words", {"name": "count_chars", "weight": 2.0}])
    path = tmp_path / "demo_cache.json"
    cache = rewards.DemoRewardCache(combined, path=path)
    # k = 2 samples per prompt, prompts repeat across steps
    prompts = ["p1", "p1", "p2", "p2"]
    demos = ["a b c", "a b c", "d e", "d e"]
    out = cache(prompts, demos, document=["x", "x", "y", "y"])
    assert out == [[3.0, 3.5], [3.0, 3.5], [2.0, 2.5], [2.0, 2.5]]  # [N, C] in combined.names order
    assert words.seen == ["a b c", "d e"] and cache.calls == 1
    again = cache(["p2", "p3", "p1"], ["d e", "f", "a b c"], document=["y", "z", "x"])
    assert again == [[2.0, 2.5], [1.0, 1.5], [3.0, 3.5]]
    assert words.seen == ["a b c", "d e", "f"] and cache.scored == 3
    # scoring demonstrations does not disturb what the trainer logs
    assert combined.last_components == {}
    # a new run reuses the file without calling the reward
    reloaded = rewards.DemoRewardCache(combined, path=path)
    assert reloaded(prompts, demos, document=["x", "x", "y", "y"]) == out and reloaded.calls == 0
    # the same demonstration with a different source column is scored again (rouge, entailment)
    cache(["p1"], ["a b c"], document=["other"])
    assert cache.calls == 3
    # a cache written for another reward is ignored
    other = rewards.DemoRewardCache(rewards.build_combined(["count_words"]), path=path)
    assert other.scores == {}


def test_demo_cache_single_reward_and_rcfd_shapes():
    counting = Counting()
    cache = rewards.DemoRewardCache(counting, key_columns=[])
    assert cache(["p", "q"], ["a b", "a b c"], id=[1, 2]) == [2.0, 3.0]
    assert cache(["p"], ["a b"], id=[99]) == [2.0] and counting.seen == ["a b", "a b c"]  # id not in the key

    combined = rewards.build_combined([{"name": "length", "target": 2}, {"name": "contains", "keywords": ["b"]}])
    prompts, completions, demos = ["p"] * 3, ["a b", "x", "a b c d"], ["a b"] * 3
    comps = combined.score_components(prompts, completions)
    policy = torch.tensor([comps[n] for n in combined.names]).T  # what the trainer builds: [N, C]
    demo = torch.tensor(rewards.DemoRewardCache(combined)(prompts, demos))
    assert policy.shape == demo.shape == (3, 2)
    assert squared_gaps(policy, demo).tolist() == [[0.0, 0.0], [-1.0, -1.0], [-4.0, 0.0]]
    # several components: each column of gaps whitened (mean, unbiased variance), then summed
    col0, col1 = [0.0, -1.0, -4.0], [0.0, -1.0, 0.0]

    def whitened(col):
        mean, var = statistics.fmean(col), statistics.variance(col)
        return [(v - mean) / math.sqrt(var + 1e-8) for v in col]

    expected = [a + 2 * b for a, b in zip(whitened(col0), whitened(col1))]
    assert calibrated_reward(policy, demo, torch.tensor([1.0, 2.0])).tolist() == pytest.approx(expected, rel=1e-6)
    # one component: exactly −w·(r − r_d)², no whitening (Rita et al., Eq. 3)
    assert calibrated_reward(policy[:, :1], demo[:, :1], torch.tensor([3.0])).tolist() == [0.0, -3.0, -12.0]
    assert calibrated_reward(policy[:, 0], demo[:, 0]).tolist() == [0.0, -1.0, -4.0]


def test_an_async_reward_is_awaited_and_sys_exit_in_a_reward_is_a_reward_error():
    """TRL accepts ``async def`` rewards: their scores are awaited (also from inside a running
    loop, as in a notebook). A reward calling sys.exit would end a run silently: it is an error."""
    import asyncio

    from rewards.base import RewardError, call_reward

    async def lengths(prompts, completions, **_):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    assert call_reward("lengths", lengths, ["p", "p"], ["ab", "abc"]) == [2.0, 3.0]

    async def inside_a_loop():
        return call_reward("lengths", lengths, ["p"], ["abcd"])

    assert asyncio.run(inside_a_loop()) == [4.0]

    def quits(prompts, completions, **_):
        raise SystemExit(0)

    with pytest.raises(RewardError, match=r"reward 'quits' called sys.exit\(0\)"):
        call_reward("quits", quits, ["p"], ["a"])
