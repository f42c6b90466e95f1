"""The progress line's ETA (sweep.runner.EtaEstimator): per kind of trial, concurrency-aware, and not
growing while the last long trials run. Pure: simulated clocks and rows, no Ray."""
from datetime import datetime, timedelta, timezone

import pytest

from sweep.runner import EtaEstimator, _Sink, cost_key, format_seconds

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(key, defense, *, start, defense_s, attack_s=None, cached=None, status="ok", overhead=2.0):
    """A finished trial's row as the engine writes it: its wall time is its defense, its build (when it
    built the model) and ``overhead``."""
    wall = defense_s + overhead + (attack_s if cached is False else 0.0)
    return {"model_key": key, "defense": defense, "status": status, "defense_seconds": defense_s,
            "attack_seconds": attack_s, "attack_cached": cached,
            "started_at": (T0 + timedelta(seconds=start)).isoformat(),
            "finished_at": (T0 + timedelta(seconds=start + wall)).isoformat()}


class _Writer:
    """A results writer that keeps nothing (the progress line is what these tests read)."""

    def add(self, r):
        return False

    def close(self):
        pass


def old_eta(elapsed, finished, total):
    """The estimate this replaces: the mean of finished trials times the trials left."""
    return elapsed / finished * (total - finished)


def test_10_of_12_done_two_abl_trials_training_the_eta_falls_with_their_time():
    """Five models built (100 s each), ten post-training trials done (none: 0.5 s, finetune: 20 s), then two
    ABL trials (a training-time defense, none finished yet) run on the two slots. The ETA is ABL's estimate
    (a model's training, since no ABL has finished) less the time they have run: it falls by the second
    and stays at zero if they overrun, where the mean-based estimate grew with every second they ran."""
    keys = [f"m{i}" for i in range(5)]
    queued = [(k, d) for k in keys for d in ("none", "finetune")] + [("m0", "abl"), ("m1", "abl")]
    eta = EtaEstimator(queued, training_time={"abl"}, slots=None)
    now, i = 0.0, 0
    for k in keys:  # two slots: the builder of each model, then its second trial
        for d, secs in (("none", 0.5), ("finetune", 20.0)):
            eta.start(f"t{i}", k, d, now)
            builds = d == "none"
            r = row(k, d, start=now, defense_s=secs, attack_s=100.0, cached=not builds)
            now += secs + 2.0 + (100.0 if builds else 0.0)
            eta.finish(f"t{i}", r, now)
            i += 1
    eta.peak = 2  # two trials ran at a time
    eta.start("abl0", "m0", "abl", now)
    eta.start("abl1", "m1", "abl", now + 5)
    start, finished, total = now, 10, 12
    etas, olds = [], []
    for dt in range(10, 200, 10):
        etas.append(eta.eta(start + dt))
        olds.append(old_eta(start + dt, finished, total))
    expected = 100.0 + 2.0  # a build's time (ABL's fallback) plus the mean overhead
    assert etas[0] == pytest.approx(expected + 5 - 10)  # the later ABL trial, 5 s younger, ends last
    assert all(b <= a for a, b in zip(etas, etas[1:])), etas  # never grows
    assert etas[5] == pytest.approx(etas[0] - 50)  # falls with the clock
    assert etas[-1] == 0.0  # overrunning trials: "any moment now", not a negative time
    assert all(b > a for a, b in zip(olds, olds[1:]))  # what the old line did meanwhile

    # the first ABL finishes after 150 s of defense: the other's estimate becomes 150 s
    eta.finish("abl0", row("m0", "abl", start=start, defense_s=150.0), start + 152)
    assert eta.eta(start + 152) == pytest.approx(150.0 + 2.0 - 147.0)


