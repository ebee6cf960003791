"""eval/metrics: every metric against values computed by hand in the test (not by the function under
test), the model-vs-human edge cases, and the debiasing frontier's guarantees."""

import numpy as np
import pytest

from eval.metrics import accuracy, calibration, fairness, ood
from eval.metrics import model_vs_human as mvh

# --- accuracy -------------------------------------------------------------------------------------

SCORES = np.array(
    [
        [0.1, 0.7, 0.2],  # top-1 class 1, top-2 {1, 2}
        [0.5, 0.2, 0.3],  # top-1 0, top-2 {0, 2}
        [0.3, 0.3, 0.4],  # top-1 2, top-2 {2, 0} (0 beats 1 on the tie: lower index)
        [0.6, 0.3, 0.1],
    ]
)  # top-1 0, top-2 {0, 1}


def test_topk_accuracy_by_hand():
    labels = np.array([1, 2, 1, 1])
    # top-1 hits: row0 yes, row1 no, row2 no, row3 no -> 1/4
    # top-2: row0 {1,2} yes, row1 {0,2} yes, row2 {2,0} no (the tie goes to 0, not 1),
    # row3 {0,1} yes -> 3/4
    assert accuracy.accuracy(SCORES, labels, 1) == 0.25
    assert accuracy.accuracy(SCORES, labels, 2) == 0.75
    assert accuracy.topk_correct(SCORES, labels, 2).tolist() == [True, True, False, True]


def test_multilabel_any_correct_and_unlabelled_rows():
    labels = np.array(
        [[0, 1, 1], [0, 1, 1], [0, 0, 0], [1, 0, 0]]
    )  # row 2: no label -> not counted
    # top-1 in the label set: row0 (1 in {1,2}) yes, row1 (0) no, row3 (0) yes -> 2/3
    assert accuracy.accuracy(SCORES, labels, 1) == pytest.approx(2 / 3)
    assert accuracy.accuracy(SCORES, np.array([1, -1, -1, 0]), 1) == 1.0  # ids: -1 = no label


def test_real_accuracy_leaves_out_empty_sets():
    real = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0]])  # row 1 has no ReaL label
    # row0: top 1 in {1} yes; row2: top 2 in {0, 2} yes; row3: top 0 in {1} no -> 2/3
    assert accuracy.real_accuracy(SCORES, real) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no example has a label"):
        accuracy.real_accuracy(SCORES, np.zeros((4, 3)))


# --- OOD through label maps -----------------------------------------------------------------------

# 4 source classes -> 2 targets: t0 = {s0, s1}, t1 = {s2}; s3 belongs to no target.
MEMBERSHIP = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], bool)
OOD_SCORES = np.array(
    [
        [1.0, 4.0, 3.0, 0.0],  # max: t0=4, t1=3 -> t0; mean: t0=2.5, t1=3 -> t1
        [0.0, 0.0, 1.0, 9.0],  # restricted: t1; unrestricted argmax s3 (no target)
        [5.0, 0.0, 1.0, 0.0],
    ]
)  # t0 under both reductions
OOD_TRUTH = np.array([[1, 0], [0, 1], [0, 0]], bool)  # row 2: no target label -> not scored


def test_label_map_conventions_by_hand():
    correct, scored = ood.label_map_correct(OOD_SCORES, OOD_TRUTH, MEMBERSHIP, reduce="max")
    assert scored.tolist() == [True, True, False]
    assert correct.tolist() == [True, True, False]
    assert (
        ood.label_map_accuracy(OOD_SCORES, OOD_TRUTH, MEMBERSHIP, reduce="mean") == 0.5
    )  # row0 -> t1: wrong
    assert (
        ood.label_map_accuracy(OOD_SCORES, OOD_TRUTH, MEMBERSHIP, restrict=False) == 0.5
    )  # row1: s3 is wrong