def test_each_remaining_trial_is_estimated_by_its_kind():
    """A model to build costs its build once (trials sharing a model_key build it once; a model in the
    store costs nothing), a post-training defense its own defense time, and concurrency spreads the queue."""
    eta = EtaEstimator([("m0", "none"), ("m0", "finetune")], training_time={"abl"})
    eta.start("a", "m0", "none", 0.0)
    eta.finish("a", row("m0", "none", start=0, defense_s=0.0, attack_s=100.0, cached=False, overhead=0.0), 100.0)
    eta.start("b", "m0", "finetune", 100.0)
    eta.finish("b", row("m0", "finetune", start=100, defense_s=10.0, attack_s=100.0, cached=True, overhead=0.0), 110.0)
    assert eta.eta(110.0) == 0.0
    # four finetune trials: two on a model to build (m5), two on one already in the store (m6)
    eta.queued.update({("m5", ("finetune", None)): 2, ("m6", ("finetune", None)): 2})  # (key, (name, variant))
    eta.have_models.add("m6")
    assert eta.eta(110.0) == pytest.approx(110 + 10 + 10 + 10)  # one slot: the build, then 4 × 10 s
    eta.peak = 2
    assert eta.eta(110.0) == pytest.approx(110)  # two slots: the builder on one, the three others beside it
    eta.slots = 1  # max_concurrent caps the slots seen
    assert eta.eta(110.0) == pytest.approx(140)
    # a builder running for 30 s has 80 s left
    eta.start("c", "m5", "finetune", 110.0)
    assert eta.running["c"][3] is True  # it builds m5; the other m5 trial will not
    assert eta.eta(140.0) == pytest.approx(80 + 30)


def test_unknown_until_a_figure_exists_then_fallbacks():
    eta = EtaEstimator([("m0", "ibau"), ("m1", "abl")], training_time={"abl"})
    assert eta.eta(0.0) is None  # nothing finished: no figure to go by
    eta.start("a", "m0", "ibau", 0.0)
    eta.finish("a", row("m0", "ibau", start=0, defense_s=30.0, attack_s=60.0, cached=False, overhead=0.0), 90.0)
    # ABL: no training-time defense finished: a model's build time stands in (it trains one)
    assert eta.defense_time("abl") == pytest.approx(60.0)
    assert eta.eta(90.0) == pytest.approx(60.0)
    # a post-training defense never seen: the mean of its kind
    assert eta.defense_time("awm") == pytest.approx(30.0)
    # failed and stopped rows count as done but do not set the figures
    eta.finish("x", {**row("m1", "abl", start=0, defense_s=1.0), "status": "failed"}, 91.0)
    assert eta.defense_time("abl") == pytest.approx(60.0) and eta.eta(91.0) == 0.0


def test_the_progress_line_shows_the_estimate(capsys):
    eta = EtaEstimator([("m0", "none")] * 3)
    sink = _Sink(_Writer(), None, total=4, show=True, eta=eta)
    sink.tracker = type("T", (), {"log_many": lambda self, items: None})()
    r = row("m0", "none", start=0, defense_s=1.0, attack_s=5000.0, cached=False, overhead=0.0)
    sink._record({**r, "trial_id": "t0"}, {}, {}, "t0")
    sink._progress(force=True)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("[sweep] 1/4 done") and line.endswith("eta 2s"), line  # two 1-second trials left


@pytest.mark.parametrize("s,text", [(45, "45s"), (725, "12m05s"), (11220, "3h07m"), (187200, "2d04h")])
def test_durations_read_at_a_glance(s, text):
    assert format_seconds(s) == text


def test_a_defense_not_seen_finishing_is_not_estimated_by_the_none_rows():
    """The none rows finish first and cost nothing; the queued ANP trials must not inherit that: they take
    at least as long as the ANP trial already running has run."""
    eta = EtaEstimator([("m", "none"), ("m", "anp"), ("m", "anp"), ("m", "anp")], have_models={"m"}, slots=1)
    eta.start("t0", "m", "none", 0.0)
    eta.finish("t0", {"model_key": "m", "defense": "none", "status": "ok", "defense_seconds": 0.0,
                      "attack_cached": True}, 1.0)
    eta.start("t1", "m", "anp", 1.0)
    # nothing of ANP has finished: each queued ANP trial takes at least what the running one has run
    assert eta.eta(2.0) == pytest.approx(2 * 1.0)
    assert eta.eta(61.0) == pytest.approx(2 * 60.0)  # the estimate grows with the evidence, not from 0 s


def test_a_first_build_is_projected_at_its_own_pace():
    """The first hour of a day-long sweep: no model has finished, so without the build's epochs the ETA is
    unknown. With them each running build is projected at its pace (seconds x epochs / epoch) and the
    queued models to build take the running builds' projections."""
    eta = EtaEstimator([("m0", "none"), ("m1", "none")], slots=1)
    eta.start("a", "m0", "none", 0.0)
    assert eta.eta(60.0) is None  # no figure at all
    eta.build_progress("a", {"model_key": "m0", "epoch": 5, "epochs": 20, "seconds": 300.0}, 300.0)
    assert eta.build_proj["a"] == pytest.approx(1200.0)
    # a: 1200 s build of which 300 run; m1's builder after it takes the same 1200 s
    assert eta.eta(300.0) == pytest.approx(900.0 + 1200.0)
    # the pace changes: the projection follows
    eta.build_progress("a", {"model_key": "m0", "epoch": 10, "epochs": 20, "seconds": 800.0}, 800.0)
    assert eta.eta(800.0) == pytest.approx(800.0 + 1600.0)
    # an epoch of a model for another key (an attack's clean reference model) is not this trial's build
    eta.build_progress("a", {"model_key": "ref", "epoch": 1, "epochs": 20, "seconds": 10.0}, 810.0)
    assert eta.build_proj["a"] == pytest.approx(1600.0)
    # once the build finishes, its measured time replaces the projections
    eta.finish("a", row("m0", "none", start=0, defense_s=0.0, attack_s=1500.0, cached=False, overhead=0.0), 1500.0)
    assert "a" not in eta.build_proj
    assert eta.eta(1500.0) == pytest.approx(1500.0)


def test_the_progress_line_names_the_build_and_its_epoch(capsys):
    class Trial:
        trial_id = "t0"
        config = {"trial": '{"model_key": "b9bd9f6c500c932f", "defense": {"name": "none"}}'}

    eta = EtaEstimator([("b9bd9f6c500c932f", "none")], slots=1)
    sink = _Sink(_Writer(), None, total=1, show=True, eta=eta)
    sink.on_trial_start(0, [], Trial())
    result = {"build_json": '{"model_key": "b9bd9f6c500c932f", "epoch": 7, "epochs": 20, "seconds": 70.0}'}
    sink.on_trial_result(0, [], Trial(), result)
    assert result == {}  # popped: Tune keeps no copy of it
    sink._progress(force=True)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 running (building b9bd9f6c: epoch 7/20)" in line, line
    assert not line.endswith("eta ?"), line  # 13 of the build's 20 epochs at 10 s each are left
    sink.on_trial_complete(0, [], Trial())
    assert sink.building == {}


def test_a_trial_reports_each_epoch_of_the_model_it_builds_and_none_of_a_cached_one(tmp_path):
    from sweep.spec import expand, parse_spec
    from sweep.store import Store
    from sweep.trial import execute

    spec = {"name": "progress", "dataset": {"name": "synthetic", "train_size": 200, "test_size": 50},
            "model": "small_cnn", "train": {"epochs": 3}, "seeds": [0],
            "attacks": [{"name": "badnets"}], "defenses": [{"name": "none"}]}
    (trial,) = expand(parse_spec(spec))
    store, seen = Store(tmp_path), []
    row = execute(trial, store, progress=seen.append).row
    assert row["status"] == "ok", row["error"]
    assert [(r["model_key"], r["epoch"], r["epochs"]) for r in seen] == [(trial.model_key, e, 3) for e in (1, 2, 3)]
    assert 0 < seen[0]["seconds"] <= seen[1]["seconds"] <= seen[2]["seconds"] <= row["attack_seconds"]
    seen.clear()
    assert execute(trial, store, progress=seen.append).row["attack_cached"] is True and seen == []