def test_max_reduction_equals_argmax_over_the_mapped_union():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 4))
    union = np.flatnonzero(MEMBERSHIP.any(axis=1))
    best_source = union[np.argmax(scores[:, union], axis=1)]
    expected = np.argmax(MEMBERSHIP[best_source], axis=1)  # the target holding it
    truth = np.eye(2, dtype=bool)[expected]
    correct, _ = ood.label_map_correct(scores, truth, MEMBERSHIP, reduce="max")
    assert correct.all()


def test_target_truth_maps_split_labels():
    labels = np.array([[0, 0, 1, 0], [0, 0, 0, 1]])  # split in source classes: s2, s3
    assert ood.target_truth(labels, MEMBERSHIP).tolist() == [[False, True], [False, False]]


def test_crop_border_keeps_the_interior():
    images = np.ones((1, 8, 8, 3), np.float32)
    images[:, 2:6, 2:6, :] = 0.25  # the 4x4 interior left after a 2-px crop
    out = np.asarray(ood.crop_border(images, 2))
    assert out.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


# --- calibration ----------------------------------------------------------------------------------


def test_ece_equal_width_by_hand():
    conf = np.array([0.95, 0.95, 0.65, 0.62, 0.30])
    correct = np.array([1, 0, 1, 1, 0], bool)
    # 15 bins of width 1/15: 0.95 -> (14/15, 1]; 0.65 and 0.62 -> (9/15, 10/15];
    # 0.30 -> (4/15, 5/15]
    # |0.5 - 0.95| * 2/5 + |1 - 0.635| * 2/5 + |0 - 0.30| * 1/5 = 0.18 + 0.146 + 0.06
    assert calibration.ece(conf, correct) == pytest.approx(0.386)
    rel = calibration.reliability(conf, correct)
    assert (
        rel["count"][14] == 2
        and rel["count"][9] == 2
        and rel["count"][4] == 1
        and sum(rel["count"]) == 5
    )
    assert rel["accuracy"][0] is None  # empty bin


def test_ece_bin_edges_and_equal_mass():
    # a confidence exactly on an edge belongs to the lower bin: (lo, hi]
    assert calibration.bin_index(np.array([1 / 15, 0.0, 1.0])).tolist() == [0, 0, 14]
    conf = np.array([0.9, 0.2, 0.6, 0.8])
    correct = np.array([1, 0, 0, 1], bool)
    # 2 equal-mass bins: {0.2, 0.6} (acc 0, conf 0.4) and {0.8, 0.9} (acc 1, conf 0.85)
    assert calibration.ece(conf, correct, bins=2, scheme="mass") == pytest.approx(
        0.5 * 0.4 + 0.5 * 0.15
    )