def test_a_variant_is_estimated_by_its_own_figures_before_its_names_mean():
    """I-BAU with 5,000 clean images costs 40x I-BAU with 100 (seeds spec: ~1,000 s against ~25 s): the
    mean of both (512 s) would underestimate the long one, and a time limit would start it too late."""
    big, small = ("ibau", "v5000"), ("ibau", "v100")
    eta = EtaEstimator([("m", big), ("m", small), ("m", big)], have_models={"m"}, slots=1)
    eta.start("a", "m", big, 0.0)
    eta.finish("a", row("m", "ibau", start=0, defense_s=1000.0, attack_s=50.0, cached=True, overhead=0.0), 1000.0)
    eta.start("b", "m", small, 1000.0)
    eta.finish("b", row("m", "ibau", start=1000, defense_s=25.0, attack_s=50.0, cached=True, overhead=0.0), 1025.0)
    assert eta.estimate("m", big, 1025.0) == pytest.approx(1000.0)
    assert eta.estimate("m", small, 1025.0) == pytest.approx(25.0)
    assert eta.eta(1025.0) == pytest.approx(1000.0)  # the one left is the long one
    # a variant never seen: its name's mean; a bare name (a search's trials): the same
    assert eta.estimate("m", ("ibau", "v500"), 1025.0) == pytest.approx(512.5)
    assert eta.estimate("m", "ibau", 1025.0) == pytest.approx(512.5)


def test_an_earlier_pieces_rows_estimate_this_piece_from_its_first_trial():
    """learn(): the rows a results directory holds from earlier runs give the figures before this run has
    finished anything; this run's own figures of the same variant then replace them."""
    big = ("ibau", "v5000")
    past = [{**row("m0", "ibau", start=0, defense_s=1000.0, attack_s=1500.0, cached=False, overhead=0.0),
             "trial_id": "old1", "defense_key": "v5000"},
            {**row("m0", "ibau", start=0, defense_s=25.0, attack_s=1500.0, cached=True, overhead=0.0),
             "trial_id": "old2"},  # written before rows had defense_key: the spec's map names its variant
            {**row("m0", "ibau", start=0, defense_s=9999.0), "trial_id": "old3", "status": "failed"}]
    eta = EtaEstimator([("m1", big), ("m1", ("ibau", "v100"))], slots=1)
    assert eta.eta(0.0) is None
    eta.learn(past, {"old2": ("ibau", "v100")})
    assert eta.estimate("m1", big, 0.0) == pytest.approx(1500.0 + 1000.0)  # a build (the past's) + the defense
    assert eta.eta(0.0) == pytest.approx(1500.0 + 1000.0 + 25.0)
    assert eta.defense_time(("ibau", "v500")) == pytest.approx(512.5)  # the name's mean, failed row left out
    eta.start("a", "m1", big, 0.0)
    eta.finish("a", row("m1", "ibau", start=0, defense_s=600.0, attack_s=1200.0, cached=False, overhead=0.0), 1800.0)
    assert eta.defense_time(big) == pytest.approx(600.0)  # this machine's own figure, not the past's
    assert eta.build_time() == pytest.approx(1200.0)


def test_a_searched_trial_queued_by_name_leaves_the_queue_when_it_starts_under_its_variant():
    """A search's trials are queued by their defense's name (their parameters are not drawn yet); each starts
    with its own variant. It must leave the queue then, and go back to it if Tune retries it."""
    eta = EtaEstimator([("m", "ibau")] * 3, have_models={"m"}, slots=1)
    eta.own.by_name = {"ibau": [100.0]}
    assert eta.eta(0.0) == pytest.approx(300.0)
    eta.start("a", "m", ("ibau", "drawn1"), 0.0)
    assert eta.queued[("m", ("ibau", None))] == 2
    assert eta.eta(40.0) == pytest.approx(60.0 + 200.0)
    eta.abandon("a")
    assert eta.queued[("m", ("ibau", None))] == 3 and eta.eta(40.0) == pytest.approx(300.0)


def test_a_variant_never_seen_is_scaled_from_its_names_variants_by_their_work():
    """Seen on the I-BAU release (2026-12-07): the piece at 5,000 clean images, never run before, was
    estimated at the name's mean over 500- and 100-image rows (~150 s) where it takes ~10 times that. With
    the defenses' work (rounds x clean images for I-BAU) it is scaled from the variants seen."""
    v100, v500, v5000, v200 = ("ibau", "v100"), ("ibau", "v500"), ("ibau", "v5000"), ("ibau", "v200")
    works = {v100: 5 * 100, v500: 5 * 500, v5000: 5 * 5000, v200: 5 * 200}
    eta = EtaEstimator([("m", v5000), ("m", v200)], have_models={"m"}, slots=1, works=works)
    eta.learn([{**row("m", "ibau", start=0, defense_s=25.0, overhead=0.0), "defense_key": "v100"},
               {**row("m", "ibau", start=0, defense_s=80.0, overhead=0.0), "defense_key": "v500"}])
    assert eta.defense_time(v5000) == pytest.approx(800.0)  # beyond the seen: in proportion to the nearest
    assert eta.defense_time(v200) == pytest.approx(25.0 + 55.0 * 500 / 2000)  # between: the line
    assert eta.defense_time(("ibau", "unknown")) == pytest.approx(52.5)  # no work known: the name's mean
    assert eta.eta(0.0) == pytest.approx(800.0 + 25.0 + 55.0 * 500 / 2000)
    eta.start("a", "m", v5000, 0.0)
    eta.finish("a", row("m", "ibau", start=0, defense_s=600.0, overhead=0.0), 600.0)
    assert eta.defense_time(v5000) == pytest.approx(600.0)  # its own figure, once it has one


def test_the_defenses_say_what_their_variants_compute():
    """Defense.work for the ETA, from a spec's trials: I-BAU scales with rounds x clean images, AWM's phases
    are sized for at least min_samples images (100 and 500 clean images cost the same), a defense that does
    not say gives None (the name's mean then)."""
    from sweep.runner import defense_work
    from sweep.spec import expand, parse_spec

    spec = parse_spec({"name": "w", "dataset": {"name": "synthetic", "train_size": 2000}, "model": "small_cnn",
                       "attacks": [{"name": "badnets"}],
                       "defenses": [{"name": "ibau", "clean_size": [100, 500]}, {"name": "ibau", "rounds": 10,
                                    "clean_size": 100}, {"name": "awm", "clean_size": [100, 500, "one_shot"]},
                                    {"name": "finetune", "clean_size": 0.05}, {"name": "clp"}]})
    works = [(t.defense.name, t.defense.params.get("clean_size"), defense_work(t.defense.name, t.defense.params, t.dataset))
             for t in expand(spec)]
    by = {(n, cs, w) for n, cs, w in works}
    assert ("ibau", 100, 500) in by and ("ibau", 500, 2500) in by and ("ibau", 100, 1000) in by
    awm = {w for n, _, w in works if n == "awm"}
    assert len(awm) == 1 and awm.pop() == 10 * 512 * 10
    assert ("finetune", 0.05, 20 * 100) in by
    assert ("clp", None, None) in by


def test_rows_of_a_configuration_the_spec_no_longer_holds_still_scale_by_their_parameters():
    """The release's first piece ran I-BAU with defaults since changed, before rows had defense_key: those rows
    match no trial of the spec. Their defense.* columns (Parquet's floats for counts) give their work, so a
    new configuration is scaled from them instead of estimated at the name's mean."""
    from sweep.spec import expand, parse_spec

    spec = parse_spec({"name": "w", "dataset": {"name": "synthetic", "train_size": 2000}, "model": "small_cnn",
                       "attacks": [{"name": "badnets"}], "defenses": [{"name": "ibau", "clean_size": 1000}]})
    todo = expand(spec)
    old = [{**row(todo[0].model_key, "ibau", start=0, defense_s=s, overhead=0.0), "trial_id": f"gone{i}",
            "defense.clean_size": float(n), "defense.rounds": 5.0, "defense.portion": 0.1, "defense.lr": None}
           for i, (n, s) in enumerate([(500, 80.0), (100, 20.0)])]
    eta = EtaEstimator.for_trials(todo, todo, old, have_models={todo[0].model_key}, training_time=set(), slots=1)
    new = cost_key(todo[0].defense.as_dict())
    assert eta.estimate(todo[0].model_key, new, 0.0) == pytest.approx(160.0)  # 1,000 images: twice the 500-image row