def test_top_label_and_binary_confidence():
    conf, pred = calibration.top_label(np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert conf.tolist() == [0.8, 0.6] and pred.tolist() == [1, 0]
    conf, correct = calibration.binary_confidence(np.array([0.3, 0.9]), np.array([False, False]))
    assert conf.tolist() == [0.7, 0.9] and correct.tolist() == [True, False]


# --- fairness -------------------------------------------------------------------------------------


def test_subgroup_accuracy_and_dp_gap_by_hand():
    group = np.array([0, 0, 0, 1, 1])
    correct = np.array([1, 1, 0, 1, 0], bool)
    assert fairness.subgroup_accuracy(correct, group) == pytest.approx({0: 2 / 3, 1: 0.5})
    assert fairness.largest_gap({0: 2 / 3, 1: 0.5}) == pytest.approx(1 / 6)
    positive = np.array([1, 0, 0, 1, 1], bool)  # rates 1/3 and 1
    assert fairness.demographic_parity_gap(positive, group) == pytest.approx(2 / 3)
    # randomized: x = P(positive); expected accuracy = mean(x where label else 1 - x)
    assert fairness.expected_accuracy(
        np.array([0.8, 0.3]), np.array([True, False])
    ) == pytest.approx(0.75)


def test_randomized_threshold_by_hand():
    # group 0: p = 0.9 (y = 0.8), group 1: p = 0.1 (y = -0.8); rho = mean p = 0.5, gamma = 1.
    p = np.array([0.9, 0.9, 0.1, 0.1])
    group = np.array([0, 0, 1, 1])
    # eps = 0: both rates must be 0.5: clip(0.8 - t0) = 0.5 -> t0 = 0.3;
    # clip(-0.8 - t1) = 0.5 -> t1 = -1.3
    rule = fairness.fit_randomized_threshold(p, group, eps=0.0, gamma=1.0)
    assert rule.thetas == pytest.approx((0.3, -1.3), abs=1e-9)
    np.testing.assert_allclose(rule.predict(p, group), 0.5, atol=1e-9)
    # eps = 0.2: band [0.4, 0.6] -> t0 = 0.2 (rate 0.6), t1 = -1.2 (rate 0.4)
    rule = fairness.fit_randomized_threshold(p, group, eps=0.2, gamma=1.0)
    assert rule.thetas == pytest.approx((0.2, -1.2), abs=1e-9)
    # a tolerance the scores already meet leaves the unconstrained rule x = clip(y / gamma, 0, 1)
    rule = fairness.fit_randomized_threshold(p, group, eps=2.0, gamma=1.0)
    assert rule.thetas == (0.0, 0.0)
    np.testing.assert_allclose(rule.predict(p, group), [0.8, 0.8, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"group\(s\) \[7\] were not in the fitting data"):
        rule.predict(p, np.array([0, 0, 1, 7]))


def _biased_scores(n: int, seed: int):
    """A classifier whose positive rate depends on the group (group 1 gets higher scores)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 0.8 * group - 0.8)))
    label = rng.random(n) < p
    return p, label, group


def test_debiasing_frontier_guarantees():
    fit, evaluated = _biased_scores(600, 1), _biased_scores(400, 2)
    epsilons = (0.5, 0.2, 0.1, 0.05, 0.01, 0.0)
    rows = fairness.frontier(fit, evaluated, epsilons, gamma=0.1)
    assert [r["eps"] for r in rows] == sorted(epsilons, reverse=True)
    original = fairness.demographic_parity_gap(fit[0] >= 0.5, fit[2])
    assert original > 0.2  # the fixture is biased
    accs = [r["frontier"]["fit"]["accuracy"] for r in rows]
    for row in rows:
        assert (
            row["fit"]["dp_gap"] <= row["eps"] + 1e-9
        )  # the rule fitted at eps meets it on the fit split
        assert row["frontier"]["fit"]["dp_gap"] <= row["eps"] + 1e-9
        assert row["frontier_eps"] <= row["eps"]
        assert 0.0 <= row["eval"]["ece"] <= 1.0
    assert all(a >= b - 1e-12 for a, b in zip(accs, accs[1:]))  # non-increasing as eps shrinks
    assert accs[0] > accs[-1]  # parity costs accuracy here


# --- model-vs-human -------------------------------------------------------------------------------


def test_image_ids_and_texture_names():
    assert mvh.image_id("0000_cl_s01_bw_boat_40_n02951358_5952.JPEG") == "n02951358_5952.JPEG"
    assert mvh.image_id("airplane1-bicycle2.png") == "airplane1-bicycle2.png"
    assert mvh.image_id("0001_cc_dnn_airplane1-bicycle2.png") == "airplane1-bicycle2.png"
    assert mvh.image_id("cue/airplane/airplane1-bicycle2.png") == "airplane1-bicycle2.png"
    assert mvh.texture_category("XXX_dog10-bird2.png") == "bird"
    assert mvh.condition_from_name("0001_cl_s01_c50_boat_40_n02951358_5952.JPEG") == "c50"
    assert mvh.condition_from_name("airplane1-bicycle2.png") == mvh.NO_CONDITION


def test_decisions_average_probabilities_per_category():
    membership = np.array(
        [[1, 0], [1, 0], [0, 1]], bool
    )  # category 0 = classes {0, 1}, category 1 = {2}
    probs = np.array(
        [
            [0.5, 0.1, 0.4],  # means 0.3 vs 0.4 -> category 1 (max would say 0)
            [0.3, 0.3, 0.25],
        ]
    )  # 0.3 vs 0.25 -> category 0
    assert mvh.decisions(probs, membership).tolist() == [1, 0]


def _trials(subj, correct_pattern, names=("a.png", "b.png", "c.png", "d.png"), condition="c1"):
    return mvh.Trials.of(
        subj=[subj] * len(names),
        condition=[condition] * len(names),
        imagename=list(names),
        category=["cat"] * len(names),
        object_response=["cat" if c else "dog" for c in correct_pattern],
    )


def test_error_consistency_by_hand():
    # observed 2/4 agree; p1 = p2 = 1/2 -> expected 1/2 -> kappa 0
    c = mvh.consistency(_trials("m", [1, 1, 0, 0]), _trials("subject-01", [1, 0, 0, 1]))
    assert (c["observed-consistency"], c["expected-consistency"], c["error-consistency"]) == (
        0.5,
        0.5,
        0.0,
    )
    # observed 3/4; p1 = 3/4, p2 = 1/2 -> expected 3/8 + 1/8 = 1/2 -> kappa (3/4 - 1/2)/(1/2) = 1/2
    c = mvh.consistency(_trials("m", [1, 1, 1, 0]), _trials("subject-01", [1, 1, 0, 0]))
    assert c["error-consistency"] == pytest.approx(0.5)
    # perfect agreement -> kappa 1, also when both are always right (expected = 1: no 0/0)
    assert (
        mvh.consistency(_trials("m", [1, 0, 1, 0]), _trials("s", [1, 0, 1, 0]))["error-consistency"]
        == 1.0
    )
    assert (
        mvh.consistency(_trials("m", [1, 1, 1, 1]), _trials("s", [1, 1, 1, 1]))["error-consistency"]
        == 1.0
    )
    # pairing is by image id, not by row order
    shuffled = _trials(
        "s", [0, 1, 0, 0], names=("d.png", "c.png", "b.png", "a.png")
    )  # = [0, 0, 1, 0] in a..d
    assert mvh.consistency(_trials("m", [0, 0, 1, 0]), shuffled)["error-consistency"] == 1.0
    with pytest.raises(ValueError, match="image 'e.png' seen by 's' has no trial"):
        mvh.consistency(_trials("m", [1, 1, 1, 1]), _trials("s", [1], names=("e.png",)))


def test_shape_bias_drops_no_conflict_rows():
    shape = ["cat", "cat", "dog", "dog", "car", "car"]
    texture = ["dog", "dog", "cat", "car", "car", "dog"]  # row 4: shape == texture -> dropped
    decision = ["cat", "dog", "dog", "boat", "car", "dog"]
    # conflict rows 0,1,2,3,5: shape hits rows 0, 2 = 2; texture hits rows 1, 5 = 2; row 3 neither
    result = mvh.shape_bias(decision, shape, texture)
    assert result == {
        "fraction-correct-shape": 2 / 6,
        "fraction-correct-texture": 2 / 6,
        "shape-bias": 0.5,
    }
    assert mvh.shape_bias(["cat"], ["cat"], ["dog"])["shape-bias"] == 1.0


def _write_raw(root, dataset, subject, rows):
    directory = root / dataset
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["subj,session,trial,rt,object_response,category,condition,imagename"]
    lines += [
        f"{subject},1,{i + 1},700,{resp},{cat},{cond},{i:04d}_x_{subject}_{cond}_{cat}_{name}"
        for i, (name, cat, resp, cond) in enumerate(rows)
    ]
    (directory / f"{dataset}_{subject}_session_1.csv").write_text("\n".join(lines) + "\n")


def test_benchmark_aggregates_per_condition_then_subject(tmp_path):
    # contrast: c100 is excluded by the toolbox; conditions c50 and c10 count.
    images = [("i1.png", "cat"), ("i2.png", "cat"), ("i3.png", "dog"), ("i4.png", "dog")]
    conds = ["c50", "c50", "c10", "c10"]
    _write_raw(
        tmp_path,
        "contrast",
        "subject-01",
        [(n, c, c, k) for (n, c), k in zip(images, conds)] + [("i5.png", "cat", "dog", "c100")],
    )
    _write_raw(
        tmp_path,
        "contrast",
        "subject-02",
        [(n, c, r, k) for (n, c), r, k in zip(images, ["cat", "dog", "dog", "na"], conds)],
    )
    humans = mvh.read_raw_data(tmp_path, "contrast")
    assert len(humans) == 9 and humans.subjects(humans=True) == ["subject-01", "subject-02"]
    # the model: right on i1, i3; wrong on i2, i4 (its names carry no condition: taken from the
    # humans)
    model = mvh.Trials.of(
        subj=["vit"] * 5,
        condition=["NaN"] * 5,
        imagename=["i1.png", "i2.png", "i3.png", "i4.png", "i5.png"],
        category=["cat", "cat", "dog", "dog", "cat"],
        object_response=["cat", "dog", "dog", "cat", "cat"],
    )
    rows, summary, reference = mvh.benchmark(model, humans, "contrast")
    assert {r["condition"] for r in rows} == {"c50", "c10"}
    # per condition (model acc 1/2 in both): vs subject-01 (acc 1): diff 1/4, obs 1/2, kappa 0;
    # vs subject-02: c50 (s02 = [1, 0]: acc 1/2) diff 0, obs 1, kappa 1; c10 (s02 = [1, 0]) the
    # same.
    # means over conditions, then subjects: diff (1/4 + 0)/2; obs (1/2 + 1)/2 = 3/4;
    # kappa (0 + 1)/2 = 1/2
    assert summary == pytest.approx(
        {
            "OOD accuracy": 0.5,
            "accuracy difference": 0.125,
            "observed consistency": 0.75,
            "error consistency": 0.5,
        }
    )
    # humans: the one pair (01, 02): per condition diff 1/4, obs 1/2, kappa 0; OOD accuracy pooled
    # 6/8
    assert reference == pytest.approx(
        {
            "OOD accuracy": 0.75,
            "accuracy difference": 0.25,
            "observed consistency": 0.5,
            "error consistency": 0.0,
        }
    )
    assert set(rows[0]) == {"model", "human", "dataset", "metric", "condition", "value"}
    assert mvh.mean_over_datasets({"a": {"x": 1.0}, "b": {"x": 0.0, "y": 2.0}}) == {
        "x": 0.5,
        "y": 2.0,
    }


def test_raw_data_errors_name_the_file(tmp_path):
    (tmp_path / "cue-conflict").mkdir()
    bad = tmp_path / "cue-conflict" / "cue-conflict_subject-01_session_1.csv"
    bad.write_text("subj,object_response,category,imagename\nsubject-01,cat,cat,a.png\n")
    with pytest.raises(ValueError, match=rf"{bad}: column 'condition' is missing"):
        mvh.read_raw_data(tmp_path, "cue-conflict")
    with pytest.raises(ValueError, match="no CSV files"):
        mvh.read_raw_data(tmp_path, "sketch")


def test_trials_csv_round_trip(tmp_path):
    trials = _trials("vit", [1, 0, 1, 1])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "d_vit_session_1.csv").write_text(trials.csv_text())
    back = mvh.read_raw_data(tmp_path, "d")
    assert back.object_response.tolist() == trials.object_response.tolist()
    assert back.imagename.tolist() == trials.imagename.tolist()
